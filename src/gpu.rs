//! The GPU context: adapter choice, device with the adapter's own limits and the features the
//! kernels can use, and a report of what was found.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::kernel::{DType, PipelineCache};

/// A kernel tier: how Q, K, V are stored and which hardware paths the kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// f32 storage and arithmetic, no optional features; runs on every adapter.
    PortableF32,
    /// f16 storage, f32 arithmetic (`SHADER_F16`).
    PortableF16,
    /// bf16 storage (pairs in `u32` words, widened in the shader), f32 arithmetic; no features.
    PortableBf16,
    /// f16 storage, Q·Kᵀ and P·V on tensor cores through cooperative matrices
    /// (16×16×16, f16 operands, f32 accumulators), softmax in f32.
    TensorCore,
}

impl Tier {
    /// Storage type of Q, K, V and O in this tier.
    pub fn dtype(self) -> DType {
        match self {
            Tier::PortableF32 => DType::F32,
            Tier::PortableF16 | Tier::TensorCore => DType::F16,
            Tier::PortableBf16 => DType::BF16,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::PortableF32 => "portable-f32",
            Tier::PortableF16 => "portable-f16",
            Tier::PortableBf16 => "portable-bf16",
            Tier::TensorCore => "tensor-core-f16",
        })
    }
}

impl std::str::FromStr for Tier {
    type Err = Error;
    fn from_str(s: &str) -> Result<Tier> {
        match s {
            "portable-f32" | "f32" => Ok(Tier::PortableF32),
            "portable-f16" => Ok(Tier::PortableF16),
            "portable-bf16" => Ok(Tier::PortableBf16),
            "tensor-core-f16" | "tensor-core" => Ok(Tier::TensorCore),
            _ => Err(Error::InvalidArgument {
                what: "tier",
                why: format!(
                    "{s:?} is not one of portable-f32, portable-f16, portable-bf16, \
                     tensor-core-f16"
                ),
            }),
        }
    }
}

/// Features blockflash asks for when the adapter offers them.
fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
}

/// A device and queue that blockflash runs on, with what is known about the adapter.
///
/// Create one with [`Gpu::new`] (picks an adapter, honours `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`
/// and `WGPU_POWER_PREF`) or wrap a device the caller already has with [`Gpu::from_device`].
#[derive(Clone)]
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    coop_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    /// The tensor-core tier runs with emulated cooperative matrices (the device has none).
    emulated_coop: bool,
    /// Why the device was lost (stays).
    lost: Arc<Mutex<Option<String>>>,
    /// The first GPU error nobody captured since the last check (reported once).
    error: Arc<Mutex<Option<String>>>,
    pipelines: PipelineCache,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

/// The most invocations per workgroup of a device whose cooperative matrices are emulated.
const EMULATED_INVOCATIONS: usize = 128;

impl Gpu {
    /// Picks an adapter and creates a device on it (blocking; see [`Gpu::new_async`]).
    pub fn new() -> Result<Gpu> {
        pollster::block_on(Self::new_async())
    }

    /// Picks an adapter and creates a device on it.
    ///
    /// `WGPU_BACKEND` restricts the backends, `WGPU_ADAPTER_NAME` picks the first adapter whose
    /// name contains the given text (case-insensitive), `WGPU_POWER_PREF` sets the preference.
    /// The device gets the adapter's own limits (e.g. 48 KiB of workgroup memory on NVIDIA) and
    /// whichever of `SHADER_F16`, `SUBGROUP`, `TIMESTAMP_QUERY` and cooperative matrices the
    /// adapter offers.
    pub async fn new_async() -> Result<Gpu> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pick_adapter(&instance).await?;
        let offered = adapter.features();
        let features = offered & wanted_features();
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: cooperative matrices are only used by kernels whose configuration the
            // adapter reported in `cooperative_matrix_properties()`.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("blockflash"),
                required_features: features,
                required_limits: adapter.limits(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let coop_matrix = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            adapter.cooperative_matrix_properties()
        } else {
            Vec::new()
        };
        Ok(Self::wrap(device, queue, adapter.get_info(), coop_matrix))
    }

    /// Wraps a device and queue that the caller already has.
    ///
    /// `info` describes the adapter (from `adapter.get_info()`); `coop_matrix` lists the
    /// cooperative-matrix configurations the adapter reports (empty if none or unknown).
    /// Kernels use only features and limits that `device` was created with; `info` must be the
    /// adapter's own, since its subgroup sizes decide which row reductions run (a size larger
    /// than the device's gives wrong results) and whether the tensor-core tier runs (subgroups
    /// of exactly 32 invocations). blockflash installs the device's lost callback
    /// and uncaptured-error handler, and reports what they catch from its next call.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        coop_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Gpu {
        Self::wrap(device, queue, info, coop_matrix)
    }

    fn wrap(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        coop_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    ) -> Gpu {
        let lost = Arc::new(Mutex::new(None));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = flag.lock() {
                *l = Some(format!("device lost ({reason:?}): {message}"));
            }
        });
        // wgpu panics on errors nobody captured; record the first so that the next check
        // returns it.
        let error = Arc::new(Mutex::new(None));
        let flag = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut l) = flag.lock() {
                l.get_or_insert_with(|| e.to_string());
            }
        }));
        Gpu {
            device,
            queue,
            info,
            coop_matrix,
            emulated_coop: false,
            lost,
            error,
            pipelines: PipelineCache::default(),
        }
    }

    /// This device with the tensor-core tier's cooperative-matrix operations emulated in plain
    /// WGSL where the device has none (on a device with them, it changes nothing).
    ///
    /// For testing: the tensor-core kernels' tiling, masking and softmax (forward and backward)
    /// then run, and can be checked against the reference, on any device with `SHADER_F16`
    /// (lavapipe included), far slower than either real tier. The emulation's products go
    /// through workgroup memory, so [`Gpu::limits`] reports 8 KiB less of it and at most 128
    /// invocations per workgroup, for every tier (no 128-row tensor-core tiles).
    pub fn with_tensor_core_emulation(mut self) -> Gpu {
        self.emulated_coop = !self
            .features()
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        self
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// What the adapter said about itself.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The limits the device was created with.
    pub fn limits(&self) -> wgpu::Limits {
        let mut limits = self.device.limits();
        if self.emulated_coop {
            // Room for the emulation's scratch in workgroups of up to 128 invocations, which are
            // all the emulated device offers (128-row tensor-core tiles are left out).
            limits.max_compute_workgroup_storage_size -=
                (EMULATED_INVOCATIONS * crate::coop_emulation::SCRATCH_BYTES_PER_INVOCATION) as u32;
            limits.max_compute_invocations_per_workgroup = limits
                .max_compute_invocations_per_workgroup
                .min(EMULATED_INVOCATIONS as u32);
        }
        limits
    }

    /// The features the device was created with.
    pub fn features(&self) -> wgpu::Features {
        self.device.features()
    }

    /// Cooperative-matrix configurations the adapter reports (empty when unsupported).
    pub fn coop_matrix_configs(&self) -> &[wgpu::CooperativeMatrixProperties] {
        &self.coop_matrix
    }

    /// The adapter's smallest subgroup size when the device has `SUBGROUP` (the portable
    /// kernel's row reductions can then use subgroup shuffles), else `None`.
    pub fn min_subgroup_size(&self) -> Option<u32> {
        self.features()
            .contains(wgpu::Features::SUBGROUP)
            .then_some(self.info.subgroup_min_size)
    }

    /// Whether the device runs in software on the CPU (lavapipe, SwiftShader, WARP).
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Whether this device can run `tier`, and if not, why.
    pub fn supports(&self, tier: Tier) -> Result<()> {
        let f = self.features();
        match tier {
            Tier::PortableF32 | Tier::PortableBf16 => Ok(()),
            Tier::PortableF16 if f.contains(wgpu::Features::SHADER_F16) => Ok(()),
            Tier::PortableF16 => Err(Error::TierUnavailable(
                "portable-f16 needs SHADER_F16, which this device lacks".into(),
            )),
            Tier::TensorCore => {
                let configured = self.emulated_coop
                    || self.coop_matrix.iter().any(|c| {
                        (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                            && c.ab_type == wgpu::CooperativeScalarType::F16
                            && c.cr_type == wgpu::CooperativeScalarType::F32
                    });
                // The kernels give each 16x16 fragment to a subgroup of invocations 32 w ..
                // 32 w + 31; subgroups of any other size would mix rows of different fragments.
                let (min, max) = (self.info.subgroup_min_size, self.info.subgroup_max_size);
                if !f.contains(wgpu::Features::SHADER_F16) {
                    Err(Error::TierUnavailable(
                        "tensor-core-f16 needs SHADER_F16, which this device lacks".into(),
                    ))
                } else if !configured {
                    Err(Error::TierUnavailable(
                        "tensor-core-f16 needs cooperative matrices 16x16x16 with f16 operands \
                         and f32 accumulators, which this adapter does not report"
                            .into(),
                    ))
                } else if !self.emulated_coop && (min, max) != (32, 32) {
                    Err(Error::TierUnavailable(format!(
                        "tensor-core-f16 needs subgroups of exactly 32 invocations; this \
                         adapter's are {min}..{max}"
                    )))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The tier that runs inputs stored as `dtype` when the caller does not choose: tensor
    /// cores for f16 where the device offers them (3.1x the portable f16 kernel at d = 64 on
    /// the H100, see BENCHMARKS.md), else portable f16 (`SHADER_F16`); portable bf16 for bf16
    /// (every device), portable f32 for f32. A plan whose head dim the tensor-core kernel does not hold (over
    /// 128) runs portable f16 instead ([`Gpu::tier_for_head_dim`]).
    pub fn tier_for(&self, dtype: DType) -> Result<Tier> {
        match dtype {
            DType::F32 => Ok(Tier::PortableF32),
            DType::BF16 => Ok(Tier::PortableBf16),
            DType::F16 => self
                .supports(Tier::TensorCore)
                .map(|_| Tier::TensorCore)
                .or_else(|_| self.supports(Tier::PortableF16).map(|_| Tier::PortableF16)),
        }
    }

    /// [`Gpu::tier_for`] at head dim `head_dim`: the tier a plan runs when the caller does not
    /// choose. Where that is the tensor-core tier and its kernel does not hold `head_dim`
    /// (over 128), portable f16.
    pub fn tier_for_head_dim(&self, dtype: DType, head_dim: usize) -> Result<Tier> {
        let tier = self.tier_for(dtype)?;
        let held =
            !crate::kernel::KernelConfig::candidates(&self.limits(), tier, head_dim).is_empty();
        if tier == Tier::TensorCore && !held && self.supports(Tier::PortableF16).is_ok() {
            return Ok(Tier::PortableF16);
        }
        Ok(tier)
    }

    /// The tier that runs by default for f16 inputs where the device has one, else f32.
    pub fn best_tier(&self) -> Tier {
        self.tier_for(DType::F16).unwrap_or(Tier::PortableF32)
    }

    /// The compiled kernels of this device.
    pub(crate) fn pipelines(&self) -> &PipelineCache {
        &self.pipelines
    }

    /// Error if the device has been lost (every call from then on), or once for a GPU error
    /// that nobody captured since the last check.
    pub(crate) fn check_lost(&self) -> Result<()> {
        let lost = self.lost.lock().ok().and_then(|l| l.clone());
        let error = || self.error.lock().ok().and_then(|mut e| e.take());
        match lost.or_else(error) {
            Some(why) => Err(Error::Device(why)),
            None => Ok(()),
        }
    }

    /// A human-readable report: adapter, backend, features, limits, coop-matrix configurations,
    /// and the tier that would run.
    pub fn report(&self) -> String {
        let i = &self.info;
        let l = self.limits();
        let f = self.features();
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        let mut s = String::new();
        s += &format!("adapter:        {}\n", i.name);
        s += &format!("backend:        {:?}\n", i.backend);
        s += &format!("device type:    {:?}\n", i.device_type);
        s += &format!("driver:         {} {}\n", i.driver, i.driver_info);
        s += &format!("vendor/device:  {:#06x}/{:#06x}\n", i.vendor, i.device);
        s += "features:\n";
        s += &format!(
            "  shader-f16:          {}\n",
            has(wgpu::Features::SHADER_F16)
        );
        s += &format!("  subgroup:            {}\n", has(wgpu::Features::SUBGROUP));
        s += &format!(
            "  timestamp-query:     {}\n",
            has(wgpu::Features::TIMESTAMP_QUERY)
        );
        s += &format!(
            "  cooperative-matrix:  {}\n",
            has(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        );
        s += "limits:\n";
        s += &format!(
            "  workgroup memory:          {} bytes\n",
            l.max_compute_workgroup_storage_size
        );
        s += &format!(
            "  invocations / workgroup:   {}\n",
            l.max_compute_invocations_per_workgroup
        );
        s += &format!(
            "  storage binding:           {} bytes\n",
            l.max_storage_buffer_binding_size
        );
        s += &format!("  buffer size:               {} bytes\n", l.max_buffer_size);
        s += &format!(
            "  workgroups per dimension:  {}\n",
            l.max_compute_workgroups_per_dimension
        );
        s += &format!(
            "  subgroup size:             {}..{}\n",
            i.subgroup_min_size, i.subgroup_max_size
        );
        if self.coop_matrix.is_empty() {
            s += "cooperative-matrix configurations: none\n";
        } else {
            s += "cooperative-matrix configurations (MxNxK, A/B -> C):\n";
            for c in &self.coop_matrix {
                s += &format!(
                    "  {}x{}x{} {:?} -> {:?}\n",
                    c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type
                );
            }
        }
        s += &format!(
            "kernel tier:    {} for f16 inputs, {} for bf16 inputs, {} for f32 inputs\n",
            self.tier_for(DType::F16)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| "none".into()),
            Tier::PortableBf16,
            Tier::PortableF32
        );
        if let Err(Error::TierUnavailable(why)) = self.supports(Tier::TensorCore) {
            s += &format!("tensor cores:   unavailable: {why}\n");
        }
        s += &format!(
            "row reductions: {}\n",
            match self.min_subgroup_size() {
                Some(n) => format!(
                    "subgroup shuffles in portable tiles of up to {n} threads per row, \
                     workgroup memory in wider ones"
                ),
                None => "workgroup memory (no subgroups)".into(),
            }
        );
        s
    }
}

async fn pick_adapter(instance: &wgpu::Instance) -> Result<wgpu::Adapter> {
    if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME") {
        let want = name.to_lowercase();
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&want))
            .ok_or_else(|| {
                Error::NoAdapter(format!(
                    "WGPU_ADAPTER_NAME={name} matches none of the adapters {names:?}"
                ))
            });
    }
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::from_env().unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::NoAdapter(e.to_string()))
}
