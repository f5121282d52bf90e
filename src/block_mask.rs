//! The three-state block mask of Binary Block Masking: one [`TileState`] per (query tile, key tile),
//! in the layouts the kernels read (sparse CSR list, run-length intervals, bit slots of partial
//! tiles) plus the transposed lists of the backward pass.

use std::fmt;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::mask::{mask_geometry, set_bit_range, set_strided, tail_bits, Mask};
use crate::parallel::{run_all, threads};

/// State of one (query tile, key tile) pair.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileState {
    /// No allowed pair: the tile is skipped.
    Empty = 0,
    /// Some pairs allowed: computed, with the tile's mask bits applied.
    Partial = 1,
    /// Every pair allowed: computed without reading mask bits.
    Full = 2,
}

/// Slot id of a full tile in [`TransposedBlockMask::slots`] (full tiles have no bits).
pub const NO_SLOT: u32 = u32::MAX;

/// The block mask of a [`Mask`] for `tile_rows × tile_cols` tiles (the kernel's `Br × Bc`).
///
/// **Rows.** A row of the block mask is one query tile of one batch element: `r = b * q_tiles + qt`
/// for `b` in `0..batches` (1 when the mask is shared by all batch elements).
///
/// **States at the edges.** A tile that sticks out past `seq_q` or `seq_k` is classified over its
/// in-range pairs only: `Full` iff all of them are allowed, `Empty` iff none is, else `Partial`; the
/// kernels bound-check the rest.
///
/// **Sparse-list (CSR) form.** Row `r`'s active key tiles are `cols[row_ptr[r]..row_ptr[r + 1]]`:
/// its `full_count[r]` full tiles first, then its partial ones, each group in key order.
///
/// **Run-length form** (only when [`run_length_eligible`](BlockMask::run_length_eligible)): per row
/// `[begin, end, full_begin, full_end]`; active tiles are `begin..end`, full ones
/// `full_begin..full_end`, partial ones `begin..full_begin` and `full_end..end`. A row without full
/// tiles has `full_begin == full_end == begin`; an empty row is all zeros.
///
/// **Partial slots.** Partial tiles are numbered in row order and within a row in key order; row
/// `r`'s are slots `partial_base[r] ..` (as many as it has partial tiles). Slot `s` is
/// `tile_rows * tile_cols / 32` words of `partial_bits` from `s * tile_rows * tile_cols / 32`; word
/// `w` of tile row `i` is at offset `i * tile_cols / 32 + w` and holds keys
/// `kt * tile_cols + 32 * w ..+ 32` of query `qt * tile_rows + i`, bit `k % 32` for key `k`. Bits of
/// queries `>= seq_q` or keys `>= seq_k` are zero.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockMask {
    seq_q: usize,
    seq_k: usize,
    tile_rows: usize,
    tile_cols: usize,
    q_tiles: usize,
    k_tiles: usize,
    batches: usize,
    states: Vec<TileState>,
    row_ptr: Vec<u32>,
    cols: Vec<u32>,
    full_count: Vec<u32>,
    partial_base: Vec<u32>,
    runs: Option<Vec<[u32; 4]>>,
    partial_bits: Vec<u32>,
}

/// Largest tile side a block mask takes (kernels run far smaller ones): a partial tile's bits
/// stay within 2 MiB.
const MAX_TILE_SIDE: usize = 4096;

/// Most tiles one block mask holds (one byte of state each: 4 GiB).
const MAX_TILES: u64 = 1 << 32;

/// Error unless a block mask of `batches` masks of `seq_q × seq_k` at these tiles holds at most
/// [`MAX_TILES`] tiles.
fn check_tile_count(
    seq_q: usize,
    seq_k: usize,
    tile_rows: usize,
    tile_cols: usize,
    batches: usize,
) -> Result<()> {
    let tiles = [seq_q.div_ceil(tile_rows), seq_k.div_ceil(tile_cols)]
        .into_iter()
        .try_fold(batches as u64, |a, n| a.checked_mul(n as u64));
    match tiles {
        Some(n) if n <= MAX_TILES && usize::try_from(n).is_ok() => Ok(()),
        _ => Err(Error::InvalidArgument {
            what: "tiles",
            why: format!(
                "{batches} x {seq_q} x {seq_k} at {tile_rows}x{tile_cols} tiles is over {MAX_TILES} \
                 tiles"
            ),
        }),
    }
}

/// Checks a tile shape: `tile_rows` in 1..=MAX_TILE_SIDE, `tile_cols` a multiple of 32 in
/// 32..=MAX_TILE_SIDE (so each tile row is whole u32 words of a mask row).
pub(crate) fn check_tiles(tile_rows: usize, tile_cols: usize) -> Result<()> {
    if !(1..=MAX_TILE_SIDE).contains(&tile_rows) {
        return Err(Error::InvalidArgument {
            what: "tile rows",
            why: format!("{tile_rows} is not in 1..={MAX_TILE_SIDE}"),
        });
    }
    if !(32..=MAX_TILE_SIDE).contains(&tile_cols) || !tile_cols.is_multiple_of(32) {
        return Err(Error::InvalidArgument {
            what: "tile columns",
            why: format!("{tile_cols} is not a multiple of 32 in 32..={MAX_TILE_SIDE}"),
        });
    }
    Ok(())
}

/// The run-length entry of a row of states, or `None` when its active or full tiles are not one
/// interval each.
fn run_of(states: &[TileState]) -> Option<[u32; 4]> {
    let Some(begin) = states.iter().position(|&s| s != TileState::Empty) else {
        return Some([0; 4]);
    };
    let end = states.iter().rposition(|&s| s != TileState::Empty)? + 1;
    if states[begin..end].contains(&TileState::Empty) {
        return None;
    }
    let (full_begin, full_end) = match states.iter().position(|&s| s == TileState::Full) {
        None => (begin, begin),
        Some(fb) => {
            let fe = states.iter().rposition(|&s| s == TileState::Full)? + 1;
            if states[fb..fe].contains(&TileState::Partial) {
                return None;
            }
            (fb, fe)
        }
    };
    Some([begin, end, full_begin, full_end].map(|x| x as u32))
}

/// Lays out the CSR lists, run-length entries and partial slots row by row, from tile states.
struct Assembler {
    bm: BlockMask,
    slot_words: usize,
    slots: usize,
}

impl Assembler {
    fn new(
        seq_q: usize,
        seq_k: usize,
        tile_rows: usize,
        tile_cols: usize,
        batches: usize,
    ) -> Assembler {
        let (q_tiles, k_tiles) = (seq_q.div_ceil(tile_rows), seq_k.div_ceil(tile_cols));
        let rows = batches * q_tiles;
        let mut row_ptr = Vec::with_capacity(rows + 1);
        row_ptr.push(0);
        Assembler {
            bm: BlockMask {
                seq_q,
                seq_k,
                tile_rows,
                tile_cols,
                q_tiles,
                k_tiles,
                batches,
                states: Vec::with_capacity(rows * k_tiles),
                row_ptr,
                cols: Vec::new(),
                full_count: Vec::with_capacity(rows),
                partial_base: Vec::with_capacity(rows),
                runs: Some(Vec::with_capacity(rows)),
                partial_bits: Vec::new(),
            },
            slot_words: tile_rows * tile_cols / 32,
            slots: 0,
        }
    }

    /// Appends the next row and returns where its partial key tiles are in `bm.cols`; their slots
    /// are the next ones (the caller provides their bits).
    fn push_row(&mut self, states: &[TileState]) -> Range<usize> {
        let bm = &mut self.bm;
        bm.states.extend_from_slice(states);
        let start = bm.cols.len();
        let tiles_in = |want: TileState| {
            (0..states.len() as u32).filter(move |&kt| states[kt as usize] == want)
        };
        bm.cols.extend(tiles_in(TileState::Full));
        let first_partial = bm.cols.len();
        bm.cols.extend(tiles_in(TileState::Partial));
        bm.full_count.push((first_partial - start) as u32);
        bm.partial_base.push(self.slots as u32);
        bm.row_ptr.push(bm.cols.len() as u32);
        self.slots += bm.cols.len() - first_partial;
        if let Some(runs) = &mut bm.runs {
            match run_of(states) {
                Some(run) => runs.push(run),
                None => bm.runs = None,
            }
        }
        first_partial..bm.cols.len()
    }
}

/// Classifies the key tiles of query tiles of a bit-packed mask from the OR and AND of each query
/// tile's rows, whole words at a time (tile_cols being a multiple of 32).
struct BitClassifier {
    wpr: usize,
    words_per_tile_row: usize,
    tail: u32,
    or_acc: Vec<u32>,
    and_acc: Vec<u32>,
}

impl BitClassifier {
    fn new(mask: &Mask, tile_cols: usize) -> BitClassifier {
        let wpr = mask.words_per_row();
        BitClassifier {
            wpr,
            words_per_tile_row: tile_cols / 32,
            tail: tail_bits(mask.seq_k()),
            or_acc: vec![0; wpr],
            and_acc: vec![0; wpr],
        }
    }

    /// States of the key tiles of the query tile made of mask rows `rows` of `words`.
    fn classify(&mut self, words: &[u32], rows: Range<usize>, out: &mut [TileState]) {
        let wpr = self.wpr;
        let first = &words[rows.start * wpr..(rows.start + 1) * wpr];
        self.or_acc.copy_from_slice(first);
        self.and_acc.copy_from_slice(first);
        for row in words[(rows.start + 1) * wpr..rows.end * wpr].chunks_exact(wpr) {
            for ((o, a), &x) in self.or_acc.iter_mut().zip(&mut self.and_acc).zip(row) {
                *o |= x;
                *a &= x;
            }
        }
        // Keys past seq_k must not stop a tile from being full.
        self.and_acc[wpr - 1] |= !self.tail;
        for (kt, state) in out.iter_mut().enumerate() {
            let w = kt * self.words_per_tile_row..((kt + 1) * self.words_per_tile_row).min(wpr);
            *state = if self.and_acc[w.clone()].iter().all(|&x| x == !0) {
                TileState::Full
            } else if self.or_acc[w].iter().any(|&x| x != 0) {
                TileState::Partial
            } else {
                TileState::Empty
            };
        }
    }
}

/// Mask words above which [`BlockMask::new`] spreads its work over threads (below, spawning costs
/// more than it saves).
const PARALLEL_WORDS: usize = 1 << 20;

/// Number of active tiles of a mask for a tile shape, without building the block mask's lists and
/// bits (what RCM reports before and after reordering).
pub(crate) fn active_tile_count(mask: &Mask, tile_rows: usize, tile_cols: usize) -> Result<usize> {
    check_tiles(tile_rows, tile_cols)?;
    let mut classifier = BitClassifier::new(mask, tile_cols);
    let mut states = vec![TileState::Empty; mask.seq_k().div_ceil(tile_cols)];
    let mut active = 0;
    for b in 0..mask.batches() {
        for q0 in (0..mask.seq_q()).step_by(tile_rows) {
            let rows = q0..(q0 + tile_rows).min(mask.seq_q());
            classifier.classify(mask.words(b), rows, &mut states);
            active += states.iter().filter(|&&s| s != TileState::Empty).count();
        }
    }
    Ok(active)
}

/// Division by the tile width: a shift when it is a power of two, as it is in practice (the
/// interval builder divides a few times per interval).
#[derive(Clone, Copy)]
struct TileWidth {
    width: usize,
    shift: Option<u32>,
}

impl TileWidth {
    fn new(width: usize) -> TileWidth {
        let shift = width.is_power_of_two().then(|| width.trailing_zeros());
        TileWidth { width, shift }
    }

    fn tile_of(self, x: usize) -> usize {
        match self.shift {
            Some(s) => x >> s,
            None => x / self.width,
        }
    }
}

/// The tile states of one query-tile row from per-key-tile difference counts: `touched[kt]`
/// adds the rows whose allowed keys start reaching tile kt, `covered[kt]` the rows that start
/// covering it whole; a tile covered by all `rows` rows is full, one touched by any is partial.
fn states_from_counts(touched: &[i32], covered: &[i32], rows: i32, states: &mut [TileState]) {
    let (mut t, mut c) = (0, 0);
    for (kt, state) in states.iter_mut().enumerate() {
        t += touched[kt];
        c += covered[kt];
        *state = if c == rows {
            TileState::Full
        } else if t > 0 {
            TileState::Partial
        } else {
            TileState::Empty
        };
    }
}

impl BlockMask {
    /// The block mask of `mask` for `tile_rows × tile_cols` tiles. `tile_rows` must be positive and
    /// `tile_cols` a positive multiple of 32 ([`Error::InvalidArgument`] otherwise).
    ///
    /// Works on whole u32 words: per query tile, the OR and AND of its rows decide every key tile;
    /// then only partial tiles have their words copied. Large masks use all cores for both passes.
    pub fn new(mask: &Mask, tile_rows: usize, tile_cols: usize) -> Result<BlockMask> {
        check_tiles(tile_rows, tile_cols)?;
        let (seq_q, seq_k, wpr) = (mask.seq_q(), mask.seq_k(), mask.words_per_row());
        check_tile_count(seq_q, seq_k, tile_rows, tile_cols, mask.batches())?;
        let mut asm = Assembler::new(seq_q, seq_k, tile_rows, tile_cols, mask.batches());
        let (q_tiles, k_tiles) = (asm.bm.q_tiles, asm.bm.k_tiles);
        let rows = mask.batches() * q_tiles;
        let threads = threads(mask.batches() * seq_q * wpr, PARALLEL_WORDS);
        let rows_per_job = rows.div_ceil(threads);

        // Pass 1: tile states, rows split over the threads.
        let mut states = vec![TileState::Empty; rows * k_tiles];
        run_all(
            states
                .chunks_mut(rows_per_job * k_tiles)
                .enumerate()
                .map(|(j, chunk)| {
                    move || {
                        let mut classifier = BitClassifier::new(mask, tile_cols);
                        for (i, out) in chunk.chunks_exact_mut(k_tiles).enumerate() {
                            let r = j * rows_per_job + i;
                            let q0 = r % q_tiles * tile_rows;
                            let words = mask.words(r / q_tiles);
                            classifier.classify(words, q0..(q0 + tile_rows).min(seq_q), out);
                        }
                    }
                })
                .collect(),
        );

        // Lists and slot numbers; the slots' memory is zeroed lazily by the allocator.
        for row in states.chunks_exact(k_tiles) {
            asm.push_row(row);
        }
        let slot_words = asm.slot_words;
        let mut bits = vec![0u32; asm.slots * slot_words];

        // Pass 2: copy the words of partial tiles, rows split so that each job gets about as many
        // slots; a job's slots are contiguous.
        let bm = &asm.bm;
        let slot_of_row = |r: usize| {
            if r == rows {
                asm.slots
            } else {
                bm.partial_base[r] as usize
            }
        };
        let mut jobs = Vec::with_capacity(threads);
        let mut rest = &mut bits[..];
        let mut first_row = 0;
        for t in 1..=threads {
            let end_row = if t == threads {
                rows
            } else {
                let target = asm.slots * t / threads;
                bm.partial_base
                    .partition_point(|&s| (s as usize) < target)
                    .max(first_row)
            };
            let words = (slot_of_row(end_row) - slot_of_row(first_row)) * slot_words;
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(words);
            rest = tail;
            let row_range = first_row..end_row;
            jobs.push(move || {
                let wpt = tile_cols / 32;
                let mut slots = mine.chunks_exact_mut(slot_words);
                for r in row_range {
                    let (q0, words) = (r % q_tiles * tile_rows, mask.words(r / q_tiles));
                    let q1 = (q0 + tile_rows).min(seq_q);
                    let (_, mid, end) = bm.row_bounds(r);
                    for (&kt, slot) in bm.cols[mid..end].iter().zip(&mut slots) {
                        let w = kt as usize * wpt..((kt as usize + 1) * wpt).min(wpr);
                        for (q, dst) in (q0..q1).zip(slot.chunks_exact_mut(wpt)) {
                            let src = &words[q * wpr + w.start..q * wpr + w.end];
                            // A word loop: tile rows are a few words, too short for memcpy.
                            for (d, &x) in dst.iter_mut().zip(src) {
                                *d = x;
                            }
                        }
                    }
                }
            });
            first_row = end_row;
        }
        run_all(jobs);
        asm.bm.partial_bits = bits;
        Ok(asm.bm)
    }

    /// The block mask of the shared `seq_q × seq_k` mask whose row `q` allows the union of the key
    /// ranges that `rows(q, out)` pushes onto `out` (`out` arrives empty; ranges may overlap, come in
    /// any order and reach past `seq_k`, they are clipped), without materialising the mask.
    ///
    /// Equal to `BlockMask::new(&Mask::from_row_intervals(seq_q, seq_k, rows)?, ..)`, in
    /// O(q_tiles · k_tiles + intervals + bits of partial tiles): the fast path of the generators
    /// whose rows are a few intervals (causal, windows, documents, prefix-LM, Longformer, BigBird,
    /// shallow trees, random blocks).
    pub fn from_row_intervals(
        seq_q: usize,
        seq_k: usize,
        tile_rows: usize,
        tile_cols: usize,
        mut rows: impl FnMut(usize, &mut Vec<Range<usize>>),
    ) -> Result<BlockMask> {
        check_tiles(tile_rows, tile_cols)?;
        mask_geometry(seq_q, seq_k)?;
        check_tile_count(seq_q, seq_k, tile_rows, tile_cols, 1)?;
        let mut asm = Assembler::new(seq_q, seq_k, tile_rows, tile_cols, 1);
        let (k_tiles, slot_words, wpt) = (asm.bm.k_tiles, asm.slot_words, tile_cols / 32);
        let tiles = TileWidth::new(tile_cols);
        let mut buf = Vec::new();
        // Merged, sorted, disjoint intervals of the rows of the current query tile.
        let mut ivs: Vec<(usize, usize)> = Vec::new();
        let mut row_start: Vec<usize> = Vec::with_capacity(tile_rows + 1);
        // Per key tile, difference arrays of the rows touching it and the rows covering it.
        let (mut touched, mut covered) = (vec![0i32; k_tiles + 1], vec![0i32; k_tiles + 1]);
        let mut states = vec![TileState::Empty; k_tiles];
        for q0 in (0..seq_q).step_by(tile_rows) {
            let q1 = (q0 + tile_rows).min(seq_q);
            ivs.clear();
            row_start.clear();
            touched.fill(0);
            covered.fill(0);
            for q in q0..q1 {
                row_start.push(ivs.len());
                buf.clear();
                rows(q, &mut buf);
                buf.retain_mut(|r| {
                    r.end = r.end.min(seq_k);
                    r.start < r.end
                });
                if !buf.is_sorted_by_key(|r| r.start) {
                    buf.sort_unstable_by_key(|r| r.start);
                }
                let first = ivs.len();
                for r in &buf {
                    // Touching intervals merge too, so that a full tile is inside one interval.
                    match ivs[first..].last_mut() {
                        Some(last) if r.start <= last.1 => last.1 = last.1.max(r.end),
                        _ => ivs.push((r.start, r.end)),
                    }
                }
                for &(s, e) in &ivs[first..] {
                    touched[tiles.tile_of(s)] += 1;
                    touched[tiles.tile_of(e - 1) + 1] -= 1;
                    let full_begin = tiles.tile_of(s + tile_cols - 1);
                    let full_end = if e == seq_k {
                        k_tiles
                    } else {
                        tiles.tile_of(e)
                    };
                    if full_begin < full_end {
                        covered[full_begin] += 1;
                        covered[full_end] -= 1;
                    }
                }
            }
            row_start.push(ivs.len());
            states_from_counts(&touched, &covered, (q1 - q0) as i32, &mut states);
            let partial = asm.push_row(&states);
            let bm = &mut asm.bm;
            let base = bm.partial_bits.len();
            bm.partial_bits.resize(base + partial.len() * slot_words, 0);
            let (kts, bits) = (&bm.cols[partial], &mut bm.partial_bits[base..]);
            // Per row, walk its intervals and the partial tiles together (both in key order).
            for i in 0..q1 - q0 {
                let row = &ivs[row_start[i]..row_start[i + 1]];
                let mut j = 0;
                for (p, &kt) in kts.iter().enumerate() {
                    let lo = kt as usize * tile_cols;
                    let hi = (lo + tile_cols).min(seq_k);
                    while j < row.len() && row[j].1 <= lo {
                        j += 1;
                    }
                    let dst = &mut bits[p * slot_words + i * wpt..][..wpt];
                    for &(s, e) in row[j..].iter().take_while(|&&(s, _)| s < hi) {
                        set_bit_range(dst, s.max(lo) - lo, e.min(hi) - lo);
                    }
                }
            }
        }
        Ok(asm.bm)
    }

    /// The block mask of the `seq_q × seq_k` mask whose row `q` allows the keys
    /// `r.start, r.start + step, ..` below `r.end` (clipped to `seq_k`) for `r = rows(q)`: the fast
    /// path of dilated windows, whose rows are one such progression rather than a few intervals.
    pub(crate) fn from_strided_rows(
        seq_q: usize,
        seq_k: usize,
        tile_rows: usize,
        tile_cols: usize,
        step: usize,
        rows: impl Fn(usize) -> Range<usize>,
    ) -> Result<BlockMask> {
        check_tiles(tile_rows, tile_cols)?;
        mask_geometry(seq_q, seq_k)?;
        check_tile_count(seq_q, seq_k, tile_rows, tile_cols, 1)?;
        let mut asm = Assembler::new(seq_q, seq_k, tile_rows, tile_cols, 1);
        let (k_tiles, slot_words, wpt) = (asm.bm.k_tiles, asm.slot_words, tile_cols / 32);
        let tiles = TileWidth::new(tile_cols);
        let wpr = seq_k.div_ceil(32);
        let mut scratch = vec![0u32; wpr];
        // Each row's keys as (first, last + 1), empty rows as (0, 0).
        let mut keys: Vec<(usize, usize)> = Vec::with_capacity(tile_rows);
        let (mut touched, mut covered) = (vec![0i32; k_tiles + 1], vec![0i32; k_tiles + 1]);
        let mut states = vec![TileState::Empty; k_tiles];
        for q0 in (0..seq_q).step_by(tile_rows) {
            let q1 = (q0 + tile_rows).min(seq_q);
            keys.clear();
            touched.fill(0);
            covered.fill(0);
            for q in q0..q1 {
                let r = rows(q);
                let end = r.end.min(seq_k);
                if r.start >= end {
                    keys.push((0, 0));
                    continue;
                }
                let last = r.start + (end - 1 - r.start) / step * step;
                keys.push((r.start, last + 1));
                // With step <= tile_cols every tile between the first and the last key holds a
                // key, so the row touches the tiles of that span; else each key's tile.
                if step <= tile_cols {
                    touched[tiles.tile_of(r.start)] += 1;
                    touched[tiles.tile_of(last) + 1] -= 1;
                } else {
                    for k in (r.start..end).step_by(step) {
                        touched[tiles.tile_of(k)] += 1;
                        touched[tiles.tile_of(k) + 1] -= 1;
                    }
                }
                // A row covers a tile if it holds all its in-range keys: for step > 1 only a last
                // tile with a single in-range key can be covered.
                let (full_begin, full_end) = if step == 1 {
                    let fe = if end == seq_k {
                        k_tiles
                    } else {
                        tiles.tile_of(end)
                    };
                    (tiles.tile_of(r.start + tile_cols - 1), fe)
                } else if seq_k % tile_cols == 1 && last == seq_k - 1 {
                    (k_tiles - 1, k_tiles)
                } else {
                    (0, 0)
                };
                if full_begin < full_end {
                    covered[full_begin] += 1;
                    covered[full_end] -= 1;
                }
            }
            states_from_counts(&touched, &covered, (q1 - q0) as i32, &mut states);
            let partial = asm.push_row(&states);
            let bm = &mut asm.bm;
            let base = bm.partial_bits.len();
            bm.partial_bits.resize(base + partial.len() * slot_words, 0);
            let (kts, bits) = (&bm.cols[partial], &mut bm.partial_bits[base..]);
            // Per row: its keys into a scratch row once, then the words of each partial tile.
            for (i, &(first, end)) in keys.iter().enumerate() {
                if first >= end {
                    continue;
                }
                set_strided(&mut scratch, first, end, step);
                let row_tiles = tiles.tile_of(first) as u32..=tiles.tile_of(end - 1) as u32;
                for (p, &kt) in kts.iter().enumerate() {
                    if row_tiles.contains(&kt) {
                        let w = kt as usize * wpt..((kt as usize + 1) * wpt).min(wpr);
                        bits[p * slot_words + i * wpt..][..w.len()].copy_from_slice(&scratch[w]);
                    }
                }
                scratch[first / 32..=(end - 1) / 32].fill(0);
            }
        }
        Ok(asm.bm)
    }

    /// Query length.
    pub fn seq_q(&self) -> usize {
        self.seq_q
    }

    /// Key length.
    pub fn seq_k(&self) -> usize {
        self.seq_k
    }

    /// Query rows per tile (`Br`).
    pub fn tile_rows(&self) -> usize {
        self.tile_rows
    }

    /// Keys per tile (`Bc`), a multiple of 32.
    pub fn tile_cols(&self) -> usize {
        self.tile_cols
    }

    /// Query tiles per batch element, `ceil(seq_q / tile_rows)`.
    pub fn q_tiles(&self) -> usize {
        self.q_tiles
    }

    /// Key tiles, `ceil(seq_k / tile_cols)`.
    pub fn k_tiles(&self) -> usize {
        self.k_tiles
    }

    /// Batch elements with their own block mask: 1 for a shared mask, B for a per-batch one.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// State of key tile `kt` of query tile `qt` in batch element `b` (ignored when shared).
    ///
    /// # Panics
    /// If an index is out of range (`b` only when `batches() > 1`).
    pub fn state(&self, b: usize, qt: usize, kt: usize) -> TileState {
        let b = if self.batches == 1 { 0 } else { b };
        assert!(b < self.batches && qt < self.q_tiles && kt < self.k_tiles);
        self.states[(b * self.q_tiles + qt) * self.k_tiles + kt]
    }

    /// All tile states, row-major: index `(b * q_tiles + qt) * k_tiles + kt`.
    pub fn states(&self) -> &[TileState] {
        &self.states
    }

    /// Tiles over all batch elements, `batches * q_tiles * k_tiles`.
    pub fn total_tiles(&self) -> usize {
        self.states.len()
    }

    /// Active (full or partial) tiles over all batch elements.
    pub fn active_tiles(&self) -> usize {
        self.cols.len()
    }

    /// Full tiles over all batch elements.
    pub fn full_tiles(&self) -> usize {
        self.full_count.iter().map(|&c| c as usize).sum()
    }

    /// Partial tiles over all batch elements (= partial slots).
    pub fn partial_tiles(&self) -> usize {
        self.active_tiles() - self.full_tiles()
    }

    /// Active tiles / total tiles.
    pub fn active_fraction(&self) -> f64 {
        self.active_tiles() as f64 / self.total_tiles() as f64
    }

    /// Partial tiles / total tiles.
    pub fn partial_fraction(&self) -> f64 {
        self.partial_tiles() as f64 / self.total_tiles() as f64
    }

    /// Full tiles / total tiles.
    pub fn full_fraction(&self) -> f64 {
        self.full_tiles() as f64 / self.total_tiles() as f64
    }

    /// Active tiles of query tile `qt` of batch element `b` (ignored when shared): its work.
    pub fn row_work(&self, b: usize, qt: usize) -> usize {
        let b = if self.batches == 1 { 0 } else { b };
        let r = b * self.q_tiles + qt;
        (self.row_ptr[r + 1] - self.row_ptr[r]) as usize
    }

    /// Whether every row's active tiles are one interval and its full tiles one interval inside it,
    /// so that [`runs`](BlockMask::runs) exists.
    pub fn run_length_eligible(&self) -> bool {
        self.runs.is_some()
    }

    /// CSR row offsets into [`cols`](BlockMask::cols), `batches * q_tiles + 1` entries.
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }

    /// Active key tile indices of each row: full ones first, then partial ones, each in key order.
    pub fn cols(&self) -> &[u32] {
        &self.cols
    }

    /// Number of full tiles at the start of each row's [`cols`](BlockMask::cols).
    pub fn full_count(&self) -> &[u32] {
        &self.full_count
    }

    /// Each row's first partial slot.
    pub fn partial_base(&self) -> &[u32] {
        &self.partial_base
    }

    /// Per row `[begin, end, full_begin, full_end]` when run-length eligible (see [`BlockMask`]).
    pub fn runs(&self) -> Option<&[[u32; 4]]> {
        self.runs.as_deref()
    }

    /// Bits of the partial tiles, one slot of `tile_rows * tile_cols / 32` words each (see
    /// [`BlockMask`]).
    pub fn partial_bits(&self) -> &[u32] {
        &self.partial_bits
    }

    /// Bytes of the mask data a kernel reads: the partial bits, the CSR arrays (`row_ptr`, `cols`,
    /// `full_count`, `partial_base`) and the run-length entries when eligible. The host-side state
    /// array is not counted.
    pub fn mask_bytes(&self) -> usize {
        let words = self.partial_bits.len()
            + self.row_ptr.len()
            + self.cols.len()
            + self.full_count.len()
            + self.partial_base.len()
            + self.runs.as_ref().map_or(0, |r| 4 * r.len());
        4 * words
    }

    /// Bytes of a dense bit mask of the same shape, `ceil(batches * seq_q * seq_k / 8)`.
    pub fn dense_mask_bytes(&self) -> usize {
        (self.batches * self.seq_q * self.seq_k).div_ceil(8)
    }

    /// The transposed structure: per key tile its active query tiles (for the backward pass).
    pub fn transposed(&self) -> TransposedBlockMask {
        let columns = self.batches * self.k_tiles;
        let (mut full, mut partial) = (vec![0u32; columns], vec![0u32; columns]);
        let rows = self.batches * self.q_tiles;
        let col_of = |r: usize, kt: u32| r / self.q_tiles * self.k_tiles + kt as usize;
        for r in 0..rows {
            let (start, mid, end) = self.row_bounds(r);
            for &kt in &self.cols[start..mid] {
                full[col_of(r, kt)] += 1;
            }
            for &kt in &self.cols[mid..end] {
                partial[col_of(r, kt)] += 1;
            }
        }
        let mut col_ptr = Vec::with_capacity(columns + 1);
        col_ptr.push(0u32);
        for c in 0..columns {
            col_ptr.push(col_ptr[c] + full[c] + partial[c]);
        }
        // Next free position of each column's full and partial groups.
        let mut next_full: Vec<u32> = col_ptr[..columns].to_vec();
        let mut next_partial: Vec<u32> = (0..columns).map(|c| col_ptr[c] + full[c]).collect();
        let mut q_tile = vec![0u32; self.cols.len()];
        let mut slots = vec![NO_SLOT; self.cols.len()];
        for r in 0..rows {
            let (start, mid, end) = self.row_bounds(r);
            let qt = (r % self.q_tiles) as u32;
            for &kt in &self.cols[start..mid] {
                let e = &mut next_full[col_of(r, kt)];
                q_tile[*e as usize] = qt;
                *e += 1;
            }
            for (j, &kt) in self.cols[mid..end].iter().enumerate() {
                let e = &mut next_partial[col_of(r, kt)];
                q_tile[*e as usize] = qt;
                slots[*e as usize] = self.partial_base[r] + j as u32;
                *e += 1;
            }
        }
        TransposedBlockMask {
            q_tiles: self.q_tiles,
            k_tiles: self.k_tiles,
            batches: self.batches,
            col_ptr,
            rows: q_tile,
            full_count: full,
            slots,
        }
    }

    /// The mask this block mask describes (per batch element when it has several): full tiles
    /// allow every pair, empty ones none, partial ones their bits. Used to rebuild the mask at
    /// another tile shape.
    pub(crate) fn to_mask(&self) -> Result<Mask> {
        let (wpr, wpt) = (self.seq_k.div_ceil(32), self.tile_cols / 32);
        let slot_words = self.tile_rows * wpt;
        let masks = (0..self.batches)
            .map(|b| {
                let mut words = vec![0u32; self.seq_q * wpr];
                for qt in 0..self.q_tiles {
                    let r = b * self.q_tiles + qt;
                    let rows = qt * self.tile_rows..((qt + 1) * self.tile_rows).min(self.seq_q);
                    let (start, mid, end) = self.row_bounds(r);
                    for (i, &kt) in self.cols[start..end].iter().enumerate() {
                        let w = kt as usize * wpt..((kt as usize + 1) * wpt).min(wpr);
                        let slot = (i >= mid - start).then(|| {
                            let s = self.partial_base[r] as usize + i - (mid - start);
                            &self.partial_bits[s * slot_words..][..slot_words]
                        });
                        for (j, q) in rows.clone().enumerate() {
                            let dst = &mut words[q * wpr + w.start..q * wpr + w.end];
                            match slot {
                                Some(bits) => dst.copy_from_slice(&bits[j * wpt..][..dst.len()]),
                                None => dst.fill(!0),
                            }
                        }
                    }
                }
                Mask::from_words(self.seq_q, self.seq_k, words)
            })
            .collect::<Result<Vec<Mask>>>()?;
        if masks.len() == 1 {
            Ok(masks.into_iter().next().expect("one mask"))
        } else {
            Mask::per_batch(masks)
        }
    }

    /// Row `r`'s range in `cols` split at its first partial entry: `(start, mid, end)`.
    fn row_bounds(&self, r: usize) -> (usize, usize, usize) {
        let start = self.row_ptr[r] as usize;
        (
            start,
            start + self.full_count[r] as usize,
            self.row_ptr[r + 1] as usize,
        )
    }
}

/// Per key tile, the query tiles that use it: the block mask's CSR transposed, for a backward pass
/// that walks key tiles (dK, dV).
///
/// Columns are indexed `c = b * k_tiles + kt`. Column `c`'s entries are
/// `col_ptr[c]..col_ptr[c + 1]`: its `full_count[c]` full query tiles first, then its partial ones,
/// each group in increasing query tile order. `rows[e]` is entry `e`'s query tile index and
/// `slots[e]` its partial slot in [`BlockMask::partial_bits`] (the same bits the forward pass
/// reads), or [`NO_SLOT`] for a full entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TransposedBlockMask {
    q_tiles: usize,
    k_tiles: usize,
    batches: usize,
    col_ptr: Vec<u32>,
    rows: Vec<u32>,
    full_count: Vec<u32>,
    slots: Vec<u32>,
}

impl TransposedBlockMask {
    /// Query tiles per batch element.
    pub fn q_tiles(&self) -> usize {
        self.q_tiles
    }

    /// Key tiles per batch element.
    pub fn k_tiles(&self) -> usize {
        self.k_tiles
    }

    /// Batch elements (1 when the mask is shared).
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Column offsets into [`rows`](Self::rows) and [`slots`](Self::slots), `batches * k_tiles + 1`
    /// entries.
    pub fn col_ptr(&self) -> &[u32] {
        &self.col_ptr
    }

    /// Query tile index of each entry.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// Number of full entries at the start of each column.
    pub fn full_count(&self) -> &[u32] {
        &self.full_count
    }

    /// Partial slot of each entry ([`NO_SLOT`] for full entries).
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

/// Tiles per side beyond which the picture is downsampled.
const PICTURE_MAX: usize = 64;

impl fmt::Display for BlockMask {
    /// A header line of statistics, then one picture per batch element: one character per tile
    /// (`.` empty, `░` partial, `█` full); beyond 64 tiles a side, a cell stands for `f × f` tiles
    /// and shows the most active state among them (full over partial over empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "BlockMask {}x{} in {}x{} tiles ({} x {} tiles, {} batch element{}): {:.1}% active \
             ({:.1}% full, {:.1}% partial), run-length {}, mask {} B vs dense {} B",
            self.seq_q,
            self.seq_k,
            self.tile_rows,
            self.tile_cols,
            self.q_tiles,
            self.k_tiles,
            self.batches,
            if self.batches == 1 { "" } else { "s" },
            100.0 * self.active_fraction(),
            100.0 * self.full_fraction(),
            100.0 * self.partial_fraction(),
            if self.run_length_eligible() {
                "eligible"
            } else {
                "not eligible"
            },
            self.mask_bytes(),
            self.dense_mask_bytes(),
        )?;
        let scale = self.q_tiles.max(self.k_tiles).div_ceil(PICTURE_MAX);
        if scale > 1 {
            writeln!(f, "(one cell = {scale}x{scale} tiles)")?;
        }
        for b in 0..self.batches {
            if self.batches > 1 {
                writeln!(f, "batch {b}:")?;
            }
            for qc in (0..self.q_tiles).step_by(scale) {
                let line: String = (0..self.k_tiles)
                    .step_by(scale)
                    .map(|kc| {
                        let most = (qc..(qc + scale).min(self.q_tiles))
                            .flat_map(|qt| {
                                (kc..(kc + scale).min(self.k_tiles))
                                    .map(move |kt| self.state(b, qt, kt) as u8)
                            })
                            .max()
                            .unwrap_or(0);
                        ['.', '░', '█'][most as usize]
                    })
                    .collect();
                writeln!(f, "{line}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `to_mask` gives back the mask a block mask was built from: shared and per batch, tiles
    /// that do not divide the lengths, 128-row tiles, rows and keys that see nothing.
    #[test]
    fn to_mask_gives_back_the_mask() {
        let masks = [
            crate::suite::family_mask("documents", 300, 3).unwrap(),
            crate::suite::family_mask("tree", 257, 3).unwrap(),
            Mask::from_fn(45, 61, |q, k| q >= 5 && k < 50 && (k * 7 + q) % 5 != 0).unwrap(),
            Mask::per_batch(vec![
                Mask::causal(130, 100).unwrap(),
                Mask::sliding_window(130, 100, 9, false).unwrap(),
            ])
            .unwrap(),
        ];
        for mask in &masks {
            for (rows, cols) in [(128, 32), (64, 32), (16, 64), (8, 32)] {
                let bm = BlockMask::new(mask, rows, cols).unwrap();
                assert_eq!(&bm.to_mask().unwrap(), mask, "{rows}x{cols}");
            }
        }
    }
}
