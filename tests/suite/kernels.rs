//! The host's idea of each kernel configuration against the WGSL itself: the workgroup memory
//! the host budgets for must be what the shader declares once its overrides are applied (a
//! configuration over the adapter's limit can hang a driver instead of failing). Forward and
//! backward kernels alike.

use blockflash::kernel::{
    backward_layout, backward_module_source, emulated_tensor_core_backward_source,
    emulated_tensor_core_source, module_source, BackwardPass, KernelConfig, BACKWARD_PRE_THREADS,
    EMULATION_BYTES_PER_INVOCATION,
};
use blockflash::Tier;
use wgpu::naga;

/// Every kernel tier.
const TIERS: [Tier; 4] = [
    Tier::PortableF32,
    Tier::PortableF16,
    Tier::PortableBf16,
    Tier::TensorCore,
];

/// Bytes of workgroup memory that the `main` entry point of `tier`'s module declares for `c`
/// (with subgroups and row reductions through workgroup memory, the most it can declare).
fn declared_workgroup_bytes(tier: Tier, c: &KernelConfig) -> u32 {
    declared_bytes(&module_source(tier, true), "main", &forward_constants(c))
}

/// The overrides that size the forward kernels' workgroup memory for `c`.
fn forward_constants(c: &KernelConfig) -> Vec<(&'static str, usize)> {
    let mut constants = vec![
        ("BR", c.tile_rows),
        ("BC", c.tile_cols),
        ("D", c.head_dim),
        ("THREADS", c.threads()),
        ("DC", c.dc),
    ];
    if c.tier == Tier::TensorCore {
        constants.push(("SPLIT", c.tx / 2));
    } else {
        constants.push(("TX", c.tx));
    }
    constants
}

/// Bytes of workgroup memory that module `src` declares once `constants` are applied for
/// `entry` (the workgroup variables that the entry point uses).
fn declared_bytes(src: &str, entry: &str, constants: &[(&str, usize)]) -> u32 {
    let module = specialised(src, entry, constants);
    let gctx = module.to_ctx();
    module
        .global_variables
        .iter()
        .filter(|(_, v)| v.space == naga::AddressSpace::WorkGroup)
        .map(|(_, v)| {
            let ty = &module.types[v.ty].inner;
            match *ty {
                naga::TypeInner::Array {
                    size: naga::ArraySize::Pending(o),
                    stride,
                    ..
                } => {
                    let n = match module.overrides[o]
                        .init
                        .map(|e| &module.global_expressions[e])
                    {
                        Some(naga::Expression::Literal(naga::Literal::U32(n))) => *n,
                        other => panic!("array size not resolved: {other:?}"),
                    };
                    n * stride
                }
                _ => ty.size(gctx),
            }
        })
        .sum()
}

/// Module `src` with `constants` applied, compacted to what `entry` uses.
fn specialised(src: &str, entry: &str, constants: &[(&str, usize)]) -> naga::Module {
    let module = naga::front::wgsl::parse_str(src).expect("kernel WGSL parses");
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .expect("kernel WGSL validates");
    let constants: naga::back::PipelineConstants = constants
        .iter()
        .map(|&(k, v)| (k.to_string(), v as f64))
        .collect();
    let (module, _) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, entry)),
        &constants,
    )
    .expect("overrides apply");
    module.into_owned()
}

#[test]
fn host_workgroup_budget_matches_the_shaders_declarations() {
    // Roomy limits, the H200's (48 KiB: output staged in chunks, two subgroups per 16 rows),
    // 256 invocations (one subgroup per 16 rows at 128-row tiles) and the WebGPU baseline.
    let mut configs = std::collections::HashSet::new();
    for (bytes, invocations) in [
        (1 << 20, 1024),
        (48 << 10, 1024),
        (48 << 10, 256),
        (16 << 10, 256),
    ] {
        let limits = wgpu::Limits {
            max_compute_workgroup_storage_size: bytes,
            max_compute_invocations_per_workgroup: invocations,
            max_compute_workgroup_size_x: invocations,
            ..wgpu::Limits::default()
        };
        for tier in TIERS {
            for d in blockflash::shape::HEAD_DIMS {
                configs.extend(KernelConfig::candidates(&limits, tier, d));
            }
        }
    }
    let splits: std::collections::BTreeSet<(usize, bool)> = configs
        .iter()
        .filter(|c| c.tier == Tier::TensorCore)
        .map(|c| (c.tx / 2, c.dc < c.head_dim))
        .collect();
    assert_eq!(
        splits.into_iter().collect::<Vec<_>>(),
        [(1, false), (1, true), (2, false), (2, true)],
        "both tensor-core layouts, with the output staged whole and in chunks"
    );
    for c in configs {
        let tier = c.tier;
        let declared = declared_workgroup_bytes(tier, &c) as usize;
        assert_eq!(
            declared,
            c.workgroup_bytes(),
            "{tier} {c:?}: the shader declares {declared} bytes, the host budgets {}",
            c.workgroup_bytes()
        );
        // Gpu::with_tensor_core_emulation leaves room for 128 invocations' scratch and
        // offers no wider workgroups.
        if tier == Tier::TensorCore && c.threads() <= 128 {
            let emulated = declared_bytes(
                &emulated_tensor_core_source(),
                "main",
                &forward_constants(&c),
            );
            let scratch = c.threads() * EMULATION_BYTES_PER_INVOCATION;
            assert_eq!(emulated as usize, c.workgroup_bytes() + scratch, "{c:?}");
        }
    }
}

#[test]
fn backward_workgroup_budget_matches_the_shader_and_fits_the_baseline() {
    // The WebGPU baseline: 16 KiB of workgroup memory, 256 invocations.
    let baseline = wgpu::Limits::downlevel_defaults();
    let big = wgpu::Limits {
        max_compute_workgroup_storage_size: 1 << 20,
        max_compute_invocations_per_workgroup: 1024,
        max_compute_workgroup_size_x: 1024,
        ..wgpu::Limits::default()
    };
    // The baseline, lavapipe's 32 KiB and NVIDIA's 48 KiB.
    let limits = [16 << 10, 32 << 10, 48 << 10].map(|bytes| wgpu::Limits {
        max_compute_workgroup_storage_size: bytes,
        ..baseline.clone()
    });
    for tier in TIERS {
        for d in blockflash::shape::HEAD_DIMS {
            // Plans of the other tiles run their backward through a 64x32 plan.
            let taken = KernelConfig::candidates(&big, tier, d)
                .into_iter()
                .filter(KernelConfig::backward_takes_tiles);
            for c in taken {
                let mut specialisations = vec![(
                    "pre",
                    false,
                    vec![("D", d), ("THREADS", BACKWARD_PRE_THREADS)],
                    0,
                )];
                for limits in &limits {
                    // Short walks and long ones (steps of one tile and of several).
                    let cases = [("dkdv", BackwardPass::DkDv), ("dq", BackwardPass::Dq)]
                        .into_iter()
                        .flat_map(|case| [(case, 1), (case, 64)]);
                    for ((entry, pass), walk) in cases {
                        let l = backward_layout(&c, pass, limits, &[walk])
                            .unwrap_or_else(|| panic!("{tier} {c:?} {entry}: no layout fits"));
                        assert!(
                            l.workgroup_bytes()
                                <= limits.max_compute_workgroup_storage_size as usize
                        );
                        // Tensor-core plans get tensor-core gradients within NVIDIA's limits;
                        // other tiers never do.
                        if tier != Tier::TensorCore {
                            assert!(!l.tensor_cores, "{tier} {c:?} {entry}");
                        } else if limits.max_compute_workgroup_storage_size == 48 << 10 {
                            assert!(l.tensor_cores, "{tier} {c:?} {entry}");
                        }
                        let constants: Vec<_> = l
                            .constants()
                            .into_iter()
                            .map(|(name, v)| (name, v as usize))
                            .collect();
                        specialisations.push((
                            entry,
                            l.tensor_cores,
                            constants,
                            l.workgroup_bytes(),
                        ));
                    }
                }
                for (entry, tensor_cores, constants, budget) in specialisations {
                    let src = backward_module_source(tier.dtype(), tensor_cores);
                    // Naga keeps only what the entry point uses.
                    let declared = declared_bytes(&src, entry, &constants) as usize;
                    assert_eq!(
                        declared, budget,
                        "{tier} {c:?} {entry} {constants:?}: declares {declared}, budget {budget}"
                    );
                    // The emulation adds its scratch, within the room Gpu leaves for it (wider
                    // workgroups, two subgroups per 16 rows of a 64-row dQ tile, are not
                    // offered where the products are emulated).
                    let threads = constants.iter().find(|(n, _)| *n == "THREADS").unwrap().1;
                    if tensor_cores && threads <= 128 {
                        let emulated = declared_bytes(
                            &emulated_tensor_core_backward_source(),
                            entry,
                            &constants,
                        ) as usize;
                        assert_eq!(
                            emulated,
                            budget + threads * EMULATION_BYTES_PER_INVOCATION,
                            "{c:?} {entry}"
                        );
                    }
                    // The WebGPU baseline allows 8 storage buffers per shader stage.
                    let module = specialised(&src, entry, &constants);
                    let storage = module
                        .global_variables
                        .iter()
                        .filter(|(_, v)| matches!(v.space, naga::AddressSpace::Storage { .. }))
                        .count();
                    assert!(storage <= 8, "{entry} binds {storage} storage buffers");
                }
            }
        }
    }
}

#[test]
fn subgroup_operations_stay_out_of_the_tensor_core_module_and_devices_without_them() {
    // Subgroup built-in functions (subgroupAdd, subgroupShuffleXor, ...) and values
    // (subgroup_size, subgroup_invocation_id, ...), not the word in comments.
    let uses_subgroups = |src: &str| {
        src.match_indices("subgroup").any(|(i, _)| {
            let next = src[i + "subgroup".len()..].chars().next();
            next.is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        })
    };
    // One NVIDIA driver crashed on a module mixing cooperative matrices and subgroup operations.
    for subgroups in [false, true] {
        assert!(!uses_subgroups(&module_source(Tier::TensorCore, subgroups)));
    }
    assert!(!uses_subgroups(&backward_module_source(
        blockflash::kernel::DType::F16,
        true
    )));
    for tier in [Tier::PortableF32, Tier::PortableF16, Tier::PortableBf16] {
        let without = module_source(tier, false);
        assert!(!uses_subgroups(&without), "{tier}");
        let with = module_source(tier, true);
        assert!(uses_subgroups(&with), "{tier}");
        // Both variants of the row reductions specialise and validate.
        for (src, red) in [(&without, 0), (&with, 0), (&with, 1)] {
            let constants = [
                ("BR", 16),
                ("BC", 32),
                ("D", 64),
                ("THREADS", 128),
                ("DC", 64),
                ("TX", 8),
                ("SUBGROUP_RED", red),
            ];
            let module = specialised(src, "main", &constants);
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{tier} SUBGROUP_RED={red}: {e:?}"));
        }
    }
}
