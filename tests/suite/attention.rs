//! The dense kernel against the f64 reference: shapes, head dims, GQA, masks, edge cases, and
//! the host and GPU-resident forms.

use blockflash::{reference, Error, Mask, Path, Plan, PlanOptions, Shape, Tier};

use blockflash::kernel::DType;

use crate::common::{
    assert_close, check_case, emulated_gpu, gpu, inputs, rel_l2, rounded, run_filled_on,
    run_poisoned, run_poisoned_on, small_binding_gpu, tier_or_skip, tolerance, Rng,
};

fn dense() -> PlanOptions {
    PlanOptions {
        path: Some(Path::Dense),
        ..Default::default()
    }
}

#[test]
fn dense_matches_reference_on_lengths_that_are_not_tile_multiples() {
    let mut rng = Rng::fresh("lengths");
    for (nq, nk) in [(1, 1), (17, 63), (63, 65), (65, 17), (200, 513), (513, 200)] {
        let shape = Shape {
            batch: 2,
            heads: 2,
            kv_heads: 1,
            seq_q: nq,
            seq_k: nk,
            head_dim: 64,
        };
        check_case(&format!("Nq={nq} Nk={nk}"), &mut rng, shape, None, dense());
    }
}

#[test]
fn dense_matches_reference_on_every_head_dim() {
    let mut rng = Rng::fresh("head dims");
    for d in blockflash::shape::HEAD_DIMS {
        let shape = Shape {
            batch: 1,
            heads: 2,
            kv_heads: 2,
            seq_q: 70,
            seq_k: 97,
            head_dim: d,
        };
        check_case(&format!("d={d}"), &mut rng, shape, None, dense());
    }
}

#[test]
fn dense_matches_reference_with_grouped_and_multi_query_heads() {
    let mut rng = Rng::fresh("gqa");
    for (h, hkv) in [(4, 4), (4, 2), (6, 1), (8, 2)] {
        let shape = Shape {
            batch: 2,
            heads: h,
            kv_heads: hkv,
            seq_q: 40,
            seq_k: 75,
            head_dim: 32,
        };
        check_case(&format!("H={h} Hkv={hkv}"), &mut rng, shape, None, dense());
    }
}

#[test]
fn custom_scale_and_no_lse_output_are_honoured() {
    let mut rng = Rng::fresh("scale");
    let shape = Shape::new(1, 2, 50, 64);
    let opts = PlanOptions {
        scale: Some(0.37),
        ..dense()
    };
    check_case("scale 0.37", &mut rng, shape, None, opts);
    let (q, k, v) = inputs(&mut rng, &shape);
    let plan = Plan::new(
        gpu(),
        shape,
        None,
        PlanOptions {
            write_lse: false,
            ..dense()
        },
    )
    .unwrap();
    let out = plan.run(&q, &k, &v).unwrap();
    assert!(out.lse.is_empty());
    let want = reference::attention(&shape, &q, &k, &v, None, None).unwrap();
    assert!(rel_l2(&out.o, &want.o) <= 1e-5);
}

#[test]
fn element_mask_on_dense_path_matches_reference_including_rows_with_no_allowed_key() {
    let mut rng = Rng::fresh("dense mask");
    let (nq, nk) = (77, 130);
    let mut bits = Vec::with_capacity(nq * nk);
    for q in 0..nq {
        for _ in 0..nk {
            // every fifth row has no allowed key
            bits.push(q % 5 != 3 && rng.below(3) == 0);
        }
    }
    let mask = Mask::from_bools(nq, nk, &bits).unwrap();
    let shape = Shape {
        batch: 2,
        heads: 2,
        kv_heads: 1,
        seq_q: nq,
        seq_k: nk,
        head_dim: 32,
    };
    check_case("random element mask", &mut rng, shape, Some(&mask), dense());
    let per_batch = Mask::per_batch(vec![mask.clone(), Mask::causal(nq, nk).unwrap()]).unwrap();
    check_case("per-batch mask", &mut rng, shape, Some(&per_batch), dense());
}

#[test]
fn host_form_equals_gpu_resident_form() {
    let mut rng = Rng::fresh("host vs resident");
    let shape = Shape {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 90,
        seq_k: 90,
        head_dim: 64,
    };
    let mask = Mask::causal(90, 90).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (q, k, v) = inputs(&mut rng, &shape);
        let (q, k, v) = (rounded(dtype, q), rounded(dtype, k), rounded(dtype, v));
        let opts = PlanOptions {
            dtype,
            ..Default::default()
        };
        let plan = Plan::new(gpu(), shape, Some(&mask), opts).unwrap();
        let host = plan.run(&q, &k, &v).unwrap();
        let resident = run_poisoned(&plan, &q, &k, &v);
        assert_eq!(host.o, resident.o);
        assert_eq!(host.lse, resident.lse);
        let want = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
        assert_close(
            &format!("host form {dtype}"),
            &host,
            &want,
            tolerance(dtype),
        );
    }
}

#[test]
fn inputs_over_the_binding_limit_are_split_over_batch_and_heads() {
    // A device with a 64 KiB storage binding forces the host form to split the work.
    let small = small_binding_gpu();
    let mut rng = Rng::fresh("split");
    for shape in [
        Shape {
            batch: 3,
            heads: 4,
            kv_heads: 2,
            seq_q: 100,
            seq_k: 60,
            head_dim: 32,
        },
        // one batch element is over the limit: split over key/value heads
        Shape {
            batch: 2,
            heads: 8,
            kv_heads: 4,
            seq_q: 100,
            seq_k: 120,
            head_dim: 64,
        },
    ] {
        let mask = Mask::causal(shape.seq_q, shape.seq_k).unwrap();
        // bf16 halves the bytes: the second shape still splits over key/value heads.
        for dtype in [DType::BF16, DType::F32] {
            let (q, k, v) = inputs(&mut rng, &shape);
            let (q, k, v) = (rounded(dtype, q), rounded(dtype, k), rounded(dtype, v));
            let opts = PlanOptions {
                dtype,
                ..Default::default()
            };
            let plan = Plan::new(&small, shape, Some(&mask), opts).unwrap();
            assert!(
                !plan.describe().contains(" 1 dispatch(es)"),
                "{}",
                plan.describe()
            );
            let out = plan.run(&q, &k, &v).unwrap();
            let want = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
            assert_close(&format!("split {dtype}"), &out, &want, tolerance(dtype));
        }
        let plan = Plan::new(&small, shape, Some(&mask), PlanOptions::default()).unwrap();
        // The GPU-resident form cannot split caller buffers: it names the limit.
        let dev = small.device();
        let buf = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut enc = dev.create_command_encoder(&Default::default());
        let t = blockflash::Tensors {
            q: &buf,
            k: &buf,
            v: &buf,
            o: &buf,
            lse: &buf,
        };
        match plan.encode(&mut enc, &t) {
            Err(Error::TooLarge { limit_name, .. }) => {
                assert_eq!(limit_name, "max_storage_buffer_binding_size")
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
}

#[test]
fn bad_inputs_give_typed_errors() {
    let g = gpu();
    let ok = Shape::new(1, 2, 16, 32);
    let plan = Plan::new(g, ok, None, PlanOptions::default()).unwrap();
    let n = ok.q_len();
    assert!(matches!(
        plan.run(&vec![0.5; n - 1], &vec![0.5; n], &vec![0.5; n]),
        Err(Error::ShapeMismatch { what: "q", .. })
    ));
    let gqa = Shape {
        kv_heads: 3,
        ..Shape::new(1, 4, 16, 32)
    };
    assert!(matches!(
        Plan::new(g, gqa, None, PlanOptions::default()),
        Err(Error::HeadsNotDivisible {
            heads: 4,
            kv_heads: 3
        })
    ));
    assert!(matches!(
        Plan::new(g, Shape::new(1, 2, 16, 48), None, PlanOptions::default()),
        Err(Error::UnsupportedHeadDim(48))
    ));
    assert!(matches!(
        Plan::new(g, Shape::new(1, 2, 0, 32), None, PlanOptions::default()),
        Err(Error::Empty("seq_q"))
    ));
    let wrong = Mask::causal(16, 17).unwrap();
    assert!(matches!(
        Plan::new(g, ok, Some(&wrong), PlanOptions::default()),
        Err(Error::ShapeMismatch { what: "mask", .. })
    ));
    let wrong_batch = Mask::per_batch(vec![Mask::causal(16, 16).unwrap(); 3]).unwrap();
    assert!(matches!(
        Plan::new(g, ok, Some(&wrong_batch), PlanOptions::default()),
        Err(Error::ShapeMismatch { what: "mask", .. })
    ));
    assert!(matches!(
        reference::attention(&ok, &[1.0], &[1.0], &[1.0], None, None),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn bad_options_shapes_and_caller_buffers_give_typed_errors() {
    let g = gpu();
    let ok = Shape::new(1, 2, 16, 32);
    let invalid = |r: blockflash::Result<Plan>, want: &str| match r {
        Err(Error::InvalidArgument { what, .. }) if what == want => {}
        other => panic!("{want}: {:?}", other.map(|p| p.describe())),
    };
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let opts = PlanOptions {
            scale: Some(scale),
            ..Default::default()
        };
        invalid(Plan::new(g, ok, None, opts), "scale");
    }
    let opts = PlanOptions {
        max_tiles_per_workgroup: Some(0),
        ..Default::default()
    };
    invalid(Plan::new(g, ok, None, opts), "max_tiles_per_workgroup");
    // Element counts that overflow, more dispatches than a plan makes, more query heads per
    // key/value head than a dispatch dimension holds: refused at once.
    for shape in [
        Shape::new(1 << 60, 1 << 10, 32, 32),
        Shape::new(1 << 40, 1, 32, 32),
        Shape {
            kv_heads: 1,
            ..Shape::new(1, 70_000, 32, 32)
        },
    ] {
        invalid(Plan::new(g, shape, None, PlanOptions::default()), "shape");
    }

    // Caller buffers wgpu could not bind as the pass needs.
    let plan = Plan::new(g, ok, None, PlanOptions::default()).unwrap();
    let dev = g.device();
    let buffer = |usage| {
        dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4 * ok.q_len() as u64,
            usage,
            mapped_at_creation: false,
        })
    };
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let (q, k, v, o, lse) = (
        buffer(storage),
        buffer(storage),
        buffer(storage),
        buffer(storage),
        buffer(storage),
    );
    let uniform = buffer(wgpu::BufferUsages::UNIFORM);
    let mut enc = dev.create_command_encoder(&Default::default());
    let encode = |enc: &mut wgpu::CommandEncoder, t: &blockflash::Tensors| plan.encode(enc, t);
    let t = |q, o| blockflash::Tensors {
        q,
        k: &k,
        v: &v,
        o,
        lse: &lse,
    };
    assert!(matches!(
        encode(&mut enc, &t(&uniform, &o)),
        Err(Error::InvalidArgument {
            what: "q buffer",
            ..
        })
    ));
    assert!(matches!(
        encode(&mut enc, &t(&q, &q)),
        Err(Error::InvalidArgument {
            what: "o buffer",
            ..
        })
    ));
    if g.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
        let set = dev.create_query_set(&wgpu::QuerySetDescriptor {
            label: None,
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        for index in [1, u32::MAX] {
            assert!(matches!(
                plan.encode_timed(&mut enc, &t(&q, &o), Some((&set, index))),
                Err(Error::InvalidArgument {
                    what: "timestamps",
                    ..
                })
            ));
        }
        plan.encode_timed(&mut enc, &t(&q, &o), Some((&set, 0)))
            .unwrap();
    }
    encode(&mut enc, &t(&q, &o)).unwrap();
    g.queue().submit([enc.finish()]);
}

#[test]
fn buffers_of_another_device_give_typed_errors_and_of_another_instance_no_panic() {
    // Two devices of one instance: wgpu's validation error, returned by the call. A device of
    // another instance: wgpu-core knows buffers by index within its instance, so a foreign one
    // either stands for one of this instance's buffers (nothing can tell) or for none (a panic
    // inside wgpu-core, returned as an error); no panic may escape. The plan's device must stay
    // usable either way.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))
        .expect("tests need a GPU adapter");
    let device = || {
        let (d, q) = pollster::block_on(adapter.request_device(&Default::default())).unwrap();
        blockflash::Gpu::from_device(d, q, adapter.get_info(), Vec::new())
    };
    let (mine, same_instance) = (device(), device());
    let other_instance = blockflash::Gpu::new().unwrap();
    let shape = Shape::new(1, 2, 16, 32);
    let plan = Plan::new(&mine, shape, None, PlanOptions::default()).unwrap();
    let mut rng = Rng::fresh("foreign buffers");
    let (q, k, v) = inputs(&mut rng, &shape);
    for (foreign, refused) in [(&same_instance, true), (&other_instance, false)] {
        let b: Vec<wgpu::Buffer> = (0..9)
            .map(|_| {
                foreign.device().create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 4 * shape.q_len() as u64,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let mut enc = mine.device().create_command_encoder(&Default::default());
        let forward = blockflash::Tensors {
            q: &b[0],
            k: &b[1],
            v: &b[2],
            o: &b[3],
            lse: &b[4],
        };
        let backward = blockflash::BackwardTensors {
            q: &b[0],
            k: &b[1],
            v: &b[2],
            o: &b[3],
            lse: &b[4],
            d_o: &b[5],
            dq: &b[6],
            dk: &b[7],
            dv: &b[8],
        };
        for got in [
            plan.encode(&mut enc, &forward),
            plan.encode_backward(&mut enc, &backward),
        ] {
            match got {
                Err(Error::InvalidArgument { what, why }) => {
                    assert_eq!(what, "caller buffers or query set", "{why}")
                }
                Ok(()) if !refused => {}
                other => panic!("{other:?}"),
            }
        }
        drop(enc);
        // The plan's own buffers (outputs poisoned) still give the reference.
        let out = run_poisoned_on(&mine, &plan, &q, &k, &v);
        let want = reference::attention(&shape, &q, &k, &v, None, None).unwrap();
        assert_close("after foreign buffers", &out, &want, tolerance(DType::F32));
    }
}

#[test]
fn a_gpu_error_nobody_captured_is_reported_once() {
    // Its own device: the error must not reach the other tests' plans.
    let g = blockflash::Gpu::new().unwrap();
    let shape = Shape::new(1, 2, 16, 32);
    // A validation error of the caller's own: a mapped buffer of a size not a multiple of 4.
    let _ = g.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 3,
        usage: wgpu::BufferUsages::MAP_WRITE,
        mapped_at_creation: true,
    });
    let plan = Plan::new(&g, shape, None, PlanOptions::default());
    match plan {
        Err(Error::Device(_)) => {}
        other => panic!("{:?}", other.map(|p| p.describe())),
    }
    let plan = Plan::new(&g, shape, None, PlanOptions::default()).unwrap();
    let n = shape.q_len();
    plan.run(&vec![0.5; n], &vec![0.5; n], &vec![0.5; n])
        .unwrap();
}

#[test]
fn nan_and_inf_inputs_propagate_without_crashing() {
    // Documented behaviour: a NaN or Inf in Q, K or V makes the affected outputs NaN or Inf
    // (as the reference does); other rows stay correct and nothing crashes.
    let mut rng = Rng::fresh("nan");
    let shape = Shape::new(1, 1, 40, 32);
    let (mut q, k, mut v) = inputs(&mut rng, &shape);
    q[5 * 32 + 3] = f32::NAN; // row 5 of Q
    v[7 * 32] = f32::INFINITY; // key 7 of V, column 0
    let plan = Plan::new(gpu(), shape, None, PlanOptions::default()).unwrap();
    // Filled with a finite value, so that the non-finite outputs below are the kernel's.
    let out = run_filled_on(gpu(), &plan, &q, &k, &v, 7.0);
    let want = reference::attention(&shape, &q, &k, &v, None, None).unwrap();
    assert!(
        out.o[5 * 32..6 * 32].iter().any(|x| !x.is_finite()),
        "row 5"
    );
    for row in 0..40 {
        for c in 0..32 {
            let (g, w) = (out.o[row * 32 + c], want.o[row * 32 + c]);
            if w.is_finite() {
                assert!((g as f64 - w).abs() < 1e-4, "row {row} col {c}: {g} vs {w}");
            } else {
                assert!(!g.is_finite(), "row {row} col {c}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn non_finite_values_reach_the_rows_that_attend_them_and_of_masked_keys_no_row_that_skips_their_tile(
) {
    // Documented on `Plan`: a NaN or +inf score (from Q or an attended key's K) makes the row's
    // output and LSE NaN; a masked key's K never reaches a row; its V reaches the rows of the
    // tiles that compute it (0 x NaN) and no others. Causal mask; every tier (the tensor-core
    // tier emulated where the adapter has no cooperative matrices), the sparse path whole and
    // split over workgroups (the merge), and the dense path. The outputs are filled with a
    // finite value first, so every NaN below was written by a kernel.
    let mut rng = Rng::fresh("non-finite");
    let (n, d) = (200, 64);
    let shape = Shape::new(1, 4, n, d);
    let mask = Mask::causal(n, n).unwrap();
    let mut tiers = vec![
        (gpu(), Tier::PortableF32, Some(false)),
        (emulated_gpu(), Tier::TensorCore, None),
    ];
    if gpu().min_subgroup_size().is_some_and(|s| s >= 8) {
        tiers.push((gpu(), Tier::PortableF32, Some(true)));
    }
    for tier in [Tier::PortableF16, Tier::PortableBf16] {
        if tier_or_skip(tier) {
            tiers.push((gpu(), tier, None));
        }
    }
    for (g, tier, subgroups) in tiers {
        let dtype = tier.dtype();
        let (q, mut k, mut v) = inputs(&mut rng, &shape);
        let last = n - 1;
        k[last * d + 3] = f32::NAN; // head 0: K and V of the last key
        v[last * d + 5] = f32::NAN;
        // head 1: K only, infinite with the sign that makes the last row's score +inf
        k[(n + last) * d] = f32::INFINITY.copysign(q[(n + last) * d]);
        // head 2: K of key 150 only (V finite), inside the walk of rows 150..: their scores
        // with it are NaN on a tile that is not their walk's first
        k[(2 * n + 150) * d + 7] = f32::NAN;
        // head 3: K of key 2 infinite (+inf scores for rows whose Q is positive there, -inf
        // for the others), then key 40 with a large K that makes later tiles rescale rows
        k[(3 * n + 2) * d] = f32::INFINITY;
        k[(3 * n + 40) * d + 1] = 2000.0;
        let (q, k, v) = (rounded(dtype, q), rounded(dtype, k), rounded(dtype, v));
        let want = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
        for (path, split) in [
            (Path::Sparse, None),
            (Path::Sparse, Some(2)),
            (Path::Dense, None),
        ] {
            let options = PlanOptions {
                path: Some(path),
                dtype,
                tier: Some(tier),
                max_tiles_per_workgroup: split,
                subgroup_reductions: subgroups,
                ..Default::default()
            };
            let plan = Plan::new(g, shape, Some(&mask), options).unwrap();
            assert_eq!(plan.describe().contains("split-KV"), split.is_some());
            let out = run_filled_on(g, &plan, &q, &k, &v, 7.0);
            let rows = plan.config().tile_rows;
            let what = format!(
                "{tier} {rows}x{} {path:?} split {split:?} subgroups {subgroups:?}",
                plan.config().tile_cols
            );
            for h in 0..4 {
                for row in 0..n {
                    let at = (h * n + row) * d;
                    let (got, w) = (&out.o[at..at + d], &want.o[at..at + d]);
                    let reaches = match h {
                        2 => row >= 150,
                        3 => row >= 2 && q[at] >= 0.0,
                        _ => row == last,
                    };
                    assert_eq!(
                        w.iter().any(|x| !x.is_finite()),
                        reaches,
                        "{what} head {h} row {row}: reference"
                    );
                    let lse = out.lse[h * n + row];
                    if reaches {
                        assert!(
                            got.iter().all(|x| x.is_nan()) && lse.is_nan(),
                            "{what} head {h} row {row}: {:?} lse {lse}",
                            &got[..4]
                        );
                    } else if h != 0 || (path != Path::Dense && row < last / rows * rows) {
                        // head 0's NaN V reaches the rows of the last query tile, on the dense
                        // path every row
                        let err = rel_l2(got, w);
                        assert!(err < tolerance(dtype), "{what} head {h} row {row}: {err}");
                    }
                    if !reaches {
                        assert!(lse.is_finite(), "{what} head {h} row {row}: lse {lse}");
                    }
                }
            }
        }
    }
}
