//! One case of the demo: a mask family at a shape, planned masked and dense, run and checked
//! against the f64 reference on sampled rows, then timed on resident buffers; its outcome as
//! the JSON object the page shows and the browser test reads.

use blockflash::kernel::DType;
use blockflash::mask::SplitMix64;
use blockflash::reference::sampled_error;
use blockflash::suite::family_mask;
use blockflash::timing::{median_ms_async, Clock, Resident};
use blockflash::{BlockMask, Gpu, Mask, Path, Plan, PlanOptions, Shape};
use serde_json::json;
use wasm_bindgen::prelude::*;
use web_sys::HtmlCanvasElement;

use crate::picture;

/// Untimed runs before the timed ones.
const WARMUP: usize = 2;
/// Timed runs of each plan; the median is reported.
const REPEATS: usize = 5;
/// Output rows of each plan checked against the f64 reference.
const SAMPLES: usize = 64;

/// Largest relative error that passes, as in `blockflash bench`.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 5e-3,
        DType::BF16 => 1e-2,
    }
}

/// A planned case: the mask, the masked plan (the path the cost model chose) and the dense plan
/// (every tile, no mask: what FlashAttention computes).
#[wasm_bindgen]
pub struct Case {
    gpu: Gpu,
    adapter: String,
    family: String,
    seed: u64,
    shape: Shape,
    mask: Mask,
    masked: Plan,
    dense: Plan,
    /// Whether the masked plan reordered the tokens (Reverse Cuthill–McKee), so that its block
    /// mask is not that of the mask as drawn.
    reordered: bool,
}

impl Case {
    /// Builds the mask and both plans (see [`crate::Demo::plan`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        gpu: &Gpu,
        adapter: &str,
        family: &str,
        seq: usize,
        heads: usize,
        head_dim: usize,
        f16: bool,
        seed: u64,
    ) -> blockflash::Result<Case> {
        let shape = Shape::new(1, heads, seq, head_dim);
        let mask = family_mask(family, seq, seed)?;
        let options = PlanOptions {
            dtype: if f16 { DType::F16 } else { DType::F32 },
            ..PlanOptions::default()
        };
        let masked = Plan::new(gpu, shape, Some(&mask), options.clone())?;
        let dense = Plan::new(
            gpu,
            shape,
            None,
            PlanOptions {
                path: Some(Path::Dense),
                ..options
            },
        )?;
        let bm = masked
            .block_mask()
            .expect("a plan with a mask has a block mask");
        let reordered =
            BlockMask::new(&mask, bm.tile_rows(), bm.tile_cols())?.states() != bm.states();
        Ok(Case {
            gpu: gpu.clone(),
            adapter: adapter.to_string(),
            family: family.to_string(),
            seed,
            shape,
            mask,
            masked,
            dense,
            reordered,
        })
    }

    fn block_mask(&self) -> &BlockMask {
        self.masked
            .block_mask()
            .expect("a plan with a mask has a block mask")
    }

    /// Random Q, K, V in [-1, 1), rounded to the storage type so that the reference sees what
    /// the GPU sees.
    fn inputs(&self) -> [Vec<f32>; 3] {
        let mut rng = SplitMix64::new(self.seed);
        let e = self.masked.dtype();
        let s = self.shape;
        [s.q_len(), s.kv_len(), s.kv_len()].map(|n| {
            let x: Vec<f32> = (0..n)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect();
            e.decode(&e.encode(&x), n)
        })
    }
}

#[wasm_bindgen]
impl Case {
    /// Draws the mask and the block mask the masked plan runs on.
    pub fn draw(
        &self,
        mask_canvas: &HtmlCanvasElement,
        block_canvas: &HtmlCanvasElement,
    ) -> Result<(), JsError> {
        picture::draw_mask(mask_canvas, &self.mask)?;
        picture::draw_block_mask(block_canvas, self.block_mask())
    }

    /// Runs both plans, checks their outputs against the f64 reference on sampled rows, times
    /// them, and resolves to the case's JSON object.
    pub async fn run(self) -> Result<String, JsError> {
        let gpu = &self.gpu;
        let s = self.shape;
        let [q, k, v] = self.inputs();
        // Outputs first: a kernel that failed to build in the browser fails this readback.
        let masked_out = self.masked.run_async(&q, &k, &v).await?;
        let dense_out = self.dense.run_async(&q, &k, &v).await?;
        let err_masked = sampled_error(
            &s,
            &q,
            &k,
            &v,
            Some(&self.mask),
            None,
            &masked_out.o,
            SAMPLES,
        );
        let err_dense = sampled_error(&s, &q, &k, &v, None, None, &dense_out.o, SAMPLES);
        let tol = tolerance(self.masked.dtype());

        let buffers = Resident::new(gpu, &self.masked, &q, &k, &v)?;
        let (ms_dense, _) = median_ms_async(gpu, &self.dense, &buffers, WARMUP, REPEATS).await?;
        let (ms_masked, clock) =
            median_ms_async(gpu, &self.masked, &buffers, WARMUP, REPEATS).await?;

        let bm = self.block_mask();
        // Tiles of the masked plan's shape; the family masks are shared by every head (and the
        // batch of one).
        let per_head = s.heads * s.batch;
        let tiles_dense = bm.total_tiles() * per_head;
        let tiles_masked = match self.masked.path() {
            Path::Dense => tiles_dense,
            Path::RunLength | Path::Sparse => bm.active_tiles() * per_head,
        };
        let dc = self.dense.config();
        let report = json!({
            "mask": self.family,
            "seq": s.seq_q,
            "batch": s.batch,
            "heads": s.heads,
            "head_dim": s.head_dim,
            "seed": self.seed,
            "adapter": self.adapter,
            "tier": self.masked.tier().to_string(),
            "path": self.masked.path().to_string(),
            "tile": [bm.tile_rows(), bm.tile_cols()],
            "dense_tile": [dc.tile_rows, dc.tile_cols],
            "reordered": self.reordered,
            "tiles_dense": tiles_dense,
            "tiles_masked": tiles_masked,
            "active_tiles": bm.active_fraction(),
            "partial_tiles": bm.partial_fraction(),
            "full_tiles": bm.full_fraction(),
            "ms_dense": ms_dense,
            "ms_masked": ms_masked,
            "speedup": ms_dense / ms_masked,
            "ideal_speedup": 1.0 / bm.active_fraction().max(1e-9),
            "clock": match clock {
                Clock::Timestamps => "timestamps",
                Clock::WallClock => "wall-clock",
            },
            "samples": SAMPLES,
            // NaN becomes null in JSON, which the test treats as a failure.
            "max_rel_error_masked": err_masked,
            "max_rel_error_dense": err_dense,
            "tolerance": tol,
            "verified": err_masked <= tol && err_dense <= tol,
            "ms_plan": self.masked.build_ms(),
            "plan": self.masked.describe(),
        });
        Ok(report.to_string())
    }
}
