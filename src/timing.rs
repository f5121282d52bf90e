//! Timing plans on the GPU: timestamp queries around each run where the adapter has them, wall
//! clock around a completed submission otherwise. Medians after a warm-up.

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernel::DType;
use crate::plan::{Plan, Tensors};

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
    dtype: DType,
    o_len: usize,
}

impl Resident {
    /// Uploads Q, K, V and allocates O and LSE for `plan`'s shape.
    pub fn new(gpu: &Gpu, plan: &Plan, q: &[f32], k: &[f32], v: &[f32]) -> Result<Resident> {
        let s = plan.shape();
        s.check_inputs(q.len(), k.len(), v.len())?;
        let dev = gpu.device();
        let e = plan.dtype();
        let up = |d: &[f32]| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("blockflash input"),
                contents: &e.encode(d),
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let out = |bytes: u64| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("blockflash output"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        Ok(Resident {
            q: up(q),
            k: up(k),
            v: up(v),
            o: out(e.bytes(s.q_len())),
            lse: out(4 * s.lse_len() as u64),
            dtype: e,
            o_len: s.q_len(),
        })
    }

    /// Fills O and LSE with NaN, so that elements a later run leaves unwritten show up.
    pub fn poison(&self, gpu: &Gpu) {
        let o = self.dtype.encode(&vec![f32::NAN; self.o_len]);
        gpu.queue().write_buffer(&self.o, 0, &o);
        let lse = vec![f32::NAN; (self.lse.size() / 4) as usize];
        gpu.queue()
            .write_buffer(&self.lse, 0, bytemuck::cast_slice(&lse));
    }

    /// Runs `plan` once on these buffers and reads O back (as f32).
    pub fn run_and_read(&self, gpu: &Gpu, plan: &Plan) -> Result<Vec<f32>> {
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        plan.encode(&mut enc, &self.tensors())?;
        let bytes = self.dtype.bytes(self.o_len);
        let out = crate::readback::read_bytes(gpu, enc, &[(&self.o, bytes)])?;
        Ok(self.dtype.decode(&out[0], self.o_len))
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
}

/// How a time was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// GPU timestamp queries around the compute pass.
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
    let dev = gpu.device();
    let stamps = gpu.features().contains(wgpu::Features::TIMESTAMP_QUERY);
    let query = stamps.then(|| {
        dev.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("blockflash timing"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        })
    });
    let resolve = dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("blockflash timestamps"),
        size: 16,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let read = dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("blockflash timestamps readback"),
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let period = gpu.queue().get_timestamp_period() as f64;
    let mut times = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats {
        let mut enc = dev.create_command_encoder(&Default::default());
        plan.encode_timed(&mut enc, &buffers.tensors(), query.as_ref().map(|q| (q, 0)))?;
        if let Some(q) = &query {
            enc.resolve_query_set(q, 0..2, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, 16);
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
        let ms = if query.is_some() {
            let view = read
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Device(e.to_string()))?;
            let t: &[u64] = bytemuck::cast_slice(&view);
            let ms = t[1].wrapping_sub(t[0]) as f64 * period / 1e6;
            drop(view);
            read.unmap();
            ms
        } else {
            wall
        };
        if i >= warmup {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    let clock = if stamps {
        Clock::Timestamps
    } else {
        Clock::WallClock
    };
    Ok((times[times.len() / 2], clock))
}
