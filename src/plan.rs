//! `Plan`: built once from a mask and a problem shape, run many times. It picks the tile shape
//! and the path (dense, run-length, sparse list), orders the work, optionally reorders tokens
//! with Reverse Cuthill–McKee, uploads its index buffers once, and dispatches the kernel. The
//! backward pass lives in the `backward` child module.

use std::fmt::Write as _;
use std::sync::OnceLock;

use wgpu::util::DeviceExt;

use crate::block_mask::BlockMask;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tier};
use crate::kernel::{DType, KernelConfig, Params, Path, Variant};
use crate::mask::Mask;
use crate::reference::{check_mask, Output};
use crate::shape::Shape;
use crate::timing::Instant;

mod backward;
pub use backward::BackwardTensors;

/// Whether the plan reorders tokens with Reverse Cuthill–McKee.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reorder {
    /// Reorder when the mask is square, shared, scattered, and reordering removes enough tiles.
    #[default]
    Auto,
    /// Never reorder.
    Off,
    /// Always reorder (square shared masks only).
    On,
}

/// Choices a caller can make when building a [`Plan`]; `Default` lets the plan decide.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOptions {
    /// Softmax scale; `None` means 1/sqrt(d).
    pub scale: Option<f32>,
    /// Force a path; `None` picks one with the cost model.
    pub path: Option<Path>,
    /// Force a tile shape (rows, cols); `None` picks one.
    pub tile: Option<(usize, usize)>,
    /// Token reordering.
    pub reorder: Reorder,
    /// Whether the kernel writes the log-sum-exp.
    pub write_lse: bool,
    /// Storage type of Q, K, V and O (the host form converts f32 inputs to it).
    pub dtype: DType,
    /// Force a kernel tier; `None` takes [`Gpu::tier_for`] of `dtype`.
    pub tier: Option<Tier>,
    /// Split-KV: the most key tiles one workgroup walks; query tiles with more are split over
    /// several workgroups and merged by log-sum-exp. `None` splits query tiles with over four
    /// times the mean work (global tokens) and, where a dispatch would have fewer than 256
    /// workgroups (decoding: few query tiles over long keys), walks longer than the mean walk
    /// over the parts that about 256 workgroups take (but at least 16 key tiles);
    /// `Some(usize::MAX)` never splits.
    pub max_tiles_per_workgroup: Option<usize>,
    /// How the portable kernel combines a row's max and sum over the threads of the row:
    /// `Some(true)` by subgroup shuffles (needs `SUBGROUP`; only tiles with at most as many
    /// threads per row as the adapter's smallest subgroup are considered), `Some(false)`
    /// through workgroup memory. `None` uses subgroup shuffles where the device has them and
    /// the chosen tile fits, unless the environment variable `BLOCKFLASH_SUBGROUP_REDUCTIONS`
    /// says `0` (never) or `1` (as `Some(true)`). The tensor-core tier never uses them.
    pub subgroup_reductions: Option<bool>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            scale: None,
            path: None,
            tile: None,
            reorder: Reorder::Auto,
            write_lse: true,
            max_tiles_per_workgroup: None,
            dtype: DType::F32,
            tier: None,
            subgroup_reductions: None,
        }
    }
}

/// GPU buffers of one attention call, owned by the caller (the GPU-resident form).
///
/// Q `[B, H, Nq, d]`, K and V `[B, Hkv, Nk, d]`, O `[B, H, Nq, d]` as storage buffers in the
/// plan's storage type ([`Plan::dtype`]; bf16 as the raw 16-bit patterns, two per 4 bytes), LSE
/// `[B, H, Nq]` f32 (needed only when the plan writes it). Buffers of the plan's device, with
/// `STORAGE` usage; the outputs must not be bound twice.
#[derive(Clone, Copy, Debug)]
pub struct Tensors<'a> {
    /// Queries (STORAGE).
    pub q: &'a wgpu::Buffer,
    /// Keys (STORAGE).
    pub k: &'a wgpu::Buffer,
    /// Values (STORAGE).
    pub v: &'a wgpu::Buffer,
    /// Output (STORAGE).
    pub o: &'a wgpu::Buffer,
    /// Log-sum-exp output (STORAGE).
    pub lse: &'a wgpu::Buffer,
}

/// A part of the batch × key/value-head grid small enough for one storage binding.
#[derive(Debug)]
struct Chunk {
    b0: usize,
    nb: usize,
    hk0: usize,
    nhk: usize,
    params: wgpu::Buffer,
    /// The values in `params` (the backward's parameters start from them).
    params_data: Params,
    index: wgpu::Buffer,
    items: u32,
    merges: u32,
    slots: usize,
    scratch: wgpu::Buffer,
    z: u32,
}

/// A built attention plan: mask → block mask → path, tiles and buffers, ready to run.
///
/// Non-finite inputs: a row with a NaN or +∞ score (from Q, or from the K of a key it attends)
/// gets NaN as its output and log-sum-exp, as in the reference; a score of −∞ weighs nothing
/// in both. WGSL lets a GPU compiler assume that no value is NaN or infinite, and some do (the
/// H200's Vulkan driver turned a NaN score into a finite weight), so the forward kernels track
/// such scores with integer tests rather than trusting float arithmetic to carry them. K of a
/// key that a row may not attend never reaches it. V of such a key can: the P·V product of a
/// computed tile multiplies the masked keys' zero probabilities by their V, and 0 × NaN (or × ∞)
/// is NaN. So a non-finite V spreads to the rows of every tile that computes its key (partial
/// tiles; every tile on the dense path), and to no row whose tiles skip it. Keep V finite on
/// masked and padding keys. Scores are computed in f32 (the reference uses f64), so finite
/// inputs whose score overflows f32 behave as infinite ones there. The backward pass reads the
/// NaN log-sum-exp of such rows, but does not track non-finite values itself: train on finite
/// inputs.
///
/// ```no_run
/// use blockflash::{Gpu, Mask, Plan, PlanOptions, Shape};
/// let gpu = Gpu::new()?;
/// let shape = Shape::new(1, 8, 1024, 64);
/// let mask = Mask::causal(1024, 1024)?;
/// let plan = Plan::new(&gpu, shape, Some(&mask), PlanOptions::default())?;
/// println!("{}", plan.describe());
/// let n = shape.q_len();
/// let (q, k, v) = (vec![0.5f32; n], vec![0.25f32; n], vec![1.0f32; n]);
/// let out = plan.run(&q, &k, &v)?;
/// # Ok::<(), blockflash::Error>(())
/// ```
pub struct Plan {
    gpu: Gpu,
    shape: Shape,
    scale: f32,
    config: KernelConfig,
    path: Path,
    dense_mask: bool,
    write_lse: bool,
    subgroup_red: bool,
    block_mask: Option<BlockMask>,
    permuted: Option<(usize, usize)>,
    /// The RCM permutation (empty when tokens are not reordered).
    perm: Vec<u32>,
    per_batch: bool,
    chunks: Vec<Chunk>,
    /// The backward pass's buffers, or the 64x32 plan it runs through, built on its first call
    /// (forward-only plans never pay for the transposed block mask).
    backward: OnceLock<backward::BackwardState>,
    bits: wgpu::Buffer,
    why: String,
    build_ms: f64,
}

/// What the cost model charges a kernel configuration: one work item (a query tile's Q load,
/// output write and the wait for its first K/V tile), one key tile of the dense walk, a full and
/// a partial key tile of the run-length and sparse walks, and the extra of mask bits on every
/// tile of the dense walk.
struct Costs {
    item: f64,
    dense: f64,
    run_length: (f64, f64),
    sparse: (f64, f64),
    mask: f64,
}

/// The tensor-core kernel at d = 64 in nanoseconds of the whole H200 (132 SMs), by tile rows:
/// (rows, work item, dense tile, full and partial tile of the sparse walk). A work item is a
/// query tile's Q, first K/V tile and output. Fitted by least squares on relative error to the
/// sparse plans of every family, `bench --path sparse --seq 16384 --batch 4 --heads 32
/// --head-dim 64 --tile Rx32` (BENCHMARKS.md): the 128-row shape on 2026-12-01 at 07:35 UTC,
/// after its accumulators left local memory (every family within ±5%; dense tile from the
/// dense plan), the 64-row shape earlier that day (within ±13%, with five block-diagonal masks);
/// both scaled on 2026-12-02 to the kernel with two subgroups per 16 rows (128 rows by 0.938,
/// every family within ±4%; 64 rows by 0.762, causal, documents and tree within ±8%; dense
/// tiles from the dense plans); the 32- and 16-row shapes earlier, from fewer masks, one tile
/// cost for both kinds, with the Q load of one f16 per thread and step and one subgroup per 16
/// rows. More rows per workgroup share each K/V tile load: a 128x32 tile costs a little more
/// than a 64x32 one and a 64x32 tile less than a 32x32 one, so the taller shapes win unless
/// their longer work items dominate (the tree mask takes 64x32).
const TENSOR_CORE_NS: [(usize, f64, f64, f64, f64); 4] = [
    (128, 65.3, 10.2, 10.67, 11.98),
    (64, 27.6, 7.0, 8.63, 9.54),
    (32, 52.0, 12.3, 15.1, 15.1),
    (16, 52.0, 20.7, 24.5, 24.5),
];

impl Costs {
    /// One batch element's dense walk without mask bits: every query tile's work item and
    /// every tile.
    fn dense_walk(&self, q_tiles: usize, k_tiles: usize) -> f64 {
        q_tiles as f64 * (self.item + k_tiles as f64 * self.dense)
    }
}

fn costs(c: &KernelConfig) -> Costs {
    let (br, bc, d) = (c.tile_rows as f64, c.tile_cols as f64, c.head_dim as f64);
    if c.tier == Tier::TensorCore {
        let (_, item, dense, full, partial) = TENSOR_CORE_NS
            .iter()
            .copied()
            .find(|&(rows, ..)| rows == c.tile_rows)
            .unwrap_or(TENSOR_CORE_NS[TENSOR_CORE_NS.len() - 1]);
        // Per tile in proportion to the head dim; tiles whose next K/V tile is not fetched
        // ahead wait for global memory every tile: 4x to 7x slower per tile on the H200
        // (BENCHMARKS.md, 2026-11-30).
        let scale = d / 64.0 * if c.prefetch() { 1.0 } else { 4.0 };
        let walk = (full * scale, partial * scale);
        return Costs {
            item: item * d / 64.0,
            dense: dense * scale,
            // The run-length walk took 1.2x to 1.4x the sparse walk's time on the same masks
            // (causal, sliding window, documents, prefix-LM at N = 16384, d = 64 and 128) on
            // the H200 (BENCHMARKS.md, 2026-12-02).
            run_length: (1.3 * walk.0, 1.3 * walk.1),
            sparse: walk,
            // Mask bits on every tile of the dense path: causal at 128x32, d = 64, took 108.9 ms
            // against 86.4 ms unmasked on the H200 (2026-12-02).
            mask: 0.26 * dense * scale,
        };
    }
    // Portable tiers, in arbitrary units: the multiply-adds, the K/V loads that the tile's rows
    // share, and a fixed cost of barriers and loop overhead; the sparse walk reads its list.
    let tile = br * bc * d + 8.0 * bc * d + 4096.0;
    let mask = br * bc * 4.0;
    Costs {
        item: 0.0,
        dense: tile,
        run_length: (tile, tile + mask),
        sparse: (tile + 64.0, tile + 64.0 + mask),
        mask,
    }
}

struct Choice {
    config: KernelConfig,
    path: Path,
    block_mask: Option<BlockMask>,
    cost: f64,
    dense_cost: f64,
}

fn choose(
    candidates: &[KernelConfig],
    mask: &Mask,
    forced_path: Option<Path>,
    forced_block: Option<BlockMask>,
) -> Result<Choice> {
    let mut best: Option<Choice> = None;
    let mut tried = std::collections::HashSet::new();
    for &config in candidates {
        if !tried.insert((config.tile_rows, config.tile_cols)) {
            continue;
        }
        let bm = match &forced_block {
            Some(b) => b.clone(),
            None => BlockMask::new(mask, config.tile_rows, config.tile_cols)?,
        };
        let tiles = bm.total_tiles() as f64;
        let c = costs(&config);
        let items = (bm.q_tiles() * bm.batches()) as f64 * c.item;
        // A mask that allows every pair runs the dense path without mask bits: the unmasked
        // kernel.
        let dense_cost = bm.batches() as f64 * c.dense_walk(bm.q_tiles(), bm.k_tiles())
            + if bm.full_tiles() == bm.total_tiles() {
                0.0
            } else {
                tiles * c.mask
            };
        let (full, partial) = (bm.full_tiles() as f64, bm.partial_tiles() as f64);
        let walk = |(f, p): (f64, f64)| items + full * f + partial * p;
        let mut options = vec![(Path::Dense, dense_cost), (Path::Sparse, walk(c.sparse))];
        if bm.runs().is_some() {
            options.push((Path::RunLength, walk(c.run_length)));
        }
        if let Some(p) = forced_path {
            if p == Path::RunLength && bm.runs().is_none() {
                return Err(Error::PathNotEligible(format!(
                    "the run-length path needs every query tile's active key tiles to form one \
                     interval with the full ones one inner interval; this mask at {}x{} tiles \
                     does not",
                    config.tile_rows, config.tile_cols
                )));
            }
            options.retain(|(q, _)| *q == p);
        }
        let (path, cost) = options
            .into_iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one path");
        if best.as_ref().is_none_or(|b| cost < b.cost) {
            best = Some(Choice {
                config,
                path,
                block_mask: Some(bm),
                cost,
                dense_cost,
            });
        }
    }
    best.ok_or_else(|| Error::InvalidArgument {
        what: "tile",
        why: "no kernel configuration fits the adapter".into(),
    })
}

/// Decoding on tensor cores: where one 16-row tile holds every query, taller tiles compute rows
/// that no query fills, and the cost model (fitted on full grids, where a 16-row tile costs 3x a
/// 64-row one) would not take it. The 16-row tile alone where it fetches K/V ahead: at d = 64 it
/// ran 1.27x to 1.48x faster than 64x32 without a mask and 1.02x to 1.28x with the causal
/// mask's last rows (H200, 1 to 16 queries over 16384 and 65536 keys, BENCHMARKS.md); at
/// d = 128 it has no prefetch and ran 4x slower. Otherwise `candidates` as they are.
fn decoding_tiles(candidates: Vec<KernelConfig>, shape: &Shape) -> Vec<KernelConfig> {
    let short = candidates
        .iter()
        .find(|c| c.tier == Tier::TensorCore && c.tile_rows == 16 && c.prefetch());
    match short {
        Some(&c) if shape.seq_q <= 16 => vec![c],
        _ => candidates,
    }
}

/// The tile shape of a plan without a mask: on the tensor-core tier the candidate whose dense
/// walk over `shape` the cost model charges least (its model was fitted on the H200), on the
/// portable tiers the first candidate (their model was never fitted on a GPU).
fn cheapest_dense(candidates: &[KernelConfig], shape: &Shape) -> KernelConfig {
    if candidates[0].tier != Tier::TensorCore {
        return candidates[0];
    }
    let cost = |c: &KernelConfig| {
        costs(c).dense_walk(
            shape.seq_q.div_ceil(c.tile_rows),
            shape.seq_k.div_ceil(c.tile_cols),
        )
    };
    *candidates
        .iter()
        .min_by(|a, b| cost(a).total_cmp(&cost(b)))
        .expect("at least one candidate")
}

impl Plan {
    /// Builds a plan for `shape` with an optional mask (`[Nq, Nk]` shared, or one per batch
    /// element). Uploads the block mask and index buffers once.
    pub fn new(gpu: &Gpu, shape: Shape, mask: Option<&Mask>, options: PlanOptions) -> Result<Plan> {
        Self::build(gpu, shape, mask, None, options, true)
    }

    /// Builds a plan from a block mask built earlier from `mask` (its tile shape fixes the
    /// kernel's tiles). The block mask is checked against the mask, which costs one block-mask
    /// build: one of another mask is an [`Error::InvalidArgument`].
    pub fn from_block_mask(
        gpu: &Gpu,
        shape: Shape,
        mask: &Mask,
        block_mask: BlockMask,
        options: PlanOptions,
    ) -> Result<Plan> {
        if BlockMask::new(mask, block_mask.tile_rows(), block_mask.tile_cols())? != block_mask {
            return Err(Error::InvalidArgument {
                what: "block_mask",
                why: format!(
                    "not the block mask of this mask at {}x{} tiles",
                    block_mask.tile_rows(),
                    block_mask.tile_cols()
                ),
            });
        }
        let options = PlanOptions {
            tile: Some((block_mask.tile_rows(), block_mask.tile_cols())),
            reorder: Reorder::Off,
            ..options
        };
        Self::build(gpu, shape, Some(mask), Some(block_mask), options, true)
    }

    /// With `compile_forward`, the forward kernel is compiled now, so that the first run does
    /// not pay for it; a plan built only for its backward pass leaves it out.
    fn build(
        gpu: &Gpu,
        shape: Shape,
        mask: Option<&Mask>,
        forced_block: Option<BlockMask>,
        options: PlanOptions,
        compile_forward: bool,
    ) -> Result<Plan> {
        let start = Instant::now();
        shape.validate()?;
        if let Some(scale) = options.scale.filter(|x| !x.is_finite()) {
            return Err(Error::InvalidArgument {
                what: "scale",
                why: format!("the softmax scale must be finite, got {scale}"),
            });
        }
        if options.max_tiles_per_workgroup == Some(0) {
            return Err(Error::InvalidArgument {
                what: "max_tiles_per_workgroup",
                why: "a workgroup walks at least one key tile".into(),
            });
        }
        if let Some(m) = mask {
            check_mask(&shape, m)?;
        }
        let limits = gpu.limits();
        let tier = match options.tier {
            Some(t) => {
                gpu.supports(t)?;
                t
            }
            None => gpu.tier_for_head_dim(options.dtype, shape.head_dim)?,
        };
        if tier.dtype() != options.dtype {
            return Err(Error::TierUnavailable(format!(
                "tier {tier} stores {} but the plan's inputs are {}",
                tier.dtype(),
                options.dtype
            )));
        }
        let all = KernelConfig::candidates(&limits, tier, shape.head_dim);
        let mut candidates = all.clone();
        if let Some((r, c)) = options.tile {
            candidates.retain(|k| k.tile_rows == r && k.tile_cols == c);
        }
        if candidates.is_empty() {
            return Err(Error::InvalidArgument {
                what: "tile",
                why: format!(
                    "{} has no kernel tile{} at head dim {} within this adapter's limits \
                     ({} bytes of workgroup memory); shapes: {:?}",
                    tier,
                    options
                        .tile
                        .map(|(r, c)| format!(" {r}x{c}"))
                        .unwrap_or_default(),
                    shape.head_dim,
                    limits.max_compute_workgroup_storage_size,
                    all.iter()
                        .map(|k| format!("{}x{}", k.tile_rows, k.tile_cols))
                        .collect::<Vec<_>>()
                ),
            });
        }
        if options.tile.is_none() {
            candidates = decoding_tiles(candidates, &shape);
        }
        // Row reductions by subgroup shuffles: portable tiles whose threads of a row fit in the
        // adapter's smallest subgroup.
        let lanes = gpu.min_subgroup_size().filter(|_| tier != Tier::TensorCore);
        let fits_lanes =
            |k: &KernelConfig| lanes.is_some_and(|n| k.tx.is_power_of_two() && k.tx <= n as usize);
        let subgroups = match options.subgroup_reductions {
            Some(on) => Some(on),
            None => subgroup_reductions_from_env()?,
        };
        if subgroups == Some(true) {
            let Some(n) = lanes else {
                return Err(Error::TierUnavailable(format!(
                    "subgroup reductions need SUBGROUP and a portable tier; this plan runs {tier} \
                     on a device {} subgroups",
                    if gpu.min_subgroup_size().is_some() {
                        "with"
                    } else {
                        "without"
                    }
                )));
            };
            candidates.retain(|k| fits_lanes(k));
            if candidates.is_empty() {
                return Err(Error::TierUnavailable(format!(
                    "subgroup reductions need tiles with at most {n} threads per row (the \
                     adapter's smallest subgroup); {tier} has none{} at head dim {}",
                    options
                        .tile
                        .map(|(r, c)| format!(" at {r}x{c}"))
                        .unwrap_or_default(),
                    shape.head_dim
                )));
            }
        }
        let mut why = String::new();

        // Reverse Cuthill–McKee on square shared masks.
        let mut reordered: Option<(Mask, Vec<u32>, usize, usize)> = None;
        if let Some(m) = mask {
            let square = m.seq_q() == m.seq_k() && !m.is_per_batch();
            let want = match options.reorder {
                Reorder::Off => false,
                Reorder::On => {
                    if m.is_per_batch() {
                        return Err(Error::InvalidArgument {
                            what: "reorder",
                            why: "RCM reordering needs one mask shared by the batch, not one per \
                                  batch element"
                                .into(),
                        });
                    }
                    if !square {
                        return Err(Error::NotSquare {
                            seq_q: m.seq_q(),
                            seq_k: m.seq_k(),
                        });
                    }
                    true
                }
                Reorder::Auto => {
                    // Scattered: far more active tiles than the allowed pairs would fill.
                    let c = &candidates[0];
                    let density = m.count_allowed(0) as f64 / (m.seq_q() * m.seq_k()) as f64;
                    square
                        && forced_block.is_none()
                        && options.path != Some(Path::RunLength)
                        && BlockMask::new(m, c.tile_rows, c.tile_cols)?.active_fraction()
                            > 4.0 * density
                }
            };
            if want {
                let c = &candidates[0];
                let rep = crate::rcm::rcm_report(m, c.tile_rows, c.tile_cols)?;
                let pays = rep.active_after * 10 < rep.active_before * 8;
                if options.reorder == Reorder::On || pays {
                    let _ = writeln!(
                        why,
                        "RCM reordering: active tiles {} -> {} at {}x{}",
                        rep.active_before, rep.active_after, c.tile_rows, c.tile_cols
                    );
                    reordered = Some((
                        m.permuted(&rep.perm)?,
                        rep.perm,
                        rep.active_before,
                        rep.active_after,
                    ));
                } else {
                    let _ = writeln!(
                        why,
                        "RCM not applied: active tiles {} -> {} saves under 20%",
                        rep.active_before, rep.active_after
                    );
                }
            }
        }
        let mask_used = reordered.as_ref().map(|r| &r.0).or(mask);

        let (config, path, block_mask) = match mask_used {
            None => {
                if options.path.is_some_and(|p| p != Path::Dense) {
                    return Err(Error::PathNotEligible(
                        "without a mask only the dense path runs".into(),
                    ));
                }
                let c = cheapest_dense(&candidates, &shape);
                let _ = writeln!(
                    why,
                    "no mask: dense path, {}x{} tiles",
                    c.tile_rows, c.tile_cols
                );
                (c, Path::Dense, None)
            }
            Some(m) => {
                let ch = choose(&candidates, m, options.path, forced_block)?;
                let _ = writeln!(
                    why,
                    "cost model: {} at {}x{} tiles costs {:.3} of dense{}",
                    ch.path,
                    ch.config.tile_rows,
                    ch.config.tile_cols,
                    ch.cost / ch.dense_cost.max(1.0),
                    if options.path.is_some() {
                        " (path forced)"
                    } else {
                        ""
                    }
                );
                (ch.config, ch.path, ch.block_mask)
            }
        };
        let dense_mask = path == Path::Dense
            && block_mask
                .as_ref()
                .is_some_and(|bm| bm.full_tiles() < bm.total_tiles());
        if path == Path::Dense && mask_used.is_some() && !dense_mask {
            let _ = writeln!(
                why,
                "the mask allows every pair: the dense path reads no mask bits"
            );
        }
        let subgroup_red = subgroups != Some(false) && fits_lanes(&config);

        // Index buffer: work items, per-row table, key-tile list, permutation.
        let q_tiles = shape.seq_q.div_ceil(config.tile_rows);
        let k_tiles = shape.seq_k.div_ceil(config.tile_cols);
        let per_batch = mask_used.is_some_and(|m| m.is_per_batch());
        let (rows_tab, cols_tab) = walk_tables(block_mask.as_ref(), path);
        let perm: Vec<u32> = reordered.as_ref().map(|r| r.1.clone()).unwrap_or_default();
        let row_work = |b: usize, qt: usize| -> usize {
            match (&block_mask, path) {
                (Some(bm), Path::RunLength | Path::Sparse) => bm.row_work(b, qt),
                _ => k_tiles,
            }
        };

        let bits: Vec<u32> = match (&block_mask, mask_used) {
            (_, Some(m)) if dense_mask => (0..m.batches())
                .flat_map(|b| m.words(b).iter().copied())
                .collect(),
            (Some(bm), _) if path != Path::Dense => bm.partial_bits().to_vec(),
            _ => Vec::new(),
        };
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let bits_bytes = (bits.len() * 4) as u64;
        if bits_bytes > binding_limit {
            return Err(Error::TooLarge {
                what: "mask bits",
                bytes: bits_bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: binding_limit,
            });
        }
        let device = gpu.device();
        let bits_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("blockflash mask bits"),
            contents: bytemuck::cast_slice(if bits.is_empty() { &[0u32; 4] } else { &bits }),
            // COPY_SRC: the backward copies the bits into its index buffer.
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        });

        let chunk_dims = split_work(
            &shape,
            binding_limit,
            q_tiles,
            per_batch,
            &limits,
            tier.dtype(),
        )?;
        let mut chunks = Vec::with_capacity(chunk_dims.len());
        for (b0, nb, hk0, nhk) in chunk_dims {
            // Work items, heavy query tiles (and on small grids every long one) split over
            // several workgroups, heaviest and lightest alternating.
            let mut rows = Vec::new();
            let batches = if per_batch { nb } else { 1 };
            for bl in 0..batches {
                let bm_b = if per_batch { b0 + bl } else { 0 };
                for qt in 0..q_tiles {
                    let row = (bm_b * q_tiles + qt) as u32;
                    rows.push((row_work(bm_b, qt), [qt as u32, row, bl as u32]));
                }
            }
            let z = if per_batch { 1 } else { nb };
            let part_bytes =
                (z * nhk * shape.group() * config.tile_rows * (shape.head_dim + 1) * 4) as u64;
            let mut work = split_rows(
                &rows,
                nhk * shape.group() * z,
                options.max_tiles_per_workgroup,
                part_bytes,
                binding_limit,
            );
            work.items = heavy_and_light_alternating(work.items);
            let max_dim = limits.max_compute_workgroups_per_dimension as usize;
            if work.items.len() > max_dim {
                return Err(Error::TooLarge {
                    what: "work items of one dispatch",
                    bytes: work.items.len() as u64,
                    limit_name: "max_compute_workgroups_per_dimension",
                    limit: max_dim as u64,
                });
            }
            let mut index: Vec<u32> = work.items.iter().flatten().copied().collect();
            let rows_off = index.len() as u32;
            index.extend_from_slice(&rows_tab);
            let cols_off = index.len() as u32;
            index.extend_from_slice(&cols_tab);
            let perm_off = index.len() as u32;
            index.extend_from_slice(&perm);
            let merge_off = index.len() as u32;
            index.extend(work.merges.iter().flatten());
            let scratch_lse_off =
                (work.slots * z * nhk * shape.group() * config.tile_rows * shape.head_dim) as u32;
            let scratch = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("blockflash split-KV parts"),
                size: (work.slots as u64 * part_bytes).max(16),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            let params = Params {
                seq_q: shape.seq_q as u32,
                seq_k: shape.seq_k as u32,
                heads: (nhk * shape.group()) as u32,
                group: shape.group() as u32,
                scale_log2: options.scale.unwrap_or(shape.default_scale())
                    * std::f32::consts::LOG2_E,
                words_per_row: shape.seq_k.div_ceil(32) as u32,
                mask_batch_stride: if per_batch {
                    (shape.seq_q * shape.seq_k.div_ceil(32)) as u32
                } else {
                    0
                },
                rows_off,
                cols_off,
                neg_inf_bits: f32::NEG_INFINITY.to_bits(),
                k_tiles: k_tiles as u32,
                perm_off,
                merge_off,
                scratch_lse_off,
                t_cols_off: 0,
                t_rows_off: 0,
                bits_off: 0,
                pad: [0; 3],
            };
            let params_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("blockflash params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let index_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("blockflash index"),
                contents: bytemuck::cast_slice(&index),
                usage: wgpu::BufferUsages::STORAGE,
            });
            chunks.push(Chunk {
                b0,
                nb,
                hk0,
                nhk,
                params: params_buf,
                params_data: params,
                index: index_buf,
                items: work.items.len() as u32,
                merges: work.merges.len() as u32,
                slots: work.slots,
                scratch,
                z: z as u32,
            });
        }
        let plan = Plan {
            gpu: gpu.clone(),
            shape,
            scale: options.scale.unwrap_or(shape.default_scale()),
            config,
            path,
            dense_mask,
            write_lse: options.write_lse,
            subgroup_red,
            block_mask,
            permuted: reordered.map(|r| (r.2, r.3)),
            perm,
            per_batch,
            chunks,
            backward: OnceLock::new(),
            bits: bits_buf,
            why,
            build_ms: 0.0,
        };
        if compile_forward {
            plan.gpu.pipelines().get(device, plan.variant())?;
        }
        gpu.check_lost()?;
        Ok(Plan {
            build_ms: start.elapsed().as_secs_f64() * 1e3,
            ..plan
        })
    }

    fn variant(&self) -> Variant {
        Variant {
            config: self.config,
            path: self.path,
            dense_mask: self.dense_mask,
            write_lse: self.write_lse,
            permuted: self.permuted.is_some(),
            subgroup_red: self.subgroup_red,
            merge: false,
        }
    }

    /// The problem shape the plan was built for.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The path the plan runs.
    pub fn path(&self) -> Path {
        self.path
    }

    /// The kernel configuration (tile shape, thread grid).
    pub fn config(&self) -> KernelConfig {
        self.config
    }

    /// Storage type of Q, K, V and O on the GPU.
    pub fn dtype(&self) -> DType {
        self.config.tier.dtype()
    }

    /// The kernel tier the plan runs.
    pub fn tier(&self) -> Tier {
        self.config.tier
    }

    /// Whether the kernel combines row maxima and sums by subgroup shuffles (else through
    /// workgroup memory); see [`PlanOptions::subgroup_reductions`].
    pub fn subgroup_reductions(&self) -> bool {
        self.subgroup_red
    }

    /// The block mask the plan runs on (in reordered token order when RCM was applied).
    pub fn block_mask(&self) -> Option<&BlockMask> {
        self.block_mask.as_ref()
    }

    /// Fraction of tiles the plan computes (1 for the dense path).
    pub fn computed_fraction(&self) -> f64 {
        match (&self.block_mask, self.path) {
            (Some(bm), Path::RunLength | Path::Sparse) => bm.active_fraction(),
            _ => 1.0,
        }
    }

    /// Milliseconds spent building the plan (block mask, choice, uploads, kernel compile).
    pub fn build_ms(&self) -> f64 {
        self.build_ms
    }

    /// What the plan chose and why; once a backward call has built its kernels, which ones
    /// its dK/dV and dQ passes run.
    pub fn describe(&self) -> String {
        let s = &self.shape;
        let c = &self.config;
        let mut d = String::new();
        let _ = writeln!(
            d,
            "shape: B={} H={} Hkv={} Nq={} Nk={} d={} scale={}",
            s.batch, s.heads, s.kv_heads, s.seq_q, s.seq_k, s.head_dim, self.scale
        );
        let _ = writeln!(
            d,
            "tier: {}; tiles {}x{}, head-dim chunk {}, {} threads ({}x{}), {} B workgroup memory, \
             row reductions by {}",
            self.tier(),
            c.tile_rows,
            c.tile_cols,
            c.dc,
            c.threads(),
            c.tx,
            c.ty,
            c.workgroup_bytes(),
            if self.subgroup_red {
                "subgroup shuffles"
            } else {
                "workgroup memory"
            }
        );
        let _ = writeln!(d, "path: {}", self.path);
        if let Some(bm) = &self.block_mask {
            let _ = writeln!(
                d,
                "tiles: active {:.4}, partial {:.4}, full {:.4}; run-length eligible: {}",
                bm.active_fraction(),
                bm.partial_fraction(),
                bm.full_fraction(),
                bm.runs().is_some()
            );
            let _ = writeln!(
                d,
                "expected work vs dense: {:.4} (ideal speedup {:.2}x)",
                self.computed_fraction(),
                1.0 / self.computed_fraction().max(1e-9)
            );
            let _ = writeln!(
                d,
                "mask memory: {} B (a dense bit mask: {} B)",
                match (self.path, self.dense_mask) {
                    (Path::Dense, true) => bm.dense_mask_bytes(),
                    (Path::Dense, false) => 0,
                    _ => bm.mask_bytes(),
                },
                bm.dense_mask_bytes()
            );
        }
        if let Some((before, after)) = self.permuted {
            let _ = writeln!(
                d,
                "tokens reordered (RCM): active tiles {before} -> {after}"
            );
        }
        let _ = writeln!(
            d,
            "work order: heaviest and lightest query tiles alternating; {} dispatch(es)",
            self.chunks.len()
        );
        let (merges, slots) = self
            .chunks
            .iter()
            .fold((0, 0), |(m, s), c| (m + c.merges as usize, s + c.slots));
        if merges > 0 {
            let _ = writeln!(
                d,
                "split-KV: {merges} query tile(s) split into {slots} parts, merged by log-sum-exp"
            );
        }
        if let Some(b) = self.backward.get() {
            d += &b.describe();
        }
        d += &self.why;
        d
    }

    /// Encodes the attention into `encoder` over buffers the caller owns (GPU-resident form).
    ///
    /// Every buffer must hold at least the plan's shape, within one storage binding of the
    /// adapter (the host form [`Plan::run`] splits larger problems), and belong to the plan's
    /// device: buffers of another device of the same wgpu instance give
    /// [`Error::InvalidArgument`] (natively; in the browser wgpu reports them from a later
    /// call). Buffers of another wgpu instance are not supported: wgpu knows a buffer only by
    /// its index within its own instance, so such a buffer may stand for one of this
    /// instance's buffers without any error (where it stands for none, wgpu-core panics, and
    /// this call returns that as [`Error::InvalidArgument`] instead).
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder, t: &Tensors) -> Result<()> {
        self.encode_timed(encoder, t, None)
    }

    /// Like [`Plan::encode`], writing GPU timestamps at the start and end of the pass into
    /// `timestamps` (query set, first index) when given.
    pub fn encode_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        t: &Tensors,
        timestamps: Option<(&wgpu::QuerySet, u32)>,
    ) -> Result<()> {
        self.check_single_chunk()?;
        let s = &self.shape;
        let e = self.dtype();
        let lse_bytes = if self.write_lse {
            4 * s.lse_len() as u64
        } else {
            4
        };
        check_buffers(
            &self.gpu,
            &[
                ("q buffer", t.q, e.bytes(s.q_len()), false),
                ("k buffer", t.k, e.bytes(s.kv_len()), false),
                ("v buffer", t.v, e.bytes(s.kv_len()), false),
                ("o buffer", t.o, e.bytes(s.q_len()), true),
                ("lse buffer", t.lse, lse_bytes, true),
            ],
        )?;
        check_timestamps(timestamps)?;
        guard_caller_objects(&self.gpu, || {
            self.encode_chunk(encoder, &self.chunks[0], t, timestamps)
        })
    }

    /// Error unless the problem fits one dispatch over caller buffers (the GPU-resident forms
    /// cannot split caller buffers; the host forms split the work).
    fn check_single_chunk(&self) -> Result<()> {
        if self.chunks.len() == 1 {
            return Ok(());
        }
        Err(Error::TooLarge {
            what: "one of Q, K, V, O",
            bytes: self
                .dtype()
                .bytes(self.shape.q_len().max(self.shape.kv_len())),
            limit_name: "max_storage_buffer_binding_size",
            limit: self.gpu.limits().max_storage_buffer_binding_size,
        })
    }

    fn encode_chunk(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        chunk: &Chunk,
        t: &Tensors,
        timestamps: Option<(&wgpu::QuerySet, u32)>,
    ) -> Result<()> {
        let device = self.gpu.device();
        let (pipeline, bgl) = self.gpu.pipelines().get(device, self.variant())?;
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("blockflash attention"),
            layout: &bgl,
            entries: &[
                (0, &chunk.params),
                (1, t.q),
                (2, t.k),
                (3, t.v),
                (4, t.o),
                (5, t.lse),
                (6, &chunk.index),
                (7, &self.bits),
                (8, &chunk.scratch),
            ]
            .map(|(binding, b)| wgpu::BindGroupEntry {
                binding,
                resource: b.as_entire_binding(),
            }),
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("blockflash attention"),
            timestamp_writes: timestamps.map(|(qs, i)| wgpu::ComputePassTimestampWrites {
                query_set: qs,
                beginning_of_pass_write_index: Some(i),
                end_of_pass_write_index: Some(i + 1),
            }),
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        let heads = (chunk.nhk * self.shape.group()) as u32;
        pass.dispatch_workgroups(chunk.items, heads, chunk.z);
        if chunk.merges > 0 {
            let merge = Variant {
                merge: true,
                ..self.variant()
            };
            let (pipeline, _) = self.gpu.pipelines().get(device, merge)?;
            pass.set_pipeline(&pipeline);
            pass.dispatch_workgroups(chunk.merges, heads, chunk.z);
        }
        Ok(())
    }

    /// Runs attention on host tensors and reads the result back (blocking; in the browser use
    /// [`Plan::run_async`]).
    ///
    /// Q `[B, H, Nq, d]`, K and V `[B, Hkv, Nk, d]` row-major f32; returns O `[B, H, Nq, d]`
    /// and LSE `[B, H, Nq]` (natural log; −∞ for rows with no allowed key; empty when the
    /// plan does not write it). A plan with f16 or bf16 storage rounds the inputs to it on
    /// upload (f16 holds magnitudes up to 65504: from 65520 on, inputs become infinite; see the
    /// non-finite inputs on [`Plan`]) and returns its output widened to f32.
    pub fn run(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Output<f32>> {
        pollster::block_on(self.run_async(q, k, v))
    }

    /// [`Plan::run`] as a future, for the browser, where waiting for the GPU must yield to the
    /// page's event loop. On native it blocks inside the first poll, like [`Plan::run`].
    pub async fn run_async(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Output<f32>> {
        let s = self.shape;
        s.check_inputs(q.len(), k.len(), v.len())?;
        let mut o = vec![0f32; s.q_len()];
        let mut lse = vec![0f32; if self.write_lse { s.lse_len() } else { 0 }];
        let d = s.head_dim;
        let g = s.group();
        for chunk in &self.chunks {
            let nh = chunk.nhk * g;
            // Gather this chunk's slices (contiguous per batch element).
            let q_rows = nh * s.seq_q * d;
            let kv_rows = chunk.nhk * s.seq_k * d;
            let gather = |src: &[f32], per_b: usize, off: usize, len: usize| -> Vec<f32> {
                (chunk.b0..chunk.b0 + chunk.nb)
                    .flat_map(|b| src[b * per_b + off..][..len].iter().copied())
                    .collect()
            };
            let qc = gather(
                q,
                s.heads * s.seq_q * d,
                chunk.hk0 * g * s.seq_q * d,
                q_rows,
            );
            let kc = gather(
                k,
                s.kv_heads * s.seq_k * d,
                chunk.hk0 * s.seq_k * d,
                kv_rows,
            );
            let vc = gather(
                v,
                s.kv_heads * s.seq_k * d,
                chunk.hk0 * s.seq_k * d,
                kv_rows,
            );
            let (oc, lc) = self.run_chunk(chunk, &qc, &kc, &vc).await?;
            for bl in 0..chunk.nb {
                let b = chunk.b0 + bl;
                o[b * s.heads * s.seq_q * d + chunk.hk0 * g * s.seq_q * d..][..q_rows]
                    .copy_from_slice(&oc[bl * q_rows..][..q_rows]);
                if self.write_lse {
                    let n = nh * s.seq_q;
                    lse[b * s.heads * s.seq_q + chunk.hk0 * g * s.seq_q..][..n]
                        .copy_from_slice(&lc[bl * n..][..n]);
                }
            }
        }
        Ok(Output { o, lse })
    }

    async fn run_chunk(
        &self,
        chunk: &Chunk,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let device = self.gpu.device();
        let e = self.dtype();
        let upload = |data: &[f32], label| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &e.encode(data),
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let (qb, kb, vb) = (upload(q, "q"), upload(k, "k"), upload(v, "v"));
        let out = |bytes: u64, label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(16),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        let lse_len = chunk.nb * chunk.nhk * self.shape.group() * self.shape.seq_q;
        let (ob, lb) = (out(e.bytes(q.len()), "o"), out(4 * lse_len as u64, "lse"));
        let mut encoder = device.create_command_encoder(&Default::default());
        let t = Tensors {
            q: &qb,
            k: &kb,
            v: &vb,
            o: &ob,
            lse: &lb,
        };
        self.encode_chunk(&mut encoder, chunk, &t, None)?;
        let bytes = crate::readback::read_bytes_async(
            &self.gpu,
            encoder,
            &[(&ob, e.bytes(q.len())), (&lb, 4 * lse_len as u64)],
        )
        .await?;
        Ok((
            e.decode(&bytes[0], q.len()),
            DType::F32.decode(&bytes[1], lse_len),
        ))
    }
}

/// `BLOCKFLASH_SUBGROUP_REDUCTIONS`: `0` for never, `1` for always (as
/// `PlanOptions::subgroup_reductions`); unset or empty leaves the choice to the plan.
fn subgroup_reductions_from_env() -> Result<Option<bool>> {
    match std::env::var("BLOCKFLASH_SUBGROUP_REDUCTIONS").as_deref() {
        Err(_) | Ok("") => Ok(None),
        Ok("0") => Ok(Some(false)),
        Ok("1") => Ok(Some(true)),
        Ok(other) => Err(Error::InvalidArgument {
            what: "BLOCKFLASH_SUBGROUP_REDUCTIONS",
            why: format!("{other:?} is not 0 or 1"),
        }),
    }
}

/// The per-row table (2 x vec4 per row) and the key-tile list of the walk over `path`, as the
/// kernels read them from the index buffer (empty for the dense path).
fn walk_tables(block_mask: Option<&BlockMask>, path: Path) -> (Vec<u32>, Vec<u32>) {
    match (block_mask, path) {
        (Some(bm), Path::RunLength) => {
            let runs = bm.runs().expect("eligible");
            let mut t = Vec::with_capacity(runs.len() * 8);
            for (r, run) in runs.iter().enumerate() {
                t.extend_from_slice(run);
                t.extend_from_slice(&[bm.partial_base()[r], 0, 0, 0]);
            }
            (t, Vec::new())
        }
        (Some(bm), Path::Sparse) => {
            let rp = bm.row_ptr();
            let mut t = Vec::with_capacity((rp.len() - 1) * 8);
            for r in 0..rp.len() - 1 {
                t.extend_from_slice(&[rp[r], rp[r + 1], bm.full_count()[r], 0]);
                t.extend_from_slice(&[bm.partial_base()[r], 0, 0, 0]);
            }
            (t, bm.cols().to_vec())
        }
        _ => (Vec::new(), Vec::new()),
    }
}

/// Error unless every caller buffer `(name, buffer, bytes needed, written by the pass)` can be
/// bound as the pass needs: a storage buffer of at least the bytes needed and within the
/// device's storage-binding limit, and no written buffer bound twice. (wgpu would otherwise
/// report these later, from an unrelated call.)
fn check_buffers(gpu: &Gpu, buffers: &[(&'static str, &wgpu::Buffer, u64, bool)]) -> Result<()> {
    let limit = gpu.limits().max_storage_buffer_binding_size;
    for (i, &(what, buf, need, written)) in buffers.iter().enumerate() {
        let invalid = |why: String| Err(Error::InvalidArgument { what, why });
        if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
            return invalid(format!("usage {:?} lacks STORAGE", buf.usage()));
        }
        if buf.size() < need {
            return Err(Error::ShapeMismatch {
                what,
                expected: format!("at least {need} bytes"),
                got: format!("{} bytes", buf.size()),
            });
        }
        if buf.size() > limit {
            return invalid(format!(
                "{} bytes, over the device's max_storage_buffer_binding_size of {limit}",
                buf.size()
            ));
        }
        let alias = buffers
            .iter()
            .enumerate()
            .find(|&(j, other)| j != i && other.1 == buf);
        if let (true, Some((_, other))) = (written, alias) {
            return invalid(format!(
                "the pass writes it and it is also bound as the {}",
                other.0
            ));
        }
    }
    Ok(())
}

/// Runs `encode`, which binds the caller's buffers and query set, so that objects of another
/// device come back as an error of this call rather than of a later one: wgpu reports another
/// device's buffer as a validation error, caught by an error scope here. A buffer of another
/// wgpu instance is known to this one only by its index: where that index names one of this
/// instance's buffers, nothing can tell (see [`Plan::encode`]); where it names none, wgpu-core
/// panics, and the panic is caught here (after wgpu's panic hook has printed it). An encoder of
/// another device shows up when it is finished or submitted, as wgpu reports it. In the
/// browser, where error scopes resolve asynchronously and panics abort, `encode` runs as is.
fn guard_caller_objects(gpu: &Gpu, encode: impl FnOnce() -> Result<()>) -> Result<()> {
    #[cfg(target_arch = "wasm32")]
    {
        let _ = gpu;
        encode()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let scope = gpu.device().push_error_scope(wgpu::ErrorFilter::Validation);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(encode));
        let refused = pollster::block_on(scope.pop());
        let invalid = |why: String| Error::InvalidArgument {
            what: "caller buffers or query set",
            why,
        };
        match (result, refused) {
            (Ok(Ok(())), Some(e)) => Err(invalid(format!("wgpu refused them: {e}"))),
            (Ok(r), _) => r,
            (Err(panic), _) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(invalid(format!(
                    "wgpu panicked while binding them ({message}): buffers of another wgpu \
                     instance?"
                )))
            }
        }
    }
}

/// Error unless timestamps at `index` and `index + 1` fit the query set.
fn check_timestamps(timestamps: Option<(&wgpu::QuerySet, u32)>) -> Result<()> {
    match timestamps {
        Some((set, index)) if index.checked_add(1).is_none_or(|end| end >= set.count()) => {
            Err(Error::InvalidArgument {
                what: "timestamps",
                why: format!(
                    "indices {index} and {index} + 1 do not fit the query set of {}",
                    set.count()
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Work items of one dispatch and the merges of split query tiles.
struct Work {
    /// [query tile, block-mask row, batch base, split slot or NO_SPLIT, first, end, 0, 0]
    items: Vec<[u32; 8]>,
    /// [query tile, batch base, first slot, slot count]
    merges: Vec<[u32; 4]>,
    slots: usize,
}

const NO_SPLIT: u32 = u32::MAX;

/// Workgroups below which a dispatch leaves a large GPU idle (the H200 has 132 SMs and runs
/// one or two tensor-core workgroups on each): without a forced limit, plans on every tier and
/// adapter split long query tiles over keys until their dispatches have about this many.
const FILL_WORKGROUPS: usize = 256;
/// The fewest key tiles of a part split off to fill the GPU: each part loads its Q tile and
/// writes a partial output that the merge reads back.
const FILL_MIN_TILES: usize = 16;

/// Orders query tiles heaviest first and splits the heavy ones (on small grids, every long
/// one; see FILL_WORKGROUPS): `rows` holds (work in key tiles, [query tile, block-mask row,
/// batch base]), each item dispatched as `grid` workgroups (heads and batch elements). A split
/// part's scratch costs `part_bytes`; splitting stops short of the binding limit.
fn split_rows(
    rows: &[(usize, [u32; 3])],
    grid: usize,
    max_tiles: Option<usize>,
    part_bytes: u64,
    binding_limit: u64,
) -> Work {
    let total: usize = rows.iter().map(|r| r.0).sum();
    let mean = total as f64 / rows.len().max(1) as f64;
    let mut limit = match max_tiles {
        Some(m) => m.max(1),
        None => {
            let heaviest = rows.iter().map(|r| r.0).max().unwrap_or(0);
            let skewed = if (heaviest as f64) > 4.0 * mean {
                ((2.0 * mean).ceil() as usize).max(4)
            } else {
                usize::MAX
            };
            // Too few workgroups for the GPU: parts of the mean work over the parts it takes.
            let workgroups = (rows.len() * grid).max(1);
            let fill = if workgroups < FILL_WORKGROUPS {
                let parts = FILL_WORKGROUPS.div_ceil(workgroups);
                ((mean / parts as f64).ceil() as usize).max(FILL_MIN_TILES)
            } else {
                usize::MAX
            };
            skewed.min(fill)
        }
    };
    let slots_for = |limit: usize| -> usize {
        rows.iter()
            .filter(|r| r.0 > limit)
            .map(|r| r.0.div_ceil(limit))
            .sum()
    };
    while limit < usize::MAX && slots_for(limit) as u64 * part_bytes > binding_limit {
        limit = limit.saturating_mul(2);
    }
    let mut pieces: Vec<(usize, [u32; 8])> = Vec::new();
    let mut merges = Vec::new();
    let mut slots = 0usize;
    for &(w, [qt, row, bl]) in rows {
        if w <= limit {
            pieces.push((w, [qt, row, bl, NO_SPLIT, 0, u32::MAX, 0, 0]));
            continue;
        }
        let parts = w.div_ceil(limit);
        merges.push([qt, bl, slots as u32, parts as u32]);
        for p in 0..parts {
            let (lo, hi) = (p * w / parts, (p + 1) * w / parts);
            let slot = (slots + p) as u32;
            pieces.push((hi - lo, [qt, row, bl, slot, lo as u32, hi as u32, 0, 0]));
        }
        slots += parts;
    }
    pieces.sort_by_key(|(w, _)| std::cmp::Reverse(*w));
    Work {
        items: pieces.into_iter().map(|(_, it)| it).collect(),
        merges,
        slots,
    }
}

/// Items ordered heaviest first, reordered as the heaviest, the lightest, the second heaviest,
/// the second lightest, ...: heavy and light items then run side by side on the GPU throughout.
/// On the H200 (tensor-core tier, d = 64, N = 16384) this took 3% off causal and packed-document
/// masks against heaviest first; tree, sliding-window and random-block masks within 1%
/// (BENCHMARKS.md).
fn heavy_and_light_alternating<T: Copy>(items: Vec<T>) -> Vec<T> {
    let n = items.len();
    (0..n)
        .map(|i| items[if i % 2 == 0 { i / 2 } else { n - 1 - i / 2 }])
        .collect()
}

/// Most dispatches (each with its own index and scratch buffers) one plan splits its work into.
const MAX_DISPATCHES: usize = 1 << 16;

/// Splits (batch, kv-head) work so that every tensor of a part fits one storage binding and
/// every dispatch dimension fits the adapter: returns (b0, nb, hk0, nhk) parts; more than
/// [`MAX_DISPATCHES`] of them, or counts past the dispatch limits, are an error.
fn split_work(
    s: &Shape,
    binding_limit: u64,
    q_tiles: usize,
    per_batch: bool,
    limits: &wgpu::Limits,
    e: DType,
) -> Result<Vec<(usize, usize, usize, usize)>> {
    let max_dim = limits.max_compute_workgroups_per_dimension as usize;
    let d = s.head_dim;
    let g = s.group();
    let q_b = e.bytes(s.heads * s.seq_q * d);
    let kv_b = e.bytes(s.kv_heads * s.seq_k * d);
    // Counts against the dispatch limits: one workgroup row per query tile, one per query head
    // of the key/value heads a dispatch covers.
    let over = |what: &str, n: usize, limit: usize, name: &str| Error::InvalidArgument {
        what: "shape",
        why: format!("{n} {what} exceed the {limit} {name} that one plan can run"),
    };
    if q_tiles > max_dim {
        return Err(over(
            "query tiles",
            q_tiles,
            max_dim,
            "workgroups per dispatch dimension (max_compute_workgroups_per_dimension)",
        ));
    }
    if g > max_dim {
        return Err(over(
            "query heads per key/value head",
            g,
            max_dim,
            "workgroups per dispatch dimension (max_compute_workgroups_per_dimension)",
        ));
    }
    let mut parts = Vec::new();
    if q_b.max(kv_b) <= binding_limit && s.heads <= max_dim {
        let mut nb = ((binding_limit / q_b.max(kv_b)) as usize)
            .min(s.batch)
            .min(max_dim);
        if per_batch {
            nb = nb.min(max_dim / q_tiles).max(1);
        }
        let dispatches = s.batch.div_ceil(nb);
        if dispatches > MAX_DISPATCHES {
            return Err(over("dispatches", dispatches, MAX_DISPATCHES, "dispatches"));
        }
        let mut b0 = 0;
        while b0 < s.batch {
            let n = nb.min(s.batch - b0);
            parts.push((b0, n, 0, s.kv_heads));
            b0 += n;
        }
        return Ok(parts);
    }
    let q_h = e.bytes(g * s.seq_q * d);
    let kv_h = e.bytes(s.seq_k * d);
    if q_h.max(kv_h) > binding_limit {
        return Err(Error::TooLarge {
            what: "the queries or keys of one key/value head",
            bytes: q_h.max(kv_h),
            limit_name: "max_storage_buffer_binding_size",
            limit: binding_limit,
        });
    }
    let nhk = ((binding_limit / q_h.max(kv_h)) as usize)
        .min(s.kv_heads)
        .min((max_dim / g).max(1));
    let dispatches = s.kv_heads.div_ceil(nhk).saturating_mul(s.batch);
    if dispatches > MAX_DISPATCHES {
        return Err(over("dispatches", dispatches, MAX_DISPATCHES, "dispatches"));
    }
    for b in 0..s.batch {
        let mut hk0 = 0;
        while hk0 < s.kv_heads {
            let n = nhk.min(s.kv_heads - hk0);
            parts.push((b, 1, hk0, n));
            hk0 += n;
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The H200's limits that shape the kernels (48 KiB of workgroup memory, 1024 invocations).
    fn h200_limits() -> wgpu::Limits {
        wgpu::Limits {
            max_compute_workgroup_storage_size: 49152,
            max_compute_invocations_per_workgroup: 1024,
            max_compute_workgroup_size_x: 1024,
            ..Default::default()
        }
    }

    /// The tensor-core cost model picks, for every mask family of the suite at N = 16384, the
    /// tile shape that ran fastest on the H200 (BENCHMARKS.md, 2026-12-02: 128-row tiles at
    /// d = 64 but for the tree mask), and the sparse path; never the 32-row tiles the
    /// area-proportional model used to pick (1.75x to 2x slower).
    #[test]
    fn tensor_core_plans_take_the_measured_fastest_tiles() {
        let limits = h200_limits();
        // Tree ran 2.12 ms at 64x32 against 2.20 at 128x32, documents 5.62 against 4.47,
        // causal 68.9 against 48.2 (H200, 2026-12-02). BigBird was not run at 64x32 with two
        // subgroups per 16 rows: the model takes 64x32 (7.83 ms there against 7.04 at 128x32
        // with one, and the 64-row tiles gained 1.24x to 1.35x from the second, the 128-row
        // ones 1.08x).
        let fastest: [(&str, &[usize]); 8] = [
            ("causal", &[128]),
            ("sliding-window", &[128]),
            ("documents", &[128]),
            ("prefix-lm", &[128]),
            ("longformer", &[128]),
            ("bigbird", &[64, 128]),
            ("tree", &[64]),
            ("random-blocks", &[128]),
        ];
        for d in [64, 128] {
            let candidates = KernelConfig::candidates(&limits, Tier::TensorCore, d);
            let rows: Vec<usize> = candidates.iter().map(|c| c.tile_rows).collect();
            // 128-row tiles fit 48 KiB only up to d = 64.
            let want: &[usize] = if d == 64 {
                &[64, 128, 32, 16]
            } else {
                &[64, 32, 16]
            };
            assert_eq!(rows, want, "d = {d}");
            // Without a mask: the dense plan ran 86.7 ms at 128x32 against 118.5 at 64x32
            // (N = 16384).
            let dense = cheapest_dense(&candidates, &Shape::new(4, 32, 16384, d));
            assert_eq!(dense.tile_rows, if d == 64 { 128 } else { 64 }, "d = {d}");
            for (family, best) in fastest {
                let mask = crate::suite::family_mask(family, 16384, 1).unwrap();
                let ch = choose(&candidates, &mask, None, None).unwrap();
                let tile = (ch.config.tile_rows, ch.config.tile_cols);
                let best: &[usize] = if d == 64 { best } else { &[64] };
                assert!(
                    best.contains(&tile.0) && tile.1 == 32 && ch.path == Path::Sparse,
                    "{family} at d = {d}: {tile:?} {}",
                    ch.path
                );
            }
        }
    }

    #[test]
    fn heavy_and_light_items_alternate_heaviest_first() {
        let by_weight: Vec<u32> = (0..7).rev().collect();
        assert_eq!(
            heavy_and_light_alternating(by_weight),
            [6, 0, 5, 1, 4, 2, 3]
        );
        assert_eq!(heavy_and_light_alternating(vec![9, 8]), [9, 8]);
        assert!(heavy_and_light_alternating(Vec::<u32>::new()).is_empty());
    }

    /// Decoding takes the 16-row tensor-core tile where it prefetches (d = 64 on the H200's
    /// limits), not at d = 128 nor for more than 16 queries nor on the portable tiers.
    #[test]
    fn decoding_takes_16_row_tiles_where_they_prefetch() {
        let limits = h200_limits();
        let rows = |tier, d, seq_q| {
            let shape = Shape {
                seq_q,
                ..Shape::new(1, 32, 16384, d)
            };
            decoding_tiles(KernelConfig::candidates(&limits, tier, d), &shape)
                .iter()
                .map(|c| c.tile_rows)
                .collect::<Vec<_>>()
        };
        assert_eq!(rows(Tier::TensorCore, 64, 1), [16]);
        assert_eq!(rows(Tier::TensorCore, 64, 16), [16]);
        assert_eq!(rows(Tier::TensorCore, 64, 17), [64, 128, 32, 16]);
        assert_eq!(rows(Tier::TensorCore, 128, 1), [64, 32, 16]);
        let portable = KernelConfig::candidates(&limits, Tier::PortableF16, 64);
        assert_eq!(rows(Tier::PortableF16, 64, 1).len(), portable.len());
    }

    /// Small grids split every item to fill the GPU, in parts of at least FILL_MIN_TILES;
    /// full grids and short walks stay whole.
    #[test]
    fn small_grids_split_to_fill_the_gpu() {
        let parts = |rows: &[(usize, [u32; 3])], grid| {
            let w = split_rows(rows, grid, None, 1, u64::MAX);
            (w.items.len(), w.slots)
        };
        // Decoding, 32 heads over 512 key tiles: 8 parts of 64 tiles, 256 workgroups.
        assert_eq!(parts(&[(512, [0, 0, 0])], 32), (8, 8));
        // One head: parts of 16 tiles, not the 2 that 256 workgroups would take.
        assert_eq!(parts(&[(512, [0, 0, 0])], 1), (32, 32));
        // 256 workgroups already, or walks no longer than a part: no split.
        assert_eq!(parts(&[(512, [0, 0, 0])], 256), (1, 0));
        assert_eq!(parts(&[(16, [0, 0, 0]), (16, [1, 1, 0])], 4), (2, 0));
        // A forced limit wins.
        let w = split_rows(&[(512, [0, 0, 0])], 1, Some(usize::MAX), 1, u64::MAX);
        assert_eq!((w.items.len(), w.slots), (1, 0));
    }
}
