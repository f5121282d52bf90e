//! The attention kernels: the forward kernel's tile configurations, the backward kernels' step
//! size, the WGSL sources specialised by `override` constants, and the pipeline cache.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::Tier;
use crate::parallel::for_chunks;

/// WGSL shared by every kernel: walk, masks, stores, split-KV merge.
pub const COMMON_WGSL: &str = include_str!("../shaders/common.wgsl");
/// WGSL of the f32 and f16 storage types (after `alias Elem = f32;` or `f16`).
pub const STORAGE_FLOAT_WGSL: &str = include_str!("../shaders/storage_float.wgsl");
/// WGSL of the bf16 storage type (bf16 pairs in `u32` words).
pub const STORAGE_BF16_WGSL: &str = include_str!("../shaders/storage_bf16.wgsl");
/// WGSL of the portable kernel (all paths and tile shapes, f32, f16 or bf16 storage).
pub const ATTENTION_WGSL: &str = include_str!("../shaders/attention.wgsl");
/// WGSL of the tensor-core kernel (cooperative matrices, f16 storage).
pub const ATTENTION_COOP_WGSL: &str = include_str!("../shaders/attention_coop.wgsl");
/// WGSL both backward modules share (bindings, the pre-pass, the dK/dV pass's rows).
pub const BACKWARD_WALK_WGSL: &str = include_str!("../shaders/backward_walk.wgsl");
/// WGSL of the portable backward kernels (dK/dV, dQ; f32 arithmetic on every storage type).
pub const BACKWARD_WGSL: &str = include_str!("../shaders/backward.wgsl");
/// WGSL of the tensor-core backward kernels (dK/dV, dQ; cooperative matrices, f16 storage).
pub const BACKWARD_COOP_WGSL: &str = include_str!("../shaders/backward_coop.wgsl");

/// Environment variable naming a folder of WGSL files that replace the built-in kernel sources
/// of the same names (`common.wgsl`, `attention_coop.wgsl`, ... as in `shaders/`) wherever a
/// module is built: kernel variants measured with one binary, without rebuilding. Each
/// replacement is logged as a warning; files not in the folder stay built in.
pub const SHADER_DIR_ENV: &str = "BLOCKFLASH_SHADER_DIR";

/// Kernel source `name`: from the folder named by [`SHADER_DIR_ENV`] where that holds it, else
/// `builtin`.
fn wgsl(name: &str, builtin: &'static str) -> Cow<'static, str> {
    match std::env::var_os(SHADER_DIR_ENV) {
        Some(dir) => wgsl_from(std::path::Path::new(&dir), name, builtin),
        None => Cow::Borrowed(builtin),
    }
}

fn wgsl_from(dir: &std::path::Path, name: &str, builtin: &'static str) -> Cow<'static, str> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            log::warn!(
                "kernel source {name} read from {} ({SHADER_DIR_ENV})",
                path.display()
            );
            Cow::Owned(text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cow::Borrowed(builtin),
        Err(e) => {
            log::warn!(
                "{SHADER_DIR_ENV}: {} unreadable ({e}); built-in {name} used",
                path.display()
            );
            Cow::Borrowed(builtin)
        }
    }
}

/// Storage type of Q, K, V and O (the kernels compute in f32 on every storage type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    #[default]
    F32,
    /// 16-bit float (needs `SHADER_F16`).
    F16,
    /// bfloat16: the upper 16 bits of an f32, as most models store their weights. WGSL has no
    /// such type: the kernels read pairs of them from `u32` words and widen them to f32, and
    /// round f32 results to the nearest even bfloat16 when they store them (no features needed).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Bytes of `n` elements, rounded up to wgpu's 4-byte copy alignment.
    pub fn bytes(self, n: usize) -> u64 {
        (n * self.size()).next_multiple_of(4) as u64
    }

    /// `data` converted to this type (f16, bf16: rounded to nearest even), as bytes padded to 4;
    /// large inputs on all cores.
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        let size = self.size();
        let mut out = vec![0u8; self.bytes(data.len()) as usize];
        for_chunks(&mut out[..data.len() * size], size, |start, chunk| {
            let (dst, src) = (chunk.chunks_exact_mut(size), &data[start / size..]);
            match self {
                DType::F32 => dst
                    .zip(src)
                    .for_each(|(d, x)| d.copy_from_slice(&x.to_le_bytes())),
                DType::F16 => dst
                    .zip(src)
                    .for_each(|(d, &x)| d.copy_from_slice(&half::f16::from_f32(x).to_le_bytes())),
                DType::BF16 => dst
                    .zip(src)
                    .for_each(|(d, &x)| d.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes())),
            }
        });
        out
    }

    /// The first `n` elements of `bytes` as f32; large inputs on all cores.
    pub fn decode(self, bytes: &[u8], n: usize) -> Vec<f32> {
        let size = self.size();
        let bytes = &bytes[..n * size];
        let mut out = vec![0f32; n];
        for_chunks(&mut out, 1, |start, chunk| {
            let src = bytes[start * size..].chunks_exact(size);
            match self {
                DType::F32 => chunk
                    .iter_mut()
                    .zip(src)
                    .for_each(|(x, b)| *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                DType::F16 => chunk
                    .iter_mut()
                    .zip(src)
                    .for_each(|(x, b)| *x = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                DType::BF16 => chunk
                    .iter_mut()
                    .zip(src)
                    .for_each(|(x, b)| *x = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            }
        });
        out
    }

    /// `x` rounded to this type and widened back: what a kernel reads of an f32 input stored as
    /// this type (`decode(encode(x))` element by element).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// The WGSL module of a tier: a prologue for extensions, the storage type and, for the portable
/// kernel, the lane exchange of its row reductions; then the shared code and the kernel's own.
///
/// `subgroups` says whether the device has `SUBGROUP`: only then does the portable module hold
/// subgroup operations (naga 30 rejects `enable subgroups;` and needs none). The tensor-core
/// module never does: one NVIDIA driver crashed on modules that mix them with cooperative
/// matrices.
pub fn module_source(tier: Tier, subgroups: bool) -> String {
    match tier {
        Tier::PortableF32 | Tier::PortableF16 | Tier::PortableBf16 => {
            let lanes = if subgroups {
                "fn lane_xor(x: f32, mask: u32) -> f32 {\n    return subgroupShuffleXor(x, mask);\n}\n"
            } else {
                // The host sets SUBGROUP_RED only on devices with subgroups.
                "// No subgroups: SUBGROUP_RED stays false and this is never called.\n\
                 fn lane_xor(x: f32, mask: u32) -> f32 {\n    return x;\n}\n"
            };
            format!(
                "{}{lanes}{}\n{}",
                storage_prologue(tier.dtype()),
                wgsl("common.wgsl", COMMON_WGSL),
                wgsl("attention.wgsl", ATTENTION_WGSL)
            )
        }
        Tier::TensorCore => format!(
            "enable wgpu_cooperative_matrix;\n{}{}\n{}",
            storage_prologue(DType::F16),
            wgsl("common.wgsl", COMMON_WGSL),
            wgsl("attention_coop.wgsl", ATTENTION_COOP_WGSL)
        ),
    }
}

/// The tensor-core module with its cooperative-matrix operations emulated in plain WGSL (see
/// [`crate::Gpu::with_tensor_core_emulation`]); its workgroup memory is the kernel's plus
/// [`EMULATION_BYTES_PER_INVOCATION`] per invocation.
pub fn emulated_tensor_core_source() -> String {
    crate::coop_emulation::emulated(&module_source(Tier::TensorCore, false))
}

/// Workgroup memory the emulated tensor-core module adds per invocation.
pub const EMULATION_BYTES_PER_INVOCATION: usize =
    crate::coop_emulation::SCRATCH_BYTES_PER_INVOCATION;

/// The prologue of storage type `dtype`: `Elem4` (four elements of Q, K, V, O or a gradient),
/// `load4` (widen to `vec4<f32>`) and `pack4` (round to the storage type), with f16 enabled
/// where needed and `Elem` (the element type) for f32 and f16.
fn storage_prologue(dtype: DType) -> String {
    let float = || wgsl("storage_float.wgsl", STORAGE_FLOAT_WGSL);
    match dtype {
        DType::F32 => format!("alias Elem = f32;\n{}", float()),
        DType::F16 => format!("enable f16;\nalias Elem = f16;\n{}", float()),
        DType::BF16 => wgsl("storage_bf16.wgsl", STORAGE_BF16_WGSL).into_owned(),
    }
}

/// The WGSL module of the backward kernels: the portable ones for storage type `dtype`, or with
/// `tensor_cores` the tensor-core ones (f16 storage; no subgroup operations).
pub fn backward_module_source(dtype: DType, tensor_cores: bool) -> String {
    let common = wgsl("common.wgsl", COMMON_WGSL);
    let walk = wgsl("backward_walk.wgsl", BACKWARD_WALK_WGSL);
    if tensor_cores {
        format!(
            "enable wgpu_cooperative_matrix;\n{}{common}\n{walk}\n{}",
            storage_prologue(DType::F16),
            wgsl("backward_coop.wgsl", BACKWARD_COOP_WGSL)
        )
    } else {
        format!(
            "{}{common}\n{walk}\n{}",
            storage_prologue(dtype),
            wgsl("backward.wgsl", BACKWARD_WGSL)
        )
    }
}

/// The tensor-core backward module with its cooperative-matrix operations emulated (see
/// [`emulated_tensor_core_source`]).
pub fn emulated_tensor_core_backward_source() -> String {
    crate::coop_emulation::emulated(&backward_module_source(DType::F16, true))
}

/// Invocations per workgroup of the backward pre-pass (one per query row; within every
/// device's limits).
pub const BACKWARD_PRE_THREADS: usize = 64;
// Capacities of the walking backward passes' per-thread arrays: S_CAP S (and dP) elements,
// SIDE_CAP rows and keys of them, ACC_CAP vec4 accumulators of dK and dV (or dQ).
const BACKWARD_S_CAP: usize = 16;
const BACKWARD_SIDE_CAP: usize = 8;
const BACKWARD_ACC_CAP: usize = 16;
/// What [`backward_layout`] prefers: at least this many threads (two subgroups of 32 on most
/// GPUs) and at most this many accumulators per thread and kind (registers).
const BACKWARD_PREFERRED_THREADS: usize = 64;
const BACKWARD_PREFERRED_ACC: usize = 8;
/// Most query rows of a dK/dV step.
const BACKWARD_MAX_ROWS: usize = 64;
/// Most key tiles of a dQ step.
const BACKWARD_MAX_KEY_TILES: usize = 4;

/// How a walking pass of the backward (dK/dV or dQ) runs a tile shape (see
/// shaders/backward.wgsl): its workgroup size, the query rows and keys of a step, the head-dim
/// chunk in workgroup memory, and its two thread grids: `sx` threads along the keys of the S and
/// dP block, `ax` threads along the vec4 column groups of the accumulators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardLayout {
    /// The pass: dK/dV or dQ (the pre-pass has no layout).
    pub pass: BackwardPass,
    /// Query rows per tile (Br), from the forward configuration.
    pub tile_rows: usize,
    /// Keys per tile (Bc), from the forward configuration.
    pub tile_cols: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Invocations per workgroup.
    pub threads: usize,
    /// Query rows per step: dK/dV's run over the query tiles of its walk (any power of two),
    /// dQ's divide its query tile.
    pub rows: usize,
    /// Keys per step: dK/dV's key tile, or for dQ a multiple of it (key tiles of its walk).
    pub keys: usize,
    /// Head-dim columns in workgroup memory at once (divides `head_dim`; all of it keeps the
    /// operands that stay over the walk).
    pub dc: usize,
    /// Threads along the keys of the S and dP block.
    pub sx: usize,
    /// Threads along the vec4 column groups of the accumulators.
    pub ax: usize,
    /// The tensor-core kernels (shaders/backward_coop.wgsl): `split` subgroups of 32 for each
    /// 16 keys (dK/dV) or 16 query rows (dQ) of the tile, steps of `rows` query rows (dK/dV)
    /// by one key tile, all of d in workgroup memory; `sx` and `ax` unused (0).
    pub tensor_cores: bool,
    /// Tensor cores: subgroups sharing each 16 keys or rows (1 or 2; with 2 each computes one
    /// product of each pair, or half of dQ's columns, and holds half the accumulators). 1 for
    /// the portable kernels.
    pub split: usize,
}

impl BackwardLayout {
    /// Bytes of workgroup memory of the pass: Q and dO of a step's rows and K and V of its
    /// keys, each a head-dim chunk with rows padded by a vec4; P (dK/dV only) and dS of a step.
    pub fn workgroup_bytes(&self) -> usize {
        let (rs, ks) = (self.rows, self.keys);
        if self.tensor_cores {
            let (br, bc, d) = (self.tile_rows, self.tile_cols, self.head_dim);
            // kv_sh (K and V, f16 rows padded by 8), then dK/dV: qd_sh, st_sh, ft_sh, pd_sh and
            // common.wgsl's walk; dQ: fq_sh, ds_sh and the walk and span.
            let kv = 2 * 2 * bc * (d + 8);
            return match self.pass {
                BackwardPass::DkDv => {
                    kv + 2 * 2 * rs * (d + 8)
                        + 4 * 2 * rs
                        + 4 * 2 * bc * (rs + 4)
                        + 2 * 2 * bc * (rs + 8)
                        + 16
                }
                _ => kv + 4 * 2 * br * (bc + 4) + 2 * br * (bc + 8) + WALK_BYTES,
            };
        }
        let chunk = 4 * (self.dc + 4) * (2 * rs + 2 * ks);
        match self.pass {
            BackwardPass::DkDv => chunk + 4 * 2 * rs * ks,
            // dS, and common.wgsl's walk (the dQ pass reads its work items with it).
            _ => chunk + 4 * rs * ks + WALK_BYTES,
        }
    }

    /// The override constants of the pass.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = vec![
            ("BR", self.tile_rows as f64),
            ("BC", self.tile_cols as f64),
            ("D", self.head_dim as f64),
            ("THREADS", self.threads as f64),
            ("RS", self.rows as f64),
        ];
        if self.tensor_cores {
            c.push(("PREFETCH", self.prefetch() as u32 as f64));
            c.push(("SPLIT", self.split as f64));
        } else {
            c.extend([
                ("KS", self.keys as f64),
                ("DC", self.dc as f64),
                ("SX", self.sx as f64),
                ("AX", self.ax as f64),
            ]);
        }
        c
    }

    /// Whether the tensor-core pass reads the next step's operands (dK/dV: Q and dO of the next
    /// rows; dQ: K and V of the next key tile) into registers a step ahead (its PREFETCH): where
    /// a thread's share divides evenly and is at most 8 vec4, as for the forward kernel.
    pub fn prefetch(&self) -> bool {
        let lines = if self.pass == BackwardPass::DkDv {
            self.rows
        } else {
            self.tile_cols
        };
        let share = lines * self.head_dim / 4;
        self.tensor_cores
            && share.is_multiple_of(self.threads)
            && share / self.threads <= TENSOR_CORE_PREFETCH_MAX
    }

    /// Words one step moves: operand reads from workgroup memory (each thread reads the rows
    /// and keys of its block, so wider blocks read less) plus, at eight times the weight,
    /// staging from global memory (global reads, conversion and stores: the weight that fits
    /// lavapipe's times).
    fn step_cost(&self) -> usize {
        let (d, t, rs, ks, dc, sx, ax) = (
            self.head_dim,
            self.threads,
            self.rows,
            self.keys,
            self.dc,
            self.sx,
            self.ax,
        );
        let (sy, ay) = (t / sx, t / ax);
        let chunked = usize::from(dc < d);
        let scores = 2 * d * (rs * sx + ks * sy);
        let (accumulate, staged) = match self.pass {
            // Per row: P and dS of the thread's keys, dO and Q of its columns. Q and dO each
            // step, and again but for the last chunk; K and V each step when chunked.
            BackwardPass::DkDv => (
                rs * (2 * ks * ax + 2 * d * ay),
                2 * rs * (2 * d - dc) + 2 * ks * d * chunked,
            ),
            // Per key: dS of the thread's rows, K of its columns. K and V each step, K again
            // but for the last chunk; Q and dO each step when chunked.
            _ => (
                ks * (rs * ax + d * ay),
                ks * (3 * d - dc) + 2 * rs * d * chunked,
            ),
        };
        scores + accumulate + 8 * staged
    }

    /// Steps of the walks whose lengths in tiles are `walks` (dK/dV: query tiles of each key
    /// tile's walk over the heads of its group; dQ: key tiles of each query tile's walk).
    fn steps(&self, walks: &[usize]) -> usize {
        let (br, bc, rs, ks) = (self.tile_rows, self.tile_cols, self.rows, self.keys);
        walks
            .iter()
            .map(|&n| match self.pass {
                BackwardPass::DkDv => (n * br).div_ceil(rs),
                _ => br / rs * (n * bc).div_ceil(ks),
            })
            .sum()
    }

    /// Whether the shader's capacities and `limits` hold this layout.
    fn valid(&self, limits: &wgpu::Limits) -> bool {
        let fits = self.threads <= limits.max_compute_invocations_per_workgroup as usize
            && self.threads <= limits.max_compute_workgroup_size_x as usize
            && self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size as usize;
        if self.tensor_cores {
            // DT_CAP and RT_CAP; Q and dO of a dQ tile pass through K and V's buffers.
            let (br, bc, d, rs) = (self.tile_rows, self.tile_cols, self.head_dim, self.rows);
            // dK/dV: thread t takes query column t % RS of a step, so RS divides THREADS =
            // 2 SPLIT BC; a row's mask bits against a key tile are one word (BC = 32). The parts
            // of a split dQ block take whole fragments of the head dim, and its output passes
            // through 16 SPLIT columns of the score buffer.
            let lines = if self.pass == BackwardPass::DkDv {
                bc
            } else {
                br
            };
            let split = self.split;
            return fits
                && bc == 32
                && d.is_multiple_of(16 * split)
                && d / 16 <= TENSOR_CORE_DT_CAP
                && rs.is_multiple_of(16)
                && rs / 16 <= 4
                && br <= 2 * bc
                && (split == 1 || split == 2)
                && self.threads == 2 * split * lines
                && self.threads.is_multiple_of(rs);
        }
        let (br, bc, d, t, rs, ks, dc, sx, ax) = (
            self.tile_rows,
            self.tile_cols,
            self.head_dim,
            self.threads,
            self.rows,
            self.keys,
            self.dc,
            self.sx,
            self.ax,
        );
        let step = match self.pass {
            BackwardPass::DkDv => ks == bc,
            _ => br.is_multiple_of(rs) && ks.is_multiple_of(bc),
        };
        // Scores: sx x (t / sx) threads over rs x ks.
        let (sm, sn) = (rs / (t / sx).max(1), ks / sx);
        let scores = t.is_multiple_of(sx)
            && ks.is_multiple_of(sx)
            && rs.is_multiple_of(t / sx)
            && sm.max(sn) <= BACKWARD_SIDE_CAP
            && sm * sn <= BACKWARD_S_CAP;
        // Accumulators: ax x (t / ax) threads over keys (dK/dV) or rows (dQ) by d / 4 groups,
        // every chunk holding whole column groups of each thread.
        let lines = if self.pass == BackwardPass::DkDv {
            bc
        } else {
            rs
        };
        let acc = t.is_multiple_of(ax)
            && lines.is_multiple_of(t / ax)
            && (dc / 4).is_multiple_of(ax)
            && self.accumulators() <= BACKWARD_ACC_CAP;
        fits && step && d.is_multiple_of(dc) && scores && acc
    }

    /// vec4 accumulators per thread of each kind (dK and dV, or dQ).
    fn accumulators(&self) -> usize {
        let lines = if self.pass == BackwardPass::DkDv {
            self.tile_cols
        } else {
            self.rows
        };
        lines / (self.threads / self.ax) * (self.head_dim / (4 * self.ax))
    }
}

/// The layout of walking pass `pass` (dK/dV or dQ) for the tiles of `config` within `limits`
/// (see [`BackwardLayout`]), for walks of `walks` tiles (see `BackwardLayout::steps`). A
/// tensor-core configuration gets the tensor-core kernels where they fit (dK/dV with the
/// longest step that does). Otherwise the portable kernels: of the layouts with at least 64
/// threads and at most 8 accumulators per thread and kind, else of all that fit, the one that
/// moves the fewest words over the walks. `None` when none fits (and for the pre-pass).
pub fn backward_layout(
    config: &KernelConfig,
    pass: BackwardPass,
    limits: &wgpu::Limits,
    walks: &[usize],
) -> Option<BackwardLayout> {
    let (br, bc, d) = (config.tile_rows, config.tile_cols, config.head_dim);
    if config.tier == Tier::TensorCore && pass != BackwardPass::Pre {
        // dK/dV steps of a whole query tile, or of a half or a quarter of it; dQ takes whole tiles.
        // The longest step that fits, two subgroups per 16 keys or rows where they fit.
        let steps: &[usize] = if pass == BackwardPass::DkDv {
            &[br, br / 2, br / 4]
        } else {
            &[br]
        };
        let lines = if pass == BackwardPass::DkDv { bc } else { br };
        let tensor_cores = steps
            .iter()
            .copied()
            .filter(|&rs| rs >= 16 && br.is_multiple_of(rs))
            .flat_map(|rs| [(rs, 2), (rs, 1)])
            .map(|(rs, split)| BackwardLayout {
                pass,
                tile_rows: br,
                tile_cols: bc,
                head_dim: d,
                threads: 2 * split * lines,
                rows: rs,
                keys: bc,
                dc: d,
                sx: 0,
                ax: 0,
                tensor_cores: true,
                split,
            })
            .find(|l| l.valid(limits));
        if tensor_cores.is_some() {
            return tensor_cores;
        }
    }
    let pow2 = |max: usize| (0..).map(|e| 1usize << e).take_while(move |&x| x <= max);
    let (max_rows, max_keys) = match pass {
        BackwardPass::Pre => return None,
        BackwardPass::DkDv => (BACKWARD_MAX_ROWS, bc),
        BackwardPass::Dq => (br, BACKWARD_MAX_KEY_TILES * bc),
    };
    // (not preferred, cost): the smallest wins.
    let mut best: Option<((bool, usize), BackwardLayout)> = None;
    for threads in [64, 128, 256, 32] {
        for rows in pow2(max_rows) {
            for keys in pow2(max_keys).filter(|k| k.is_multiple_of(bc)) {
                let mut steps = None;
                let chunks = (1..=d / 4)
                    .filter(|&n| d.is_multiple_of(4 * n))
                    .map(|n| d / n);
                for dc in chunks {
                    for sx in pow2(keys) {
                        for ax in pow2(d / 4) {
                            let l = BackwardLayout {
                                pass,
                                tile_rows: br,
                                tile_cols: bc,
                                head_dim: d,
                                threads,
                                rows,
                                keys,
                                dc,
                                sx,
                                ax,
                                tensor_cores: false,
                                split: 1,
                            };
                            if !l.valid(limits) {
                                continue;
                            }
                            let preferred = threads >= BACKWARD_PREFERRED_THREADS
                                && l.accumulators() <= BACKWARD_PREFERRED_ACC;
                            let steps = *steps.get_or_insert_with(|| l.steps(walks));
                            let cost = (!preferred, steps * l.step_cost());
                            if best.is_none_or(|(c, _)| cost < c) {
                                best = Some((cost, l));
                            }
                        }
                    }
                }
            }
        }
    }
    best.map(|(_, l)| l)
}

/// Which key tiles a workgroup walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Every key tile; an element mask, if any, is applied everywhere.
    Dense,
    /// Per query tile one interval of active key tiles with an inner interval of full ones.
    RunLength,
    /// Per query tile a list of active key tiles, full ones first.
    Sparse,
}

impl Path {
    pub(crate) fn code(self) -> u32 {
        match self {
            Path::Dense => 0,
            Path::RunLength => 1,
            Path::Sparse => 2,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::Dense => "dense",
            Path::RunLength => "run-length",
            Path::Sparse => "sparse",
        })
    }
}

impl std::str::FromStr for Path {
    type Err = Error;
    fn from_str(s: &str) -> Result<Path> {
        match s {
            "dense" => Ok(Path::Dense),
            "runlength" | "run-length" => Ok(Path::RunLength),
            "sparse" => Ok(Path::Sparse),
            _ => Err(Error::InvalidArgument {
                what: "path",
                why: format!("{s:?} is not one of dense, runlength, sparse"),
            }),
        }
    }
}

// Capacities of the per-thread arrays in the shaders (TM_CAP, S_CAP, ACC_CAP, HALF_CAP).
const TM_CAP: usize = 8;
const HALF_CAP: usize = 32;
const S_CAP: usize = 32;
const ACC_CAP: usize = 16;

/// A tile configuration of a kernel: its tier, `tile_rows` × `tile_cols` tiles, and its thread
/// layout. Portable tiers hold a head-dim chunk of `dc` columns of K/V in workgroup memory and
/// run a `tx` × `ty` thread grid; the tensor-core tier runs `tx / 2` subgroups of 32 for each
/// 16 query rows (`tx` threads per row, `ty` = `tile_rows`), each computing its share of the
/// keys of S and of the head dim of O, and stages the output through workgroup memory `dc`
/// columns at a time (d, or `tile_cols` where d does not fit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelConfig {
    /// The kernel tier.
    pub tier: Tier,
    /// Query rows per tile (Br).
    pub tile_rows: usize,
    /// Keys per tile (Bc), a multiple of 32.
    pub tile_cols: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Head-dim columns of K/V (portable tiers) or of the output (tensor cores) held in
    /// workgroup memory at once.
    pub dc: usize,
    /// Threads per row group.
    pub tx: usize,
    /// Row groups.
    pub ty: usize,
}

/// Portable tile shapes and thread grids (rows, cols, tx, ty), fastest first.
const PORTABLE: [(usize, usize, usize, usize); 8] = [
    (64, 64, 16, 16),
    (64, 32, 16, 16),
    (32, 64, 16, 8),
    (32, 32, 16, 8),
    (32, 32, 8, 16),
    (16, 32, 8, 16),
    (16, 32, 8, 8),
    (8, 32, 8, 8),
];

/// Tensor-core tile shapes (rows, cols); plans take the cost model's choice among them. The
/// kernel walks 32 keys at a time: with its three K/V buffers, 64-key tiles do not fit 48 KiB of
/// workgroup memory at d = 64, and they measured slower with its earlier single-buffer form (see
/// BENCHMARKS.md). 128-row tiles share each K/V tile among eight blocks of 16 rows; they fit
/// 48 KiB up to d = 64 (output staged in 32-column chunks).
const TENSOR_CORE: [(usize, usize); 4] = [(64, 32), (128, 32), (32, 32), (16, 32)];
/// Most head-dim blocks of 16 the tensor-core kernel holds in registers (its DT_CAP).
const TENSOR_CORE_DT_CAP: usize = 8;
/// Most vec4 of a K or V tile per thread for which the tensor-core kernels fetch a tile ahead
/// into registers (KV_CAP, and the backward's PF_CAP): d = 64 at 64x32 (4) ran 1.7x faster with
/// it on the H100; 8 on the H200: d = 64 at 32x32 2.6x faster (documents, N4096), d = 128 at
/// 64x32 1.27x faster (dense, N16384) than the copy straight to workgroup memory; at d = 128,
/// 32x32 (16 per thread) the registers spilled and it ran 5x slower.
const TENSOR_CORE_PREFETCH_MAX: usize = 8;

/// Workgroup memory of common.wgsl's `walk` (vec4<u32>) and `span` (vec2<u32>).
const WALK_BYTES: usize = 24;

impl KernelConfig {
    /// Bytes of workgroup memory the kernel declares for this configuration (checked against
    /// the WGSL by a test).
    pub fn workgroup_bytes(&self) -> usize {
        let (br, bc, d, dc) = (self.tile_rows, self.tile_cols, self.head_dim, self.dc);
        match self.tier {
            Tier::PortableF32 | Tier::PortableF16 | Tier::PortableBf16 => {
                4 * (br * d + bc * (dc + 4) + br * bc + 2 * br * self.tx) + WALK_BYTES
            }
            // kv_sh (three f16 tiles of bc rows padded by 8); p_sh (f16, rows padded by 8);
            // f_sh (f32, rows of max(bc, dc) + 4); red (tx br + 4 f32); walk
            Tier::TensorCore => {
                2 * 3 * bc * (d + 8)
                    + 2 * br * (bc + 8)
                    + 4 * br * (bc.max(dc) + 4)
                    + 4 * (self.tx * br + 4)
                    + WALK_BYTES
            }
        }
    }

    /// Invocations per workgroup.
    pub fn threads(&self) -> usize {
        self.tx * self.ty
    }

    /// Whether a plan of this configuration runs the backward kernels at its own tiles. The
    /// tensor-core backward takes query tiles of at most twice the keys of a tile (its dQ pass
    /// stages a tile's Q and dO in the K/V buffers); taller tiles would get the portable
    /// backward kernels (no tensor cores), so a plan of them runs its backward through a plan
    /// of the same mask at 64x32 tiles.
    pub fn backward_takes_tiles(&self) -> bool {
        self.tier != Tier::TensorCore || self.tile_rows <= 2 * self.tile_cols
    }

    /// Whether the tensor-core kernel fetches the next K and V tile into registers a tile
    /// ahead (its PREFETCH constant).
    pub fn prefetch(&self) -> bool {
        let share = self.tile_cols * self.head_dim / 4;
        self.tier == Tier::TensorCore
            && share.is_multiple_of(self.threads())
            && share / self.threads() <= TENSOR_CORE_PREFETCH_MAX
    }

    fn valid(&self, limits: &wgpu::Limits) -> bool {
        let (br, bc, d, dc, tx, ty) = (
            self.tile_rows,
            self.tile_cols,
            self.head_dim,
            self.dc,
            self.tx,
            self.ty,
        );
        let fits = self.threads() <= limits.max_compute_invocations_per_workgroup as usize
            && self.threads() <= limits.max_compute_workgroup_size_x as usize
            && self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size as usize;
        if self.tier == Tier::TensorCore {
            return fits
                && br.is_multiple_of(16)
                && bc.is_multiple_of(32)
                && bc / tx <= HALF_CAP
                && bc <= 64
                && br <= 4 * bc
                // Q staged in two halves of whole 16-row blocks where it outgrows the K/V buffers
                && (br <= 3 * bc || br.is_multiple_of(32))
                && d.is_multiple_of(16)
                && d / 16 <= TENSOR_CORE_DT_CAP
                && (dc == d || dc == bc)
                && d.is_multiple_of(dc)
                && ty == br
                && (tx == 2 || (tx == 4 && dc.is_multiple_of(32)));
        }
        let tm = br / ty;
        fits && br.is_multiple_of(ty)
            && (1..=TM_CAP).contains(&tm)
            && bc.is_multiple_of(32)
            && bc.is_multiple_of(tx)
            && tm * (bc / tx) <= S_CAP
            && d.is_multiple_of(4 * tx)
            && tm * (d / (4 * tx)) <= ACC_CAP
            && dc.is_multiple_of(4 * tx)
            && d.is_multiple_of(dc)
    }

    /// Every configuration of `tier` that runs head dim `head_dim` within `limits`, fastest
    /// first (portable ones with the largest head-dim chunk that fits).
    pub fn candidates(limits: &wgpu::Limits, tier: Tier, head_dim: usize) -> Vec<KernelConfig> {
        if tier == Tier::TensorCore {
            // Two subgroups per 16 rows where they fit, else one; O staged whole where it
            // fits, else in chunks of bc columns.
            return TENSOR_CORE
                .iter()
                .filter_map(|&(br, bc)| {
                    [4, 2].into_iter().find_map(|tx| {
                        [head_dim, bc].into_iter().find_map(|dc| {
                            let c = KernelConfig {
                                tier,
                                tile_rows: br,
                                tile_cols: bc,
                                head_dim,
                                dc,
                                tx,
                                ty: br,
                            };
                            c.valid(limits).then_some(c)
                        })
                    })
                })
                .collect();
        }
        PORTABLE
            .iter()
            .filter_map(|&(br, bc, tx, ty)| {
                [1, 2, 3, 4, 8].iter().find_map(|&div| {
                    let c = KernelConfig {
                        tier,
                        tile_rows: br,
                        tile_cols: bc,
                        head_dim,
                        dc: head_dim / div,
                        tx,
                        ty,
                    };
                    (head_dim.is_multiple_of(div) && c.valid(limits)).then_some(c)
                })
            })
            .collect()
    }
}

/// Uniform parameters of one dispatch (must match `Params` in the shader).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub seq_q: u32,
    pub seq_k: u32,
    pub heads: u32,
    pub group: u32,
    pub scale_log2: f32,
    pub words_per_row: u32,
    pub mask_batch_stride: u32,
    pub rows_off: u32,
    pub cols_off: u32,
    pub neg_inf_bits: u32,
    pub k_tiles: u32,
    pub perm_off: u32,
    pub merge_off: u32,
    pub scratch_lse_off: u32,
    pub t_cols_off: u32,
    pub t_rows_off: u32,
    pub bits_off: u32,
    pub pad: [u32; 3],
}

/// One specialisation of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Variant {
    pub config: KernelConfig,
    pub path: Path,
    pub dense_mask: bool,
    pub write_lse: bool,
    pub permuted: bool,
    /// Row reductions by subgroup shuffles (portable tiers on devices with `SUBGROUP` only).
    pub subgroup_red: bool,
    /// The split-KV merge entry point instead of the attention one.
    pub merge: bool,
}

/// The three passes of the backward, in dispatch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackwardPass {
    /// D = rowsum(dO ∘ O) and the LSE in log2 units, per query row.
    Pre,
    /// dK and dV, one workgroup per key tile.
    DkDv,
    /// dQ, one workgroup per query tile.
    Dq,
}

/// One specialisation of the backward kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BackwardVariant {
    pub config: KernelConfig,
    pub path: Path,
    pub dense_mask: bool,
    pub permuted: bool,
    pub pass: BackwardPass,
    /// The walking passes' layout (from [`backward_layout`]); `None` for the pre-pass.
    pub layout: Option<BackwardLayout>,
}

/// Compiled pipelines of one device, shared by every plan on it.
#[derive(Clone, Default)]
pub(crate) struct PipelineCache {
    inner: Arc<Mutex<CacheInner>>,
}

#[derive(Default)]
struct CacheInner {
    modules: HashMap<Tier, wgpu::ShaderModule>,
    layout: Option<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    pipelines: HashMap<Variant, wgpu::ComputePipeline>,
    backward_modules: HashMap<(DType, bool), wgpu::ShaderModule>,
    backward: HashMap<BackwardVariant, (wgpu::ComputePipeline, wgpu::BindGroupLayout)>,
}

/// Whether tensor-core modules on `device` run with emulated cooperative matrices: a
/// tensor-core plan on a device without them comes from a Gpu that emulates them
/// (Gpu::with_tensor_core_emulation).
fn emulates_coop(device: &wgpu::Device) -> bool {
    !device
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
}

/// A shader module from blockflash's own WGSL, without wgpu's loop bounding and, where
/// `bounds_checks` is false, without the index clamping that wgpu adds to it.
fn trusted_module(
    device: &wgpu::Device,
    label: &str,
    source: String,
    bounds_checks: bool,
) -> wgpu::ShaderModule {
    // SAFETY: every loop of the kernels has a finite trip count (bounds come from override
    // constants and block-mask tables the host built), so wgpu's loop bounding only blocks the
    // driver from unrolling. Without bounds checks (the tensor-core module): its indices into
    // its own workgroup and register arrays follow from the override constants of a
    // configuration the host validated (the workgroup sizes are checked against the WGSL by a
    // test), and its reads of storage buffers stay within the extents the host checked
    // against the shape before every dispatch; on Vulkan the device's robust buffer access
    // still bounds them.
    unsafe {
        device.create_shader_module_trusted(
            wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            },
            wgpu::ShaderRuntimeChecks {
                bounds_checks,
                force_loop_bounding: false,
                ..wgpu::ShaderRuntimeChecks::checked()
            },
        )
    }
}

/// Builds a compute pipeline, turning a validation error into [`Error::Device`] naming `what`.
fn build_pipeline(
    device: &wgpu::Device,
    what: &dyn fmt::Debug,
    layout: Option<&wgpu::PipelineLayout>,
    module: &wgpu::ShaderModule,
    entry: &str,
    constants: &[(&str, f64)],
) -> Result<wgpu::ComputePipeline> {
    // The browser cannot block on an error scope: there a failed build reaches the device's
    // uncaptured-error handler, and the readback of the first run returns the error.
    #[cfg(not(target_arch = "wasm32"))]
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("blockflash attention"),
        layout,
        module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    });
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(Error::Device(format!(
            "kernel {what:?} failed to build: {e}"
        )));
    }
    #[cfg(target_arch = "wasm32")]
    let _ = what;
    Ok(pipeline)
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl PipelineCache {
    /// The pipeline of `variant` and its bind group layout, compiled on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        variant: Variant,
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroupLayout)> {
        let mut c = self
            .inner
            .lock()
            .map_err(|_| Error::Device("pipeline cache poisoned".into()))?;
        let module = c
            .modules
            .entry(variant.config.tier)
            .or_insert_with(|| {
                let features = device.features();
                let subgroups = features.contains(wgpu::Features::SUBGROUP);
                let tier = variant.config.tier;
                let mut source = module_source(tier, subgroups);
                if tier == Tier::TensorCore && emulates_coop(device) {
                    source = crate::coop_emulation::emulated(&source);
                }
                // Index clamping kept the tensor-core kernel's register arrays in local
                // memory (9x slower on the H100); the portable kernels ran as fast with it.
                trusted_module(
                    device,
                    "blockflash attention",
                    source,
                    tier != Tier::TensorCore,
                )
            })
            .clone();
        let (bgl, layout) = c
            .layout
            .get_or_insert_with(|| {
                let uniform = wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                };
                let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("blockflash attention"),
                    entries: &[
                        uniform,
                        storage(1, true),
                        storage(2, true),
                        storage(3, true),
                        storage(4, false),
                        storage(5, false),
                        storage(6, true),
                        storage(7, true),
                        storage(8, false),
                    ],
                });
                let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some("blockflash attention"),
                    bind_group_layouts: &[Some(&bgl)],
                    immediate_size: 0,
                });
                (bgl, layout)
            })
            .clone();
        if let Some(p) = c.pipelines.get(&variant) {
            return Ok((p.clone(), bgl));
        }
        let k = variant.config;
        let mut constants = vec![
            ("BR", k.tile_rows as f64),
            ("BC", k.tile_cols as f64),
            ("D", k.head_dim as f64),
            ("THREADS", k.threads() as f64),
            ("PATH", variant.path.code() as f64),
            ("DENSE_MASK", variant.dense_mask as u32 as f64),
            ("WRITE_LSE", variant.write_lse as u32 as f64),
            ("PERMUTED", variant.permuted as u32 as f64),
        ];
        if k.tier == Tier::TensorCore {
            constants.extend([
                ("PREFETCH", k.prefetch() as u32 as f64),
                ("DC", k.dc as f64),
                ("SPLIT", (k.tx / 2) as f64),
            ]);
        } else {
            constants.extend([
                ("DC", k.dc as f64),
                ("TX", k.tx as f64),
                ("SUBGROUP_RED", variant.subgroup_red as u32 as f64),
            ]);
        }
        let pipeline = build_pipeline(
            device,
            &variant,
            Some(&layout),
            &module,
            if variant.merge { "merge" } else { "main" },
            &constants,
        )?;
        c.pipelines.insert(variant, pipeline.clone());
        Ok((pipeline, bgl))
    }

    /// The pipeline of a backward pass and its bind group layout, compiled on first use. The
    /// layout is the pass's own (derived from the shader), holding only the bindings it uses,
    /// so that each pass stays within the adapter's storage buffers per stage.
    pub fn get_backward(
        &self,
        device: &wgpu::Device,
        variant: BackwardVariant,
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroupLayout)> {
        let mut c = self
            .inner
            .lock()
            .map_err(|_| Error::Device("pipeline cache poisoned".into()))?;
        if let Some(p) = c.backward.get(&variant) {
            return Ok(p.clone());
        }
        let dtype = variant.config.tier.dtype();
        let tensor_cores = variant.layout.is_some_and(|l| l.tensor_cores);
        let module = c
            .backward_modules
            .entry((dtype, tensor_cores))
            .or_insert_with(|| {
                let mut source = backward_module_source(dtype, tensor_cores);
                // As the forward module: built without index clamping.
                if tensor_cores && emulates_coop(device) {
                    source = crate::coop_emulation::emulated(&source);
                }
                trusted_module(device, "blockflash backward", source, !tensor_cores)
            })
            .clone();
        let mut constants = vec![
            ("PATH", variant.path.code() as f64),
            ("DENSE_MASK", variant.dense_mask as u32 as f64),
            ("PERMUTED", variant.permuted as u32 as f64),
        ];
        match variant.layout {
            Some(l) => constants.extend(l.constants()),
            None => constants.extend([
                ("D", variant.config.head_dim as f64),
                ("THREADS", BACKWARD_PRE_THREADS as f64),
            ]),
        }
        let entry = match variant.pass {
            BackwardPass::Pre => "pre",
            BackwardPass::DkDv => "dkdv",
            BackwardPass::Dq => "dq",
        };
        let pipeline = build_pipeline(device, &variant, None, &module, entry, &constants)?;
        let bgl = pipeline.get_bind_group_layout(0);
        let pair = (pipeline, bgl);
        c.backward.insert(variant, pair.clone());
        Ok(pair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encoding and decoding in parallel chunks give what element-by-element conversion gives,
    /// past the size from which they spread over threads, and pad to 4 bytes.
    #[test]
    fn encode_and_decode_match_each_element_rounded() {
        let n = (1 << 20) + 3;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 300.0).collect();
        for e in [DType::F32, DType::F16, DType::BF16] {
            let bytes = e.encode(&x);
            assert_eq!(bytes.len() as u64, e.bytes(n), "{e:?}");
            assert!(bytes[n * e.size()..].iter().all(|&b| b == 0), "{e:?}");
            let back = e.decode(&bytes, n);
            for (i, (&a, &b)) in x.iter().zip(&back).enumerate() {
                assert_eq!(e.round(a).to_bits(), b.to_bits(), "{e:?} element {i}");
            }
        }
    }

    #[test]
    fn a_shader_folder_replaces_only_the_sources_it_holds() {
        let dir = std::env::temp_dir().join(format!("blockflash-wgsl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("attention_coop.wgsl"), "// a variant\n").unwrap();
        let replaced = wgsl_from(&dir, "attention_coop.wgsl", ATTENTION_COOP_WGSL);
        let kept = wgsl_from(&dir, "common.wgsl", COMMON_WGSL);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(replaced, "// a variant\n");
        assert!(matches!(kept, Cow::Borrowed(s) if s == COMMON_WGSL));
    }
}
