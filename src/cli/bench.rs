//! `blockflash bench` and the main job: masked against dense attention over mask kinds, timed
//! (medians after a warm-up of two), forward or (`--backward`) forward + backward, verified on
//! sampled rows, printed as a markdown table and optionally written as JSON lines.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use blockflash::kernel::DType;
use blockflash::reference::SAMPLED_GRADIENT_CHECK;
use blockflash::suite::{run_backward_case, run_case, CaseResult, Measure, FAMILIES};
use blockflash::timing::Clock;
use blockflash::{Error, Gpu, Mask, PlanOptions, Result, Shape};
use clap::{Args, Parser};
use serde_json::json;

use super::generate::{self, GeneratorArgs};
use super::{parse_tile, PathArg, Precision, TierArg};

/// Largest sampled relative error that passes verification, by storage type.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 5e-3,
        DType::BF16 => 1e-2,
    }
}

/// Arguments of `blockflash bench`; every size defaults to one that suits the adapter.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Mask kind (see `blockflash mask --help`), or "all" for the suite's eight families.
    #[arg(long, value_name = "KIND|all", default_value = "all")]
    pub mask: String,
    /// Sequence length N [default: 1024 on a CPU adapter, 8192 on a GPU].
    #[arg(long, value_name = "N")]
    pub seq: Option<usize>,
    /// Query rows: the last M rows of each N x N mask, over all N keys (decoding M new tokens
    /// after N - M) [default: N].
    #[arg(long, value_name = "M")]
    pub seq_q: Option<usize>,
    /// Batch size [default: 1 on a CPU adapter, 2 on a GPU].
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Query heads [default: 4 on a CPU adapter, 16 on a GPU].
    #[arg(long, value_name = "H")]
    pub heads: Option<usize>,
    /// Key/value heads, dividing --heads [default: as many as --heads].
    #[arg(long, value_name = "H")]
    pub kv_heads: Option<usize>,
    /// Head dimension: 32, 64, 96, 128 or 256.
    #[arg(long, value_name = "D", default_value_t = 64)]
    pub head_dim: usize,
    /// Storage precision of the kernel; auto is f16 on a GPU with SHADER_F16 and f32 on a CPU
    /// adapter. f16 runs on tensor cores where the adapter offers them, else the portable kernel.
    #[arg(long, value_enum, default_value_t)]
    pub precision: Precision,
    /// Kernel tier of both plans; auto takes the precision's (see --precision). A forced tier
    /// sets the precision when that is auto and must agree with it otherwise.
    #[arg(long, value_enum, default_value_t)]
    pub tier: TierArg,
    /// Dispatch path of the masked plan (the baseline is always the dense plan without a mask).
    #[arg(long, value_enum, default_value_t)]
    pub path: PathArg,
    /// Force a tile shape, query rows x key columns (default: the plan picks).
    #[arg(long, value_name = "RxC", value_parser = parse_tile)]
    pub tile: Option<(usize, usize)>,
    /// Split-KV: the most key tiles one workgroup walks (default: the plan decides; see
    /// PlanOptions::max_tiles_per_workgroup).
    #[arg(long, value_name = "TILES", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tiles_per_workgroup: Option<u64>,
    /// Timed runs per plan after two warm-up runs (1 to 10000); the median is reported.
    #[arg(long, value_name = "K", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub repeat: u32,
    /// Output rows checked against the f64 CPU reference per case (with --backward also dQ
    /// rows, and dK/dV keys); at least 1.
    #[arg(long, value_name = "ROWS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub samples: u32,
    /// Time forward then backward (dQ, dK, dV) of both plans instead of the forward pass, and
    /// check the gradients too. The dense plan is timed once and shared by every mask.
    #[arg(long)]
    pub backward: bool,
    /// Write one JSON object per case to FILE (JSON lines), as each case finishes.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub generator: GeneratorArgs,
}

impl BenchArgs {
    /// The arguments of `blockflash bench` without flags: what the main job runs.
    pub fn defaults() -> BenchArgs {
        #[derive(Parser)]
        struct Bare {
            #[command(flatten)]
            args: BenchArgs,
        }
        Bare::parse_from(["bench"]).args
    }
}

/// Seed of the random Q, K, V.
const INPUT_SEED: u64 = 11;

/// A rate in TFLOP/s; below 0.01 (CPU adapters run at a few GFLOP/s) in scientific notation.
fn rate(tflops: f64) -> String {
    if tflops >= 0.01 {
        format!("{tflops:.3}")
    } else {
        format!("{tflops:.2e}")
    }
}

/// Prints a markdown table of suite results; forward + backward rows add the forward parts'
/// times and the gradients' errors.
fn print_table(rows: &[CaseResult]) {
    let backward = rows.iter().any(|r| r.backward.is_some());
    let mut head = "| pass | mask | active | path | tile | dense ms | masked ms | speedup | ideal \
                    | TFLOP/s | max err |"
        .to_string();
    if backward {
        head += " fwd dense ms | fwd masked ms | dQ err | dK err | dV err |";
    }
    println!("{head}\n|{}", "---|".repeat(head.matches(" |").count()));
    for r in rows {
        let mut line = format!(
            "| {} | {} | {:.3} | {} | {}x{} | {:.3} | {:.3} | {:.2}x | {:.2}x | {} | {:.1e} |",
            r.pass(),
            r.mask,
            r.active_tiles,
            r.path,
            r.tile.0,
            r.tile.1,
            r.ms_dense,
            r.ms_masked,
            r.speedup,
            r.ideal_speedup,
            rate(r.tflops),
            r.max_rel_error
        );
        if let Some(b) = &r.backward {
            let [dq, dk, dv] = b.grad_errors;
            line += &format!(
                " {:.3} | {:.3} | {dq:.1e} | {dk:.1e} | {dv:.1e} |",
                b.dense.fwd, b.ms_fwd_masked
            );
        }
        println!("{line}");
    }
}

/// One JSON row of a case.
fn json_row(gpu: &Gpu, r: &CaseResult) -> serde_json::Value {
    let s = r.shape;
    let info = gpu.adapter_info();
    let mut row = json!({
        "pass": r.pass(),
        "mask": r.mask,
        "seq": s.seq_k,
        "seq_q": s.seq_q,
        "batch": s.batch,
        "heads": s.heads,
        "kv_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "precision": r.tier.dtype().to_string(),
        "tier": r.tier.to_string(),
        "path": r.path.to_string(),
        "tile": format!("{}x{}", r.tile.0, r.tile.1),
        "active_tiles": r.active_tiles,
        "ms_dense": r.ms_dense,
        "ms_masked": r.ms_masked,
        "speedup": r.speedup,
        "ideal_speedup": r.ideal_speedup,
        "tflops": r.tflops,
        "max_rel_error": r.max_rel_error,
        "ms_plan": r.ms_plan,
        "clock": match r.clock {
            Clock::Timestamps => "gpu-timestamps",
            Clock::WallClock => "wall-clock",
        },
        "adapter": info.name,
        "backend": format!("{:?}", info.backend),
        "driver": format!("{} {}", info.driver, info.driver_info).trim().to_string(),
    });
    if let Some(b) = &r.backward {
        let [dq, dk, dv] = b.grad_errors;
        let extra = json!({
            "ms_fwd_dense": b.dense.fwd,
            "ms_fwd_masked": b.ms_fwd_masked,
            "max_rel_error_dq": dq,
            "max_rel_error_dk": dk,
            "max_rel_error_dv": dv,
            "grad_check": SAMPLED_GRADIENT_CHECK,
        });
        if let (Some(row), serde_json::Value::Object(extra)) = (row.as_object_mut(), extra) {
            row.extend(extra);
        }
    }
    row
}

/// Runs `blockflash bench` (and, with default arguments, the main job).
pub fn run(args: &BenchArgs) -> Result<()> {
    let kinds: Vec<&str> = if args.mask == "all" {
        args.generator.only(&["--seed"], "--mask all")?;
        FAMILIES.to_vec()
    } else {
        vec![args.mask.as_str()]
    };
    let gpu = Gpu::new()?;
    let cpu = gpu.is_cpu();
    let seq = args.seq.unwrap_or(if cpu { 1024 } else { 8192 });
    // Mask kinds and their options, the shape, then the JSON file, before any case: a bad
    // name, option, shape or path fails before minutes of work (and leaves no empty file).
    let specs = kinds
        .iter()
        .map(|kind| generate::spec(kind, seq, &args.generator))
        .collect::<Result<Vec<_>>>()?;
    let heads = args.heads.unwrap_or(if cpu { 4 } else { 16 });
    let shape = Shape {
        batch: args.batch.unwrap_or(if cpu { 1 } else { 2 }),
        heads,
        kv_heads: args.kv_heads.unwrap_or(heads),
        seq_q: args.seq_q.unwrap_or(seq),
        seq_k: seq,
        head_dim: args.head_dim,
    };
    shape.validate()?;
    if shape.seq_q > seq {
        return Err(Error::InvalidArgument {
            what: "seq-q",
            why: format!("{} query rows of a mask of {seq} rows", shape.seq_q),
        });
    }
    let mut json = match &args.json {
        Some(p) => Some(BufWriter::new(File::create(p).map_err(|e| {
            Error::Io(format!("{}: cannot write: {e}", p.display()))
        })?)),
        None => None,
    };
    let auto = if cpu {
        DType::F32
    } else {
        gpu.best_tier().dtype()
    };
    let (dtype, tier) = args.tier.resolve(args.precision, auto)?;
    let options = PlanOptions {
        dtype,
        tier,
        path: args.path.forced(),
        tile: args.tile,
        max_tiles_per_workgroup: args.max_tiles_per_workgroup.map(|t| t as usize),
        ..Default::default()
    };
    let measure = Measure {
        repeats: args.repeat as usize,
        samples: args.samples as usize,
        seed: INPUT_SEED,
    };
    eprintln!(
        "blockflash on {} ({:?}), tier {}: B={} H={} Hkv={} Nq={} Nk={seq} d={}, {}, {} timed runs",
        gpu.adapter_info().name,
        gpu.adapter_info().backend,
        match tier {
            Some(t) => gpu.supports(t).map(|()| t)?,
            None => gpu.tier_for_head_dim(dtype, shape.head_dim)?,
        },
        shape.batch,
        shape.heads,
        shape.kv_heads,
        shape.seq_q,
        shape.head_dim,
        if args.backward {
            "forward + backward"
        } else {
            "forward"
        },
        measure.repeats,
    );
    let mut rows: Vec<CaseResult> = Vec::new();
    for (i, (kind, spec)) in kinds.iter().zip(&specs).enumerate() {
        eprint!("[{}/{}] {kind} ...", i + 1, kinds.len());
        std::io::stderr().flush().ok();
        let mut mask = spec.mask()?;
        if shape.seq_q < seq {
            // The generated masks are shared by the batch: their last seq_q rows.
            let first = (seq - shape.seq_q) * mask.words_per_row();
            mask = Mask::from_words(shape.seq_q, seq, mask.words(0)[first..].to_vec())?;
        }
        let r = if args.backward {
            // Every case has the same inputs and dense plan: its times are measured once.
            let dense = rows
                .first()
                .and_then(|r| r.backward.as_ref())
                .map(|b| b.dense);
            run_backward_case(&gpu, kind, shape, &mask, &options, measure, dense)?
        } else {
            run_case(&gpu, kind, shape, &mask, &options, measure)?
        };
        eprintln!(
            " dense {:.3} ms, masked {:.3} ms ({:.2}x)",
            r.ms_dense, r.ms_masked, r.speedup
        );
        if let Some(out) = json.as_mut() {
            writeln!(out, "{}", json_row(&gpu, &r))
                .and_then(|()| out.flush())
                .map_err(|e| Error::Io(format!("writing the JSON rows: {e}")))?;
        }
        rows.push(r);
    }
    print_table(&rows);
    // NaN (an unwritten or poisoned element) fails too.
    let errors = rows.iter().flat_map(|r| {
        let grads = r.backward.as_ref().map(|b| b.grad_errors);
        std::iter::once(r.max_rel_error).chain(grads.into_iter().flatten())
    });
    let worst = errors.fold(0.0, |a: f64, e| {
        if a.is_nan() || e.is_nan() {
            f64::NAN
        } else {
            a.max(e)
        }
    });
    let tolerance = tolerance(dtype);
    if worst.is_nan() || worst > tolerance {
        return Err(Error::Device(format!(
            "verification failed: max relative error {worst:e} (tolerance {tolerance:e})"
        )));
    }
    println!(
        "all {} cases verified against the f64 reference",
        rows.len()
    );
    Ok(())
}
