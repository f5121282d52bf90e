//! `blockflash mask`: the block mask of a generated or stored mask, as a text picture with
//! statistics, as JSON, or as a PNG picture.

use std::path::PathBuf;
use std::time::Instant;

use blockflash::{BlockMask, Error, Result};
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
    #[command(flatten)]
    pub generator: GeneratorArgs,
}

/// Runs `blockflash mask`.
pub fn run(args: &MaskArgs) -> Result<()> {
    let (rows, cols) = args.tile;
    let (name, bm, ms_build) = match (&args.kind, &args.from) {
        (Some(kind), _) => {
            let seq = args.seq.expect("clap requires --seq with --kind");
            let spec = generate::spec(kind, seq, &args.generator)?;
            let t0 = Instant::now();
            let bm = spec.block_mask(rows, cols)?;
            (kind.clone(), bm, t0.elapsed().as_secs_f64() * 1e3)
        }
        (None, Some(path)) => {
            args.generator.only(&[], "a mask read with --from")?;
            let mask = io::read_tensor(path, "mask")?.to_mask()?;
            let t0 = Instant::now();
            let bm = BlockMask::new(&mask, rows, cols)?;
            (
                path.display().to_string(),
                bm,
                t0.elapsed().as_secs_f64() * 1e3,
            )
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
        format!(
            "wrote {} ({}x{} px, {cells})",
            path.display(),
            p.width,
            p.height
        )
    });
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
        if let Some(line) = wrote {
            eprintln!("{line}");
        }
    } else if let Some(line) = wrote {
        // The header line of the text form: the statistics without the picture.
        let header = bm.to_string();
        println!("{name}: {}", header.lines().next().unwrap_or_default());
        println!("built in {ms_build:.3} ms");
        println!("{line}");
    } else {
        println!("{name}: {bm}built in {ms_build:.3} ms");
    }
    Ok(())
}
