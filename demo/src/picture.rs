//! The two pictures of a case, drawn on the page's canvases: the mask (allowed pairs dark) and
//! the block mask (empty, partial and full tiles in light grey, amber and dark blue, the colours
//! of the CLI's PNG), one pixel per token pair up to [`MAX_SIDE`] pixels a side.

use blockflash::{BlockMask, Mask, TileState};
use wasm_bindgen::prelude::*;
use wasm_bindgen::Clamped;
use web_sys::{CanvasRenderingContext2d, HtmlCanvasElement, ImageData};

/// Pixels of a picture's side beyond which a pixel stands for `f × f` token pairs: the size the
/// page shows the canvases at, so that no pixel row (a tile border) is lost to scaling.
const MAX_SIDE: usize = 256;

const ALLOWED: [u8; 3] = [0x22, 0x22, 0x22];
const MASKED_OUT: [u8; 3] = [0xff, 0xff, 0xff];
const EMPTY: [u8; 3] = [0xe3, 0xe3, 0xe3];
const PARTIAL: [u8; 3] = [0xf2, 0xa0, 0x1c];
const FULL: [u8; 3] = [0x1f, 0x4e, 0x9c];
/// Tile borders, drawn where a tile is at least this many pixels a side.
const GRID: [u8; 3] = [0xff, 0xff, 0xff];
const GRID_MIN_PIXELS: usize = 4;

/// Token pairs per pixel side for a side of `n` tokens.
fn pixel_tokens(n: usize) -> usize {
    n.div_ceil(MAX_SIDE).max(1)
}

/// Draws `mask` (batch element 0): a pixel is dark if any pair it covers is allowed.
pub fn draw_mask(canvas: &HtmlCanvasElement, mask: &Mask) -> Result<(), JsError> {
    let f = pixel_tokens(mask.seq_q().max(mask.seq_k()));
    let (w, h) = (mask.seq_k().div_ceil(f), mask.seq_q().div_ceil(f));
    let mut rgba = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        for x in 0..w {
            let any = (y * f..((y + 1) * f).min(mask.seq_q()))
                .any(|q| (x * f..((x + 1) * f).min(mask.seq_k())).any(|k| mask.get(0, q, k)));
            rgba.extend(if any { ALLOWED } else { MASKED_OUT });
            rgba.push(0xff);
        }
    }
    put(canvas, w, h, rgba)
}

/// Draws `bm` (batch element 0) in token coordinates, so that tiles keep their shape; a pixel
/// takes the state of the tile of its first token pair.
pub fn draw_block_mask(canvas: &HtmlCanvasElement, bm: &BlockMask) -> Result<(), JsError> {
    let f = pixel_tokens(bm.seq_q().max(bm.seq_k()));
    let (w, h) = (bm.seq_k().div_ceil(f), bm.seq_q().div_ceil(f));
    let (tr, tc) = (bm.tile_rows(), bm.tile_cols());
    // A pixel row or column holding a tile's first token, where tiles are big enough to show
    // borders.
    let border = |p: usize, tile: usize| {
        tile / f >= GRID_MIN_PIXELS && (p * f + f - 1) / tile * tile >= p * f
    };
    let mut rgba = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        for x in 0..w {
            let colour = if border(y, tr) || border(x, tc) {
                GRID
            } else {
                match bm.state(0, y * f / tr, x * f / tc) {
                    TileState::Empty => EMPTY,
                    TileState::Partial => PARTIAL,
                    TileState::Full => FULL,
                }
            };
            rgba.extend(colour);
            rgba.push(0xff);
        }
    }
    put(canvas, w, h, rgba)
}

/// Sizes `canvas` to `w × h` and puts the RGBA pixels on it.
fn put(canvas: &HtmlCanvasElement, w: usize, h: usize, rgba: Vec<u8>) -> Result<(), JsError> {
    canvas.set_width(w as u32);
    canvas.set_height(h as u32);
    let ctx: CanvasRenderingContext2d = canvas
        .get_context("2d")
        .map_err(|_| JsError::new("the canvas has no 2d context"))?
        .ok_or_else(|| JsError::new("the canvas has no 2d context"))?
        .dyn_into()
        .map_err(|_| JsError::new("the canvas's 2d context has another type"))?;
    let image = ImageData::new_with_u8_clamped_array_and_sh(Clamped(&rgba), w as u32, h as u32)
        .map_err(|_| JsError::new("could not make the picture's ImageData"))?;
    ctx.put_image_data(&image, 0.0, 0.0)
        .map_err(|_| JsError::new("could not draw the picture"))
}
