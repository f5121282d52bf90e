//! Reading GPU buffers back to the host: copy to staging buffers, map, wait (blocking on native,
//! awaited in the browser, where the page's event loop completes the mapping).

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Submits `encoder` after copying the first bytes of each `(buffer, byte count)` (a multiple
/// of 4) into a staging buffer, waits, and returns them (blocking; see [`read_bytes_async`]).
pub(crate) fn read_bytes(
    gpu: &Gpu,
    encoder: wgpu::CommandEncoder,
    sources: &[(&wgpu::Buffer, u64)],
) -> Result<Vec<Vec<u8>>> {
    pollster::block_on(read_bytes_async(gpu, encoder, sources))
}

/// Like [`read_bytes`], as a future: on native the device is polled until the copies are done
/// before the first await, so the future is ready at once; on the web it resolves when the
/// browser has mapped the staging buffers.
pub(crate) async fn read_bytes_async(
    gpu: &Gpu,
    mut encoder: wgpu::CommandEncoder,
    sources: &[(&wgpu::Buffer, u64)],
) -> Result<Vec<Vec<u8>>> {
    let device = gpu.device();
    let staging: Vec<(wgpu::Buffer, usize)> = sources
        .iter()
        .map(|&(src, size)| {
            let dst = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("blockflash readback"),
                size: size.max(4),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            if size > 0 {
                encoder.copy_buffer_to_buffer(src, 0, &dst, 0, size);
            }
            (dst, size as usize)
        })
        .collect();
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    gpu.queue().submit([encoder.finish()]);
    let mut receivers = Vec::new();
    for (buf, _) in &staging {
        let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
        buf.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            tx.send(r).ok();
        });
        receivers.push(rx);
    }
    // A no-op in the browser, which polls the device itself.
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Device(format!("waiting for the GPU failed: {e}")))?;
    if let Some(e) = scope.pop().await {
        return Err(Error::Device(e.to_string()));
    }
    gpu.check_lost()?;
    let mut out = Vec::with_capacity(staging.len());
    for ((buf, len), rx) in staging.iter().zip(receivers) {
        match rx.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Device(format!("mapping a buffer failed: {e}"))),
            None => return Err(Error::Device("mapping a buffer was cancelled".into())),
        }
        let view = buf
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Device(format!("reading a mapped buffer failed: {e}")))?;
        out.push(view[..*len].to_vec());
        drop(view);
        buf.unmap();
    }
    Ok(out)
}
