//! The subcommands of the `blockflash` binary, one module each, and the argument types they
//! share (path, precision, tile shape).

pub mod bench;
pub mod generate;
pub mod io;
pub mod mask;
pub mod picture;
pub mod run;

use blockflash::{Error, Path, Result};
use clap::ValueEnum;

/// `--path`: which dispatch path the masked plan takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum PathArg {
    /// Let the plan's cost model choose.
    #[default]
    Auto,
    /// Every key tile, the element mask applied everywhere.
    Dense,
    /// One interval of active key tiles per query tile (eligible masks only).
    #[value(alias = "run-length")]
    Runlength,
    /// A list of active key tiles per query tile.
    Sparse,
}

impl PathArg {
    /// The path to force, `None` for auto.
    pub fn forced(self) -> Option<Path> {
        match self {
            PathArg::Auto => None,
            PathArg::Dense => Some(Path::Dense),
            PathArg::Runlength => Some(Path::RunLength),
            PathArg::Sparse => Some(Path::Sparse),
        }
    }
}

/// `--precision`: the kernel tier's storage precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// The best tier of the adapter (today the portable f32 kernel).
    #[default]
    Auto,
    /// f32 storage and arithmetic.
    F32,
    /// f16 storage of Q, K, V with f32 accumulation.
    F16,
}

impl Precision {
    /// Error unless this build has a kernel tier of this precision.
    pub fn check(self) -> Result<()> {
        match self {
            Precision::Auto | Precision::F32 => Ok(()),
            Precision::F16 => Err(Error::TierUnavailable(
                "f16 tier not available yet on this build; use --precision f32 (float16 inputs \
                 are widened to f32)"
                    .into(),
            )),
        }
    }

    /// The precision the kernels run at for this choice.
    pub fn run_as(self) -> &'static str {
        match self {
            Precision::Auto | Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

/// Parses a tile shape `RxC` (e.g. `64x64`).
pub fn parse_tile(text: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("{text:?} is not a tile shape ROWSxCOLS such as 64x64");
    let (r, c) = text.split_once(['x', 'X']).ok_or_else(bad)?;
    let r: usize = r.trim().parse().map_err(|_| bad())?;
    let c: usize = c.trim().parse().map_err(|_| bad())?;
    if r == 0 || c == 0 {
        return Err(bad());
    }
    Ok((r, c))
}
