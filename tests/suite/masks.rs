//! Masks, block masks and RCM: block masks against brute-force classification, generators against
//! their definitions, fast-path block masks against the bit-built ones, RCM, and typed errors.

use std::time::{SystemTime, UNIX_EPOCH};

use blockflash::block_mask::NO_SLOT;
use blockflash::mask::{complete_tree_parents, MaskSpec, SplitMix64};
use blockflash::rcm::{rcm_report, reverse_cuthill_mckee};
use blockflash::{BlockMask, Error, Mask, TileState};

/// A fresh seed per run (printed, so a failure can be replayed with `BLOCKFLASH_SEED`).
fn seed(test: &str) -> u64 {
    let seed = std::env::var("BLOCKFLASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    println!("{test}: seed {seed} (replay with BLOCKFLASH_SEED={seed})");
    seed
}

fn pick<T: Copy>(rng: &mut SplitMix64, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

fn range(rng: &mut SplitMix64, lo: usize, hi_inclusive: usize) -> usize {
    lo + rng.below((hi_inclusive - lo + 1) as u64) as usize
}

const SIZES: [usize; 6] = [1, 17, 63, 65, 200, 513];

/// A random mask of one of several kinds: scattered elements of some density, unions of random
/// rectangles (which make full tiles), bands, or rows of random intervals.
fn random_mask(rng: &mut SplitMix64, seq_q: usize, seq_k: usize) -> Mask {
    let mut cells = vec![false; seq_q * seq_k];
    match rng.below(4) {
        0 => {
            let p = pick(rng, &[0.0, 0.01, 0.3, 0.97, 1.0]);
            cells.iter_mut().for_each(|c| *c = rng.next_f64() < p);
        }
        1 => {
            for _ in 0..range(rng, 0, 6) {
                let (q0, k0) = (range(rng, 0, seq_q - 1), range(rng, 0, seq_k - 1));
                let (q1, k1) = (range(rng, q0 + 1, seq_q), range(rng, k0 + 1, seq_k));
                for q in q0..q1 {
                    cells[q * seq_k + k0..q * seq_k + k1].fill(true);
                }
            }
        }
        2 => {
            let (lo, hi) = (range(rng, 0, 80) as i64, range(rng, 0, 80) as i64);
            for q in 0..seq_q {
                for k in 0..seq_k {
                    let d = q as i64 - k as i64;
                    cells[q * seq_k + k] = -hi <= d && d <= lo;
                }
            }
        }
        _ => {
            for q in 0..seq_q {
                for _ in 0..range(rng, 0, 3) {
                    let s = range(rng, 0, seq_k - 1);
                    let e = range(rng, s + 1, seq_k);
                    cells[q * seq_k + s..q * seq_k + e].fill(true);
                }
            }
        }
    }
    Mask::from_bools(seq_q, seq_k, &cells).unwrap()
}

/// The state of tile `(qt, kt)` by counting its in-range allowed pairs.
fn brute_state(mask: &Mask, b: usize, qt: usize, kt: usize, tr: usize, tc: usize) -> TileState {
    let (mut allowed, mut pairs) = (0, 0);
    for q in qt * tr..((qt + 1) * tr).min(mask.seq_q()) {
        for k in kt * tc..((kt + 1) * tc).min(mask.seq_k()) {
            pairs += 1;
            allowed += mask.get(b, q, k) as usize;
        }
    }
    match allowed {
        0 => TileState::Empty,
        a if a == pairs => TileState::Full,
        _ => TileState::Partial,
    }
}

/// Checks every form of `bm` against a brute-force classification of `mask`: states, statistics,
/// the CSR lists and slots, the run-length form (present exactly when eligible) and the bits.
fn check_block_mask(mask: &Mask, bm: &BlockMask) {
    let (tr, tc) = (bm.tile_rows(), bm.tile_cols());
    let (qts, kts) = (mask.seq_q().div_ceil(tr), mask.seq_k().div_ceil(tc));
    assert_eq!((bm.seq_q(), bm.seq_k()), (mask.seq_q(), mask.seq_k()));
    assert_eq!(
        (bm.q_tiles(), bm.k_tiles(), bm.batches()),
        (qts, kts, mask.batches())
    );
    assert_eq!(bm.total_tiles(), mask.batches() * qts * kts);
    assert_eq!(bm.row_ptr().len(), mask.batches() * qts + 1);
    let wpt = tc / 32;
    let slot_words = tr * wpt;
    let (mut full, mut partial, mut slot) = (0, 0, 0usize);
    let mut eligible = true;
    for b in 0..mask.batches() {
        for qt in 0..qts {
            let r = b * qts + qt;
            let states: Vec<TileState> = (0..kts)
                .map(|kt| brute_state(mask, b, qt, kt, tr, tc))
                .collect();
            for (kt, &s) in states.iter().enumerate() {
                assert_eq!(
                    bm.state(b, qt, kt),
                    s,
                    "state of tile (b {b}, qt {qt}, kt {kt})"
                );
            }
            let of = |want: TileState| -> Vec<u32> {
                (0..kts as u32)
                    .filter(|&kt| states[kt as usize] == want)
                    .collect()
            };
            let (fulls, partials) = (of(TileState::Full), of(TileState::Partial));
            let row = &bm.cols()[bm.row_ptr()[r] as usize..bm.row_ptr()[r + 1] as usize];
            let nf = bm.full_count()[r] as usize;
            assert_eq!(nf, fulls.len(), "full count of row {r}");
            assert_eq!(&row[..nf], &fulls[..], "full tiles of row {r}");
            assert_eq!(&row[nf..], &partials[..], "partial tiles of row {r}");
            assert_eq!(
                bm.partial_base()[r] as usize,
                slot,
                "partial base of row {r}"
            );
            assert_eq!(bm.row_work(b, qt), fulls.len() + partials.len());
            for &kt in &partials {
                let bits = &bm.partial_bits()[slot * slot_words..(slot + 1) * slot_words];
                for i in 0..tr {
                    for w in 0..wpt {
                        let mut want = 0u32;
                        for bit in 0..32 {
                            let (q, k) = (qt * tr + i, kt as usize * tc + 32 * w + bit);
                            if q < mask.seq_q() && k < mask.seq_k() && mask.get(b, q, k) {
                                want |= 1 << bit;
                            }
                        }
                        assert_eq!(bits[i * wpt + w], want, "slot {slot} row {i} word {w}");
                    }
                }
                slot += 1;
            }
            full += fulls.len();
            partial += partials.len();
            let active: Vec<usize> = (0..kts)
                .filter(|&k| states[k] != TileState::Empty)
                .collect();
            let contiguous = |v: &[u32]| v.windows(2).all(|w| w[1] == w[0] + 1);
            let act: Vec<u32> = active.iter().map(|&k| k as u32).collect();
            eligible &= contiguous(&act) && contiguous(&fulls);
        }
    }
    assert_eq!(bm.partial_bits().len(), slot * slot_words);
    assert_eq!((bm.full_tiles(), bm.partial_tiles()), (full, partial));
    assert_eq!(bm.active_tiles(), full + partial);
    let total = bm.total_tiles() as f64;
    assert_eq!(bm.active_fraction(), (full + partial) as f64 / total);
    assert_eq!(bm.full_fraction(), full as f64 / total);
    assert_eq!(bm.partial_fraction(), partial as f64 / total);
    assert_eq!(
        bm.dense_mask_bytes(),
        (mask.batches() * mask.seq_q() * mask.seq_k()).div_ceil(8)
    );
    assert!(bm.mask_bytes() >= 4 * bm.partial_bits().len());
    assert_eq!(bm.run_length_eligible(), eligible);
    assert_eq!(bm.runs().is_some(), eligible);
    if let Some(runs) = bm.runs() {
        check_runs(bm, runs);
    }
}

/// Each run entry describes exactly the row's states, with the documented conventions for rows
/// without full tiles and empty rows.
fn check_runs(bm: &BlockMask, runs: &[[u32; 4]]) {
    assert_eq!(runs.len(), bm.batches() * bm.q_tiles());
    for (r, &[begin, end, fb, fe]) in runs.iter().enumerate() {
        let (b, qt) = (r / bm.q_tiles(), r % bm.q_tiles());
        assert!(begin <= fb && fb <= fe && fe <= end, "run {r} out of order");
        if begin == end {
            assert_eq!([begin, end, fb, fe], [0; 4], "empty row {r}");
        }
        if fb == fe {
            assert_eq!(fb, begin, "row {r} without full tiles");
        }
        for kt in 0..bm.k_tiles() as u32 {
            let want = if (fb..fe).contains(&kt) {
                TileState::Full
            } else if (begin..end).contains(&kt) {
                TileState::Partial
            } else {
                TileState::Empty
            };
            assert_eq!(bm.state(b, qt, kt as usize), want, "run {r}, key tile {kt}");
        }
    }
}

#[test]
fn block_mask_matches_brute_force_on_random_masks() {
    let mut rng = SplitMix64::new(seed("block_mask_matches_brute_force_on_random_masks"));
    for case in 0..300 {
        let size = |rng: &mut SplitMix64| {
            if rng.below(2) == 0 {
                pick(rng, &SIZES)
            } else {
                range(rng, 1, 300)
            }
        };
        let (seq_q, seq_k) = (size(&mut rng), size(&mut rng));
        let tr = if rng.below(2) == 0 {
            pick(&mut rng, &[1, 16, 32, 64, 128])
        } else {
            range(&mut rng, 1, 128)
        };
        let tc = pick(&mut rng, &[32, 64, 128]);
        let mask = random_mask(&mut rng, seq_q, seq_k);
        println!("case {case}: {seq_q} x {seq_k}, tiles {tr} x {tc}");
        check_block_mask(&mask, &BlockMask::new(&mask, tr, tc).unwrap());
    }
}

#[test]
fn block_mask_of_per_batch_mask_indexes_rows_by_batch_then_query_tile() {
    let mut rng = SplitMix64::new(seed(
        "block_mask_of_per_batch_mask_indexes_rows_by_batch_then_query_tile",
    ));
    for _ in 0..6 {
        let (seq_q, seq_k) = (range(&mut rng, 1, 150), range(&mut rng, 1, 150));
        let masks: Vec<Mask> = (0..3)
            .map(|_| random_mask(&mut rng, seq_q, seq_k))
            .collect();
        let mask = Mask::per_batch(masks.clone()).unwrap();
        let (tr, tc) = (range(&mut rng, 1, 64), pick(&mut rng, &[32, 64]));
        let bm = BlockMask::new(&mask, tr, tc).unwrap();
        check_block_mask(&mask, &bm);
        for (b, m) in masks.iter().enumerate() {
            let one = BlockMask::new(m, tr, tc).unwrap();
            for qt in 0..bm.q_tiles() {
                for kt in 0..bm.k_tiles() {
                    assert_eq!(bm.state(b, qt, kt), one.state(0, qt, kt));
                }
            }
        }
    }
}

#[test]
fn block_mask_of_large_mask_built_on_several_threads_matches_brute_force() {
    // Above 2^20 mask words BlockMask::new splits its passes over threads; a per-batch mask also
    // puts the split between batch elements.
    let mut rng = SplitMix64::new(seed(
        "block_mask_of_large_mask_built_on_several_threads_matches_brute_force",
    ));
    let (seq_q, seq_k) = (range(&mut rng, 4000, 4200), range(&mut rng, 4000, 4200));
    let masks: Vec<Mask> = (0..2)
        .map(|_| random_mask(&mut rng, seq_q, seq_k))
        .collect();
    let mask = Mask::per_batch(masks).unwrap();
    let tr = range(&mut rng, 1, 128);
    println!("{seq_q} x {seq_k}, tiles {tr} x 64");
    check_block_mask(&mask, &BlockMask::new(&mask, tr, 64).unwrap());

    let n = range(&mut rng, 5800, 6000);
    let spec = MaskSpec::RandomBlocks {
        seq_q: n,
        seq_k: n,
        block: 100,
        p: 0.3,
        seed: rng.next_u64(),
    };
    let threaded = BlockMask::new(&spec.mask().unwrap(), 96, 128).unwrap();
    assert!(threaded == spec.block_mask(96, 128).unwrap());
}

#[test]
fn row_with_two_separate_full_runs_is_not_run_length_eligible() {
    // One query tile of 32 rows over 5 key tiles: full, empty, full, partial, full.
    let mask = Mask::from_fn(32, 160, |q, k| match k / 32 {
        0 | 2 | 4 => true,
        3 => q % 2 == 0,
        _ => false,
    })
    .unwrap();
    let bm = BlockMask::new(&mask, 32, 32).unwrap();
    assert!(!bm.run_length_eligible());
    assert_eq!(bm.runs(), None);
    assert_eq!(bm.cols(), &[0, 2, 4, 3]);
    assert_eq!(bm.full_count(), &[3]);
    assert_eq!(bm.partial_base(), &[0]);
    check_block_mask(&mask, &bm);

    // Full runs separated by a partial tile (no empty gap) are not eligible either.
    let mask = Mask::from_fn(32, 96, |q, k| k / 32 != 1 || q == 0).unwrap();
    let bm = BlockMask::new(&mask, 32, 32).unwrap();
    assert!(!bm.run_length_eligible());
    assert_eq!((bm.cols(), bm.full_count()), (&[0, 2, 1][..], &[2][..]));
    check_block_mask(&mask, &bm);

    // The same row shape with one full run is eligible: partial, full, full, partial.
    let mask = Mask::from_fn(32, 128, |q, k| (1..3).contains(&(k / 32)) || q == k % 32).unwrap();
    let bm = BlockMask::new(&mask, 32, 32).unwrap();
    assert_eq!(bm.runs(), Some(&[[0, 4, 1, 3]][..]));
}

#[test]
fn transposed_lists_match_states_and_point_at_the_same_bits() {
    let mut rng = SplitMix64::new(seed(
        "transposed_lists_match_states_and_point_at_the_same_bits",
    ));
    for _ in 0..12 {
        let (seq_q, seq_k) = (range(&mut rng, 1, 260), range(&mut rng, 1, 260));
        let batches = range(&mut rng, 1, 3);
        let masks: Vec<Mask> = (0..batches)
            .map(|_| random_mask(&mut rng, seq_q, seq_k))
            .collect();
        let mask = if batches == 1 {
            masks[0].clone()
        } else {
            Mask::per_batch(masks).unwrap()
        };
        let (tr, tc) = (range(&mut rng, 1, 64), pick(&mut rng, &[32, 64]));
        let bm = BlockMask::new(&mask, tr, tc).unwrap();
        let t = bm.transposed();
        assert_eq!(
            (t.q_tiles(), t.k_tiles(), t.batches()),
            (bm.q_tiles(), bm.k_tiles(), batches)
        );
        assert_eq!(t.col_ptr().len(), batches * bm.k_tiles() + 1);
        assert_eq!(t.rows().len(), bm.active_tiles());
        for b in 0..batches {
            for kt in 0..bm.k_tiles() {
                let c = b * bm.k_tiles() + kt;
                let entries = t.col_ptr()[c] as usize..t.col_ptr()[c + 1] as usize;
                let nf = t.full_count()[c] as usize;
                let of = |want| -> Vec<u32> {
                    (0..bm.q_tiles() as u32)
                        .filter(|&qt| bm.state(b, qt as usize, kt) == want)
                        .collect()
                };
                let rows = &t.rows()[entries.clone()];
                assert_eq!(&rows[..nf], &of(TileState::Full)[..]);
                assert_eq!(&rows[nf..], &of(TileState::Partial)[..]);
                let slots = &t.slots()[entries];
                assert!(slots[..nf].iter().all(|&s| s == NO_SLOT));
                for (&qt, &slot) in rows[nf..].iter().zip(&slots[nf..]) {
                    // The forward CSR gives the same slot for (b, qt, kt).
                    let r = b * bm.q_tiles() + qt as usize;
                    let start = (bm.row_ptr()[r] + bm.full_count()[r]) as usize;
                    let end = bm.row_ptr()[r + 1] as usize;
                    let j = bm.cols()[start..end].iter().position(|&k| k as usize == kt);
                    assert_eq!(Some(slot), j.map(|j| bm.partial_base()[r] + j as u32));
                }
            }
        }
    }
}

#[test]
fn display_draws_one_cell_per_tile_and_downsamples_wide_masks() {
    let mask = Mask::causal(100, 100).unwrap();
    let bm = BlockMask::new(&mask, 32, 32).unwrap();
    let text = bm.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("active"), "header: {}", lines[0]);
    assert_eq!(&lines[1..], &["░...", "█░..", "██░.", "███░"]);

    // 100 x 100 tiles -> cells of 2 x 2 tiles, 50 x 50 characters.
    let bm = BlockMask::new(&Mask::causal(3200, 3200).unwrap(), 32, 32).unwrap();
    let text = bm.to_string();
    let pictures: Vec<&str> = text.lines().skip(2).collect();
    assert_eq!(pictures.len(), 50);
    assert!(pictures.iter().all(|l| l.chars().count() == 50));
    // A cell shows its most active tile: the full tile below the diagonal wins.
    assert!(pictures[0].starts_with("█."));
    assert!(pictures[49].chars().all(|c| c == '█'));

    // Per-batch: one picture per element.
    let two = Mask::per_batch(vec![
        Mask::causal(64, 64).unwrap(),
        Mask::full(64, 64).unwrap(),
    ]);
    let text = BlockMask::new(&two.unwrap(), 32, 32).unwrap().to_string();
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(lines, ["batch 0:", "░.", "█░", "batch 1:", "██", "██"]);
}

#[test]
fn mask_constructors_agree_and_store_the_documented_bit_layout() {
    let mut rng = SplitMix64::new(seed(
        "mask_constructors_agree_and_store_the_documented_bit_layout",
    ));
    for _ in 0..10 {
        let (seq_q, seq_k) = (range(&mut rng, 1, 100), range(&mut rng, 1, 100));
        let p = rng.next_f64();
        let cells: Vec<bool> = (0..seq_q * seq_k).map(|_| rng.next_f64() < p).collect();
        let bytes: Vec<u8> = cells
            .iter()
            .map(|&c| c as u8 * range(&mut rng, 1, 255) as u8)
            .collect();
        let a = Mask::from_bools(seq_q, seq_k, &cells).unwrap();
        assert_eq!(a, Mask::from_bytes(seq_q, seq_k, &bytes).unwrap());
        assert_eq!(
            a,
            Mask::from_fn(seq_q, seq_k, |q, k| cells[q * seq_k + k]).unwrap()
        );
        let wpr = seq_k.div_ceil(32);
        assert_eq!(
            (a.seq_q(), a.seq_k(), a.words_per_row()),
            (seq_q, seq_k, wpr)
        );
        assert_eq!((a.batches(), a.is_per_batch()), (1, false));
        for q in 0..seq_q {
            for k in 0..seq_k {
                let bit = a.words(0)[q * wpr + k / 32] >> (k % 32) & 1 == 1;
                assert_eq!(bit, cells[q * seq_k + k]);
                assert_eq!(a.get(5, q, k), bit, "b is ignored for a shared mask");
            }
        }
        assert_eq!(a.count_allowed(0), cells.iter().filter(|&&c| c).count());
        // from_words keeps the bits and clears padding beyond seq_k.
        let mut noisy = a.words(0).to_vec();
        if seq_k % 32 != 0 {
            for row in noisy.chunks_exact_mut(wpr) {
                row[wpr - 1] |= !0u32 << (seq_k % 32);
            }
        }
        assert_eq!(Mask::from_words(seq_q, seq_k, noisy).unwrap(), a);
    }
    assert_eq!(Mask::full(5, 40).unwrap().count_allowed(0), 200);
    assert_eq!(Mask::empty(5, 40).unwrap().count_allowed(0), 0);
    assert_eq!(
        Mask::full(5, 40).unwrap().words(0)[1],
        0xff,
        "padding is zero"
    );
}

#[test]
fn per_batch_masks_keep_each_element() {
    let a = Mask::causal(20, 33).unwrap();
    let b = Mask::full(20, 33).unwrap();
    let m = Mask::per_batch(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!((m.batches(), m.is_per_batch()), (2, true));
    assert_eq!((m.batch(0), m.batch(1)), (a.clone(), b.clone()));
    assert_eq!(m.words(1), b.words(0));
    assert_eq!(m.count_allowed(0), a.count_allowed(0));
    assert!(!m.get(0, 0, 20) && m.get(1, 0, 20));
    assert_eq!(a.batch(3), a);
}

#[test]
fn permuted_mask_moves_pairs_and_inverse_permutation_restores_it() {
    let mut rng = SplitMix64::new(seed(
        "permuted_mask_moves_pairs_and_inverse_permutation_restores_it",
    ));
    for _ in 0..5 {
        let n = range(&mut rng, 1, 140);
        let mask = random_mask(&mut rng, n, n);
        let perm = shuffled(&mut rng, n);
        let moved = mask.permuted(&perm).unwrap();
        for i in 0..n {
            for j in 0..n {
                assert_eq!(
                    moved.get(0, i, j),
                    mask.get(0, perm[i] as usize, perm[j] as usize)
                );
            }
        }
        let mut inverse = vec![0u32; n];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p as usize] = i as u32;
        }
        assert_eq!(moved.permuted(&inverse).unwrap(), mask);
        let two = Mask::per_batch(vec![mask.clone(), moved.clone()]).unwrap();
        assert_eq!(two.permuted(&perm).unwrap().batch(0), moved);
    }
}

fn shuffled(rng: &mut SplitMix64, n: usize) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    perm
}

/// `spec.mask()` equals the definition, and `spec.block_mask()` (fast path where the generator has
/// one) equals the bit-built block mask and the brute-force classification, for a few tile shapes.
fn check_generator(spec: &MaskSpec, definition: impl Fn(usize, usize) -> bool) {
    let mask = spec.mask().unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let want = Mask::from_fn(mask.seq_q(), mask.seq_k(), definition).unwrap();
    assert!(mask == want, "{spec:?} differs from its definition");
    for (tr, tc) in [(1, 32), (16, 32), (64, 64), (37, 128)] {
        let fast = spec.block_mask(tr, tc).unwrap();
        let slow = BlockMask::new(&mask, tr, tc).unwrap();
        assert!(
            fast == slow,
            "{spec:?}: fast path differs for tiles {tr} x {tc}"
        );
        if mask.seq_q() * mask.seq_k() <= 300 * 300 {
            check_block_mask(&mask, &fast);
        }
    }
}

#[test]
fn causal_and_window_generators_match_their_definitions() {
    for (sq, sk) in [(1, 1), (50, 50), (30, 77), (77, 30), (129, 129), (200, 65)] {
        let shift = sk as i64 - sq as i64;
        check_generator(
            &MaskSpec::Causal {
                seq_q: sq,
                seq_k: sk,
            },
            |q, k| k as i64 <= q as i64 + shift,
        );
        check_generator(
            &MaskSpec::Full {
                seq_q: sq,
                seq_k: sk,
            },
            |_, _| true,
        );
        for window in [1, 3, 40, 500] {
            for causal in [true, false] {
                let spec = MaskSpec::SlidingWindow {
                    seq_q: sq,
                    seq_k: sk,
                    window,
                    causal,
                };
                check_generator(&spec, |q, k| {
                    let d = q as i64 + shift - k as i64;
                    let w = window as i64;
                    if causal {
                        0 <= d && d < w
                    } else {
                        d.abs() < w
                    }
                });
            }
        }
    }
    for (seq, window, dilation) in [
        (100, 4, 3),
        (257, 10, 7),
        (64, 1, 5),
        (90, 6, 1),
        (5, 9, 9),
        (300, 5, 40),
        (161, 7, 2),
        (129, 3, 32),
        (200, 30, 31),
    ] {
        for causal in [true, false] {
            let spec = MaskSpec::DilatedWindow {
                seq,
                window,
                dilation,
                causal,
            };
            check_generator(&spec, |q, k| {
                let (d, span) = (q as i64 - k as i64, (window * dilation) as i64);
                d % dilation as i64 == 0
                    && if causal {
                        0 <= d && d < span
                    } else {
                        d.abs() < span
                    }
            });
        }
    }
    assert_eq!(
        Mask::dilated_window(70, 5, 1, true).unwrap(),
        Mask::sliding_window(70, 70, 5, true).unwrap()
    );
}

#[test]
fn document_generators_match_their_definitions() {
    let mut rng = SplitMix64::new(seed("document_generators_match_their_definitions"));
    for _ in 0..6 {
        let lengths: Vec<usize> = (0..range(&mut rng, 1, 8))
            .map(|_| range(&mut rng, 1, 60))
            .collect();
        let doc: Vec<usize> = lengths
            .iter()
            .enumerate()
            .flat_map(|(d, &l)| std::iter::repeat_n(d, l))
            .collect();
        let start: Vec<usize> = (0..doc.len())
            .map(|i| doc.iter().position(|&d| d == doc[i]).unwrap())
            .collect();
        for causal in [true, false] {
            let spec = MaskSpec::Documents {
                lengths: lengths.clone(),
                causal,
            };
            check_generator(&spec, |q, k| doc[q] == doc[k] && (!causal || k <= q));
        }
        let prefix: Vec<usize> = lengths.iter().map(|&l| range(&mut rng, 0, l)).collect();
        let spec = MaskSpec::DocumentPrefixLm {
            lengths: lengths.clone(),
            prefix_lens: prefix.clone(),
        };
        check_generator(&spec, |q, k| {
            doc[q] == doc[k] && (k < start[q] + prefix[doc[q]] || k <= q)
        });
        let frac = rng.next_f64();
        let by_fraction = Mask::document_prefix_lm_fraction(&lengths, frac).unwrap();
        let floors: Vec<usize> = lengths
            .iter()
            .map(|&l| (frac * l as f64) as usize)
            .collect();
        assert_eq!(
            by_fraction,
            Mask::document_prefix_lm(&lengths, &floors).unwrap()
        );
        let n = doc.len();
        assert_eq!(
            Mask::documents_for_seq(n, &lengths, true).unwrap(),
            Mask::documents(&lengths, true).unwrap()
        );
    }
}

#[test]
fn longformer_and_bigbird_generators_match_their_definitions() {
    let mut rng = SplitMix64::new(seed(
        "longformer_and_bigbird_generators_match_their_definitions",
    ));
    for _ in 0..5 {
        let seq = range(&mut rng, 1, 300);
        let window = range(&mut rng, 0, 20);
        let global: Vec<usize> = (0..range(&mut rng, 0, 6))
            .map(|_| range(&mut rng, 0, seq - 1))
            .collect();
        let spec = MaskSpec::Longformer {
            seq,
            window,
            global: global.clone(),
        };
        check_generator(&spec, |q, k| {
            q.abs_diff(k) <= window || global.contains(&q) || global.contains(&k)
        });

        let block = range(&mut rng, 1, 40);
        let nb = seq.div_ceil(block);
        let r = range(&mut rng, 0, nb.min(3));
        let num_global = range(&mut rng, 0, 5.min(seq));
        let s = rng.next_u64();
        let spec = MaskSpec::BigBird {
            seq,
            window,
            num_global,
            block,
            random_blocks_per_row: r,
            seed: s,
        };
        let mask = spec.mask().unwrap();
        let base = |q: usize, k: usize| q.abs_diff(k) <= window || q < num_global || k < num_global;
        // Beyond band and globals, each query block sees whole key blocks, at most r of them.
        for qb in 0..nb {
            let queries: Vec<usize> = (qb * block..((qb + 1) * block).min(seq))
                .filter(|&q| q >= num_global)
                .collect();
            let mut extra_blocks = 0;
            for kb in 0..nb {
                let keys = kb * block..((kb + 1) * block).min(seq);
                let any_extra = queries
                    .iter()
                    .any(|&q| keys.clone().any(|k| mask.get(0, q, k) && !base(q, k)));
                if any_extra {
                    extra_blocks += 1;
                    for &q in &queries {
                        assert!(
                            keys.clone().all(|k| mask.get(0, q, k)),
                            "partial random block"
                        );
                    }
                }
            }
            assert!(
                extra_blocks <= r,
                "query block {qb}: {extra_blocks} random blocks > {r}"
            );
        }
        check_generator(&spec, |q, k| mask.get(0, q, k));
        assert!((0..seq).all(|q| (0..seq).all(|k| !base(q, k) || mask.get(0, q, k))));
        assert_eq!(
            Mask::bigbird(seq, window, num_global, block, r, s).unwrap(),
            mask
        );
    }
    // Every block random: everything is seen.
    let all = Mask::bigbird(100, 0, 0, 10, 10, 1).unwrap();
    assert_eq!(all, Mask::full(100, 100).unwrap());
}

/// Parent array of a random forest whose parents may come before or after their children.
fn random_forest(rng: &mut SplitMix64, n: usize) -> Vec<Option<usize>> {
    let order = shuffled(rng, n);
    let mut parents = vec![None; n];
    for i in 1..n {
        if rng.below(8) != 0 {
            parents[order[i] as usize] = Some(order[range(rng, 0, i - 1)] as usize);
        }
    }
    parents
}

fn is_ancestor_or_self(parents: &[Option<usize>], node: usize, k: usize) -> bool {
    let mut v = Some(node);
    while let Some(x) = v {
        if x == k {
            return true;
        }
        v = parents[x];
    }
    false
}

/// The definition of `Mask::tree_with_prefix`.
fn tree_sees(parents: &[Option<usize>], prefix_len: usize, q: usize, k: usize) -> bool {
    if q < prefix_len {
        k <= q
    } else {
        k < prefix_len || is_ancestor_or_self(parents, q - prefix_len, k - prefix_len)
    }
}

#[test]
fn tree_generators_match_their_definitions() {
    let mut rng = SplitMix64::new(seed("tree_generators_match_their_definitions"));
    for _ in 0..6 {
        let n = range(&mut rng, 1, 120);
        let parents = random_forest(&mut rng, n);
        for prefix_len in [0, range(&mut rng, 1, 40)] {
            let spec = MaskSpec::Tree {
                prefix_len,
                parents: parents.clone(),
            };
            check_generator(&spec, |q, k| tree_sees(&parents, prefix_len, q, k));
        }
    }
    // A chain deeper than the interval path's limit (built from bits) plus a side branch.
    let mut deep: Vec<Option<usize>> = (0..150usize).map(|i| i.checked_sub(1)).collect();
    deep.extend([Some(70), Some(150), Some(0)]);
    for prefix_len in [0, 9] {
        let spec = MaskSpec::Tree {
            prefix_len,
            parents: deep.clone(),
        };
        check_generator(&spec, |q, k| tree_sees(&deep, prefix_len, q, k));
    }
    // Complete trees: node count and breadth-first parents.
    for (depth, branching) in [(0, 3), (1, 1), (3, 2), (2, 4), (4, 3)] {
        let parents = complete_tree_parents(depth, branching).unwrap();
        let count: usize = (0..=depth as u32).map(|l| branching.pow(l)).sum();
        assert_eq!(parents.len(), count);
        assert!(parents
            .iter()
            .enumerate()
            .all(|(i, &p)| p == (i > 0).then(|| (i - 1) / branching)));
        assert_eq!(
            Mask::complete_tree(depth, branching).unwrap(),
            Mask::tree(&parents).unwrap()
        );
    }
    let mask = Mask::complete_tree(2, 2).unwrap();
    // Node 5 = child 0 of node 2, a child of the root: it sees 0, 2 and 5.
    assert_eq!(
        (0..7).filter(|&k| mask.get(0, 5, k)).collect::<Vec<_>>(),
        [0, 2, 5]
    );
}

#[test]
fn random_generators_match_their_definitions() {
    let mut rng = SplitMix64::new(seed("random_generators_match_their_definitions"));
    for _ in 0..4 {
        let (sq, sk) = (range(&mut rng, 1, 200), range(&mut rng, 1, 200));
        let (p, s) = (rng.next_f64(), rng.next_u64());
        check_generator(
            &MaskSpec::Random {
                seq_q: sq,
                seq_k: sk,
                p,
                seed: s,
            },
            |q, k| SplitMix64::unit(SplitMix64::at(s, (q * sk + k) as u64)) < p,
        );
        for (sq, sk) in [(sq, sk), (sq, sq)] {
            let block = range(&mut rng, 1, 70);
            let nbk = sk.div_ceil(block);
            let spec = MaskSpec::RandomBlocks {
                seq_q: sq,
                seq_k: sk,
                block,
                p,
                seed: s,
            };
            check_generator(&spec, |q, k| {
                let (i, j) = (q / block, k / block);
                sq == sk && i == j || SplitMix64::unit(SplitMix64::at(s, (i * nbk + j) as u64)) < p
            });
        }
    }
    let mut a = SplitMix64::new(42);
    let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
    assert_eq!(
        first,
        (0..5).map(|i| SplitMix64::at(42, i)).collect::<Vec<_>>()
    );
    assert_eq!(Mask::random(30, 30, 0.0, 1).unwrap().count_allowed(0), 0);
    assert_eq!(Mask::random(30, 30, 1.0, 1).unwrap().count_allowed(0), 900);
}

#[test]
fn fast_path_block_masks_equal_bit_built_ones_at_larger_sizes() {
    let mut rng = SplitMix64::new(seed(
        "fast_path_block_masks_equal_bit_built_ones_at_larger_sizes",
    ));
    let n = range(&mut rng, 1500, 2100);
    let lengths: Vec<usize> = {
        let mut left = n;
        let mut v = Vec::new();
        while left > 0 {
            let l = range(&mut rng, 1, 400).min(left);
            v.push(l);
            left -= l;
        }
        v
    };
    let specs = [
        MaskSpec::Causal { seq_q: n, seq_k: n },
        MaskSpec::Causal {
            seq_q: n / 3,
            seq_k: n,
        },
        MaskSpec::SlidingWindow {
            seq_q: n,
            seq_k: n,
            window: 300,
            causal: true,
        },
        MaskSpec::SlidingWindow {
            seq_q: n,
            seq_k: n,
            window: 77,
            causal: false,
        },
        MaskSpec::DilatedWindow {
            seq: n,
            window: 40,
            dilation: 3,
            causal: false,
        },
        MaskSpec::Documents {
            lengths: lengths.clone(),
            causal: true,
        },
        MaskSpec::document_prefix_lm_fraction(&lengths, 0.3).unwrap(),
        MaskSpec::Longformer {
            seq: n,
            window: 64,
            global: vec![0, 1, 2, 500, n - 1],
        },
        MaskSpec::BigBird {
            seq: n,
            window: 64,
            num_global: 32,
            block: 64,
            random_blocks_per_row: 3,
            seed: rng.next_u64(),
        },
        MaskSpec::Tree {
            prefix_len: 5,
            parents: random_forest(&mut rng, n - 5),
        },
        MaskSpec::RandomBlocks {
            seq_q: n,
            seq_k: n,
            block: 96,
            p: 0.1,
            seed: rng.next_u64(),
        },
    ];
    for spec in &specs {
        let mask = spec.mask().unwrap();
        for (tr, tc) in [(64, 64), (128, 128), (50, 96)] {
            let fast = spec.block_mask(tr, tc).unwrap();
            let slow = BlockMask::new(&mask, tr, tc).unwrap();
            assert!(
                fast == slow,
                "{spec:?}: fast path differs for tiles {tr} x {tc}"
            );
            assert!(slow.runs().is_some() || !matches!(spec, MaskSpec::Causal { .. }));
        }
    }
}

#[test]
fn rcm_returns_a_permutation() {
    let mut rng = SplitMix64::new(seed("rcm_returns_a_permutation"));
    let mut masks = vec![
        Mask::empty(50, 50).unwrap(),
        Mask::full(70, 70).unwrap(),
        Mask::documents(&[5, 1, 40, 3], false).unwrap(),
        Mask::causal(1, 1).unwrap(),
    ];
    for _ in 0..8 {
        let n = range(&mut rng, 1, 400);
        masks.push(random_mask(&mut rng, n, n));
    }
    for mask in &masks {
        let perm = reverse_cuthill_mckee(mask).unwrap();
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..mask.seq_q() as u32).collect::<Vec<_>>());
        let report = rcm_report(mask, 32, 32).unwrap();
        assert_eq!(report.perm, perm);
        assert_eq!(
            report.active_before,
            BlockMask::new(mask, 32, 32).unwrap().active_tiles()
        );
        let after = BlockMask::new(&mask.permuted(&perm).unwrap(), 32, 32).unwrap();
        assert_eq!(report.active_after, after.active_tiles());
    }
}

#[test]
fn rcm_packs_a_shuffled_band_back_to_at_most_twice_its_tiles() {
    let mut rng = SplitMix64::new(seed(
        "rcm_packs_a_shuffled_band_back_to_at_most_twice_its_tiles",
    ));
    let band = Mask::sliding_window(512, 512, 9, false).unwrap(); // |i - j| <= 8
    let band_tiles = BlockMask::new(&band, 32, 32).unwrap().active_tiles();
    let shuffled_band = band.permuted(&shuffled(&mut rng, 512)).unwrap();
    let report = rcm_report(&shuffled_band, 32, 32).unwrap();
    println!(
        "band {band_tiles} tiles, shuffled {}, after RCM {}",
        report.active_before, report.active_after
    );
    assert!(report.active_before > 4 * band_tiles);
    assert!(report.active_after <= 2 * band_tiles);

    // A one-sided band (|i - j| <= 8, j <= i) is the same graph once symmetrised.
    let lower = Mask::sliding_window(512, 512, 9, true).unwrap();
    let report = rcm_report(&lower.permuted(&shuffled(&mut rng, 512)).unwrap(), 32, 32).unwrap();
    assert!(report.active_after <= 2 * band_tiles);
}

#[test]
fn bad_input_gives_typed_errors() {
    use Error::*;
    let ok = Mask::causal(8, 8).unwrap();
    let shape = |r: Result<Mask, Error>| matches!(r, Err(ShapeMismatch { .. }));
    let invalid = |r: Result<Mask, Error>| matches!(r, Err(InvalidArgument { .. }));
    let tree = |r: Result<Mask, Error>| matches!(r, Err(InvalidTree(_)));
    assert!(shape(Mask::from_bools(3, 4, &[true; 11])));
    assert!(shape(Mask::from_bytes(3, 4, &[1; 13])));
    assert!(shape(Mask::from_words(3, 40, vec![0; 3])));
    assert!(shape(Mask::per_batch(vec![
        ok.clone(),
        Mask::causal(8, 9).unwrap()
    ])));
    assert!(invalid(Mask::per_batch(vec![Mask::per_batch(vec![
        ok.clone()
    ])
    .unwrap()])));
    assert!(matches!(Mask::per_batch(vec![]), Err(Empty(_))));
    assert!(matches!(Mask::causal(0, 5), Err(Empty(_))));
    assert!(matches!(Mask::from_fn(5, 0, |_, _| true), Err(Empty(_))));
    assert!(matches!(
        Mask::documents_for_seq(10, &[3, 4], true),
        Err(DocumentLengths { sum: 7, seq: 10 })
    ));
    assert!(matches!(Mask::documents(&[], true), Err(Empty(_))));
    assert!(invalid(Mask::documents(&[3, 0, 2], true)));
    assert!(shape(Mask::document_prefix_lm(&[3, 4], &[1])));
    assert!(invalid(Mask::document_prefix_lm(&[3, 4], &[1, 5])));
    assert!(invalid(Mask::document_prefix_lm_fraction(&[3, 4], 1.5)));
    assert!(tree(Mask::tree(&[None, Some(2), Some(1)])), "cycle");
    assert!(tree(Mask::tree(&[Some(0)])), "own parent");
    assert!(tree(Mask::tree(&[None, Some(7)])), "out-of-range parent");
    assert!(matches!(Mask::tree(&[]), Err(Empty(_))));
    assert!(matches!(
        complete_tree_parents(3, 0),
        Err(InvalidArgument { .. })
    ));
    assert!(matches!(
        complete_tree_parents(64, 2),
        Err(InvalidArgument { .. })
    ));
    // refused at once, not after counting 2^32 levels of one node
    assert!(matches!(
        complete_tree_parents(usize::MAX, 1),
        Err(InvalidArgument { .. })
    ));
    assert!(invalid(Mask::sliding_window(8, 8, 0, true)));
    assert!(invalid(Mask::dilated_window(8, 0, 2, true)));
    assert!(invalid(Mask::dilated_window(8, 2, 0, true)));
    assert!(invalid(Mask::longformer(8, 2, &[8])));
    assert!(invalid(Mask::bigbird(8, 2, 9, 4, 1, 0)));
    assert!(invalid(Mask::bigbird(8, 2, 1, 0, 1, 0)));
    assert!(invalid(Mask::bigbird(8, 2, 1, 4, 3, 0)));
    for p in [-0.1, 1.1, f64::NAN] {
        assert!(invalid(Mask::random(8, 8, p, 0)), "density {p}");
        assert!(
            invalid(Mask::random_blocks(8, 8, 2, p, 0)),
            "block density {p}"
        );
    }
    assert!(invalid(Mask::random_blocks(8, 8, 0, 0.5, 0)));
    assert!(matches!(ok.permuted(&[0, 1]), Err(ShapeMismatch { .. })));
    assert!(invalid(ok.permuted(&[0, 1, 2, 3, 4, 5, 6, 6])));
    assert!(matches!(
        Mask::causal(4, 5).unwrap().permuted(&[0; 4]),
        Err(NotSquare { .. })
    ));

    let rect = Mask::causal(8, 16).unwrap();
    assert!(matches!(
        reverse_cuthill_mckee(&rect),
        Err(NotSquare {
            seq_q: 8,
            seq_k: 16
        })
    ));
    assert!(matches!(rcm_report(&rect, 32, 32), Err(NotSquare { .. })));
    let two = Mask::per_batch(vec![ok.clone(), ok.clone()]).unwrap();
    assert!(matches!(
        reverse_cuthill_mckee(&two),
        Err(InvalidArgument { .. })
    ));

    for (tr, tc) in [(0, 32), (16, 0), (16, 48), (16, 16)] {
        assert!(matches!(
            BlockMask::new(&ok, tr, tc),
            Err(InvalidArgument { .. })
        ));
        let spec = MaskSpec::Causal { seq_q: 8, seq_k: 8 };
        assert!(matches!(
            spec.block_mask(tr, tc),
            Err(InvalidArgument { .. })
        ));
        let rows = BlockMask::from_row_intervals(8, 8, tr, tc, |q, out| out.push(0..q + 1));
        assert!(matches!(rows, Err(InvalidArgument { .. })));
    }
    assert!(matches!(
        BlockMask::from_row_intervals(0, 8, 16, 32, |_, _| {}),
        Err(Empty(_))
    ));
}

#[test]
fn windows_past_the_sequence_and_huge_tiles_stay_well_defined() {
    // A window longer than the sequence allows what the whole sequence allows.
    let n = 8;
    let causal = Mask::causal(n, n).unwrap();
    let wide = Mask::sliding_window(n, n, usize::MAX, true).unwrap();
    assert_eq!(wide.words(0), causal.words(0));
    let band = Mask::sliding_window(n, n, usize::MAX, false).unwrap();
    assert_eq!(band.count_allowed(0), n * n);
    let longformer = Mask::longformer(n, usize::MAX, &[]).unwrap();
    assert_eq!(longformer.count_allowed(0), n * n);
    // Tiles beyond any kernel's are refused, not allocated.
    for (rows, cols) in [(usize::MAX, 32), (1 << 62, 32), (32, 1 << 62), (8192, 32)] {
        assert!(
            matches!(
                BlockMask::new(&causal, rows, cols),
                Err(Error::InvalidArgument { .. })
            ),
            "{rows}x{cols}"
        );
        let spec = MaskSpec::Causal { seq_q: n, seq_k: n };
        assert!(
            matches!(
                spec.block_mask(rows, cols),
                Err(Error::InvalidArgument { .. })
            ),
            "{rows}x{cols}"
        );
    }
}
