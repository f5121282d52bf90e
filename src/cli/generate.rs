//! Mask kinds by name: the generator options that `blockflash mask` and `blockflash bench`
//! share, and the [`MaskSpec`] each kind builds. With default options a suite family's mask is
//! exactly [`blockflash::suite::family_mask`]'s.

use blockflash::mask::{complete_tree_size, MaskSpec};
use blockflash::suite::{lognormal_lengths, FAMILIES};
use blockflash::{Error, Result};
use clap::Args;

/// Mask kinds beyond the suite's families.
const EXTRA_KINDS: [&str; 4] = ["full", "sliding-window-symmetric", "dilated", "random"];

/// Every mask kind: the suite's families, then the extra ones.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    FAMILIES.into_iter().chain(EXTRA_KINDS)
}

/// The seed of the masks when `--seed` is not given (the main job's).
pub const DEFAULT_SEED: u64 = 7;

/// Options of the mask generators; each applies to the kinds named in its help, and giving one
/// to another kind is an error. Defaults scale with N as in the suite.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Generator options")]
pub struct GeneratorArgs {
    /// Window: keys per side, the diagonal included (sliding-window*, dilated; default N/16 and
    /// N/32), or band half-width |q - k| <= W (longformer, bigbird; default N/128).
    #[arg(long, value_name = "W")]
    pub window: Option<usize>,
    /// Distance between the keys a query sees (dilated; default 2).
    #[arg(long, value_name = "D")]
    pub dilation: Option<usize>,
    /// Median document length; lengths are log-normal with sigma 1 and add up to N (documents,
    /// prefix-lm; default N/64).
    #[arg(long, value_name = "L")]
    pub doc_median: Option<usize>,
    /// Fraction of each document that is a bidirectional prefix (prefix-lm; default 1/3).
    #[arg(long, value_name = "F")]
    pub prefix_frac: Option<f64>,
    /// Number of global tokens, the first ones (longformer, bigbird; default 16).
    #[arg(long, value_name = "G")]
    pub global: Option<usize>,
    /// Random key blocks per query block (bigbird; default 3).
    #[arg(long, value_name = "R")]
    pub random_blocks: Option<usize>,
    /// Block size (bigbird: random blocks, default N/256; random-blocks: default N/128).
    #[arg(long, value_name = "B")]
    pub block: Option<usize>,
    /// Probability that a pair (random) or a block (random-blocks) is allowed (default 0.1).
    #[arg(long, value_name = "P")]
    pub p: Option<f64>,
    /// Seed of the random parts (documents, prefix-lm, bigbird, random, random-blocks; default 7).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Depth of the complete tree; tokens past the tree see only themselves (tree; default 6).
    #[arg(long, value_name = "D")]
    pub depth: Option<usize>,
    /// Children per tree node (tree; default 4).
    #[arg(long, value_name = "K")]
    pub branching: Option<usize>,
    /// Causal window or documents: keys at or before the query only (the default).
    #[arg(long, conflicts_with = "symmetric")]
    pub causal: bool,
    /// Symmetric window, bidirectional documents (sliding-window, dilated, documents).
    #[arg(long)]
    pub symmetric: bool,
}

impl GeneratorArgs {
    /// The options given on the command line, by flag name.
    fn given(&self) -> Vec<&'static str> {
        [
            ("--window", self.window.is_some()),
            ("--dilation", self.dilation.is_some()),
            ("--doc-median", self.doc_median.is_some()),
            ("--prefix-frac", self.prefix_frac.is_some()),
            ("--global", self.global.is_some()),
            ("--random-blocks", self.random_blocks.is_some()),
            ("--block", self.block.is_some()),
            ("--p", self.p.is_some()),
            ("--seed", self.seed.is_some()),
            ("--depth", self.depth.is_some()),
            ("--branching", self.branching.is_some()),
            ("--causal", self.causal),
            ("--symmetric", self.symmetric),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }

    /// Error unless every option given is one of `allowed`; `whom` names the mask for the
    /// message.
    pub fn only(&self, allowed: &[&str], whom: &str) -> Result<()> {
        match self.given().into_iter().find(|g| !allowed.contains(g)) {
            None => Ok(()),
            Some(flag) => Err(Error::InvalidArgument {
                what: "generator option",
                why: format!("{flag} does not apply to {whom}"),
            }),
        }
    }
}

/// The options each kind takes.
fn options_of(kind: &str) -> &'static [&'static str] {
    const SIDE: [&str; 2] = ["--causal", "--symmetric"];
    match kind {
        "sliding-window" => &["--window", SIDE[0], SIDE[1]],
        "sliding-window-symmetric" => &["--window"],
        "dilated" => &["--window", "--dilation", SIDE[0], SIDE[1]],
        "documents" => &["--doc-median", "--seed", SIDE[0], SIDE[1]],
        "prefix-lm" => &["--doc-median", "--prefix-frac", "--seed"],
        "longformer" => &["--window", "--global"],
        "bigbird" => &[
            "--window",
            "--global",
            "--block",
            "--random-blocks",
            "--seed",
        ],
        "tree" => &["--depth", "--branching"],
        "random" => &["--p", "--seed"],
        "random-blocks" => &["--block", "--p", "--seed"],
        _ => &[],
    }
}

/// Error unless `value` is at least 1.
fn positive(what: &'static str, value: usize) -> Result<usize> {
    if value == 0 {
        return Err(Error::InvalidArgument {
            what,
            why: "must be at least 1".into(),
        });
    }
    Ok(value)
}

/// The generator of mask `kind` at length `seq` (square) with options `g`.
pub fn spec(kind: &str, seq: usize, g: &GeneratorArgs) -> Result<MaskSpec> {
    if !kinds().any(|k| k == kind) {
        return Err(Error::InvalidArgument {
            what: "mask kind",
            why: format!(
                "{kind:?} is not one of {}",
                kinds().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    g.only(options_of(kind), kind)?;
    positive("sequence length", seq)?;
    let unit = (seq / 128).max(1);
    let seed = g.seed.unwrap_or(DEFAULT_SEED);
    let causal = !g.symmetric;
    let lengths = || -> Result<Vec<usize>> {
        let median = positive("document median", g.doc_median.unwrap_or((seq / 64).max(1)))?;
        Ok(lognormal_lengths(seq, median, seed))
    };
    let global = || -> Result<usize> {
        let n = g.global.unwrap_or(16.min(seq));
        if n > seq {
            return Err(Error::InvalidArgument {
                what: "global tokens",
                why: format!("{n} global tokens in a sequence of {seq}"),
            });
        }
        Ok(n)
    };
    let (seq_q, seq_k) = (seq, seq);
    Ok(match kind {
        "full" => MaskSpec::Full { seq_q, seq_k },
        "causal" => MaskSpec::Causal { seq_q, seq_k },
        "sliding-window" | "sliding-window-symmetric" => MaskSpec::SlidingWindow {
            seq_q,
            seq_k,
            window: g.window.unwrap_or((seq / 16).max(1)),
            causal: causal && kind == "sliding-window",
        },
        "dilated" => MaskSpec::DilatedWindow {
            seq,
            window: g.window.unwrap_or((seq / 32).max(1)),
            dilation: g.dilation.unwrap_or(2),
            causal,
        },
        "documents" => MaskSpec::Documents {
            lengths: lengths()?,
            causal,
        },
        "prefix-lm" => {
            MaskSpec::document_prefix_lm_fraction(&lengths()?, g.prefix_frac.unwrap_or(1.0 / 3.0))?
        }
        "longformer" => MaskSpec::Longformer {
            seq,
            window: g.window.unwrap_or(unit),
            global: (0..global()?).collect(),
        },
        "bigbird" => {
            let block = g.block.unwrap_or((seq / 256).max(1));
            MaskSpec::BigBird {
                seq,
                window: g.window.unwrap_or(unit),
                num_global: global()?,
                block,
                // (by default 3, or every block of a sequence of fewer)
                random_blocks_per_row: g.random_blocks.unwrap_or(3.min(seq.div_ceil(block))),
                seed,
            }
        }
        "tree" => {
            let branching = g.branching.unwrap_or(4);
            let count = complete_tree_size(g.depth.unwrap_or(6), branching)?;
            // The first N nodes (breadth first), or padded with roots: tokens that see only
            // themselves.
            let parents = (0..seq)
                .map(|i| (i > 0 && i < count).then(|| (i - 1) / branching))
                .collect();
            MaskSpec::Tree {
                prefix_len: 0,
                parents,
            }
        }
        "random" => MaskSpec::Random {
            seq_q,
            seq_k,
            p: g.p.unwrap_or(0.1),
            seed,
        },
        "random-blocks" => MaskSpec::RandomBlocks {
            seq_q,
            seq_k,
            block: g.block.unwrap_or(unit),
            p: g.p.unwrap_or(0.1),
            seed,
        },
        _ => unreachable!("checked against kinds() above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockflash::suite::{family_mask, FAMILIES};

    #[test]
    fn defaults_build_the_suite_families() {
        for seq in [100, 1024, 3000] {
            for name in FAMILIES {
                let ours = spec(name, seq, &GeneratorArgs::default()).unwrap().mask();
                assert_eq!(
                    ours.unwrap(),
                    family_mask(name, seq, DEFAULT_SEED).unwrap(),
                    "{name} at {seq}"
                );
            }
        }
    }

    #[test]
    fn options_of_other_kinds_are_refused() {
        let g = GeneratorArgs {
            window: Some(8),
            ..Default::default()
        };
        assert!(spec("causal", 64, &g).is_err());
        assert!(spec("sliding-window", 64, &g).is_ok());
        assert!(spec("no-such-kind", 64, &GeneratorArgs::default()).is_err());
    }
}
