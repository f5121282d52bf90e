//! Timing plans on the GPU: timestamp queries around each run where the adapter has them, wall
//! clock around a completed submission otherwise. Medians after a warm-up. The forward pass is
//! timed alone ([`median_ms`]) or followed by the backward pass ([`median_fwd_bwd_ms`]).

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernel::DType;
use crate::plan::{BackwardTensors, Plan, Tensors};
use crate::reference::Gradients;

/// The wall clock: `std::time::Instant`, which panics on `wasm32-unknown-unknown`, where the
/// page's `performance.now()` stands in.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use std::time::Instant;
#[cfg(target_arch = "wasm32")]
pub(crate) use web_time::Instant;

/// GPU-resident inputs and outputs for a plan, uploaded once for repeated runs.
pub struct Resident {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    o: wgpu::Buffer,
    lse: wgpu::Buffer,
    /// dO, dQ, dK, dV, for the backward pass ([`Resident::with_gradient`]).
    grads: Option<[wgpu::Buffer; 4]>,
    dtype: DType,
    o_len: usize,
    kv_len: usize,
}

impl Resident {
    /// Uploads Q, K, V and allocates O and LSE for `plan`'s shape.
    pub fn new(gpu: &Gpu, plan: &Plan, q: &[f32], k: &[f32], v: &[f32]) -> Result<Resident> {
        let s = plan.shape();
        s.check_inputs(q.len(), k.len(), v.len())?;
        let e = plan.dtype();
        Ok(Resident {
            q: upload(gpu, e, q),
            k: upload(gpu, e, k),
            v: upload(gpu, e, v),
            o: output(gpu, e.bytes(s.q_len())),
            lse: output(gpu, 4 * s.lse_len() as u64),
            grads: None,
            dtype: e,
            o_len: s.q_len(),
            kv_len: s.kv_len(),
        })
    }

    /// Like [`Resident::new`], with the upstream gradient dO (shaped like Q) uploaded and dQ, dK
    /// and dV allocated, for [`median_fwd_bwd_ms`] and [`Resident::run_backward_and_read`].
    pub fn with_gradient(
        gpu: &Gpu,
        plan: &Plan,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d_o: &[f32],
    ) -> Result<Resident> {
        let mut r = Resident::new(gpu, plan, q, k, v)?;
        if d_o.len() != r.o_len {
            return Err(Error::ShapeMismatch {
                what: "d_o",
                expected: format!("{} elements (the shape of q)", r.o_len),
                got: format!("{} elements", d_o.len()),
            });
        }
        let e = r.dtype;
        r.grads = Some([
            upload(gpu, e, d_o),
            output(gpu, e.bytes(r.o_len)),
            output(gpu, e.bytes(r.kv_len)),
            output(gpu, e.bytes(r.kv_len)),
        ]);
        Ok(r)
    }

    /// Fills O, LSE and (when allocated) dQ, dK and dV with NaN, so that elements a later run
    /// leaves unwritten show up.
    pub fn poison(&self, gpu: &Gpu) {
        let nan = |buf: &wgpu::Buffer, e: DType, n: usize| {
            // One element's bytes repeated: no f32 copy of the buffer on the host.
            let mut bytes = e.encode(&[f32::NAN])[..e.size()].repeat(n);
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            gpu.queue().write_buffer(buf, 0, &bytes);
        };
        nan(&self.o, self.dtype, self.o_len);
        nan(&self.lse, DType::F32, (self.lse.size() / 4) as usize);
        if let Some([_, dq, dk, dv]) = &self.grads {
            nan(dq, self.dtype, self.o_len);
            nan(dk, self.dtype, self.kv_len);
            nan(dv, self.dtype, self.kv_len);
        }
    }

    /// Runs `plan` once on these buffers and reads O back (as f32).
    pub fn run_and_read(&self, gpu: &Gpu, plan: &Plan) -> Result<Vec<f32>> {
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        plan.encode(&mut enc, &self.tensors())?;
        let bytes = self.dtype.bytes(self.o_len);
        let out = crate::readback::read_bytes(gpu, enc, &[(&self.o, bytes)])?;
        Ok(self.dtype.decode(&out[0], self.o_len))
    }

    /// Runs `plan` forward then backward once on these buffers (built with
    /// [`Resident::with_gradient`]) and reads O, dQ, dK and dV back (as f32).
    pub fn run_backward_and_read(
        &self,
        gpu: &Gpu,
        plan: &Plan,
    ) -> Result<(Vec<f32>, Gradients<f32>)> {
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        let t = self.backward_tensors()?;
        plan.encode(&mut enc, &self.tensors())?;
        plan.encode_backward(&mut enc, &t)?;
        let e = self.dtype;
        let (q_bytes, kv_bytes) = (e.bytes(self.o_len), e.bytes(self.kv_len));
        let out = crate::readback::read_bytes(
            gpu,
            enc,
            &[
                (t.o, q_bytes),
                (t.dq, q_bytes),
                (t.dk, kv_bytes),
                (t.dv, kv_bytes),
            ],
        )?;
        let grads = Gradients {
            dq: e.decode(&out[1], self.o_len),
            dk: e.decode(&out[2], self.kv_len),
            dv: e.decode(&out[3], self.kv_len),
        };
        Ok((e.decode(&out[0], self.o_len), grads))
    }

    /// The buffers as a plan's tensors.
    pub fn tensors(&self) -> Tensors<'_> {
        Tensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            o: &self.o,
            lse: &self.lse,
        }
    }

    /// The buffers as the backward pass's tensors (an error unless built with
    /// [`Resident::with_gradient`]).
    fn backward_tensors(&self) -> Result<BackwardTensors<'_>> {
        let [d_o, dq, dk, dv] = self.grads.as_ref().ok_or_else(|| Error::InvalidArgument {
            what: "resident buffers",
            why: "the backward pass needs dO and gradient buffers: use Resident::with_gradient"
                .into(),
        })?;
        Ok(BackwardTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            o: &self.o,
            lse: &self.lse,
            d_o,
            dq,
            dk,
            dv,
        })
    }
}

/// A storage buffer holding `data` in storage type `e`.
fn upload(gpu: &Gpu, e: DType, data: &[f32]) -> wgpu::Buffer {
    gpu.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("blockflash input"),
            contents: &e.encode(data),
            usage: wgpu::BufferUsages::STORAGE,
        })
}

/// A storage buffer of `bytes` that runs write and the host reads back or poisons.
fn output(gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
    gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("blockflash output"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// How a time was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// GPU timestamps at the start of the first timed compute pass and the end of the last.
    Timestamps,
    /// Wall clock around a submission and its completion.
    WallClock,
}

/// Runs `plan` `warmup + repeats` times on resident buffers; returns the median milliseconds
/// of the last `repeats` runs and how they were measured (blocking; in the browser use
/// [`median_ms_async`]).
pub fn median_ms(
    gpu: &Gpu,
    plan: &Plan,
    buffers: &Resident,
    warmup: usize,
    repeats: usize,
) -> Result<(f64, Clock)> {
    pollster::block_on(median_ms_async(gpu, plan, buffers, warmup, repeats))
}

/// [`median_ms`] as a future, for the browser, where each run's completion is awaited from the
/// page's event loop. On native it blocks inside the first poll, like [`median_ms`].
pub async fn median_ms_async(
    gpu: &Gpu,
    plan: &Plan,
    buffers: &Resident,
    warmup: usize,
    repeats: usize,
) -> Result<(f64, Clock)> {
    let t = buffers.tensors();
    let m = median_runs(gpu, warmup, repeats, 1, |enc, query| {
        plan.encode_timed(enc, &t, query.map(|q| (q, 0)))
    })
    .await?;
    Ok((m.whole, m.clock))
}

/// Median times of a forward + backward step ([`median_fwd_bwd_ms`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FwdBwdMs {
    /// Forward then backward: from the start of the forward pass to the end of the backward
    /// pass (or the wall clock around the submission).
    pub fwd_bwd: f64,
    /// The forward pass of the same runs (timed apart with the wall clock).
    pub fwd: f64,
    /// How the times were measured.
    pub clock: Clock,
}

/// Runs `plan` forward then backward (one command buffer, as a training step does)
/// `warmup + repeats` times on resident buffers built with [`Resident::with_gradient`]; returns
/// the medians of the last `repeats` runs. With timestamps the forward time comes from the same
/// runs; with the wall clock the forward pass is timed in runs of its own.
pub fn median_fwd_bwd_ms(
    gpu: &Gpu,
    plan: &Plan,
    buffers: &Resident,
    warmup: usize,
    repeats: usize,
) -> Result<FwdBwdMs> {
    let (t, bt) = (buffers.tensors(), buffers.backward_tensors()?);
    let m = pollster::block_on(median_runs(gpu, warmup, repeats, 2, |enc, query| {
        plan.encode_timed(enc, &t, query.map(|q| (q, 0)))?;
        plan.encode_backward_timed(enc, &bt, query.map(|q| (q, 2)))
    }))?;
    let fwd = match m.first {
        Some(ms) => ms,
        None => median_ms(gpu, plan, buffers, warmup, repeats)?.0,
    };
    Ok(FwdBwdMs {
        fwd_bwd: m.whole,
        fwd,
        clock: m.clock,
    })
}

/// Medians of timed runs.
struct Medians {
    /// From the start of the first pass to the end of the last.
    whole: f64,
    /// The first pass alone (timestamps only).
    first: Option<f64>,
    clock: Clock,
}

/// Submits what `encode` records `warmup + repeats` times, waiting for each; returns the
/// medians of the last `repeats`. `encode` gets a query set of two timestamps per pass for its
/// `passes` compute passes (pass `i` writes `2i` at its start and `2i + 1` at its end) when the
/// adapter has timestamps.
async fn median_runs(
    gpu: &Gpu,
    warmup: usize,
    repeats: usize,
    passes: u32,
    mut encode: impl FnMut(&mut wgpu::CommandEncoder, Option<&wgpu::QuerySet>) -> Result<()>,
) -> Result<Medians> {
    let dev = gpu.device();
    let stamps = gpu.features().contains(wgpu::Features::TIMESTAMP_QUERY);
    let count = 2 * passes;
    let bytes = 8 * count as u64;
    let query = stamps.then(|| {
        dev.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("blockflash timing"),
            ty: wgpu::QueryType::Timestamp,
            count,
        })
    });
    let resolve = dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("blockflash timestamps"),
        size: bytes,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let read = dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("blockflash timestamps readback"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let period = gpu.queue().get_timestamp_period() as f64;
    let mut whole = Vec::with_capacity(repeats);
    let mut first = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats {
        let mut enc = dev.create_command_encoder(&Default::default());
        encode(&mut enc, query.as_ref())?;
        if let Some(q) = &query {
            enc.resolve_query_set(q, 0..count, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
        }
        let t0 = Instant::now();
        gpu.queue().submit([enc.finish()]);
        // Done: the timestamps are mapped, or (without them) the submission has completed.
        let (tx, done) = futures_intrusive::channel::shared::oneshot_channel();
        if query.is_some() {
            read.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                tx.send(r.map_err(|e| e.to_string())).ok();
            });
        } else {
            gpu.queue().on_submitted_work_done(move || {
                tx.send(Ok(())).ok();
            });
        }
        // A no-op in the browser, which polls the device itself.
        dev.poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for the GPU failed: {e}")))?;
        match done.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Device(format!("mapping timestamps failed: {e}"))),
            None => return Err(Error::Device("waiting for the GPU was cancelled".into())),
        }
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        gpu.check_lost()?;
        let (ms, ms_first) = if query.is_some() {
            let view = read
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Device(e.to_string()))?;
            let t: &[u64] = bytemuck::cast_slice(&view);
            let span = |a: usize, b: usize| t[b].wrapping_sub(t[a]) as f64 * period / 1e6;
            let spans = (span(0, t.len() - 1), span(0, 1));
            drop(view);
            read.unmap();
            spans
        } else {
            (wall, f64::NAN)
        };
        if i >= warmup {
            whole.push(ms);
            first.push(ms_first);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Medians {
        whole: median(whole),
        first: stamps.then(|| median(first)),
        clock: if stamps {
            Clock::Timestamps
        } else {
            Clock::WallClock
        },
    })
}
