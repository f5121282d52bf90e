//! The host's idea of each kernel configuration against the WGSL itself: the workgroup memory
//! the host budgets for must be what the shader declares once its overrides are applied (a
//! configuration over the adapter's limit can hang a driver instead of failing).

use blockflash::kernel::{module_source, KernelConfig};
use blockflash::Tier;
use wgpu::naga;

/// Bytes of workgroup memory that the `main` entry point of `tier`'s module declares for `c`.
fn declared_workgroup_bytes(tier: Tier, c: &KernelConfig) -> u32 {
    let src = module_source(tier);
    let module = naga::front::wgsl::parse_str(&src).expect("kernel WGSL parses");
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .expect("kernel WGSL validates");
    let mut constants = naga::back::PipelineConstants::default();
    for (k, v) in [
        ("BR", c.tile_rows),
        ("BC", c.tile_cols),
        ("D", c.head_dim),
        ("THREADS", c.threads()),
    ] {
        constants.insert(k.to_string(), v as f64);
    }
    if tier != Tier::TensorCore {
        constants.insert("DC".to_string(), c.dc as f64);
        constants.insert("TX".to_string(), c.tx as f64);
    }
    let (module, _) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .expect("overrides apply");
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

#[test]
fn host_workgroup_budget_matches_the_shaders_declarations() {
    let limits = wgpu::Limits {
        max_compute_workgroup_storage_size: 1 << 20,
        max_compute_invocations_per_workgroup: 1024,
        max_compute_workgroup_size_x: 1024,
        ..wgpu::Limits::default()
    };
    for tier in [Tier::PortableF32, Tier::PortableF16, Tier::TensorCore] {
        for d in blockflash::shape::HEAD_DIMS {
            for c in KernelConfig::candidates(&limits, tier, d) {
                let declared = declared_workgroup_bytes(tier, &c) as usize;
                assert_eq!(
                    declared,
                    c.workgroup_bytes(),
                    "{tier} {c:?}: the shader declares {declared} bytes, the host budgets {}",
                    c.workgroup_bytes()
                );
            }
        }
    }
}
