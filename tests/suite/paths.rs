//! Every dispatch path (dense with an element mask, run-length, sparse list) against the f64
//! reference on every mask family and on the awkward cases of tile skipping.

use std::io::Write;

use blockflash::kernel::DType;
use blockflash::suite::{family_mask, FAMILIES};
use blockflash::{reference, BlockMask, Error, Mask, Path, Plan, PlanOptions, Reorder, Shape};

use crate::common::{
    assert_close, check_case, gpu, inputs, run_poisoned, run_poisoned_on, shuffled_band,
    small_binding_gpu, Rng,
};

fn forced(path: Path, tile: Option<(usize, usize)>) -> PlanOptions {
    PlanOptions {
        path: Some(path),
        tile,
        reorder: Reorder::Off,
        ..Default::default()
    }
}

/// Runs `mask` on every path it is eligible for, at two tile shapes, plus the automatic plan.
fn every_path(what: &str, rng: &mut Rng, shape: Shape, mask: &Mask) {
    for tile in [(16, 32), (32, 64)] {
        for path in [Path::Dense, Path::RunLength, Path::Sparse] {
            let opts = forced(path, Some(tile));
            match Plan::new(gpu(), shape, Some(mask), opts.clone()) {
                Err(Error::PathNotEligible(_)) => assert_eq!(path, Path::RunLength),
                Err(Error::InvalidArgument { what: "tile", .. }) => {} // tile not on adapter
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => {
                    check_case(
                        &format!("{what} {path} {tile:?}"),
                        rng,
                        shape,
                        Some(mask),
                        opts,
                    );
                }
            }
        }
    }
    check_case(
        &format!("{what} auto"),
        rng,
        shape,
        Some(mask),
        PlanOptions::default(),
    );
}

#[test]
fn every_path_matches_reference_on_every_mask_family() {
    let mut rng = Rng::fresh("families");
    for name in FAMILIES {
        let seq = 300; // not a multiple of any tile
        let mask = family_mask(name, seq, rng.next_u64()).unwrap();
        let shape = Shape {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            seq_q: seq,
            seq_k: seq,
            head_dim: 32,
        };
        every_path(name, &mut rng, shape, &mask);
    }
}

#[test]
fn every_path_matches_reference_on_rectangular_masks_with_gqa() {
    let mut rng = Rng::fresh("rectangular");
    for (nq, nk) in [(70, 333), (333, 70), (1, 129)] {
        let shape = Shape {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            seq_q: nq,
            seq_k: nk,
            head_dim: 64,
        };
        let causal = Mask::causal(nq, nk).unwrap(); // decoding-style, rows may see nothing
        every_path(&format!("causal {nq}x{nk}"), &mut rng, shape, &causal);
        let window = Mask::sliding_window(nq, nk, 40, false).unwrap();
        every_path(&format!("window {nq}x{nk}"), &mut rng, shape, &window);
    }
}

#[test]
fn edge_masks_all_empty_single_pair_and_two_full_runs() {
    let mut rng = Rng::fresh("edge masks");
    let n = 130;
    let shape = Shape::new(1, 2, n, 32);
    let empty = Mask::empty(n, n).unwrap();
    every_path("all empty", &mut rng, shape, &empty);
    let single = Mask::from_fn(n, n, |q, k| k == (q * 7) % n).unwrap();
    every_path("single pair per row", &mut rng, shape, &single);
    // Each row sees keys [0, 64) and [96, 130): two separate runs of full tiles at 32 columns.
    let two_runs = Mask::from_fn(n, n, |_, k| !(64..96).contains(&k)).unwrap();
    every_path("two full runs", &mut rng, shape, &two_runs);
    // Rows with no allowed key in the middle of otherwise busy tiles.
    let holes = Mask::from_fn(n, n, |q, k| q % 9 != 4 && (q + k) % 3 != 0).unwrap();
    every_path("empty rows", &mut rng, shape, &holes);
}

#[test]
fn per_batch_masks_run_on_every_path() {
    let mut rng = Rng::fresh("per batch");
    let n = 200;
    let masks = vec![
        family_mask("documents", n, 3).unwrap(),
        family_mask("tree", n, 3).unwrap(),
        Mask::causal(n, n).unwrap(),
    ];
    let mask = Mask::per_batch(masks).unwrap();
    let shape = Shape {
        batch: 3,
        heads: 2,
        kv_heads: 2,
        seq_q: n,
        seq_k: n,
        head_dim: 64,
    };
    every_path("per-batch", &mut rng, shape, &mask);
}

#[test]
fn rcm_reordering_returns_attention_in_the_original_order() {
    let mut rng = Rng::fresh("rcm");
    let n = 256;
    let mask = shuffled_band(&mut rng, n, 6);
    let shape = Shape::new(2, 2, n, 32);
    for reorder in [Reorder::Off, Reorder::On, Reorder::Auto] {
        for path in [None, Some(Path::Sparse), Some(Path::Dense)] {
            let opts = PlanOptions {
                reorder,
                path,
                ..Default::default()
            };
            let plan = Plan::new(gpu(), shape, Some(&mask), opts.clone()).unwrap();
            if reorder == Reorder::On {
                assert!(plan.describe().contains("reordered"), "{}", plan.describe());
            }
            check_case(
                &format!("rcm {reorder:?} {path:?}"),
                &mut rng,
                shape,
                Some(&mask),
                opts,
            );
        }
    }
    let plan = Plan::new(gpu(), shape, Some(&mask), PlanOptions::default()).unwrap();
    assert!(
        plan.describe().contains("reordered"),
        "auto should reorder a shuffled band:\n{}",
        plan.describe()
    );
}

#[test]
fn paths_agree_with_each_other_bit_for_bit_on_full_tiles() {
    // Full tiles skip the mask; on a mask where every active tile is full the run-length and
    // sparse paths do the same arithmetic and must give identical outputs.
    let mut rng = Rng::fresh("agree");
    let n = 256;
    let mask = Mask::from_fn(n, n, |q, k| q / 64 == k / 64).unwrap();
    let shape = Shape::new(1, 2, n, 64);
    let (q, k, v) = inputs(&mut rng, &shape);
    let run = |path| {
        let plan = Plan::new(gpu(), shape, Some(&mask), forced(path, Some((32, 32)))).unwrap();
        run_poisoned(&plan, &q, &k, &v)
    };
    let (a, b) = (run(Path::RunLength), run(Path::Sparse));
    assert_eq!(a.o, b.o);
    let want = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
    assert_close("block diagonal", &a, &want, 1e-5);
}

#[test]
fn a_mask_that_allows_every_pair_runs_the_unmasked_kernel() {
    // No mask bits to read: the plan is the dense path of the unmasked kernel, bit for bit the
    // plan without a mask, on sequences that end inside a tile and with a per-batch mask.
    let mut rng = Rng::fresh("all pairs");
    let n = 300;
    let shape = Shape::new(2, 2, n, 64);
    let all = Mask::full(n, n).unwrap();
    let per_batch = Mask::per_batch(vec![all.clone(), all.clone()]).unwrap();
    let (q, k, v) = inputs(&mut rng, &shape);
    let unmasked = Plan::new(gpu(), shape, None, PlanOptions::default()).unwrap();
    let want = run_poisoned(&unmasked, &q, &k, &v);
    for mask in [&all, &per_batch] {
        let plan = Plan::new(gpu(), shape, Some(mask), PlanOptions::default()).unwrap();
        assert_eq!(plan.path(), Path::Dense, "{}", plan.describe());
        assert!(
            plan.describe().contains("reads no mask bits"),
            "{}",
            plan.describe()
        );
        let got = run_poisoned(&plan, &q, &k, &v);
        assert_eq!(got.o, want.o);
        let reference = reference::attention(&shape, &q, &k, &v, Some(mask), None).unwrap();
        assert_close("every pair allowed", &got, &reference, 1e-4);
    }
    // A block mask of another mask (here all-full beside a causal mask) is refused, not run
    // without the mask.
    let block = BlockMask::new(&all, 32, 32).unwrap();
    let causal = Mask::causal(n, n).unwrap();
    match Plan::from_block_mask(gpu(), shape, &causal, block, PlanOptions::default()) {
        Err(Error::InvalidArgument {
            what: "block_mask", ..
        }) => {}
        other => panic!("mismatched block mask: {:?}", other.map(|p| p.describe())),
    }
    let block = BlockMask::new(&causal, 32, 32).unwrap();
    let plan = Plan::from_block_mask(gpu(), shape, &causal, block, PlanOptions::default()).unwrap();
    let got = run_poisoned(&plan, &q, &k, &v);
    let reference = reference::attention(&shape, &q, &k, &v, Some(&causal), None).unwrap();
    assert_close("causal from its block mask", &got, &reference, 1e-4);
}

#[test]
fn plan_rejects_wrong_shapes_and_ineligible_forced_paths() {
    let n = 100;
    let shape = Shape::new(1, 2, n, 32);
    let two_runs = Mask::from_fn(n, n, |_, k| !(32..64).contains(&k)).unwrap();
    assert!(matches!(
        Plan::new(
            gpu(),
            shape,
            Some(&two_runs),
            forced(Path::RunLength, Some((16, 32)))
        ),
        Err(Error::PathNotEligible(_))
    ));
    assert!(matches!(
        Plan::new(gpu(), shape, None, forced(Path::Sparse, None)),
        Err(Error::PathNotEligible(_))
    ));
    let plan = Plan::new(
        gpu(),
        shape,
        Some(&Mask::causal(n, n).unwrap()),
        PlanOptions::default(),
    )
    .unwrap();
    let other = Shape::new(1, 2, n + 1, 32);
    let mut rng = Rng::fresh("wrong shape");
    let (q, k, v) = inputs(&mut rng, &other);
    assert!(matches!(
        plan.run(&q, &k, &v),
        Err(Error::ShapeMismatch { what: "q", .. })
    ));
    assert!(matches!(
        Plan::new(
            gpu(),
            shape,
            Some(&Mask::causal(n, n + 1).unwrap()),
            PlanOptions::default()
        ),
        Err(Error::ShapeMismatch { what: "mask", .. })
    ));
    assert!(matches!(
        Plan::new(
            gpu(),
            shape,
            Some(&Mask::causal(n, n).unwrap()),
            PlanOptions {
                tile: Some((24, 32)),
                ..Default::default()
            }
        ),
        Err(Error::InvalidArgument { what: "tile", .. })
    ));
    let batched = Shape::new(2, 2, n, 32);
    let per_batch = Mask::per_batch(vec![Mask::causal(n, n).unwrap(); 2]).unwrap();
    let reorder = PlanOptions {
        reorder: Reorder::On,
        ..Default::default()
    };
    assert!(matches!(
        Plan::new(gpu(), batched, Some(&per_batch), reorder),
        Err(Error::InvalidArgument {
            what: "reorder",
            ..
        })
    ));
}

#[test]
fn split_kv_parts_merge_to_the_reference_on_every_path() {
    let mut rng = Rng::fresh("split-kv");
    let seq = 300;
    let shape = Shape {
        batch: 2,
        heads: 2,
        kv_heads: 1,
        seq_q: seq,
        seq_k: seq,
        head_dim: 64,
    };
    for name in ["causal", "longformer", "tree", "random-blocks"] {
        let mask = family_mask(name, seq, rng.next_u64()).unwrap();
        for path in [Path::Dense, Path::RunLength, Path::Sparse] {
            for max_tiles in [1, 2, 3] {
                let opts = PlanOptions {
                    max_tiles_per_workgroup: Some(max_tiles),
                    ..forced(path, Some((16, 32)))
                };
                match Plan::new(gpu(), shape, Some(&mask), opts.clone()) {
                    Err(Error::PathNotEligible(_)) => continue,
                    Err(e) => panic!("{e}"),
                    Ok(plan) => assert!(plan.describe().contains("split-KV"), "{name}"),
                }
                let what = format!("{name} {path} max {max_tiles}");
                check_case(&what, &mut rng, shape, Some(&mask), opts);
            }
        }
    }
    // Global tokens make a few query tiles far heavier: the automatic plan splits them.
    let mask = Mask::longformer(512, 8, &[0, 1, 2, 3]).unwrap();
    let shape = Shape::new(1, 2, 512, 32);
    let plan = Plan::new(gpu(), shape, Some(&mask), PlanOptions::default()).unwrap();
    assert!(plan.describe().contains("split-KV"), "{}", plan.describe());
    check_case(
        "longformer auto split",
        &mut rng,
        shape,
        Some(&mask),
        PlanOptions::default(),
    );
}

/// Decoding: a few query rows over long keys make one query tile per head, far too few
/// workgroups for a GPU. The automatic plan splits every query tile over the keys (parts of at
/// least 16 key tiles) and merges the parts; without a mask, and with the draft tokens of a
/// speculative-decoding tree after a shared prefix.
#[test]
fn decoding_grids_split_over_keys_and_match_the_reference() {
    let mut rng = Rng::fresh("decoding");
    let (prefix, draft) = (2000, 5);
    let shape = Shape {
        batch: 1,
        heads: 4,
        kv_heads: 2,
        seq_q: draft,
        seq_k: prefix + draft,
        head_dim: 64,
    };
    // Draft token i follows token i - 1 but for token 3, a sibling of 2.
    let parents = |i: usize| match i {
        0 => None,
        3 => Some(1),
        _ => Some(i - 1),
    };
    let tree = Mask::from_fn(draft, prefix + draft, |q, k| {
        k < prefix || {
            let mut node = Some(q);
            while let Some(n) = node.filter(|&n| n != k - prefix) {
                node = parents(n);
            }
            node.is_some()
        }
    })
    .unwrap();
    for (what, mask) in [("decoding, no mask", None), ("decoding, tree", Some(&tree))] {
        let plan = Plan::new(gpu(), shape, mask, PlanOptions::default()).unwrap();
        assert!(
            plan.describe().contains("split-KV"),
            "{what}: {}",
            plan.describe()
        );
        check_case(what, &mut rng, shape, mask, PlanOptions::default());
    }
}

#[test]
fn row_reductions_by_subgroup_shuffles_and_workgroup_memory_match_the_reference() {
    let mut rng = Rng::fresh("row reductions");
    let lanes = gpu().min_subgroup_size();
    let reductions = match lanes {
        Some(_) => vec![false, true],
        None => {
            let name = &gpu().adapter_info().name;
            let why = "the device has no subgroups";
            writeln!(
                std::io::stderr(),
                "SKIPPED subgroup reductions on {name}: {why}"
            )
            .ok();
            vec![false]
        }
    };
    // 16x32 tiles run 8 threads per row: subgroups of 8 (lavapipe) and more hold a row.
    let tile = Some((16, 32));
    let n = 150;
    let per_batch = Mask::per_batch(vec![
        family_mask("documents", n, 4).unwrap(),
        Mask::from_fn(n, n, |q, k| q % 9 != 4 && k <= q).unwrap(), // rows with no key
    ])
    .unwrap();
    let gqa = Shape {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: n,
        seq_k: n,
        head_dim: 64,
    };
    let longformer = family_mask("longformer", n, 4).unwrap();
    let band = shuffled_band(&mut rng, n, 4);
    for dtype in [DType::F32, DType::BF16] {
        for &on in &reductions {
            let with = |opts: PlanOptions| PlanOptions {
                dtype,
                subgroup_reductions: Some(on),
                ..opts
            };
            for path in [Path::Dense, Path::RunLength, Path::Sparse] {
                let opts = with(forced(path, tile));
                let plan = Plan::new(gpu(), gqa, Some(&per_batch), opts.clone()).unwrap();
                assert_eq!(plan.subgroup_reductions(), on, "{}", plan.describe());
                let what = format!("per-batch {path} subgroups {on}");
                check_case(&what, &mut rng, gqa, Some(&per_batch), opts);
            }
            let split = with(PlanOptions {
                max_tiles_per_workgroup: Some(2),
                ..forced(Path::Sparse, tile)
            });
            let what = format!("split-KV subgroups {on}");
            check_case(&what, &mut rng, gqa, Some(&longformer), split);
            let rcm = with(PlanOptions {
                reorder: Reorder::On,
                tile,
                ..Default::default()
            });
            check_case(
                &format!("rcm subgroups {on}"),
                &mut rng,
                gqa,
                Some(&band),
                rcm,
            );
            check_case(
                &format!("no mask subgroups {on}"),
                &mut rng,
                gqa,
                None,
                with(forced(Path::Dense, tile)),
            );
        }
    }
    // Asked for without a tile: the plan picks one whose rows fit a subgroup.
    let on = PlanOptions {
        subgroup_reductions: Some(true),
        ..Default::default()
    };
    match (lanes, Plan::new(gpu(), gqa, None, on)) {
        (Some(n), Ok(plan)) => {
            assert!(plan.subgroup_reductions() && plan.config().tx <= n as usize);
            assert!(plan
                .describe()
                .contains("row reductions by subgroup shuffles"));
        }
        (None, Err(Error::TierUnavailable(_))) => {}
        (_, other) => panic!(
            "subgroup reductions on {lanes:?}: {:?}",
            other.map(|p| p.describe())
        ),
    }
    // A device created without SUBGROUP (and 64 KiB storage bindings): workgroup memory, and a
    // typed error when asked for subgroup reductions.
    let plain = small_binding_gpu();
    assert_eq!(plain.min_subgroup_size(), None);
    let small = Shape::new(1, 2, 100, 64);
    let plan = Plan::new(&plain, small, None, forced(Path::Dense, tile)).unwrap();
    assert!(!plan.subgroup_reductions());
    let (q, k, v) = inputs(&mut rng, &small);
    let want = reference::attention(&small, &q, &k, &v, None, None).unwrap();
    let got = run_poisoned_on(&plain, &plan, &q, &k, &v);
    assert_close("no SUBGROUP", &got, &want, 1e-5);
    let on = PlanOptions {
        subgroup_reductions: Some(true),
        ..Default::default()
    };
    match Plan::new(&plain, small, None, on) {
        Err(Error::TierUnavailable(why)) => assert!(why.contains("SUBGROUP"), "{why}"),
        other => panic!("no SUBGROUP: {:?}", other.map(|p| p.describe())),
    }
}
