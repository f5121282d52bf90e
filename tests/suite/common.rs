//! Shared test helpers: a seeded generator, the one GPU of the test run, poisoned runs through
//! the GPU-resident form, and comparisons against the f64 reference.

use std::io::Write;
use std::sync::OnceLock;

use blockflash::kernel::{DType, KernelConfig};
use blockflash::{reference, Gpu, Mask, Output, Plan, Shape, Tensors, Tier};
use wgpu::util::DeviceExt;

/// splitmix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `BLOCKFLASH_SEED` or the clock; prints the seed with `what`.
    pub fn fresh(what: &str) -> Rng {
        let seed = std::env::var("BLOCKFLASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{what}: seed {seed} (BLOCKFLASH_SEED={seed} reproduces it)");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

/// The GPU every test shares (lavapipe in CI). Fails the test when there is no adapter.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let gpu = Gpu::new().unwrap_or_else(|e| panic!("tests need a GPU adapter: {e}"));
        println!("adapter: {}", gpu.adapter_info().name);
        gpu
    })
}

/// Whether the test device supports `tier`; prints what is skipped and why where it does not.
pub fn tier_or_skip(tier: Tier) -> bool {
    match gpu().supports(tier) {
        Ok(()) => true,
        Err(e) => {
            // Straight to stderr: libtest hides println! output of passing tests.
            let name = &gpu().adapter_info().name;
            writeln!(std::io::stderr(), "SKIPPED {tier} tests on {name}: {e}").ok();
            false
        }
    }
}

/// The test device with the tensor-core tier's cooperative matrices emulated where it has
/// none (see `Gpu::with_tensor_core_emulation`).
pub fn emulated_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new()
            .unwrap_or_else(|e| panic!("tests need a GPU adapter: {e}"))
            .with_tensor_core_emulation()
    })
}

/// A device whose storage bindings hold only 64 KiB, so that the host forms split the work
/// over batch elements and key/value heads.
pub fn small_binding_gpu() -> Gpu {
    limited_gpu(|l| wgpu::Limits {
        max_storage_buffer_binding_size: 64 << 10,
        ..l
    })
}

/// A device with the WebGPU baseline's 16 KiB of workgroup memory and 256 invocations per
/// workgroup, so that kernels take their smallest layouts.
pub fn baseline_gpu() -> Gpu {
    let baseline = wgpu::Limits::downlevel_defaults();
    limited_gpu(|l| wgpu::Limits {
        max_compute_workgroup_storage_size: baseline.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: baseline.max_compute_invocations_per_workgroup,
        max_compute_workgroup_size_x: baseline.max_compute_workgroup_size_x,
        ..l
    })
}

/// A device on the default adapter without optional features, its limits changed by `limits`.
fn limited_gpu(limits: impl FnOnce(wgpu::Limits) -> wgpu::Limits) -> Gpu {
    gpu_on_default_adapter(wgpu::Features::empty(), limits)
}

/// A device with the adapter's `SHADER_F16`, `SUBGROUP` and cooperative matrices where it offers
/// them, its limits changed by `limits`.
pub fn limited_gpu_with_features(limits: impl FnOnce(wgpu::Limits) -> wgpu::Limits) -> Gpu {
    let wanted = wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
    gpu_on_default_adapter(wanted, limits)
}

/// A device on the default adapter with those of `wanted` that it offers, and its limits
/// changed by `limits`.
fn gpu_on_default_adapter(
    wanted: wgpu::Features,
    limits: impl FnOnce(wgpu::Limits) -> wgpu::Limits,
) -> Gpu {
    let adapter = pollster::block_on(
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
            .request_adapter(&Default::default()),
    )
    .expect("adapter");
    let features = adapter.features() & wanted;
    let coop = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    let experimental = if coop {
        // SAFETY: the kernels use only configurations the adapter reports, as Gpu::new does.
        unsafe { wgpu::ExperimentalFeatures::enabled() }
    } else {
        wgpu::ExperimentalFeatures::disabled()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: features,
        required_limits: limits(adapter.limits()),
        experimental_features: experimental,
        ..Default::default()
    }))
    .expect("device");
    let configs = if coop {
        adapter.cooperative_matrix_properties()
    } else {
        Vec::new()
    };
    Gpu::from_device(device, queue, adapter.get_info(), configs)
}

/// A band |i - j| <= `width` whose tokens were randomly shuffled: scattered tiles that Reverse
/// Cuthill–McKee can pack again.
pub fn shuffled_band(rng: &mut Rng, n: usize, width: usize) -> Mask {
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    Mask::from_fn(n, n, |q, k| perm[q].abs_diff(perm[k]) <= width).expect("band")
}

/// Random Q, K, V for `shape`.
/// The head dims that `tier` has a tile for within `g`'s limits; the others are printed as
/// SKIPPED for `what` (the automatic plan runs them on another tier).
pub fn head_dims_with_tiles(g: &Gpu, tier: Tier, what: &str) -> Vec<usize> {
    let (run, skip): (Vec<usize>, Vec<usize>) = blockflash::shape::HEAD_DIMS
        .into_iter()
        .partition(|&d| !KernelConfig::candidates(&g.limits(), tier, d).is_empty());
    for d in skip {
        let why = "no tile of this tier fits the adapter's limits";
        writeln!(std::io::stderr(), "SKIPPED {what} at d={d}: {why}").ok();
    }
    run
}

pub fn inputs(rng: &mut Rng, shape: &Shape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        rng.vec(shape.q_len()),
        rng.vec(shape.kv_len()),
        rng.vec(shape.kv_len()),
    )
}

pub fn poisoned(gpu: &Gpu, e: DType, len: usize) -> wgpu::Buffer {
    filled(gpu, e, len, f32::NAN)
}

/// An output buffer of `len` elements of `e`, each `fill`.
pub fn filled(gpu: &Gpu, e: DType, len: usize, fill: f32) -> wgpu::Buffer {
    gpu.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("output filled before a run"),
            contents: &e.encode(&vec![fill; len.max(1)]),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
}

/// Runs `plan` through the GPU-resident form with NaN-poisoned outputs and reads O and LSE back.
pub fn run_poisoned(plan: &Plan, q: &[f32], k: &[f32], v: &[f32]) -> Output<f32> {
    run_poisoned_on(gpu(), plan, q, k, v)
}

/// [`run_poisoned`] for a plan built on `gpu`.
pub fn run_poisoned_on(gpu: &Gpu, plan: &Plan, q: &[f32], k: &[f32], v: &[f32]) -> Output<f32> {
    run_filled_on(gpu, plan, q, k, v, f32::NAN)
}

/// [`run_poisoned_on`] with O and LSE filled with `fill` before the run: a finite fill shows
/// where the kernels left a NaN unwritten, for tests whose expected outputs are NaN.
pub fn run_filled_on(
    gpu: &Gpu,
    plan: &Plan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    fill: f32,
) -> Output<f32> {
    let s = plan.shape();
    let dev = gpu.device();
    let e = plan.dtype();
    let up = |d: &[f32]| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &e.encode(d),
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let (qb, kb, vb) = (up(q), up(k), up(v));
    let (ob, lb) = (
        filled(gpu, e, s.q_len(), fill),
        filled(gpu, DType::F32, s.lse_len(), fill),
    );
    let mut enc = dev.create_command_encoder(&Default::default());
    plan.encode(
        &mut enc,
        &Tensors {
            q: &qb,
            k: &kb,
            v: &vb,
            o: &ob,
            lse: &lb,
        },
    )
    .expect("encode");
    let read = |buf: &wgpu::Buffer, bytes: u64, enc: &mut wgpu::CommandEncoder| {
        let st = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.copy_buffer_to_buffer(buf, 0, &st, 0, bytes);
        st
    };
    let so = read(&ob, e.bytes(s.q_len()), &mut enc);
    let sl = read(&lb, DType::F32.bytes(s.lse_len()), &mut enc);
    gpu.queue().submit([enc.finish()]);
    for st in [&so, &sl] {
        st.slice(..)
            .map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    }
    dev.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
    let get = |st: &wgpu::Buffer, e: DType, n: usize| -> Vec<f32> {
        let v = e.decode(&st.slice(..).get_mapped_range().expect("view"), n);
        st.unmap();
        v
    };
    Output {
        o: get(&so, e, s.q_len()),
        lse: get(&sl, DType::F32, s.lse_len()),
    }
}

/// Relative L2 error of `got` against `want` (NaN if any element is NaN).
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}

/// Checks a GPU output against the f64 reference: O by relative L2 error, LSE element by
/// element (−∞ exactly where the reference has it).
pub fn assert_close(what: &str, got: &Output<f32>, want: &Output<f64>, tol: f64) {
    let err = rel_l2(&got.o, &want.o);
    assert!(
        err <= tol,
        "{what}: O relative L2 error {err:e} exceeds {tol:e}"
    );
    if got.lse.is_empty() {
        return;
    }
    for (i, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
        if w == f64::NEG_INFINITY {
            assert!(g == f32::NEG_INFINITY, "{what}: LSE[{i}] = {g}, want -inf");
        } else {
            let e = (g as f64 - w).abs() / w.abs().max(1.0);
            assert!(e <= tol * 10.0, "{what}: LSE[{i}] = {g}, want {w}");
        }
    }
}

/// Error bound of a storage type against the f64 reference (on inputs rounded to the type):
/// relative L2 error of O. Measured on random inputs in [-1, 1) (lavapipe, 2026-11-25): about
/// 2e-4 for f16 and 1.2e-3 to 1.7e-3 for bf16 (rounding O to 8 significant bits dominates).
pub fn tolerance(e: DType) -> f64 {
    match e {
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        DType::BF16 => 1e-2,
    }
}

/// `x` rounded to the storage type `e`.
pub fn rounded(e: DType, x: Vec<f32>) -> Vec<f32> {
    let n = x.len();
    e.decode(&e.encode(&x), n)
}

/// Plans, runs (poisoned) and checks one case against the reference; returns the plan's path.
pub fn check_case(
    what: &str,
    rng: &mut Rng,
    shape: Shape,
    mask: Option<&Mask>,
    opts: blockflash::PlanOptions,
) -> blockflash::Path {
    check_case_on(gpu(), what, rng, shape, mask, opts)
}

/// [`check_case`] on device `g`.
pub fn check_case_on(
    g: &Gpu,
    what: &str,
    rng: &mut Rng,
    shape: Shape,
    mask: Option<&Mask>,
    opts: blockflash::PlanOptions,
) -> blockflash::Path {
    let e = opts.dtype;
    let (q, k, v) = inputs(rng, &shape);
    let (q, k, v) = (rounded(e, q), rounded(e, k), rounded(e, v));
    let plan = Plan::new(g, shape, mask, opts.clone())
        .unwrap_or_else(|err| panic!("{what}: plan failed: {err}"));
    let got = run_poisoned_on(g, &plan, &q, &k, &v);
    let want = reference::attention(&shape, &q, &k, &v, mask, opts.scale).expect("reference");
    let tier = plan.tier();
    assert_close(
        &format!("{what} ({}, {tier})", plan.path()),
        &got,
        &want,
        tolerance(e),
    );
    plan.path()
}
