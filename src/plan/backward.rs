//! The backward pass of a [`Plan`]: dQ, dK and dV from Q, K, V, the forward output O and
//! log-sum-exp, and the upstream gradient dO, with the forward pass's tile skipping.
//!
//! Three dispatches per chunk (see shaders/backward.wgsl, and shaders/backward_coop.wgsl for
//! the tensor-core tier's dK/dV and dQ passes where they fit): a pre-pass (D = rowsum(dO ∘ O)), a
//! dK/dV pass with one workgroup per key tile walking the query tiles of the transposed block
//! mask (its CSR form serves both the run-length and the sparse path: full query tiles first,
//! then partial ones with the forward pass's bit slots; the dense path walks every query tile),
//! and a dQ pass over the forward walk, never split (split-KV stays a forward-only choice).
//! The buffers it needs (transposed structure, parameters, row statistics) are built on the
//! first backward call and kept in the plan, with the layouts of the two walking passes
//! ([`backward_layout`]: tensor-core or portable kernels, thread grids, step sizes, head-dim
//! chunk), picked for the device's limits and the lengths of the plan's walks.

use wgpu::util::DeviceExt;

use super::{
    check_buffers, check_timestamps, guard_caller_objects, split_rows, walk_tables, Chunk, Plan,
    PlanOptions, Reorder,
};
use crate::error::{Error, Result};
use crate::kernel::{
    backward_layout, BackwardLayout, BackwardPass, BackwardVariant, DType, Path,
    BACKWARD_PRE_THREADS,
};
use crate::reference::Gradients;

/// GPU buffers of one backward call, owned by the caller (the GPU-resident form).
///
/// Q, O, dO and dQ `[B, H, Nq, d]`, K, V, dK and dV `[B, Hkv, Nk, d]` in the plan's storage type,
/// LSE `[B, H, Nq]` f32 as the forward pass wrote it. dQ, dK and dV are overwritten whole.
/// Buffers of the plan's device, with `STORAGE` usage; the gradients must not be bound twice.
#[derive(Clone, Copy, Debug)]
pub struct BackwardTensors<'a> {
    /// Queries (STORAGE).
    pub q: &'a wgpu::Buffer,
    /// Keys (STORAGE).
    pub k: &'a wgpu::Buffer,
    /// Values (STORAGE).
    pub v: &'a wgpu::Buffer,
    /// Forward output (STORAGE).
    pub o: &'a wgpu::Buffer,
    /// Forward log-sum-exp (STORAGE).
    pub lse: &'a wgpu::Buffer,
    /// Upstream gradient dL/dO (STORAGE).
    pub d_o: &'a wgpu::Buffer,
    /// Gradient of Q (STORAGE, written).
    pub dq: &'a wgpu::Buffer,
    /// Gradient of K (STORAGE, written; summed over the query heads of each group).
    pub dk: &'a wgpu::Buffer,
    /// Gradient of V (STORAGE, written; summed over the query heads of each group).
    pub dv: &'a wgpu::Buffer,
}

/// Storage buffers the dK/dV pass binds (Q, K, V, dO, index with the mask bits, row statistics,
/// dK, dV): the most of the three passes, and the WebGPU baseline.
const STORAGE_BUFFERS: u32 = 8;

/// How a plan runs its backward pass, built on its first call.
pub(super) enum BackwardState {
    /// Its own kernels and buffers.
    Own(Backward),
    /// Through a plan of the same mask at 64x32 tiles (see
    /// [`crate::KernelConfig::backward_takes_tiles`]).
    Via(Box<Plan>),
}

impl BackwardState {
    /// One line for [`Plan::describe`].
    pub(super) fn describe(&self) -> String {
        match self {
            BackwardState::Own(b) => b.describe(),
            BackwardState::Via(p) => {
                let kernels = match p.backward.get() {
                    Some(BackwardState::Own(b)) => b.describe(),
                    _ => "backward: not built\n".into(),
                };
                format!(
                    "{} (through a {} plan at {}x{} tiles{})\n",
                    kernels.trim_end(),
                    p.path,
                    p.config.tile_rows,
                    p.config.tile_cols,
                    if p.perm.is_empty() { "" } else { ", reordered" }
                )
            }
        }
    }
}

/// The backward state of a plan: one part per forward chunk, and the layouts of the dK/dV and
/// dQ passes.
pub(super) struct Backward {
    layouts: [BackwardLayout; 2],
    chunks: Vec<BackwardChunk>,
}

/// The backward buffers of one forward chunk.
struct BackwardChunk {
    params: wgpu::Buffer,
    /// dQ work items, the forward walk's tables, the permutation, the key-tile columns, the
    /// transposed entries and a copy of the plan's mask bits.
    index: wgpu::Buffer,
    /// Per query row (LSE in log2 units, D), written by the pre-pass.
    stats: wgpu::Buffer,
    dq_items: u32,
    columns: u32,
}

impl Backward {
    /// One line for [`Plan::describe`]: which kernels the two walking passes run.
    fn describe(&self) -> String {
        let pass = |l: &BackwardLayout| {
            if l.tensor_cores {
                format!(
                    "tensor cores ({} threads, steps of {} rows{})",
                    l.threads,
                    l.rows,
                    if l.prefetch() {
                        ", next step prefetched"
                    } else {
                        ""
                    }
                )
            } else {
                format!(
                    "portable ({} threads, steps of {} rows x {} keys, head-dim chunk {})",
                    l.threads, l.rows, l.keys, l.dc
                )
            }
        };
        format!(
            "backward: dK/dV {}; dQ {}\n",
            pass(&self.layouts[0]),
            pass(&self.layouts[1])
        )
    }
}

impl Plan {
    /// The backward state, built on first use.
    fn backward_state(&self) -> Result<&BackwardState> {
        if let Some(b) = self.backward.get() {
            return Ok(b);
        }
        let b = self.build_backward()?;
        // Another thread may have won the race; either value is the same.
        let _ = self.backward.set(b);
        Ok(self.backward.get().expect("just set"))
    }

    fn build_backward(&self) -> Result<BackwardState> {
        if !self.write_lse {
            return Err(Error::InvalidArgument {
                what: "plan",
                why: "the backward pass needs the forward log-sum-exp: build the plan with \
                      PlanOptions::write_lse"
                    .into(),
            });
        }
        let c = self.config;
        if !c.backward_takes_tiles() {
            // The mask back from the block mask, in the caller's token order; the 64x32 plan
            // reorders tokens when this one does.
            let mask = match &self.block_mask {
                Some(bm) if self.perm.is_empty() => Some(bm.to_mask()?),
                Some(bm) => Some(bm.to_mask()?.unpermuted(&self.perm)?),
                None => None,
            };
            let options = PlanOptions {
                scale: Some(self.scale),
                tile: Some((64, 32)),
                dtype: self.dtype(),
                tier: Some(c.tier),
                reorder: if self.perm.is_empty() {
                    Reorder::Off
                } else {
                    Reorder::On
                },
                subgroup_reductions: Some(false),
                // Its forward never runs: no split parts (their scratch) for it.
                max_tiles_per_workgroup: Some(usize::MAX),
                ..PlanOptions::default()
            };
            // Only its backward pass runs: its forward kernel is never compiled.
            let plan = Plan::build(&self.gpu, self.shape, mask.as_ref(), None, options, false)?;
            return Ok(BackwardState::Via(Box::new(plan)));
        }
        self.build_own().map(BackwardState::Own)
    }

    fn build_own(&self) -> Result<Backward> {
        let limits = self.gpu.limits();
        if limits.max_storage_buffers_per_shader_stage < STORAGE_BUFFERS {
            return Err(Error::TierUnavailable(format!(
                "the backward's dK/dV pass binds {STORAGE_BUFFERS} storage buffers, the device \
                 allows {} per shader stage",
                limits.max_storage_buffers_per_shader_stage
            )));
        }
        let c = self.config;
        let s = &self.shape;
        let (q_tiles, k_tiles) = (s.seq_q.div_ceil(c.tile_rows), s.seq_k.div_ceil(c.tile_cols));
        let sparse = matches!(self.path, Path::RunLength | Path::Sparse);
        let transposed = match &self.block_mask {
            Some(bm) if sparse => Some(bm.transposed()),
            _ => None,
        };
        let (rows_tab, cols_tab) = walk_tables(self.block_mask.as_ref(), self.path);
        let entries: Vec<u32> = transposed
            .as_ref()
            .map(|t| {
                t.rows()
                    .iter()
                    .zip(t.slots())
                    .flat_map(|(&qt, &slot)| [qt, slot])
                    .collect()
            })
            .unwrap_or_default();
        let device = self.gpu.device();
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let mut copies = device.create_command_encoder(&Default::default());
        let mut chunks = Vec::with_capacity(self.chunks.len());
        // Lengths in tiles of the dK/dV walks (over the query heads of a group) and dQ walks.
        let (mut dkdv_walks, mut dq_walks) = (Vec::new(), Vec::new());
        for chunk in &self.chunks {
            let batches = if self.per_batch { chunk.nb } else { 1 };
            let mut dq_rows = Vec::new();
            let mut columns: Vec<(usize, [u32; 8])> = Vec::new();
            for bl in 0..batches {
                let bm_b = if self.per_batch { chunk.b0 + bl } else { 0 };
                for qt in 0..q_tiles {
                    let work = match (&self.block_mask, sparse) {
                        (Some(bm), true) => bm.row_work(bm_b, qt),
                        _ => k_tiles,
                    };
                    dq_rows.push((work, [qt as u32, (bm_b * q_tiles + qt) as u32, bl as u32]));
                }
                for kt in 0..k_tiles {
                    let (first, end, full) = match &transposed {
                        Some(t) => {
                            let col = bm_b * k_tiles + kt;
                            let cp = t.col_ptr();
                            (cp[col], cp[col + 1], t.full_count()[col])
                        }
                        None => (0, q_tiles as u32, q_tiles as u32),
                    };
                    let entry = [first, end, full, kt as u32, bl as u32, 0, 0, 0];
                    columns.push(((end - first) as usize, entry));
                }
            }
            let max_dim = limits.max_compute_workgroups_per_dimension as usize;
            if columns.len() > max_dim {
                return Err(Error::TooLarge {
                    what: "key tiles of one backward dispatch",
                    bytes: columns.len() as u64,
                    limit_name: "max_compute_workgroups_per_dimension",
                    limit: max_dim as u64,
                });
            }
            // Heaviest key tiles first, as the forward pass orders its query tiles.
            columns.sort_by_key(|(w, _)| std::cmp::Reverse(*w));
            dkdv_walks.extend(columns.iter().map(|(w, _)| w * s.group()));
            dq_walks.extend(dq_rows.iter().map(|(w, _)| *w));
            let work = split_rows(&dq_rows, 1, Some(usize::MAX), 0, u64::MAX);
            let mut index: Vec<u32> = work.items.iter().flatten().copied().collect();
            let mut params = chunk.params_data;
            params.rows_off = index.len() as u32;
            index.extend_from_slice(&rows_tab);
            params.cols_off = index.len() as u32;
            index.extend_from_slice(&cols_tab);
            params.perm_off = index.len() as u32;
            index.extend_from_slice(&self.perm);
            params.t_cols_off = index.len() as u32;
            index.extend(columns.iter().flat_map(|(_, e)| *e));
            params.t_rows_off = index.len() as u32;
            index.extend_from_slice(&entries);
            params.merge_off = 0;
            params.scratch_lse_off = 0;
            params.bits_off = index.len() as u32;
            let index_bytes = 4 * index.len() as u64;
            let total = index_bytes + self.bits.size();
            if total > binding_limit {
                return Err(Error::TooLarge {
                    what: "backward index and mask bits",
                    bytes: total,
                    limit_name: "max_storage_buffer_binding_size",
                    limit: binding_limit,
                });
            }
            let index_buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("blockflash backward index"),
                size: total,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            // The mask bits are only on the GPU (the plan does not keep the dense mask): copy
            // them there, behind the index data.
            self.gpu
                .queue()
                .write_buffer(&index_buf, 0, bytemuck::cast_slice(&index));
            copies.copy_buffer_to_buffer(&self.bits, 0, &index_buf, index_bytes, self.bits.size());
            let lse_rows = chunk.nb * chunk.nhk * s.group() * s.seq_q;
            chunks.push(BackwardChunk {
                params: device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("blockflash backward params"),
                    contents: bytemuck::bytes_of(&params),
                    usage: wgpu::BufferUsages::UNIFORM,
                }),
                index: index_buf,
                stats: device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("blockflash backward row statistics"),
                    size: (8 * lse_rows as u64).max(16),
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                }),
                dq_items: work.items.len() as u32,
                columns: columns.len() as u32,
            });
        }
        self.gpu.queue().submit([copies.finish()]);
        let layout = |pass, walks: &[usize]| {
            backward_layout(&c, pass, &limits, walks).ok_or_else(|| {
                Error::TierUnavailable(format!(
                    "the backward kernels do not fit {}x{} tiles at head dim {} in this \
                     device's limits",
                    c.tile_rows, c.tile_cols, c.head_dim
                ))
            })
        };
        let layouts = [
            layout(BackwardPass::DkDv, &dkdv_walks)?,
            layout(BackwardPass::Dq, &dq_walks)?,
        ];
        let backward = Backward { layouts, chunks };
        // Compile now, so that a failure is reported here and the first run does not pay.
        for pass in [BackwardPass::Pre, BackwardPass::DkDv, BackwardPass::Dq] {
            self.gpu
                .pipelines()
                .get_backward(device, self.backward_variant(&backward, pass))?;
        }
        self.gpu.check_lost()?;
        Ok(backward)
    }

    fn backward_variant(&self, b: &Backward, pass: BackwardPass) -> BackwardVariant {
        // The pre-pass reads neither the walk nor the mask nor the permutation: one pipeline
        // serves every path.
        let walks = pass != BackwardPass::Pre;
        BackwardVariant {
            config: self.config,
            path: if walks { self.path } else { Path::Dense },
            dense_mask: walks && self.dense_mask,
            permuted: walks && !self.perm.is_empty(),
            pass,
            layout: match pass {
                BackwardPass::Pre => None,
                BackwardPass::DkDv => Some(b.layouts[0]),
                BackwardPass::Dq => Some(b.layouts[1]),
            },
        }
    }

    /// Encodes the backward pass into `encoder` over buffers the caller owns (GPU-resident
    /// form): dQ, dK and dV of `sum(O ∘ dO)`, in the original token order also when the plan
    /// reorders tokens.
    ///
    /// Needs a plan that writes the log-sum-exp ([`Error::InvalidArgument`] otherwise), and,
    /// like [`Plan::encode`], a problem within one storage binding and buffers of the plan's
    /// device. The first call builds the backward buffers (the transposed block mask) and
    /// compiles the kernels.
    pub fn encode_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        t: &BackwardTensors,
    ) -> Result<()> {
        self.encode_backward_timed(encoder, t, None)
    }

    /// Like [`Plan::encode_backward`], writing GPU timestamps at the start and end of the pass
    /// (its three dispatches) into `timestamps` (query set, first index) when given, as
    /// [`Plan::encode_timed`] does for the forward pass.
    pub fn encode_backward_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        t: &BackwardTensors,
        timestamps: Option<(&wgpu::QuerySet, u32)>,
    ) -> Result<()> {
        let state = match self.backward_state()? {
            BackwardState::Own(b) => b,
            BackwardState::Via(p) => return p.encode_backward_timed(encoder, t, timestamps),
        };
        self.check_single_chunk()?;
        let s = &self.shape;
        let e = self.dtype();
        let (q_bytes, kv_bytes) = (e.bytes(s.q_len()), e.bytes(s.kv_len()));
        check_buffers(
            &self.gpu,
            &[
                ("q buffer", t.q, q_bytes, false),
                ("k buffer", t.k, kv_bytes, false),
                ("v buffer", t.v, kv_bytes, false),
                ("o buffer", t.o, q_bytes, false),
                ("lse buffer", t.lse, 4 * s.lse_len() as u64, false),
                ("d_o buffer", t.d_o, q_bytes, false),
                ("dq buffer", t.dq, q_bytes, true),
                ("dk buffer", t.dk, kv_bytes, true),
                ("dv buffer", t.dv, kv_bytes, true),
            ],
        )?;
        check_timestamps(timestamps)?;
        guard_caller_objects(&self.gpu, || {
            self.encode_backward_chunk(encoder, state, 0, t, timestamps)
        })
    }

    fn encode_backward_chunk(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        state: &Backward,
        i: usize,
        t: &BackwardTensors,
        timestamps: Option<(&wgpu::QuerySet, u32)>,
    ) -> Result<()> {
        let (chunk, bc): (&Chunk, &BackwardChunk) = (&self.chunks[i], &state.chunks[i]);
        let device = self.gpu.device();
        let heads = (chunk.nhk * self.shape.group()) as u32;
        let buffer = |binding: u32| -> &wgpu::Buffer {
            match binding {
                0 => &bc.params,
                1 => t.q,
                2 => t.k,
                3 => t.v,
                4 => t.o,
                5 => t.lse,
                6 => &bc.index,
                8 => &bc.stats,
                9 => t.d_o,
                10 => t.dq,
                11 => t.dk,
                _ => t.dv,
            }
        };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("blockflash backward"),
            timestamp_writes: timestamps.map(|(qs, i)| wgpu::ComputePassTimestampWrites {
                query_set: qs,
                beginning_of_pass_write_index: Some(i),
                end_of_pass_write_index: Some(i + 1),
            }),
        });
        // Each pass has its own layout with only the bindings its entry point uses.
        let passes: [(BackwardPass, &[u32], [u32; 3]); 3] = [
            (
                BackwardPass::Pre,
                &[0, 4, 5, 8, 9],
                [
                    self.shape.seq_q.div_ceil(BACKWARD_PRE_THREADS) as u32,
                    heads,
                    chunk.nb as u32,
                ],
            ),
            (
                BackwardPass::DkDv,
                &[0, 1, 2, 3, 6, 8, 9, 11, 12],
                [bc.columns, chunk.nhk as u32, chunk.z],
            ),
            (
                BackwardPass::Dq,
                &[0, 1, 2, 3, 6, 8, 9, 10],
                [bc.dq_items, heads, chunk.z],
            ),
        ];
        for (which, bindings, [x, y, z]) in passes {
            let (pipeline, bgl) = self
                .gpu
                .pipelines()
                .get_backward(device, self.backward_variant(state, which))?;
            let entries: Vec<wgpu::BindGroupEntry> = bindings
                .iter()
                .map(|&binding| wgpu::BindGroupEntry {
                    binding,
                    resource: buffer(binding).as_entire_binding(),
                })
                .collect();
            let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("blockflash backward"),
                layout: &bgl,
                entries: &entries,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    }

    /// The backward pass on host tensors (blocking; in the browser use
    /// [`Plan::backward_async`]): the gradients of `sum(O ∘ dO)` with respect to Q, K and V.
    ///
    /// Q, O and dO `[B, H, Nq, d]`, K and V `[B, Hkv, Nk, d]` row-major f32, LSE `[B, H, Nq]`,
    /// with O and LSE as [`Plan::run`] returned them. Returns dQ like Q, dK and dV like K (summed
    /// over the query heads of each group). A plan with f16 storage rounds the inputs to f16 and
    /// returns the f16 gradients widened to f32. Problems too large for one storage binding are
    /// split as in [`Plan::run`].
    pub fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        d_o: &[f32],
    ) -> Result<Gradients<f32>> {
        pollster::block_on(self.backward_async(q, k, v, o, lse, d_o))
    }

    /// [`Plan::backward`] as a future, for the browser, where waiting for the GPU must yield to
    /// the page's event loop. On native it blocks inside the first poll, like
    /// [`Plan::backward`].
    pub async fn backward_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        d_o: &[f32],
    ) -> Result<Gradients<f32>> {
        let s = self.shape;
        s.check_inputs(q.len(), k.len(), v.len())?;
        let q_dims = format!("[{}, {}, {}, {}]", s.batch, s.heads, s.seq_q, s.head_dim);
        for (what, got, want, dims) in [
            ("o", o.len(), s.q_len(), q_dims.clone()),
            ("d_o", d_o.len(), s.q_len(), q_dims),
            (
                "lse",
                lse.len(),
                s.lse_len(),
                format!("[{}, {}, {}]", s.batch, s.heads, s.seq_q),
            ),
        ] {
            if got != want {
                return Err(Error::ShapeMismatch {
                    what,
                    expected: format!("{want} elements {dims}"),
                    got: format!("{got} elements"),
                });
            }
        }
        let state = match self.backward_state()? {
            BackwardState::Own(b) => b,
            BackwardState::Via(p) => {
                return Box::pin(p.backward_async(q, k, v, o, lse, d_o)).await;
            }
        };
        let d = s.head_dim;
        let g = s.group();
        let mut grads = Gradients {
            dq: vec![0f32; s.q_len()],
            dk: vec![0f32; s.kv_len()],
            dv: vec![0f32; s.kv_len()],
        };
        for (i, chunk) in self.chunks.iter().enumerate() {
            // A chunk's slice of each tensor: per batch element, `len` elements from `off`.
            let q_part = (
                s.heads * s.seq_q * d,
                chunk.hk0 * g * s.seq_q * d,
                chunk.nhk * g * s.seq_q * d,
            );
            let kv_part = (
                s.kv_heads * s.seq_k * d,
                chunk.hk0 * s.seq_k * d,
                chunk.nhk * s.seq_k * d,
            );
            let lse_part = (
                s.heads * s.seq_q,
                chunk.hk0 * g * s.seq_q,
                chunk.nhk * g * s.seq_q,
            );
            let gather = |src: &[f32], (per_b, off, len): (usize, usize, usize)| -> Vec<f32> {
                (chunk.b0..chunk.b0 + chunk.nb)
                    .flat_map(|b| src[b * per_b + off..][..len].iter().copied())
                    .collect()
            };
            let parts = self
                .backward_chunk(
                    state,
                    i,
                    [
                        &gather(q, q_part),
                        &gather(k, kv_part),
                        &gather(v, kv_part),
                        &gather(o, q_part),
                        &gather(d_o, q_part),
                    ],
                    &gather(lse, lse_part),
                )
                .await?;
            for (dst, part, (per_b, off, len)) in [
                (&mut grads.dq, &parts[0], q_part),
                (&mut grads.dk, &parts[1], kv_part),
                (&mut grads.dv, &parts[2], kv_part),
            ] {
                for bl in 0..chunk.nb {
                    dst[(chunk.b0 + bl) * per_b + off..][..len]
                        .copy_from_slice(&part[bl * len..][..len]);
                }
            }
        }
        Ok(grads)
    }

    /// Runs chunk `i` of the backward on host slices `[q, k, v, o, d_o]` and `lse`; returns
    /// `[dq, dk, dv]`.
    async fn backward_chunk(
        &self,
        state: &Backward,
        i: usize,
        inputs: [&[f32]; 5],
        lse: &[f32],
    ) -> Result<[Vec<f32>; 3]> {
        let device = self.gpu.device();
        let e = self.dtype();
        let upload = |bytes: &[u8]| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("blockflash backward input"),
                contents: bytes,
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let [q, k, v, o, d_o] = inputs.map(|x| upload(&e.encode(x)));
        let lse = upload(&DType::F32.encode(lse));
        let (q_len, kv_len) = (inputs[0].len(), inputs[1].len());
        let out = |n: usize| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("blockflash gradient"),
                size: e.bytes(n).max(16),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        let (dq, dk, dv) = (out(q_len), out(kv_len), out(kv_len));
        let mut encoder = device.create_command_encoder(&Default::default());
        let t = BackwardTensors {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            lse: &lse,
            d_o: &d_o,
            dq: &dq,
            dk: &dk,
            dv: &dv,
        };
        self.encode_backward_chunk(&mut encoder, state, i, &t, None)?;
        let bytes = crate::readback::read_bytes_async(
            &self.gpu,
            encoder,
            &[
                (&dq, e.bytes(q_len)),
                (&dk, e.bytes(kv_len)),
                (&dv, e.bytes(kv_len)),
            ],
        )
        .await?;
        Ok([
            e.decode(&bytes[0], q_len),
            e.decode(&bytes[1], kv_len),
            e.decode(&bytes[2], kv_len),
        ])
    }
}
