//! The blockflash command line: the main job (a verified, timed suite over the mask families),
//! the adapter report, and more subcommands.

use std::io::Write;
use std::process::ExitCode;

use blockflash::suite::{family_mask, run_case, CaseResult, Measure, FAMILIES};
use blockflash::{Gpu, PlanOptions, Result, Shape};
use clap::{Parser, Subcommand};

/// Mask-aware FlashAttention (Binary Block Masking) in WGSL on any wgpu adapter.
///
/// Without a subcommand: runs the suite over the mask families at a size that suits the
/// adapter, verifies each case against the f64 CPU reference on sampled rows, and prints the
/// masked and dense times.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the adapter: backend, features, limits, cooperative-matrix configurations, tier.
    Info,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => main_job(),
        Some(Command::Info) => Gpu::new().map(|g| print!("{}", g.report())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a table of suite results.
fn print_table(rows: &[CaseResult]) {
    println!(
        "| mask | active | path | tile | dense ms | masked ms | speedup | ideal | TFLOP/s | max err |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.3} | {} | {}x{} | {:.3} | {:.3} | {:.2}x | {:.2}x | {:.3} | {:.1e} |",
            r.mask,
            r.active_tiles,
            r.path,
            r.tile.0,
            r.tile.1,
            r.ms_dense,
            r.ms_masked,
            r.speedup,
            r.ideal_speedup,
            r.tflops,
            r.max_rel_error
        );
    }
}

fn main_job() -> Result<()> {
    let gpu = Gpu::new()?;
    let (batch, heads, seq) = if gpu.is_cpu() {
        (1, 4, 1024)
    } else {
        (2, 16, 8192)
    };
    let shape = Shape::new(batch, heads, seq, 64);
    eprintln!(
        "blockflash on {} ({:?}), tier {}: B={batch} H={heads} N={seq} d=64",
        gpu.adapter_info().name,
        gpu.adapter_info().backend,
        gpu.best_tier()
    );
    let mut rows = Vec::new();
    for (i, name) in FAMILIES.iter().enumerate() {
        eprint!("[{}/{}] {name} ...", i + 1, FAMILIES.len());
        std::io::stderr().flush().ok();
        let mask = family_mask(name, seq, 7)?;
        let measure = Measure {
            repeats: 5,
            samples: 64,
            seed: 11,
        };
        let r = run_case(&gpu, name, shape, &mask, &PlanOptions::default(), measure)?;
        eprintln!(" {:.3} ms ({:.2}x)", r.ms_masked, r.speedup);
        rows.push(r);
    }
    print_table(&rows);
    let worst = rows.iter().map(|r| r.max_rel_error).fold(0.0, f64::max);
    // NaN (an unwritten or poisoned element) fails too.
    if worst.is_nan() || worst > 1e-4 {
        return Err(blockflash::Error::Device(format!(
            "verification failed: max relative error {worst:e}"
        )));
    }
    println!(
        "all {} cases verified against the f64 reference",
        rows.len()
    );
    Ok(())
}
