//! `blockflash mask`: the block mask of a generated or stored mask, as a text picture with
//! statistics, as JSON, or as a PNG picture; and the mask itself as a numpy bool `.npy`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use blockflash::{BlockMask, Error, Mask, Result};
use clap::Args;
use serde_json::json;

use super::generate::{self, GeneratorArgs};
use super::{io, parse_tile, picture};

/// Arguments of `blockflash mask`.
#[derive(Args, Debug)]
pub struct MaskArgs {
    /// Mask kind: causal, sliding-window, documents, prefix-lm, longformer, bigbird, tree,
    /// random-blocks (the suite's families), full, sliding-window-symmetric, dilated, random.
    #[arg(
        long,
        value_name = "KIND",
        required_unless_present = "from",
        requires = "seq"
    )]
    pub kind: Option<String>,
    /// Sequence length N (the mask is N x N).
    #[arg(long, value_name = "N")]
    pub seq: Option<usize>,
    /// Read the mask from a file instead: .npy or .safetensors (tensor "mask"), bool or uint8,
    /// [Nq, Nk] or [B, Nq, Nk].
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kind", "seq"])]
    pub from: Option<PathBuf>,
    /// Tile shape: query rows x key columns (columns a multiple of 32).
    #[arg(long, value_name = "RxC", default_value = "64x64", value_parser = parse_tile)]
    pub tile: (usize, usize),
    /// Print the statistics as JSON instead of the text picture.
    #[arg(long)]
    pub json: bool,
    /// Write a PNG picture of the tile states (empty, partial, full) to FILE.
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
    /// Write the mask itself to FILE.npy as numpy bool (`|b1`, C order, true = may attend):
    /// [N, N], or [B, Nq, Nk] for a per-batch --from mask. A generated mask is exactly the one
    /// `blockflash bench --mask KIND --seq N` runs with the same generator options.
    #[arg(long, value_name = "FILE.npy")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub generator: GeneratorArgs,
}

/// Runs `blockflash mask`.
pub fn run(args: &MaskArgs) -> Result<()> {
    let (rows, cols) = args.tile;
    // Refuse a bad output name before any work.
    if let Some(path) = &args.out {
        if io::Format::of(path)? != io::Format::Npy {
            return Err(Error::Io(format!(
                "{}: --out writes .npy files only",
                path.display()
            )));
        }
    }
    let (name, bm, ms_build) = match (&args.kind, &args.from) {
        (Some(kind), _) => {
            let seq = args.seq.expect("clap requires --seq with --kind");
            let spec = generate::spec(kind, seq, &args.generator)?;
            let t0 = Instant::now();
            let bm = spec.block_mask(rows, cols)?;
            let ms_build = t0.elapsed().as_secs_f64() * 1e3;
            if let Some(path) = &args.out {
                // The same generator and options as `blockflash bench` builds its mask from.
                write_npy(path, &spec.mask()?)?;
            }
            (kind.clone(), bm, ms_build)
        }
        (None, Some(path)) => {
            args.generator.only(&[], "a mask read with --from")?;
            let mask = io::read_tensor(path, "mask")?.to_mask()?;
            let t0 = Instant::now();
            let bm = BlockMask::new(&mask, rows, cols)?;
            let ms_build = t0.elapsed().as_secs_f64() * 1e3;
            if let Some(out) = &args.out {
                write_npy(out, &mask)?;
            }
            (path.display().to_string(), bm, ms_build)
        }
        (None, None) => {
            return Err(Error::InvalidArgument {
                what: "mask",
                why: "give --kind KIND --seq N or --from FILE".into(),
            })
        }
    };
    let drawn = match &args.png {
        Some(path) => Some((path, picture::write_png(path, &bm)?)),
        None => None,
    };
    let wrote = drawn.map(|(path, p)| {
        let cells = if p.tiles_per_cell > 1 {
            format!(
                "one cell = {0}x{0} tiles, its most active state",
                p.tiles_per_cell
            )
        } else {
            format!("one tile = {0}x{0} pixels", p.pixels_per_cell)
        };
        let panels = if p.panels < bm.batches() {
            format!(
                ", the first {} of {} batch elements",
                p.panels,
                bm.batches()
            )
        } else {
            String::new()
        };
        format!(
            "wrote {} ({}x{} px, {cells}{panels})",
            path.display(),
            p.width,
            p.height
        )
    });
    let wrote: Vec<String> = args
        .out
        .iter()
        .map(|p| format!("wrote the mask to {}", p.display()))
        .chain(wrote)
        .collect();
    if args.json {
        let stats = json!({
            "mask": name,
            "seq_q": bm.seq_q(),
            "seq_k": bm.seq_k(),
            "batches": bm.batches(),
            "tile_rows": bm.tile_rows(),
            "tile_cols": bm.tile_cols(),
            "q_tiles": bm.q_tiles(),
            "k_tiles": bm.k_tiles(),
            "active_tiles": bm.active_fraction(),
            "partial_tiles": bm.partial_fraction(),
            "full_tiles": bm.full_fraction(),
            "run_length_eligible": bm.run_length_eligible(),
            "mask_bytes": bm.mask_bytes(),
            "dense_mask_bytes": bm.dense_mask_bytes(),
            "ms_build": ms_build,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&stats).expect("JSON of numbers")
        );
        // stdout holds the JSON alone.
        for line in &wrote {
            eprintln!("{line}");
        }
    } else if args.png.is_some() {
        // The header line of the text form: the statistics without the picture.
        let header = bm.to_string();
        println!("{name}: {}", header.lines().next().unwrap_or_default());
        println!("built in {ms_build:.3} ms");
        for line in &wrote {
            println!("{line}");
        }
    } else {
        println!("{name}: {bm}built in {ms_build:.3} ms");
        for line in &wrote {
            println!("{line}");
        }
    }
    Ok(())
}

/// Writes `mask` as a numpy bool `.npy` (format 1.0, C order): `[Nq, Nk]` for a shared mask,
/// `[B, Nq, Nk]` for a per-batch one.
fn write_npy(path: &Path, mask: &Mask) -> Result<()> {
    let (nq, nk) = (mask.seq_q(), mask.seq_k());
    let shape = if mask.is_per_batch() {
        format!("({}, {nq}, {nk})", mask.batches())
    } else {
        format!("({nq}, {nk})")
    };
    let mut header = format!("{{'descr': '|b1', 'fortran_order': False, 'shape': {shape}, }}");
    // numpy pads the header with spaces and a newline to a multiple of 64 bytes in all.
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let header_len = u16::try_from(header.len()).expect("a short header");
    let failed = |e: std::io::Error| Error::Io(format!("{}: cannot write: {e}", path.display()));
    let mut out = BufWriter::new(File::create(path).map_err(failed)?);
    out.write_all(b"\x93NUMPY\x01\x00").map_err(failed)?;
    out.write_all(&header_len.to_le_bytes()).map_err(failed)?;
    out.write_all(header.as_bytes()).map_err(failed)?;
    let wpr = mask.words_per_row();
    let mut row = vec![0u8; nk];
    for b in 0..mask.batches() {
        for words in mask.words(b).chunks_exact(wpr) {
            for (k, byte) in row.iter_mut().enumerate() {
                *byte = (words[k / 32] >> (k % 32) & 1) as u8;
            }
            out.write_all(&row).map_err(failed)?;
        }
    }
    out.flush().map_err(failed)
}
