//! The wasm-bindgen surface of the browser demo: open the browser's WebGPU, list the mask
//! families, and plan a [`Case`] that the page draws and runs.
//!
//! The page (`index.html`, `main.js`) calls, in order: [`families`], [`Demo::open`], then per
//! run [`Demo::plan`], [`Case::draw`] and [`Case::run`].

mod case;
mod picture;

use blockflash::{Gpu, Tier};
use js_sys::{Promise, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

pub use case::Case;

/// Sends panic messages to the console, where the browser test looks for errors (without a
/// hook a panic shows only as "unreachable").
#[wasm_bindgen(start)]
fn start() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&format!("blockflash demo panicked: {info}").into());
    }));
}

/// Names of the mask families ([`blockflash::suite::FAMILIES`]), in the suite's order.
#[wasm_bindgen]
pub fn families() -> Vec<String> {
    blockflash::suite::FAMILIES
        .iter()
        .map(|f| f.to_string())
        .collect()
}

/// The browser's description of the adapter it offers (`GPUAdapterInfo`: vendor, architecture,
/// device, description; wgpu's `AdapterInfo` keeps only the description, which Chromium leaves
/// empty), marked when it is a software fallback; `None` when the browser offers no adapter.
async fn browser_adapter() -> Option<String> {
    let get = |o: &JsValue, key: &str| Reflect::get(o, &key.into()).ok();
    let gpu = get(&get(&js_sys::global(), "navigator")?, "gpu")?;
    let request: js_sys::Function = get(&gpu, "requestAdapter")?.dyn_into().ok()?;
    let promise: Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
    let adapter = JsFuture::from(promise).await.ok()?;
    if adapter.is_null() || adapter.is_undefined() {
        return None;
    }
    let info = get(&adapter, "info").unwrap_or(JsValue::UNDEFINED);
    let mut words: Vec<String> = ["vendor", "architecture", "device", "description"]
        .iter()
        .filter_map(|k| get(&info, k).and_then(|v| v.as_string()))
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        words.push("unnamed adapter".into());
    }
    if get(&info, "isFallbackAdapter").and_then(|v| v.as_bool()) == Some(true) {
        words.push("(software fallback adapter)".into());
    }
    Some(words.join(" "))
}

/// The browser's WebGPU device, opened once per page.
#[wasm_bindgen]
pub struct Demo {
    gpu: Gpu,
    adapter: String,
}

#[wasm_bindgen]
impl Demo {
    /// Opens WebGPU with the adapter's own limits; rejects with a message that says why when
    /// the browser offers no WebGPU.
    pub async fn open() -> Result<Demo, JsError> {
        let adapter = browser_adapter().await.ok_or_else(|| {
            JsError::new(
                "WebGPU is unavailable: this browser has no navigator.gpu, or it offers no \
                 adapter (Chrome and Chromium on Linux need --enable-unsafe-webgpu)",
            )
        })?;
        let gpu = Gpu::new_async()
            .await
            .map_err(|e| JsError::new(&format!("WebGPU could not be opened: {e}")))?;
        Ok(Demo { gpu, adapter })
    }

    /// The adapter as the browser describes it.
    pub fn adapter(&self) -> String {
        self.adapter.clone()
    }

    /// Whether the device has `shader-f16`, which the f16 tier needs.
    pub fn has_f16(&self) -> bool {
        self.gpu.supports(Tier::PortableF16).is_ok()
    }

    /// How runs are timed: GPU timestamp queries where the adapter offers them, else the wall
    /// clock around a completed submission.
    pub fn clock(&self) -> String {
        if self
            .gpu
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            "GPU timestamp queries".into()
        } else {
            "wall clock around each completed submission".into()
        }
    }

    /// The adapter report of `blockflash info`: features, limits and kernel tiers.
    pub fn report(&self) -> String {
        self.gpu.report()
    }

    /// Builds the masked and the dense plan of mask family `family` at `seq` tokens, `heads`
    /// heads of dimension `head_dim` (batch 1), stored as f16 when `f16`, with inputs drawn
    /// from `seed`.
    pub fn plan(
        &self,
        family: &str,
        seq: usize,
        heads: usize,
        head_dim: usize,
        f16: bool,
        seed: u32,
    ) -> Result<Case, JsError> {
        Ok(Case::new(
            &self.gpu,
            &self.adapter,
            family,
            seq,
            heads,
            head_dim,
            f16,
            seed.into(),
        )?)
    }
}
