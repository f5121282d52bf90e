//! Block-mask build speed (issue 3): `BlockMask::new` from an arbitrary bit-packed mask and the
//! generators' fast paths at N = 16384, and Reverse Cuthill–McKee on the paper's synthetic mask.
//!
//! `cargo bench --bench block_mask_build` prints markdown tables and records them in BENCHMARKS.md
//! (replacing an earlier section of the same name). Without `--bench` (as `cargo test
//! --all-targets` runs it) it does a small smoke run and writes nothing.

use std::fmt::Write as _;
use std::time::Instant;

use blockflash::mask::{complete_tree_parents, MaskSpec, SplitMix64};
use blockflash::rcm::reverse_cuthill_mckee;
use blockflash::{BlockMask, Mask};

const SECTION: &str = "## Block-mask build speed (issue 3)";

/// Median wall time of `runs` calls of `f`, in milliseconds (freeing the result not included).
fn median_ms<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let result = std::hint::black_box(f());
            let ms = t.elapsed().as_secs_f64() * 1e3;
            drop(result);
            ms
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn mib(bytes: usize) -> String {
    format!("{:.2}", bytes as f64 / (1 << 20) as f64)
}

/// Deterministic document lengths adding up to `n` (between n/64 and n/16 tokens each).
fn document_lengths(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut lengths = Vec::new();
    let mut left = n;
    while left > 0 {
        let l = (n / 64 + rng.below((n / 16 - n / 64) as u64) as usize).min(left);
        lengths.push(l);
        left -= l;
    }
    lengths
}

/// The generators of the fast-path table at sequence length `n`.
fn generators(n: usize) -> Vec<(&'static str, MaskSpec)> {
    let lengths = document_lengths(n, 3);
    let tree_depth = (n as f64).log2() as usize - 1; // 2^(d+1) - 1 nodes, plus a prompt
    let tree = complete_tree_parents(tree_depth, 2).expect("tree");
    vec![
        ("causal", MaskSpec::Causal { seq_q: n, seq_k: n }),
        (
            "sliding window, causal, w = 1024",
            MaskSpec::SlidingWindow {
                seq_q: n,
                seq_k: n,
                window: 1024,
                causal: true,
            },
        ),
        (
            "sliding window, symmetric, w = 512",
            MaskSpec::SlidingWindow {
                seq_q: n,
                seq_k: n,
                window: 512,
                causal: false,
            },
        ),
        (
            "dilated window, causal, w = 256, dilation 4",
            MaskSpec::DilatedWindow {
                seq: n,
                window: 256,
                dilation: 4,
                causal: true,
            },
        ),
        (
            "documents, causal",
            MaskSpec::Documents {
                lengths: lengths.clone(),
                causal: true,
            },
        ),
        (
            "document prefix-LM, 25% prefix",
            MaskSpec::document_prefix_lm_fraction(&lengths, 0.25).expect("prefix-LM"),
        ),
        (
            "Longformer, w = 256, 16 global",
            MaskSpec::Longformer {
                seq: n,
                window: 256,
                global: (0..16).collect(),
            },
        ),
        (
            "BigBird, w = 192, 64 global, 3 random 64-blocks",
            MaskSpec::BigBird {
                seq: n,
                window: 192,
                num_global: 64,
                block: 64,
                random_blocks_per_row: 3,
                seed: 5,
            },
        ),
        (
            "binary tree (depth 12/13) after a prompt",
            MaskSpec::Tree {
                prefix_len: n - tree.len(),
                parents: tree,
            },
        ),
        (
            "random 256-blocks, p = 0.1",
            MaskSpec::RandomBlocks {
                seq_q: n,
                seq_k: n,
                block: 256,
                p: 0.1,
                seed: 9,
            },
        ),
    ]
}

fn bits_table(n: usize, tiles: &[usize], runs: usize) -> String {
    let mut out = String::new();
    out.push_str(
        "| mask (bits) | tiles | `BlockMask::new` ms | active % | partial % | mask MiB (dense MiB) |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    let masks = [
        ("random elements, p = 0.5", Mask::random(n, n, 0.5, 1)),
        ("random elements, p = 0.001", Mask::random(n, n, 0.001, 2)),
        (
            "random 256-blocks, p = 0.1",
            Mask::random_blocks(n, n, 256, 0.1, 9),
        ),
        ("causal", Mask::causal(n, n)),
    ];
    let mut reference = 0.0;
    for (name, mask) in masks {
        let mask = mask.expect("mask");
        if reference == 0.0 {
            reference = median_ms(runs, || mask.clone());
        }
        for &t in tiles {
            let ms = median_ms(runs, || BlockMask::new(&mask, t, t).expect("block mask"));
            let bm = BlockMask::new(&mask, t, t).expect("block mask");
            writeln!(
                out,
                "| {name} | {t}×{t} | {ms:.2} | {:.1} | {:.1} | {} ({}) |",
                100.0 * bm.active_fraction(),
                100.0 * bm.partial_fraction(),
                mib(bm.mask_bytes()),
                mib(bm.dense_mask_bytes()),
            )
            .unwrap();
        }
    }
    writeln!(
        out,
        "\nFor scale: cloning the {} MiB mask (a memcpy into fresh memory) takes {reference:.2} ms \
         here; first-touch page faults of fresh memory dominate both that and the all-partial \
         rows, whose partial bits are as large as the mask.",
        (n * n / 8) >> 20
    )
    .unwrap();
    out
}

fn generator_table(n: usize, tiles: &[usize], runs: usize) -> String {
    let mut out = String::new();
    out.push_str(
        "| generator | tiles | fast path ms | `BlockMask::new` from its bits ms | active % | \
         partial % | run-length | mask MiB |\n|---|---|---:|---:|---:|---:|---|---:|\n",
    );
    for (name, spec) in generators(n) {
        let mask = spec.mask().expect("mask");
        for &t in tiles {
            let fast = median_ms(runs, || spec.block_mask(t, t).expect("fast path"));
            let bits = median_ms(runs, || BlockMask::new(&mask, t, t).expect("block mask"));
            let bm = spec.block_mask(t, t).expect("fast path");
            assert!(bm == BlockMask::new(&mask, t, t).expect("block mask"));
            writeln!(
                out,
                "| {name} | {t}×{t} | {fast:.2} | {bits:.2} | {:.1} | {:.1} | {} | {} |",
                100.0 * bm.active_fraction(),
                100.0 * bm.partial_fraction(),
                if bm.run_length_eligible() {
                    "yes"
                } else {
                    "no"
                },
                mib(bm.mask_bytes()),
            )
            .unwrap();
        }
    }
    out
}

/// The synthetic mask of Sharma & Geiping: symmetric, ones on the diagonal, and
/// `P(i, j) = max(0.5 · exp(−0.3 |i − j|), 0.0002)` off it.
fn synthetic(n: usize, seed: u64) -> Mask {
    let wpr = n.div_ceil(32);
    let mut words = vec![0u32; n * wpr];
    for i in 0..n {
        words[i * wpr + i / 32] |= 1 << (i % 32);
        for j in i + 1..n {
            let p = (0.5 * (-0.3 * (j - i) as f64).exp()).max(0.0002);
            if SplitMix64::unit(SplitMix64::at(seed, (i * n + j) as u64)) < p {
                words[i * wpr + j / 32] |= 1 << (j % 32);
                words[j * wpr + i / 32] |= 1 << (i % 32);
            }
        }
    }
    Mask::from_words(n, n, words).expect("synthetic mask")
}

fn rcm_table(sizes: &[usize], tile: usize) -> String {
    let mut out = String::new();
    out.push_str(
        "| N | order | tiles | active tiles before | after RCM | total tiles | RCM ms |\n\
         |---:|---|---|---:|---:|---:|---:|\n",
    );
    for &n in sizes {
        let own = synthetic(n, 11);
        let mut shuffle: Vec<u32> = (0..n as u32).collect();
        let mut rng = SplitMix64::new(13);
        for i in (1..n).rev() {
            shuffle.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let shuffled = own.permuted(&shuffle).expect("shuffle");
        for (order, mask) in [("own", &own), ("shuffled", &shuffled)] {
            let t = Instant::now();
            let perm = reverse_cuthill_mckee(mask).expect("rcm");
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let before = BlockMask::new(mask, tile, tile).expect("block mask");
            let after = BlockMask::new(&mask.permuted(&perm).expect("permute"), tile, tile)
                .expect("block mask");
            writeln!(
                out,
                "| {n} | {order} | {tile}×{tile} | {} | {} | {} | {ms:.0} |",
                before.active_tiles(),
                after.active_tiles(),
                before.total_tiles(),
            )
            .unwrap();
        }
    }
    out
}

/// `YYYY-MM-DD` (UTC) of the Unix time `secs` (Howard Hinnant's days-to-civil).
fn date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}")
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs (`nproc`), {model}")
}

/// Writes `section` into BENCHMARKS.md, replacing an earlier section with the same heading.
fn record(section: &str) -> std::io::Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# blockflash benchmarks\n".into());
    let new = match old.find(SECTION) {
        Some(start) => {
            let rest = &old[start + SECTION.len()..];
            let end = rest
                .find("\n## ")
                .map_or(old.len(), |i| start + SECTION.len() + i + 1);
            format!("{}{section}{}", &old[..start], &old[end..])
        }
        None => format!(
            "{}\n{section}",
            old.trim_end_matches('\n').to_string() + "\n"
        ),
    };
    std::fs::write(path, new)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (n, rcm_sizes, runs) = if bench {
        (16384, vec![4096, 16384], 15)
    } else {
        (1024, vec![512], 1)
    };
    let tiles = [64, 128];
    let bits = bits_table(n, &tiles, runs);
    let gens = generator_table(n, &tiles, runs);
    let rcm = rcm_table(&rcm_sizes, 128);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let section = format!(
        "{SECTION}\n\nMachine: {}. Date: {}. Command: `cargo bench --bench block_mask_build` \
         (release build; median of {runs} runs; `BlockMask::new` splits masks over 4 MiB across the cores, the generator fast paths run on one). The VM is shared with other work, so repeated runs differ by tens of percent.\n\n\
         ### From an arbitrary bit-packed {n} × {n} mask (target ≤ 20 ms)\n\n{bits}\n\
         ### From the generators, N = {n} (target ≤ 2 ms)\n\n\
         Fast path: `MaskSpec::block_mask`, which builds from each row's key intervals (a dilated window's: its key progression) without the \
         N² bits. Beside it, `BlockMask::new` from the generator's materialised mask (mask \
         construction not included).\n\n{gens}\n\
         ### Reverse Cuthill–McKee on the paper's synthetic mask\n\n\
         Symmetric, ones on the diagonal, P(i, j) = max(0.5·exp(−0.3|i − j|), 0.0002); in its \
         own order and with its tokens randomly shuffled. RCM ms is the permutation only.\n\n\
         {rcm}",
        machine(),
        date(now),
    );
    println!("{section}");
    if bench {
        record(&section).expect("write BENCHMARKS.md");
    }
}
