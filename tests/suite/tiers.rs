//! The half-precision tiers (portable f16 and bf16 storage, tensor cores) on every path against
//! the f64 reference on inputs rounded to the storage type: relative L2 error of O ≤ 5e-3 for
//! f16, 1e-2 for bf16 (common.rs's `tolerance`). A tier the adapter lacks is skipped with the
//! reason printed (lavapipe has no cooperative matrices; the H100 runs them).

use std::io::Write;

use blockflash::kernel::DType;
use blockflash::suite::{family_mask, FAMILIES};
use blockflash::{Error, KernelConfig, Mask, Path, Plan, PlanOptions, Reorder, Shape, Tier};

use blockflash::Gpu;

use crate::common::{
    assert_close, check_case_on, emulated_gpu, gpu, head_dims_with_tiles, inputs,
    limited_gpu_with_features, rounded, run_poisoned_on, shuffled_band, tier_or_skip, tolerance,
    Rng,
};

fn opts(tier: Tier, path: Option<Path>) -> PlanOptions {
    PlanOptions {
        dtype: tier.dtype(),
        tier: Some(tier),
        path,
        ..Default::default()
    }
}

/// Every family on every path; for the tensor-core tier at each of its tile shapes that the
/// device runs (their kernels differ in subgroups per workgroup and in workgroup memory).
fn every_path_on_every_family(g: &Gpu, tier: Tier) {
    let mut rng = Rng::fresh(&format!("{tier} families"));
    let seq = 200;
    let shape = Shape {
        batch: 2,
        heads: 2,
        kv_heads: 1,
        seq_q: seq,
        seq_k: seq,
        head_dim: 64,
    };
    let tiles: Vec<Option<(usize, usize)>> = if tier == Tier::TensorCore {
        let all = KernelConfig::candidates(&g.limits(), tier, shape.head_dim);
        writeln!(
            std::io::stderr(),
            "{tier} families at tiles {:?}",
            all.iter()
                .map(|c| (c.tile_rows, c.tile_cols))
                .collect::<Vec<_>>()
        )
        .ok();
        all.iter()
            .map(|c| Some((c.tile_rows, c.tile_cols)))
            .collect()
    } else {
        vec![None]
    };
    for tile in tiles {
        let opts = |path| PlanOptions {
            tile,
            ..opts(tier, path)
        };
        for name in FAMILIES {
            let mask = family_mask(name, seq, rng.next_u64()).unwrap();
            for path in [Path::Dense, Path::RunLength, Path::Sparse] {
                match Plan::new(g, shape, Some(&mask), opts(Some(path))) {
                    Err(Error::PathNotEligible(_)) => continue,
                    Err(e) => panic!("{name} {path} {tile:?}: {e}"),
                    Ok(_) => {}
                }
                check_case_on(
                    g,
                    &format!("{name} {path} {tile:?}"),
                    &mut rng,
                    shape,
                    Some(&mask),
                    opts(Some(path)),
                );
            }
        }
        check_case_on(g, "no mask", &mut rng, shape, None, opts(None));
    }
}

fn shapes_head_dims_and_splits(g: &Gpu, tier: Tier) {
    let mut rng = Rng::fresh(&format!("{tier} shapes"));
    for d in head_dims_with_tiles(g, tier, &tier.to_string()) {
        for (nq, nk) in [(1, 17), (65, 63), (130, 257)] {
            let shape = Shape {
                batch: 1,
                heads: 4,
                kv_heads: 2,
                seq_q: nq,
                seq_k: nk,
                head_dim: d,
            };
            let mask = Mask::causal(nq, nk).unwrap();
            check_case_on(
                g,
                &format!("d={d} {nq}x{nk}"),
                &mut rng,
                shape,
                Some(&mask),
                opts(tier, None),
            );
            check_case_on(
                g,
                &format!("d={d} {nq}x{nk} dense"),
                &mut rng,
                shape,
                None,
                opts(tier, None),
            );
        }
        // Every tile shape of the tier at this head dim (the plan picks one of them above).
        every_tile(g, tier, d, &mut rng);
    }
    let seq = 300;
    let shape = Shape::new(2, 2, seq, 64);
    let longformer = family_mask("longformer", seq, 5).unwrap();
    let split = PlanOptions {
        max_tiles_per_workgroup: Some(2),
        ..opts(tier, None)
    };
    check_case_on(g, "split-KV", &mut rng, shape, Some(&longformer), split);
    let per_batch = Mask::per_batch(vec![
        family_mask("documents", seq, 1).unwrap(),
        family_mask("tree", seq, 1).unwrap(),
    ])
    .unwrap();
    check_case_on(
        g,
        "per-batch",
        &mut rng,
        shape,
        Some(&per_batch),
        opts(tier, None),
    );
    let shuffled = shuffled_band(&mut rng, seq, 5);
    let rcm = PlanOptions {
        reorder: Reorder::On,
        ..opts(tier, None)
    };
    check_case_on(g, "rcm", &mut rng, shape, Some(&shuffled), rcm);
}

/// A causal mask at 200 x 257 on every tile configuration of `tier` at head dim `d` that `g`
/// offers; returns those configurations.
fn every_tile(g: &Gpu, tier: Tier, d: usize, rng: &mut Rng) -> Vec<KernelConfig> {
    let shape = Shape {
        batch: 1,
        heads: 4,
        kv_heads: 2,
        seq_q: 200,
        seq_k: 257,
        head_dim: d,
    };
    let mask = Mask::causal(200, 257).unwrap();
    let configs = KernelConfig::candidates(&g.limits(), tier, d);
    for c in &configs {
        let tile = Some((c.tile_rows, c.tile_cols));
        let forced = PlanOptions {
            tile,
            ..opts(tier, None)
        };
        check_case_on(g, &format!("d={d} {c:?}"), rng, shape, Some(&mask), forced);
    }
    configs
}

/// Keys that grow along the sequence (key j scaled by 1 + j / 8), so that later key tiles score
/// far above earlier ones and the online softmax must rescale what it has accumulated (inputs
/// in [-1, 1) seldom move a row's maximum after its first tile).
fn rising_scores(g: &Gpu, tier: Tier) {
    let mut rng = Rng::fresh(&format!("{tier} rising scores"));
    let (seq, d) = (300, 64);
    let shape = Shape::new(1, 2, seq, d);
    let e = tier.dtype();
    let (q, k, v) = inputs(&mut rng, &shape);
    let k = k
        .chunks(d)
        .enumerate()
        .flat_map(|(row, key)| {
            let grow = 1.0 + (row % seq) as f32 / 8.0;
            key.iter().map(move |x| x * grow)
        })
        .collect();
    let (q, k, v) = (rounded(e, q), rounded(e, k), rounded(e, v));
    let causal = Mask::causal(seq, seq).unwrap();
    let split = PlanOptions {
        max_tiles_per_workgroup: Some(2),
        ..opts(tier, None)
    };
    for (what, mask, options) in [
        ("no mask", None, opts(tier, None)),
        ("causal", Some(&causal), opts(tier, None)),
        (
            "causal sparse",
            Some(&causal),
            opts(tier, Some(Path::Sparse)),
        ),
        ("causal split-KV", Some(&causal), split),
    ] {
        let plan = Plan::new(g, shape, mask, options).unwrap();
        if what.ends_with("split-KV") {
            assert!(plan.describe().contains("split-KV"), "{}", plan.describe());
        }
        let got = run_poisoned_on(g, &plan, &q, &k, &v);
        let want = blockflash::reference::attention(&shape, &q, &k, &v, mask, None).unwrap();
        let what = format!("rising scores, {what} ({}, {tier})", plan.path());
        assert_close(&what, &got, &want, tolerance(e));
    }
}

#[test]
fn online_softmax_rescales_on_every_tier_when_later_keys_score_higher() {
    for tier in [
        Tier::PortableF32,
        Tier::PortableF16,
        Tier::PortableBf16,
        Tier::TensorCore,
    ] {
        if tier_or_skip(tier) {
            rising_scores(gpu(), tier);
        }
    }
    // The tensor-core kernel's lazy rescaling (only when a row's maximum moves by more than
    // its gap) also runs with emulated products.
    rising_scores(emulated_gpu(), Tier::TensorCore);
}

#[test]
fn portable_f16_matches_reference_on_every_path_and_family() {
    if tier_or_skip(Tier::PortableF16) {
        every_path_on_every_family(gpu(), Tier::PortableF16);
    }
}

#[test]
fn portable_f16_matches_reference_on_head_dims_lengths_splits_and_reordering() {
    if tier_or_skip(Tier::PortableF16) {
        shapes_head_dims_and_splits(gpu(), Tier::PortableF16);
    }
}

#[test]
fn portable_bf16_matches_reference_on_every_path_and_family() {
    if tier_or_skip(Tier::PortableBf16) {
        every_path_on_every_family(gpu(), Tier::PortableBf16);
    }
}

#[test]
fn portable_bf16_matches_reference_on_head_dims_lengths_splits_and_reordering() {
    if tier_or_skip(Tier::PortableBf16) {
        shapes_head_dims_and_splits(gpu(), Tier::PortableBf16);
    }
}

#[test]
fn tensor_core_matches_reference_on_every_path_and_family() {
    if tier_or_skip(Tier::TensorCore) {
        every_path_on_every_family(gpu(), Tier::TensorCore);
    }
}

#[test]
fn tensor_core_matches_reference_on_head_dims_lengths_splits_and_reordering() {
    if tier_or_skip(Tier::TensorCore) {
        shapes_head_dims_and_splits(gpu(), Tier::TensorCore);
    }
}

/// Both layouts of the tensor-core kernel: one subgroup per 16 query rows (SPLIT = 1) and two
/// (SPLIT = 2). With the H200's own limits every tile takes two; on a device allowing 256
/// invocations per workgroup its 128-row tiles take one. Without cooperative matrices
/// (lavapipe) the products are emulated and 64 invocations make 32-row tiles take one.
#[test]
fn tensor_core_with_one_and_two_subgroups_per_16_rows_matches_reference() {
    let coop = gpu()
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    let invocations = if coop { 256 } else { 64 };
    let g = limited_gpu_with_features(|l| wgpu::Limits {
        max_compute_invocations_per_workgroup: invocations,
        max_compute_workgroup_size_x: invocations,
        ..l
    })
    .with_tensor_core_emulation();
    if let Err(e) = g.supports(Tier::TensorCore) {
        panic!("tensor cores, real or emulated, need SHADER_F16: {e}");
    }
    let mut rng = Rng::fresh(&format!("tensor cores at {invocations} invocations"));
    let mut splits = std::collections::BTreeSet::new();
    for d in head_dims_with_tiles(&g, Tier::TensorCore, "tensor-core-f16, fewer invocations") {
        splits.extend(
            every_tile(&g, Tier::TensorCore, d, &mut rng)
                .iter()
                .map(|c| c.tx / 2),
        );
    }
    assert_eq!(
        splits.into_iter().collect::<Vec<_>>(),
        [1, 2],
        "both kernel layouts ran"
    );
}

/// Where the adapter has no cooperative matrices (lavapipe), the tensor-core kernel's tiles,
/// masks and online softmax still run, with its matrix products emulated in WGSL.
#[test]
fn tensor_core_kernel_logic_matches_reference_with_emulated_products() {
    let g = emulated_gpu();
    if g.supports(Tier::TensorCore).is_err() {
        panic!(
            "emulated tensor cores need SHADER_F16, which {} lacks",
            g.adapter_info().name
        );
    }
    if g.features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    {
        // Nothing to emulate: this runs the real kernel once more.
        let name = &g.adapter_info().name;
        writeln!(
            std::io::stderr(),
            "{name} has cooperative matrices: not emulated"
        )
        .ok();
    }
    every_path_on_every_family(g, Tier::TensorCore);
    shapes_head_dims_and_splits(g, Tier::TensorCore);
}

#[test]
fn tier_choice_follows_dtype_and_refuses_mismatches() {
    let shape = Shape::new(1, 1, 32, 32);
    let f32_plan = Plan::new(gpu(), shape, None, PlanOptions::default()).unwrap();
    assert_eq!(f32_plan.tier(), Tier::PortableF32);
    let f16 = PlanOptions {
        dtype: DType::F16,
        ..Default::default()
    };
    match Plan::new(gpu(), shape, None, f16) {
        Ok(p) => assert_eq!(p.tier(), gpu().tier_for(DType::F16).unwrap()),
        Err(e) => assert!(matches!(e, Error::TierUnavailable(_))),
    }
    // Every head dim runs in f16 on some tier.
    for d in blockflash::shape::HEAD_DIMS {
        let f16 = PlanOptions {
            dtype: DType::F16,
            ..Default::default()
        };
        if gpu().tier_for(DType::F16).is_ok() {
            let plan = Plan::new(gpu(), Shape::new(1, 1, 40, d), None, f16).unwrap();
            assert_eq!(plan.dtype(), DType::F16);
            // Tensor cores where they hold d, portable f16 past that.
            assert_eq!(plan.tier(), gpu().tier_for_head_dim(DType::F16, d).unwrap());
            if d > 128 {
                assert_ne!(plan.tier(), Tier::TensorCore);
            }
        }
    }
    // bf16 needs no feature: every device runs it on the portable bf16 tier.
    let bf16 = PlanOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let plan = Plan::new(gpu(), shape, None, bf16).unwrap();
    assert_eq!(
        (plan.tier(), plan.dtype()),
        (Tier::PortableBf16, DType::BF16)
    );
    assert!(plan.describe().contains("tier: portable-bf16;"));
    assert_eq!("portable-bf16".parse::<Tier>().unwrap(), Tier::PortableBf16);
    for (tier, dtype) in [
        (Tier::PortableF32, DType::F16),
        (Tier::PortableBf16, DType::F32),
        (Tier::PortableF16, DType::BF16),
    ] {
        let mismatch = PlanOptions {
            tier: Some(tier),
            dtype,
            ..Default::default()
        };
        assert!(matches!(
            Plan::new(gpu(), shape, None, mismatch),
            Err(Error::TierUnavailable(_))
        ));
    }
}

#[test]
fn tensor_cores_need_the_configuration_and_subgroups_of_32() {
    // A fresh device (the shared one keeps its handlers), described with what the test sets:
    // the tier trusts the adapter's word on configurations and subgroup sizes.
    let adapter = pollster::block_on(
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
            .request_adapter(&Default::default()),
    )
    .expect("tests need a GPU adapter");
    let f16 = adapter.features() & wgpu::Features::SHADER_F16;
    let config = wgpu::CooperativeMatrixProperties {
        m_size: 16,
        n_size: 16,
        k_size: 16,
        ab_type: wgpu::CooperativeScalarType::F16,
        cr_type: wgpu::CooperativeScalarType::F32,
        saturating_accumulation: false,
    };
    for (sizes, configs, runs) in [
        ((32, 32), vec![config], true),
        ((8, 8), vec![config], false),
        ((32, 64), vec![config], false),
        ((32, 32), vec![], false),
    ] {
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            required_features: f16,
            ..Default::default()
        }))
        .expect("device");
        let mut info = adapter.get_info();
        (info.subgroup_min_size, info.subgroup_max_size) = sizes;
        let gpu = Gpu::from_device(device, queue, info, configs.clone());
        let got = gpu.supports(Tier::TensorCore);
        if f16.is_empty() {
            println!("SKIPPED subgroup sizes {sizes:?}: the adapter lacks SHADER_F16");
            assert!(got.is_err());
            continue;
        }
        match got {
            Ok(()) => assert!(runs, "{sizes:?} {configs:?}"),
            Err(Error::TierUnavailable(why)) => {
                assert!(!runs, "{sizes:?}: {why}");
                let expected = if configs.is_empty() {
                    "16x16x16"
                } else {
                    "exactly 32"
                };
                assert!(why.contains(expected), "{why}");
                // `blockflash info` says why.
                assert!(gpu.report().contains(&format!("unavailable: {why}")));
            }
            Err(e) => panic!("{e}"),
        }
    }
}
