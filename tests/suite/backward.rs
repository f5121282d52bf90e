//! The backward pass: the f64 reference backward against central finite differences of the f64
//! forward, and the GPU gradients (dQ, dK, dV) against the reference backward on every mask
//! family, every path, awkward lengths, Nq ≠ Nk, GQA, rows with no allowed key, per-batch masks,
//! reordered tokens, split-KV plans, every head dim and the WebGPU baseline's limits.
//!
//! Tolerances: the reference backward matches finite differences within a relative L2 error of
//! 1e-6 per gradient; GPU gradients with f32 storage match the reference within a relative L2
//! error of 1e-4 per gradient (5e-3 with f16 storage, 1e-2 with bf16 storage, on inputs rounded
//! to the storage type). GPU outputs are
//! poisoned with NaN before every run, so an element the kernels never write fails the check.

use std::io::Write;

use blockflash::kernel::DType;
use blockflash::shape::HEAD_DIMS;
use blockflash::suite::{family_mask, FAMILIES};
use blockflash::timing::{median_fwd_bwd_ms, Clock, Resident};
use blockflash::{
    reference, BackwardTensors, Error, Gpu, Gradients, KernelConfig, Mask, Path, Plan, PlanOptions,
    Reorder, Shape, Tier,
};
use wgpu::util::DeviceExt;

use crate::common::{
    baseline_gpu, emulated_gpu, gpu, head_dims_with_tiles, inputs, poisoned, rel_l2, rounded,
    shuffled_band, small_binding_gpu, Rng,
};

/// Relative L2 error allowed per gradient with f32 storage.
const TOL_F32: f64 = 1e-4;
/// Relative L2 error allowed per gradient with f16 storage.
const TOL_F16: f64 = 5e-3;
/// Relative L2 error allowed per gradient with bf16 storage (about 2e-3 measured).
const TOL_BF16: f64 = 1e-2;

/// `sum(O ∘ dO)` of the f64 reference forward: the loss whose gradients the backward computes.
fn loss(shape: &Shape, q: &[f32], k: &[f32], v: &[f32], mask: Option<&Mask>, d_o: &[f32]) -> f64 {
    let out = reference::attention(shape, q, k, v, mask, None).unwrap();
    out.o.iter().zip(d_o).map(|(&o, &g)| o * g as f64).sum()
}

#[test]
fn reference_backward_matches_finite_differences() {
    let mut rng = Rng::fresh("finite differences");
    let shape = Shape {
        batch: 2,
        heads: 2,
        kv_heads: 1,
        seq_q: 3,
        seq_k: 5,
        head_dim: 32,
    };
    // Per batch element: a causal-like pattern, and one with a query row that sees no key.
    let masks = vec![
        Mask::from_fn(3, 5, |q, k| k <= q + 2).unwrap(),
        Mask::from_fn(3, 5, |q, k| q != 1 && (k + q) % 2 == 0).unwrap(),
    ];
    let mask = Mask::per_batch(masks).unwrap();
    let (q, k, v) = inputs(&mut rng, &shape);
    let d_o = rng.vec(shape.q_len());
    let grads = reference::attention_backward(&shape, &q, &k, &v, Some(&mask), None, &d_o).unwrap();
    let eps = 1e-3f32;
    // Central differences over the step f32 really takes (x ± eps rounds).
    let numeric = |which: usize| -> Vec<f64> {
        let mut x = [q.clone(), k.clone(), v.clone()];
        (0..x[which].len())
            .map(|i| {
                let x0 = x[which][i];
                let (hi, lo) = (x0 + eps, x0 - eps);
                x[which][i] = hi;
                let up = loss(&shape, &x[0], &x[1], &x[2], Some(&mask), &d_o);
                x[which][i] = lo;
                let down = loss(&shape, &x[0], &x[1], &x[2], Some(&mask), &d_o);
                x[which][i] = x0;
                (up - down) / (hi as f64 - lo as f64)
            })
            .collect()
    };
    for (what, which, analytic) in [
        ("dq", 0, &grads.dq),
        ("dk", 1, &grads.dk),
        ("dv", 2, &grads.dv),
    ] {
        let fd = numeric(which);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (a, n) in analytic.iter().zip(&fd) {
            num += (a - n).powi(2);
            den += n * n;
        }
        let err = (num / den).sqrt();
        assert!(
            err <= 1e-6,
            "{what}: relative L2 error {err:e} against finite differences"
        );
    }
    // The row that sees no key (batch 1, query 1) gets no gradient.
    for h in 0..2 {
        let row = ((2 + h) * 3 + 1) * 32;
        assert!(grads.dq[row..row + 32].iter().all(|&g| g == 0.0));
    }
}

/// A storage buffer on `gpu` holding `data` in storage type `e`.
fn upload(gpu: &Gpu, e: DType, data: &[f32]) -> wgpu::Buffer {
    gpu.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &e.encode(data),
            usage: wgpu::BufferUsages::STORAGE,
        })
}

/// Runs the backward of `plan` through the GPU-resident form with NaN-poisoned gradient buffers
/// and reads the gradients back.
fn backward_poisoned(
    gpu: &Gpu,
    plan: &Plan,
    [q, k, v, o, lse, d_o]: [&[f32]; 6],
) -> Gradients<f32> {
    let (s, e, dev) = (plan.shape(), plan.dtype(), gpu.device());
    let (qb, kb, vb, ob, db) = (
        upload(gpu, e, q),
        upload(gpu, e, k),
        upload(gpu, e, v),
        upload(gpu, e, o),
        upload(gpu, e, d_o),
    );
    let lb = upload(gpu, DType::F32, lse);
    let (dq, dk, dv) = (
        poisoned(gpu, e, s.q_len()),
        poisoned(gpu, e, s.kv_len()),
        poisoned(gpu, e, s.kv_len()),
    );
    let mut enc = dev.create_command_encoder(&Default::default());
    plan.encode_backward(
        &mut enc,
        &BackwardTensors {
            q: &qb,
            k: &kb,
            v: &vb,
            o: &ob,
            lse: &lb,
            d_o: &db,
            dq: &dq,
            dk: &dk,
            dv: &dv,
        },
    )
    .expect("encode_backward");
    let staging: Vec<(wgpu::Buffer, usize)> =
        [(&dq, s.q_len()), (&dk, s.kv_len()), (&dv, s.kv_len())]
            .into_iter()
            .map(|(buf, n)| {
                let st = dev.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: e.bytes(n),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                enc.copy_buffer_to_buffer(buf, 0, &st, 0, e.bytes(n));
                (st, n)
            })
            .collect();
    gpu.queue().submit([enc.finish()]);
    for (st, _) in &staging {
        st.slice(..)
            .map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    }
    dev.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
    let mut got = staging.iter().map(|(st, n)| {
        let v = e.decode(&st.slice(..).get_mapped_range().expect("view"), *n);
        st.unmap();
        v
    });
    Gradients {
        dq: got.next().unwrap(),
        dk: got.next().unwrap(),
        dv: got.next().unwrap(),
    }
}

/// Checks each gradient against the reference by relative L2 error (NaN fails).
fn assert_grads(what: &str, got: &Gradients<f32>, want: &Gradients<f64>, tol: f64) {
    for (name, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        let err = rel_l2(g, w);
        assert!(
            err <= tol,
            "{what}: {name} relative L2 error {err:e} exceeds {tol:e}"
        );
    }
}

/// Plans `mask` with `opts`, runs the forward, then the backward (poisoned, GPU-resident), and
/// checks the gradients against the f64 reference; returns the plan.
fn check_backward(
    what: &str,
    rng: &mut Rng,
    shape: Shape,
    mask: Option<&Mask>,
    opts: PlanOptions,
) -> Plan {
    check_backward_on(gpu(), what, rng, shape, mask, opts)
}

/// [`check_backward`] on device `gpu`.
fn check_backward_on(
    gpu: &Gpu,
    what: &str,
    rng: &mut Rng,
    shape: Shape,
    mask: Option<&Mask>,
    opts: PlanOptions,
) -> Plan {
    let e = opts.dtype;
    let (q, k, v) = inputs(rng, &shape);
    let (q, k, v) = (rounded(e, q), rounded(e, k), rounded(e, v));
    let d_o = rounded(e, rng.vec(shape.q_len()));
    let plan = Plan::new(gpu, shape, mask, opts.clone())
        .unwrap_or_else(|err| panic!("{what}: plan failed: {err}"));
    let fwd = plan.run(&q, &k, &v).expect("forward");
    let got = backward_poisoned(gpu, &plan, [&q, &k, &v, &fwd.o, &fwd.lse, &d_o]);
    let want = reference::attention_backward(&shape, &q, &k, &v, mask, opts.scale, &d_o).unwrap();
    let tol = match e {
        DType::F32 => TOL_F32,
        DType::F16 => TOL_F16,
        DType::BF16 => TOL_BF16,
    };
    assert_grads(
        &format!("{what} ({}, {})", plan.path(), plan.tier()),
        &got,
        &want,
        tol,
    );
    plan
}

fn forced(path: Path, tile: Option<(usize, usize)>) -> PlanOptions {
    PlanOptions {
        path: Some(path),
        tile,
        reorder: Reorder::Off,
        ..Default::default()
    }
}

/// Checks `mask` on every path it is eligible for (run-length only where it is).
fn every_path(what: &str, rng: &mut Rng, shape: Shape, mask: &Mask, tile: Option<(usize, usize)>) {
    every_path_on(gpu(), what, rng, shape, mask, |path| forced(path, tile));
}

/// [`every_path`] on device `gpu` with the options `opts` gives each path.
fn every_path_on(
    gpu: &Gpu,
    what: &str,
    rng: &mut Rng,
    shape: Shape,
    mask: &Mask,
    opts: impl Fn(Path) -> PlanOptions,
) {
    for path in [Path::Dense, Path::RunLength, Path::Sparse] {
        let opts = opts(path);
        match Plan::new(gpu, shape, Some(mask), opts.clone()) {
            Err(Error::PathNotEligible(_)) => assert_eq!(path, Path::RunLength, "{what}"),
            Err(e) => panic!("{what}: {e}"),
            Ok(_) => {
                let what = format!("{what} {path}");
                check_backward_on(gpu, &what, rng, shape, Some(mask), opts);
            }
        }
    }
}

#[test]
fn gradients_match_reference_on_every_mask_family_and_path() {
    let mut rng = Rng::fresh("backward families");
    let seq = 100; // not a multiple of any tile
    let shape = Shape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        seq_q: seq,
        seq_k: seq,
        head_dim: 32,
    };
    for name in FAMILIES {
        let mask = family_mask(name, seq, rng.next_u64()).unwrap();
        every_path(name, &mut rng, shape, &mask, Some((16, 32)));
    }
    // A mask that allows every pair: the unmasked dense kernels, without mask bits.
    let all = Mask::full(seq, seq).unwrap();
    let plan = check_backward(
        "every pair",
        &mut rng,
        shape,
        Some(&all),
        Default::default(),
    );
    assert_eq!(plan.path(), Path::Dense, "{}", plan.describe());
}

#[test]
fn gradients_match_reference_on_rectangular_masks_with_gqa() {
    let mut rng = Rng::fresh("backward rectangular");
    for (nq, nk) in [(45, 133), (133, 45)] {
        let shape = Shape {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            seq_q: nq,
            seq_k: nk,
            head_dim: 32,
        };
        // Decoding-style causal: with Nq > Nk the first rows see no key.
        let causal = Mask::causal(nq, nk).unwrap();
        let tile = Some((16, 32));
        every_path(&format!("causal {nq}x{nk}"), &mut rng, shape, &causal, tile);
        let window = Mask::sliding_window(nq, nk, 20, false).unwrap();
        every_path(
            &format!("window {nq}x{nk}"),
            &mut rng,
            shape,
            &window,
            Some((32, 32)),
        );
    }
    // Without a mask (the dense path without mask bits), odd lengths.
    let shape = Shape {
        batch: 2,
        heads: 2,
        kv_heads: 1,
        seq_q: 37,
        seq_k: 71,
        head_dim: 32,
    };
    check_backward("no mask", &mut rng, shape, None, PlanOptions::default());
}

#[test]
fn gradients_match_reference_at_every_head_dim_and_within_baseline_limits() {
    // Large head dims and the WebGPU baseline's 16 KiB of workgroup memory make the kernels
    // stage head-dim chunks; GQA makes a step span query heads.
    let mut rng = Rng::fresh("backward head dims");
    let baseline = baseline_gpu();
    let n = 70;
    let mask = family_mask("documents", n, rng.next_u64()).unwrap();
    for (i, d) in HEAD_DIMS.into_iter().enumerate() {
        let shape = Shape {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            seq_q: n,
            seq_k: n,
            head_dim: d,
        };
        // The dense path (its mask bits) and the sparse one by turns: each pipeline costs a
        // compilation.
        let path = [Path::Dense, Path::Sparse][i % 2];
        for (device, gpu) in [("adapter", gpu()), ("baseline", &baseline)] {
            let what = format!("d={d} {device} {path}");
            check_backward_on(gpu, &what, &mut rng, shape, Some(&mask), forced(path, None));
        }
    }
}

#[test]
fn rows_with_no_allowed_key_get_zero_gradients() {
    let mut rng = Rng::fresh("backward empty rows");
    let n = 70;
    // Rows 0..20 and every seventh row see nothing; keys 50.. are never seen.
    let mask = Mask::from_fn(n, n, |q, k| q >= 20 && q % 7 != 0 && k < 50 && k <= q).unwrap();
    let shape = Shape {
        batch: 1,
        heads: 2,
        kv_heads: 2,
        seq_q: n,
        seq_k: n,
        head_dim: 32,
    };
    every_path("empty rows", &mut rng, shape, &mask, Some((16, 32)));
    // An all-empty mask: every gradient is zero, never NaN.
    let empty = Mask::empty(n, n).unwrap();
    every_path("empty mask", &mut rng, shape, &empty, Some((16, 32)));
}

#[test]
fn gradients_match_reference_with_per_batch_masks() {
    let mut rng = Rng::fresh("backward per-batch");
    let n = 90;
    let masks = vec![
        Mask::causal(n, n).unwrap(),
        Mask::documents(&[30, 25, 35], true).unwrap(),
        Mask::random_blocks(n, n, 16, 0.3, rng.next_u64()).unwrap(),
    ];
    let mask = Mask::per_batch(masks).unwrap();
    let shape = Shape {
        batch: 3,
        heads: 2,
        kv_heads: 1,
        seq_q: n,
        seq_k: n,
        head_dim: 32,
    };
    every_path("per-batch", &mut rng, shape, &mask, Some((16, 32)));
}

#[test]
fn gradients_come_back_in_original_order_with_reordering_and_split_kv() {
    let mut rng = Rng::fresh("backward rcm");
    let n = 128;
    let shape = Shape {
        batch: 2,
        heads: 2,
        kv_heads: 1,
        seq_q: n,
        seq_k: n,
        head_dim: 32,
    };
    let band = shuffled_band(&mut rng, n, 6);
    for path in [Path::Dense, Path::Sparse] {
        let opts = PlanOptions {
            reorder: Reorder::On,
            ..forced(path, Some((16, 32)))
        };
        let plan = check_backward(&format!("rcm {path}"), &mut rng, shape, Some(&band), opts);
        assert!(plan.describe().contains("reordered"), "{}", plan.describe());
    }
    // Split-KV forward work items: the backward walks each query tile whole.
    let global = Mask::longformer(n, 4, &[0, 1, 2]).unwrap();
    let opts = PlanOptions {
        max_tiles_per_workgroup: Some(1),
        ..forced(Path::Sparse, Some((16, 32)))
    };
    let plan = check_backward("split-KV", &mut rng, shape, Some(&global), opts);
    assert!(plan.describe().contains("split-KV"), "{}", plan.describe());
}

#[test]
fn host_form_matches_and_checks_its_arguments() {
    let mut rng = Rng::fresh("backward host form");
    let shape = Shape {
        batch: 1,
        heads: 4,
        kv_heads: 2,
        seq_q: 50,
        seq_k: 50,
        head_dim: 32,
    };
    let mask = family_mask("documents", 50, rng.next_u64()).unwrap();
    let (q, k, v) = inputs(&mut rng, &shape);
    let d_o = rng.vec(shape.q_len());
    let plan = Plan::new(gpu(), shape, Some(&mask), PlanOptions::default()).unwrap();
    let fwd = plan.run(&q, &k, &v).unwrap();
    let got = plan.backward(&q, &k, &v, &fwd.o, &fwd.lse, &d_o).unwrap();
    let want = reference::attention_backward(&shape, &q, &k, &v, Some(&mask), None, &d_o).unwrap();
    assert_grads("host form", &got, &want, TOL_F32);

    let short = &d_o[1..];
    assert!(matches!(
        plan.backward(&q, &k, &v, &fwd.o, &fwd.lse, short),
        Err(Error::ShapeMismatch { what: "d_o", .. })
    ));
    assert!(matches!(
        plan.backward(&q, &k, &v, &fwd.o, &fwd.lse[1..], &d_o),
        Err(Error::ShapeMismatch { what: "lse", .. })
    ));
    let no_lse = Plan::new(
        gpu(),
        shape,
        Some(&mask),
        PlanOptions {
            write_lse: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        no_lse.backward(&q, &k, &v, &fwd.o, &fwd.lse, &d_o),
        Err(Error::InvalidArgument { what: "plan", .. })
    ));
}

#[test]
fn host_form_splits_inputs_over_the_binding_limit() {
    let small = small_binding_gpu();
    let mut rng = Rng::fresh("backward split");
    // Split over batch elements (per-batch masks), then over key/value heads.
    let masks = (0..3)
        .map(|b| Mask::sliding_window(100, 60, 10 + 20 * b, false).unwrap())
        .collect();
    let cases = [
        (
            Shape {
                batch: 3,
                heads: 4,
                kv_heads: 2,
                seq_q: 100,
                seq_k: 60,
                head_dim: 32,
            },
            Mask::per_batch(masks).unwrap(),
        ),
        (
            Shape {
                batch: 2,
                heads: 8,
                kv_heads: 4,
                seq_q: 100,
                seq_k: 120,
                head_dim: 32,
            },
            Mask::causal(100, 120).unwrap(),
        ),
    ];
    for (shape, mask) in cases {
        let (q, k, v) = inputs(&mut rng, &shape);
        let d_o = rng.vec(shape.q_len());
        // One tile shape and path for both: each pipeline compiles once on this device.
        let opts = forced(Path::Sparse, Some((16, 32)));
        let plan = Plan::new(&small, shape, Some(&mask), opts).unwrap();
        assert!(
            !plan.describe().contains(" 1 dispatch(es)"),
            "{}",
            plan.describe()
        );
        let fwd = plan.run(&q, &k, &v).unwrap();
        let got = plan.backward(&q, &k, &v, &fwd.o, &fwd.lse, &d_o).unwrap();
        let want =
            reference::attention_backward(&shape, &q, &k, &v, Some(&mask), None, &d_o).unwrap();
        assert_grads("split host form", &got, &want, TOL_F32);
    }
}

#[test]
fn f16_storage_gradients_match_reference() {
    let mut rng = Rng::fresh("backward f16");
    if gpu().tier_for(DType::F16).is_err() {
        println!("no f16 tier on this adapter: skipped");
        return;
    }
    let shape = Shape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        seq_q: 100,
        seq_k: 100,
        head_dim: 64,
    };
    let mask = family_mask("sliding-window", 100, rng.next_u64()).unwrap();
    for path in [Path::Dense, Path::RunLength, Path::Sparse] {
        let opts = PlanOptions {
            dtype: DType::F16,
            ..forced(path, None)
        };
        check_backward(&format!("f16 {path}"), &mut rng, shape, Some(&mask), opts);
    }
}

/// The tensor-core tier's gradients, from its own dK/dV and dQ kernels where they fit (else the
/// portable ones, as on lavapipe for 64-row tiles): on cooperative matrices where the adapter
/// has them, else on emulated ones (the kernels' logic, tiles and masks).
#[test]
fn tensor_core_gradients_match_reference_on_every_family_path_and_shape() {
    let g = emulated_gpu();
    if let Err(e) = g.supports(Tier::TensorCore) {
        panic!("emulated tensor cores need SHADER_F16: {e}");
    }
    let mut rng = Rng::fresh("backward tensor cores");
    let tc = |path: Option<Path>, tile: Option<(usize, usize)>| PlanOptions {
        dtype: DType::F16,
        tier: Some(Tier::TensorCore),
        reorder: Reorder::Off,
        path,
        tile,
        ..Default::default()
    };
    // Every family and path; a length no tile divides, GQA; both tile heights by turns.
    let seq = 100;
    let shape = Shape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        seq_q: seq,
        seq_k: seq,
        head_dim: 64,
    };
    for (i, name) in FAMILIES.into_iter().enumerate() {
        let mask = family_mask(name, seq, rng.next_u64()).unwrap();
        let tile = Some([(16, 32), (32, 32)][i % 2]);
        let what = format!("tensor cores {name} {tile:?}");
        every_path_on(g, &what, &mut rng, shape, &mask, |p| tc(Some(p), tile));
    }
    // At d64 the plan's tiles fit the tensor-core kernels within 24 KiB of workgroup memory
    // (lavapipe's under emulation) and 48 KiB, so it is they that ran.
    let mask = family_mask("causal", seq, rng.next_u64()).unwrap();
    let plan = check_backward_on(
        g,
        "tensor cores",
        &mut rng,
        shape,
        Some(&mask),
        tc(None, None),
    );
    // (directly, or through a 64x32 plan where the device picks 128-row tiles)
    let described = plan.describe();
    assert!(
        described.contains("dK/dV tensor cores") && described.contains("dQ tensor cores"),
        "{described}"
    );
    // 128-row tiles (where the device has them) run their backward through a 64x32 plan of
    // the mask rebuilt from the block mask, in the caller's token order also when reordered.
    let tall = KernelConfig::candidates(&g.limits(), Tier::TensorCore, 64)
        .into_iter()
        .find(|c| !c.backward_takes_tiles());
    match tall {
        None => {
            let name = &g.adapter_info().name;
            writeln!(
                std::io::stderr(),
                "SKIPPED tensor-core gradients of 128-row plans on {name}: no such tile fits"
            )
            .ok();
        }
        Some(c) => {
            let tile = Some((c.tile_rows, c.tile_cols));
            let shape = Shape {
                batch: 2,
                heads: 4,
                kv_heads: 2,
                seq_q: 300,
                seq_k: 300,
                head_dim: 64,
            };
            for name in ["causal", "documents", "tree"] {
                let mask = family_mask(name, 300, rng.next_u64()).unwrap();
                let what = format!("tensor cores {name} {tile:?}");
                let plan =
                    check_backward_on(g, &what, &mut rng, shape, Some(&mask), tc(None, tile));
                let described = plan.describe();
                assert!(described.contains("(through a"), "{described}");
            }
            let what = format!("tensor cores no mask {tile:?}");
            let plan = check_backward_on(g, &what, &mut rng, shape, None, tc(None, tile));
            assert!(
                plan.describe().contains("(through a"),
                "{}",
                plan.describe()
            );
            let per_batch = Mask::per_batch(vec![
                family_mask("documents", 300, rng.next_u64()).unwrap(),
                family_mask("sliding-window", 300, rng.next_u64()).unwrap(),
            ])
            .unwrap();
            let what = format!("tensor cores per-batch mask {tile:?}");
            check_backward_on(g, &what, &mut rng, shape, Some(&per_batch), tc(None, tile));
            let band = shuffled_band(&mut rng, 256, 20);
            let opts = PlanOptions {
                reorder: Reorder::On,
                ..tc(Some(Path::Sparse), tile)
            };
            let shape = Shape::new(1, 2, 256, 64);
            let what = format!("tensor cores reordered {tile:?}");
            let plan = check_backward_on(g, &what, &mut rng, shape, Some(&band), opts);
            assert!(plan.describe().contains("reordered"), "{}", plan.describe());
        }
    }
    // Head dims and tile shapes the plan picks, Nq != Nk (decoding-style causal: with Nq > Nk
    // the first rows see no key), batch 2, and no mask.
    for d in head_dims_with_tiles(g, Tier::TensorCore, "tensor-core gradients") {
        for (nq, nk) in [(45, 133), (133, 45)] {
            let shape = Shape {
                batch: 2,
                heads: 4,
                kv_heads: 2,
                seq_q: nq,
                seq_k: nk,
                head_dim: d,
            };
            let mask = Mask::causal(nq, nk).unwrap();
            let what = format!("tensor cores d={d} causal {nq}x{nk}");
            check_backward_on(g, &what, &mut rng, shape, Some(&mask), tc(None, None));
        }
        let shape = Shape {
            batch: 2,
            heads: 2,
            kv_heads: 2,
            seq_q: 77,
            seq_k: 77,
            head_dim: d,
        };
        let what = format!("tensor cores d={d} no mask");
        check_backward_on(g, &what, &mut rng, shape, None, tc(None, None));
    }
    // Tokens reordered by Reverse Cuthill–McKee (a scattered band).
    let n = 96;
    let shape = Shape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        seq_q: n,
        seq_k: n,
        head_dim: 32,
    };
    let mask = shuffled_band(&mut rng, n, 6);
    let opts = PlanOptions {
        reorder: Reorder::On,
        ..tc(Some(Path::Sparse), Some((16, 32)))
    };
    let plan = check_backward_on(
        g,
        "tensor cores reordered",
        &mut rng,
        shape,
        Some(&mask),
        opts,
    );
    assert!(plan.describe().contains("reordered"), "{}", plan.describe());
}

#[test]
fn sampled_gradient_errors_pass_the_reference_and_catch_wrong_elements() {
    let mut rng = Rng::fresh("sampled gradient check");
    let shape = Shape {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 45,
        seq_k: 61,
        head_dim: 32,
    };
    // Rows 0..5 see no key; keys 50.. are never seen.
    let mask = Mask::from_fn(45, 61, |q, k| q >= 5 && k < 50 && k <= q + 10).unwrap();
    let (q, k, v) = inputs(&mut rng, &shape);
    let d_o = rng.vec(shape.q_len());
    let want = reference::attention_backward(&shape, &q, &k, &v, Some(&mask), None, &d_o).unwrap();
    let exact = Gradients {
        dq: want.dq.iter().map(|&x| x as f32).collect(),
        dk: want.dk.iter().map(|&x| x as f32).collect(),
        dv: want.dv.iter().map(|&x| x as f32).collect(),
    };
    let errors = |g: &Gradients<f32>, samples| {
        reference::sampled_gradient_errors(&shape, &q, &k, &v, Some(&mask), None, &d_o, g, samples)
    };
    for samples in [1, 8, 1000] {
        for (name, e) in ["dq", "dk", "dv"].iter().zip(errors(&exact, samples)) {
            assert!(e <= 1e-6, "{name} with {samples} samples: {e:e}");
        }
    }
    // Query row 5 (the first that sees keys) of the first head is sampled when every row is;
    // key 0 of the last key/value head is always sampled.
    let d = shape.head_dim;
    let last_head_key0 = (shape.batch * shape.kv_heads - 1) * shape.seq_k * d;
    let mut wrong = exact.clone();
    wrong.dq[5 * d] += 1.0;
    wrong.dk[last_head_key0] += 1.0;
    wrong.dv[last_head_key0 + 1] -= 1.0;
    for (name, e) in ["dq", "dk", "dv"].iter().zip(errors(&wrong, 1000)) {
        assert!(e > 1e-2, "{name}: a wrong element passed ({e:e})");
    }
    // A NaN anywhere (an element never written into a poisoned buffer) fails, sampled or not.
    let mut unwritten = exact.clone();
    unwritten.dk[0] = f32::NAN;
    let [dq, dk, dv] = errors(&unwritten, 1);
    assert!(dq <= 1e-6 && dk.is_nan() && dv <= 1e-6, "{dq} {dk} {dv}");
}

#[test]
fn timed_forward_backward_on_resident_buffers_gives_the_gradients() {
    let mut rng = Rng::fresh("timed backward");
    let shape = Shape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        seq_q: 96,
        seq_k: 96,
        head_dim: 32,
    };
    let mask = family_mask("documents", 96, rng.next_u64()).unwrap();
    let (q, k, v) = inputs(&mut rng, &shape);
    let d_o = rng.vec(shape.q_len());
    let plan = Plan::new(gpu(), shape, Some(&mask), PlanOptions::default()).unwrap();
    let forward_only = Resident::new(gpu(), &plan, &q, &k, &v).unwrap();
    assert!(matches!(
        median_fwd_bwd_ms(gpu(), &plan, &forward_only, 0, 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Resident::with_gradient(gpu(), &plan, &q, &k, &v, &d_o[1..]),
        Err(Error::ShapeMismatch { what: "d_o", .. })
    ));
    let buffers = Resident::with_gradient(gpu(), &plan, &q, &k, &v, &d_o).unwrap();
    let t = median_fwd_bwd_ms(gpu(), &plan, &buffers, 1, 3).unwrap();
    assert!(t.fwd > 0.0 && t.fwd_bwd > 0.0, "{t:?}");
    if t.clock == Clock::Timestamps {
        // The forward pass is the first part of every timed run.
        assert!(t.fwd <= t.fwd_bwd, "{t:?}");
    }
    buffers.poison(gpu());
    let (o, got) = buffers.run_backward_and_read(gpu(), &plan).unwrap();
    let fwd = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
    assert!(rel_l2(&o, &fwd.o) <= 1e-5);
    let want = reference::attention_backward(&shape, &q, &k, &v, Some(&mask), None, &d_o).unwrap();
    assert_grads("resident", &got, &want, TOL_F32);
}

#[test]
fn bf16_storage_gradients_match_reference_with_gqa_per_batch_reordering_and_splits() {
    let mut rng = Rng::fresh("backward bf16");
    let bf16 = |opts: PlanOptions| PlanOptions {
        dtype: DType::BF16,
        ..opts
    };
    let n = 90;
    let per_batch = Mask::per_batch(vec![
        Mask::causal(n, n).unwrap(),
        Mask::documents(&[30, 25, 35], true).unwrap(),
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
    for path in [Path::Dense, Path::RunLength, Path::Sparse] {
        let opts = bf16(forced(path, Some((16, 32))));
        let plan = check_backward(
            &format!("bf16 {path}"),
            &mut rng,
            gqa,
            Some(&per_batch),
            opts,
        );
        assert_eq!(plan.dtype(), DType::BF16);
    }
    let band = shuffled_band(&mut rng, n, 5);
    let rcm = bf16(PlanOptions {
        reorder: Reorder::On,
        ..forced(Path::Sparse, Some((16, 32)))
    });
    let shared = Shape { batch: 2, ..gqa };
    check_backward("bf16 rcm", &mut rng, shared, Some(&band), rcm);
    let split = bf16(PlanOptions {
        max_tiles_per_workgroup: Some(1),
        ..forced(Path::Sparse, Some((16, 32)))
    });
    let global = Mask::longformer(n, 4, &[0, 1]).unwrap();
    check_backward("bf16 split-KV", &mut rng, shared, Some(&global), split);
    // Odd lengths without a mask, head dim 32, the host form.
    let shape = Shape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        seq_q: 37,
        seq_k: 71,
        head_dim: 32,
    };
    check_backward(
        "bf16 no mask",
        &mut rng,
        shape,
        None,
        bf16(PlanOptions::default()),
    );
    let (q, k, v) = inputs(&mut rng, &shape);
    let (q, k, v) = (
        rounded(DType::BF16, q),
        rounded(DType::BF16, k),
        rounded(DType::BF16, v),
    );
    let d_o = rounded(DType::BF16, rng.vec(shape.q_len()));
    let plan = Plan::new(gpu(), shape, None, bf16(PlanOptions::default())).unwrap();
    let fwd = plan.run(&q, &k, &v).unwrap();
    let got = plan.backward(&q, &k, &v, &fwd.o, &fwd.lse, &d_o).unwrap();
    let want = reference::attention_backward(&shape, &q, &k, &v, None, None, &d_o).unwrap();
    assert_grads("bf16 host form", &got, &want, TOL_BF16);
}
