//! The benchmark suite: the mask families of real workloads at a given length, and one timed,
//! verified run of a case (masked plan against the dense plan on the same inputs), forward
//! ([`run_case`]) or forward + backward ([`run_backward_case`]).

use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernel::Path;
use crate::mask::{complete_tree_parents, Mask, SplitMix64};
use crate::plan::{Plan, PlanOptions};
use crate::reference::{sampled_error, sampled_gradient_errors};
use crate::shape::Shape;
use crate::timing::{median_fwd_bwd_ms, median_ms, Clock, FwdBwdMs, Resident};

/// Names of the suite's mask families, in the order they run.
pub const FAMILIES: [&str; 8] = [
    "causal",
    "sliding-window",
    "documents",
    "prefix-lm",
    "longformer",
    "bigbird",
    "tree",
    "random-blocks",
];

/// Document lengths drawn from a log-normal distribution (median `median`, σ = 1) that add up
/// to `seq` (the last document takes the remainder).
pub fn lognormal_lengths(seq: usize, median: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    let mut left = seq;
    while left > 0 {
        // Box–Muller
        let u1 = rng.next_f64().max(1e-12);
        let u2 = rng.next_f64();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let len = ((median as f64) * z.exp()).round().max(1.0) as usize;
        let len = len.min(left);
        out.push(len);
        left -= len;
    }
    out
}

/// The suite's mask of family `name` at length `seq` (square), scaled from the settings used
/// at N = 16384: sliding window 1024 (N/16), document median 256 (N/64), Longformer band ±128
/// (N/128) with 16 global tokens, BigBird band and 3 random blocks of 64 per query block, a
/// complete 4-ary tree of depth 6 (padded with tokens that see only themselves), random
/// 128-token blocks (N/128) with p = 0.1.
pub fn family_mask(name: &str, seq: usize, seed: u64) -> Result<Mask> {
    let unit = (seq / 128).max(1);
    match name {
        "causal" => Mask::causal(seq, seq),
        "sliding-window" => Mask::sliding_window(seq, seq, (seq / 16).max(1), true),
        "documents" => Mask::documents(&lognormal_lengths(seq, (seq / 64).max(1), seed), true),
        "prefix-lm" => Mask::document_prefix_lm_fraction(
            &lognormal_lengths(seq, (seq / 64).max(1), seed),
            1.0 / 3.0,
        ),
        "longformer" => {
            let global: Vec<usize> = (0..16.min(seq)).collect();
            Mask::longformer(seq, unit, &global)
        }
        "bigbird" => Mask::bigbird(seq, unit, 16.min(seq), (seq / 256).max(1), 3, seed),
        "tree" => {
            let mut parents = complete_tree_parents(6, 4)?;
            parents.truncate(seq);
            // Tokens past the tree see only themselves (padding).
            let tree_len = parents.len();
            let tree = Mask::tree(&parents)?;
            Mask::from_fn(seq, seq, |q, k| {
                if q < tree_len && k < tree_len {
                    tree.get(0, q, k)
                } else {
                    q == k
                }
            })
        }
        "random-blocks" => Mask::random_blocks(seq, seq, unit, 0.1, seed),
        other => Err(crate::Error::InvalidArgument {
            what: "mask family",
            why: format!("{other:?} is not one of {FAMILIES:?}"),
        }),
    }
}

/// One measured case of the suite.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Mask family.
    pub mask: String,
    /// The problem shape.
    pub shape: Shape,
    /// Fraction of tiles (at the plan's tile shape) with any allowed pair.
    pub active_tiles: f64,
    /// The path the masked plan chose.
    pub path: Path,
    /// Tile shape of the masked plan.
    pub tile: (usize, usize),
    /// Median ms of the dense plan on the same inputs: every tile computed, no mask read
    /// (forward + backward in a [`run_backward_case`]).
    pub ms_dense: f64,
    /// Median ms of the masked plan (forward + backward in a [`run_backward_case`]).
    pub ms_masked: f64,
    /// ms_dense / ms_masked.
    pub speedup: f64,
    /// 1 / active_tiles.
    pub ideal_speedup: f64,
    /// Useful TFLOP/s of the masked plan: FLOPs of the active tiles only, 2 matmuls forward and
    /// 5 more backward.
    pub tflops: f64,
    /// Largest relative L2 error of sampled output rows against the f64 reference.
    pub max_rel_error: f64,
    /// ms to build the masked plan (block mask, choice, uploads, kernel compile).
    pub ms_plan: f64,
    /// How the times were measured.
    pub clock: Clock,
    /// The kernel tier of the masked plan.
    pub tier: crate::gpu::Tier,
    /// The forward parts and gradient errors of a forward + backward case; `None` for a
    /// forward case.
    pub backward: Option<BackwardResult>,
}

impl CaseResult {
    /// What was timed: "fwd" (the forward pass) or "fwd+bwd" (forward then backward).
    pub fn pass(&self) -> &'static str {
        if self.backward.is_some() {
            "fwd+bwd"
        } else {
            "fwd"
        }
    }
}

/// What a forward + backward case adds to a [`CaseResult`].
#[derive(Clone, Debug)]
pub struct BackwardResult {
    /// The dense plan's times (shared by the cases of one run: see [`run_backward_case`]).
    pub dense: FwdBwdMs,
    /// Median ms of the masked plan's forward pass within the forward + backward runs.
    pub ms_fwd_masked: f64,
    /// Relative L2 errors of dQ, dK and dV against the f64 reference on samples
    /// ([`sampled_gradient_errors`]).
    pub grad_errors: [f64; 3],
}

/// How a case is measured.
#[derive(Clone, Copy, Debug)]
pub struct Measure {
    /// Timed runs after a warm-up of two (the median is reported).
    pub repeats: usize,
    /// Output rows checked against the f64 reference (and, forward + backward, dQ rows and
    /// dK/dV keys).
    pub samples: usize,
    /// Seed of the random inputs.
    pub seed: u64,
}

/// Warm-up runs before the timed ones.
const WARMUP: usize = 2;

/// Runs one case: the dense plan (every tile, no mask) and the masked plan on the same random
/// inputs, timed, with the masked output checked on `samples` rows.
pub fn run_case(
    gpu: &Gpu,
    name: &str,
    shape: Shape,
    mask: &Mask,
    options: &PlanOptions,
    measure: Measure,
) -> Result<CaseResult> {
    let case = Case::new(gpu, shape, mask, options, measure.seed, false)?;
    let buffers = Resident::new(gpu, &case.masked, &case.q, &case.k, &case.v)?;
    let (ms_dense, _) = median_ms(
        gpu,
        &dense_plan(gpu, shape, options)?,
        &buffers,
        WARMUP,
        measure.repeats,
    )?;
    let (ms_masked, clock) = median_ms(gpu, &case.masked, &buffers, WARMUP, measure.repeats)?;
    buffers.poison(gpu);
    let out = buffers.run_and_read(gpu, &case.masked)?;
    let max_rel_error = case.output_error(mask, options, &out, measure.samples);
    Ok(case_result(
        name,
        &case.masked,
        [ms_dense, ms_masked],
        max_rel_error,
        case.ms_plan,
        clock,
        None,
    ))
}

/// Runs one forward + backward case: like [`run_case`], timing forward then backward of each
/// plan ([`median_fwd_bwd_ms`]) with a random upstream gradient dO, and checking the masked
/// plan's output and gradients on samples ([`sampled_gradient_errors`]).
///
/// The dense plan does not depend on the mask, and every case of one shape, options and seed
/// has the same inputs: `dense` passes its times from an earlier case (`None` measures them).
pub fn run_backward_case(
    gpu: &Gpu,
    name: &str,
    shape: Shape,
    mask: &Mask,
    options: &PlanOptions,
    measure: Measure,
    dense: Option<FwdBwdMs>,
) -> Result<CaseResult> {
    let case = Case::new(gpu, shape, mask, options, measure.seed, true)?;
    let Case {
        q,
        k,
        v,
        d_o,
        masked,
        ms_plan,
    } = &case;
    let buffers = Resident::with_gradient(gpu, masked, q, k, v, d_o)?;
    let dense = match dense {
        Some(t) => t,
        None => median_fwd_bwd_ms(
            gpu,
            &dense_plan(gpu, shape, options)?,
            &buffers,
            WARMUP,
            measure.repeats,
        )?,
    };
    let t = median_fwd_bwd_ms(gpu, masked, &buffers, WARMUP, measure.repeats)?;
    buffers.poison(gpu);
    let (out, grads) = buffers.run_backward_and_read(gpu, masked)?;
    let max_rel_error = case.output_error(mask, options, &out, measure.samples);
    let grad_errors = sampled_gradient_errors(
        &shape,
        q,
        k,
        v,
        Some(mask),
        options.scale,
        d_o,
        &grads,
        measure.samples,
    );
    Ok(case_result(
        name,
        masked,
        [dense.fwd_bwd, t.fwd_bwd],
        max_rel_error,
        *ms_plan,
        t.clock,
        Some(BackwardResult {
            dense,
            ms_fwd_masked: t.fwd,
            grad_errors,
        }),
    ))
}

/// The inputs and the masked plan of a case.
struct Case {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The upstream gradient (empty for a forward case).
    d_o: Vec<f32>,
    masked: Plan,
    /// ms to build the masked plan.
    ms_plan: f64,
}

impl Case {
    /// Random inputs from `seed`, rounded to the storage type so that the reference sees what
    /// the GPU sees (Q, K, V, then dO when `with_gradient`), and the masked plan.
    fn new(
        gpu: &Gpu,
        shape: Shape,
        mask: &Mask,
        options: &PlanOptions,
        seed: u64,
        with_gradient: bool,
    ) -> Result<Case> {
        // The inputs as f32 and, while each is uploaded, its encoded copy (at most 2 bytes an
        // element more), asked for at once so that a size the host cannot hold is an error
        // rather than an abort.
        let elements = [shape.q_len(), shape.kv_len(), shape.kv_len(), shape.q_len()];
        let bytes = elements.iter().fold(0usize, |a, &n| a.saturating_add(n)) as u128 * 6;
        if usize::try_from(bytes)
            .ok()
            .and_then(|b| Vec::<u8>::new().try_reserve_exact(b).ok())
            .is_none()
        {
            return Err(Error::InvalidArgument {
                what: "shape",
                why: format!("the host cannot allocate the {bytes} bytes of this case's inputs"),
            });
        }
        // Uniform in [-1, 1) from the seed's sequence, one tensor after the other, each value
        // from its index in the sequence (SplitMix64::at) so that large inputs fill on all
        // cores; rounded to the storage type.
        let e = options.dtype;
        let mut next = 0u64;
        let mut rand_stored = |n: usize| {
            let first = next;
            next += n as u64;
            let mut x = vec![0f32; n];
            crate::parallel::for_chunks(&mut x, 1, |start, chunk| {
                for (i, v) in (first + start as u64..).zip(chunk) {
                    *v = e.round((SplitMix64::unit(SplitMix64::at(seed, i)) * 2.0 - 1.0) as f32);
                }
            });
            x
        };
        let (q, k, v) = (
            rand_stored(shape.q_len()),
            rand_stored(shape.kv_len()),
            rand_stored(shape.kv_len()),
        );
        let d_o = if with_gradient {
            rand_stored(shape.q_len())
        } else {
            Vec::new()
        };
        let t0 = Instant::now();
        let masked = Plan::new(gpu, shape, Some(mask), options.clone())?;
        let ms_plan = t0.elapsed().as_secs_f64() * 1e3;
        Ok(Case {
            q,
            k,
            v,
            d_o,
            masked,
            ms_plan,
        })
    }

    /// Largest relative L2 error of the masked plan's output `out` against the f64 reference on
    /// `samples` rows ([`sampled_error`]).
    fn output_error(&self, mask: &Mask, options: &PlanOptions, out: &[f32], samples: usize) -> f64 {
        let shape = self.masked.shape();
        sampled_error(
            &shape,
            &self.q,
            &self.k,
            &self.v,
            Some(mask),
            options.scale,
            out,
            samples,
        )
    }
}

/// The baseline: every tile computed and no mask read, which is what FlashAttention does.
fn dense_plan(gpu: &Gpu, shape: Shape, options: &PlanOptions) -> Result<Plan> {
    Plan::new(
        gpu,
        shape,
        None,
        PlanOptions {
            path: Some(Path::Dense),
            ..options.clone()
        },
    )
}

/// A case's result from its masked plan and measurements (`[ms_dense, ms_masked]`).
fn case_result(
    name: &str,
    masked: &Plan,
    [ms_dense, ms_masked]: [f64; 2],
    max_rel_error: f64,
    ms_plan: f64,
    clock: Clock,
    backward: Option<BackwardResult>,
) -> CaseResult {
    let shape = masked.shape();
    let bm = masked.block_mask().expect("a masked plan has a block mask");
    let active = bm.active_fraction();
    // Forward: Q·Kᵀ and P·V; backward adds dV, dP, dS·K, dSᵀ·Q and the recomputed Q·Kᵀ.
    let matmuls = if backward.is_some() { 7.0 } else { 2.0 };
    CaseResult {
        mask: name.to_string(),
        shape,
        active_tiles: active,
        path: masked.path(),
        tile: (bm.tile_rows(), bm.tile_cols()),
        ms_dense,
        ms_masked,
        speedup: ms_dense / ms_masked,
        ideal_speedup: 1.0 / active.max(1e-9),
        tflops: shape.dense_flops() / 2.0 * matmuls * active / (ms_masked * 1e-3) / 1e12,
        max_rel_error,
        ms_plan,
        clock,
        tier: masked.tier(),
        backward,
    }
}
