//! The subcommands of the `blockflash` binary, one module each, and the argument types they
//! share (path, precision, tile shape).

pub mod bench;
pub mod generate;
pub mod io;
pub mod mask;
pub mod picture;
pub mod run;

use blockflash::kernel::DType;
use blockflash::{Error, Path, Result, Tier};
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

/// `--precision`: the storage type of Q, K, V and O in the kernel (arithmetic is f32 in every
/// tier, and files are always written as float32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// Chosen by the subcommand (see its --help).
    #[default]
    Auto,
    /// f32 storage: the portable f32 kernel, on every adapter.
    F32,
    /// f16 storage: tensor cores where the adapter has cooperative matrices (head dim up to 128),
    /// else the portable f16 kernel (f32 arithmetic). An error on adapters without SHADER_F16.
    F16,
    /// bf16 storage: the portable bf16 kernel (f32 arithmetic), on every adapter.
    Bf16,
}

impl Precision {
    /// The storage type to run, `auto` standing for `auto`.
    pub fn dtype(self, auto: DType) -> DType {
        match self {
            Precision::Auto => auto,
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// `--tier`: which kernel tier runs, overriding the one the storage precision picks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum TierArg {
    /// The tier of the precision: portable-f32 for f32, tensor-core-f16 (where offered) or
    /// portable-f16 for f16, portable-bf16 for bf16.
    #[default]
    Auto,
    /// f32 storage and arithmetic, on every adapter.
    PortableF32,
    /// f16 storage, f32 arithmetic (SHADER_F16).
    PortableF16,
    /// bf16 storage, f32 arithmetic, on every adapter.
    PortableBf16,
    /// f16 storage, Q·Kᵀ and P·V on tensor cores through cooperative matrices (16x16x16).
    #[value(alias = "tensor-core")]
    TensorCoreF16,
}

impl TierArg {
    /// The tier to force, `None` for auto.
    pub fn forced(self) -> Option<Tier> {
        match self {
            TierArg::Auto => None,
            TierArg::PortableF32 => Some(Tier::PortableF32),
            TierArg::PortableF16 => Some(Tier::PortableF16),
            TierArg::PortableBf16 => Some(Tier::PortableBf16),
            TierArg::TensorCoreF16 => Some(Tier::TensorCore),
        }
    }

    /// The storage type and forced tier of `--precision` with `--tier`: a forced tier decides
    /// the storage type when the precision is auto, and must agree with an explicit one.
    pub fn resolve(self, precision: Precision, auto: DType) -> Result<(DType, Option<Tier>)> {
        let Some(tier) = self.forced() else {
            return Ok((precision.dtype(auto), None));
        };
        let dtype = precision.dtype(tier.dtype());
        if dtype != tier.dtype() {
            return Err(Error::InvalidArgument {
                what: "--tier",
                why: format!(
                    "tier {tier} stores {} but --precision asks for {dtype}",
                    tier.dtype()
                ),
            });
        }
        Ok((dtype, Some(tier)))
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
