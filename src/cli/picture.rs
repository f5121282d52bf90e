//! The PNG picture of a block mask: one cell per tile (empty light grey, partial amber, full dark
//! blue), one panel per batch element, and a legend strip with each state's share of the tiles and
//! the tile shape.
//!
//! Masks with more than [`MAX_CELLS`] tiles a side are downsampled: a cell then stands for
//! `f × f` tiles and shows the most active state among them. Small masks are scaled up to at
//! least [`MIN_SIDE`] pixels.

use std::path::Path;

use blockflash::{BlockMask, Error, Result};

/// Cells per side beyond which tiles are merged into cells.
pub const MAX_CELLS: usize = 1024;
/// Pixels of the longer side that small pictures are scaled up to.
pub const MIN_SIDE: usize = 512;
/// Most batch elements drawn, one panel each (the first ones).
pub const MAX_PANELS: usize = 16;

/// Margin around the panels and the legend, in pixels.
const MARGIN: usize = 8;

/// Palette indices.
const BACKGROUND: u8 = 0;
const TEXT: u8 = 4;
/// RGB of background, empty, partial, full and text.
const PALETTE: [u8; 15] = [
    0xff, 0xff, 0xff, // background
    0xe3, 0xe3, 0xe3, // empty
    0xf2, 0xa0, 0x1c, // partial
    0x1f, 0x4e, 0x9c, // full
    0x22, 0x22, 0x22, // text
];

/// What was drawn.
#[derive(Clone, Copy, Debug)]
pub struct Picture {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Tiles per cell side (1 unless downsampled).
    pub tiles_per_cell: usize,
    /// Pixels per cell side.
    pub pixels_per_cell: usize,
    /// Batch elements drawn (the first ones, at most [`MAX_PANELS`]).
    pub panels: usize,
}

/// 5 × 7 glyphs of the legend's characters, one byte per row, bit 4 the leftmost pixel.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        _ => [0; 7],
    }
}

/// A palette-indexed canvas.
struct Canvas {
    width: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, colour: u8) {
        for row in y..y + h {
            self.pixels[row * self.width + x..][..w].fill(colour);
        }
    }

    /// Draws `text` at (x, y) with glyph pixels of `scale × scale`.
    fn text(&mut self, x: usize, y: usize, text: &str, scale: usize) {
        for (i, c) in text.chars().enumerate() {
            for (r, bits) in glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        let px = x + (i * 6 + col) * scale;
                        self.fill(px, y + r * scale, scale, scale, TEXT);
                    }
                }
            }
        }
    }
}

/// Width in pixels of `text` at `scale`.
fn text_width(text: &str, scale: usize) -> usize {
    (text.chars().count() * 6).saturating_sub(1) * scale
}

/// The legend's entries: (palette index, label).
fn legend(bm: &BlockMask, tiles_per_cell: usize) -> (Vec<(u8, String)>, String) {
    let pct = |f: f64| format!("{:.1}%", 100.0 * f);
    let entries = vec![
        (1, format!("empty {}", pct(1.0 - bm.active_fraction()))),
        (2, format!("partial {}", pct(bm.partial_fraction()))),
        (3, format!("full {}", pct(bm.full_fraction()))),
    ];
    let mut tiles = format!("{}x{} tiles", bm.tile_rows(), bm.tile_cols());
    if tiles_per_cell > 1 {
        tiles += &format!(", {tiles_per_cell}x{tiles_per_cell} per cell");
    }
    (entries, tiles)
}

/// Width in pixels of the legend's first line (the swatches and their labels) at `scale`.
fn entries_width(entries: &[(u8, String)], scale: usize) -> usize {
    let items: usize = entries
        .iter()
        .map(|(_, label)| 11 * scale + text_width(label, scale) + 14 * scale)
        .sum();
    items.saturating_sub(14 * scale)
}

/// Width in pixels of the legend strip at `scale`: the swatches on one line, the tile shape on
/// the next.
fn legend_width(entries: &[(u8, String)], tiles: &str, scale: usize) -> usize {
    entries_width(entries, scale).max(text_width(tiles, scale))
}

/// Draws the block mask as a palette image.
fn render(bm: &BlockMask) -> (Picture, Vec<u8>) {
    let (qt, kt) = (bm.q_tiles(), bm.k_tiles());
    let f = qt.max(kt).div_ceil(MAX_CELLS).max(1);
    let (rows, cols) = (qt.div_ceil(f), kt.div_ceil(f));
    let px = MIN_SIDE.div_ceil(rows.max(cols)).max(1);
    // A one-pixel gap between cells once they are large enough to show the tile grid.
    let gap = usize::from(px >= 6);
    let (panel_w, panel_h) = (cols * px, rows * px);
    let (entries, tiles) = legend(bm, f);
    let scale = if legend_width(&entries, &tiles, 2) <= panel_w {
        2
    } else {
        1
    };
    let width = panel_w.max(legend_width(&entries, &tiles, scale)) + 2 * MARGIN;
    let panels = bm.batches().min(MAX_PANELS);
    let legend_top = MARGIN + panels * (panel_h + MARGIN) + MARGIN;
    let height = legend_top + 18 * scale + MARGIN;
    let mut canvas = Canvas {
        width,
        pixels: vec![BACKGROUND; width * height],
    };
    for b in 0..panels {
        let top = MARGIN + b * (panel_h + MARGIN);
        for r in 0..rows {
            for c in 0..cols {
                let most = (r * f..((r + 1) * f).min(qt))
                    .flat_map(|q| (c * f..((c + 1) * f).min(kt)).map(move |k| (q, k)))
                    .map(|(q, k)| bm.state(b, q, k) as u8)
                    .max()
                    .unwrap_or(0);
                canvas.fill(MARGIN + c * px, top + r * px, px - gap, px - gap, most + 1);
            }
        }
    }
    let mut x = MARGIN;
    for (colour, label) in &entries {
        canvas.fill(x, legend_top, 7 * scale, 7 * scale, *colour);
        x += 11 * scale;
        canvas.text(x, legend_top, label, scale);
        x += text_width(label, scale) + 14 * scale;
    }
    canvas.text(MARGIN, legend_top + 11 * scale, &tiles, scale);
    let picture = Picture {
        width,
        height,
        tiles_per_cell: f,
        pixels_per_cell: px,
        panels,
    };
    (picture, canvas.pixels)
}

/// Writes the picture of `bm` to `path` as an indexed-colour PNG.
pub fn write_png(path: &Path, bm: &BlockMask) -> Result<Picture> {
    let (picture, pixels) = render(bm);
    let fail = |e: &dyn std::fmt::Display| Error::Io(format!("{}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(|e| fail(&e))?;
    let mut encoder = png::Encoder::new(
        std::io::BufWriter::new(file),
        picture.width as u32,
        picture.height as u32,
    );
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(&PALETTE[..]);
    let mut writer = encoder.write_header().map_err(|e| fail(&e))?;
    writer.write_image_data(&pixels).map_err(|e| fail(&e))?;
    writer.finish().map_err(|e| fail(&e))?;
    Ok(picture)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockflash::{Mask, TileState};

    #[test]
    fn cells_show_the_most_active_state() {
        // 4 x 4 tiles of 32: the top-left tile partial, the bottom-right one full.
        let mask =
            Mask::from_fn(128, 128, |q, k| (q == 0 && k == 0) || (q >= 96 && k >= 96)).unwrap();
        let bm = BlockMask::new(&mask, 32, 32).unwrap();
        assert_eq!(bm.state(0, 0, 0), TileState::Partial);
        let (pic, pixels) = render(&bm);
        assert_eq!(pic.tiles_per_cell, 1);
        assert_eq!(pic.pixels_per_cell, MIN_SIDE / 4);
        let at = |x: usize, y: usize| pixels[y * pic.width + x];
        assert_eq!(at(MARGIN, MARGIN), 2);
        assert_eq!(
            at(
                MARGIN + 3 * pic.pixels_per_cell,
                MARGIN + 3 * pic.pixels_per_cell
            ),
            3
        );
        assert_eq!(at(MARGIN + pic.pixels_per_cell, MARGIN), 1);
        assert_eq!(at(0, 0), BACKGROUND);
    }

    #[test]
    fn large_masks_are_downsampled() {
        let bm = BlockMask::new(&Mask::causal(2100 * 32, 32).unwrap(), 32, 32).unwrap();
        let (pic, _) = render(&bm);
        assert_eq!(pic.tiles_per_cell, 3);
        assert_eq!(pic.height, MARGIN + 700 + MARGIN + MARGIN + 18 + MARGIN);
    }
}
