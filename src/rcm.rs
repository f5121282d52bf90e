//! Reverse Cuthill–McKee reordering of the tokens of a square mask, which packs scattered allowed
//! pairs near the diagonal and so into fewer active tiles.

use crate::block_mask::active_tile_count;
use crate::error::{Error, Result};
use crate::mask::Mask;

/// A Reverse Cuthill–McKee permutation and what it does to the active tile count.
#[derive(Clone, Debug, PartialEq)]
pub struct RcmReport {
    /// New position `i` holds old token `perm[i]` (as [`Mask::permuted`] takes it).
    pub perm: Vec<u32>,
    /// Active tiles of the mask in its own order.
    pub active_before: usize,
    /// Active tiles of the permuted mask.
    pub active_after: usize,
}

/// Reverse Cuthill–McKee of `mask` and its active tiles for `tile_rows × tile_cols` tiles before
/// and after reordering. Errors as [`reverse_cuthill_mckee`] and for bad tile shapes.
pub fn rcm_report(mask: &Mask, tile_rows: usize, tile_cols: usize) -> Result<RcmReport> {
    let active_before = active_tile_count(mask, tile_rows, tile_cols)?;
    let perm = reverse_cuthill_mckee(mask)?;
    let active_after = active_tile_count(&mask.permuted(&perm)?, tile_rows, tile_cols)?;
    Ok(RcmReport {
        perm,
        active_before,
        active_after,
    })
}

/// Transposes a 32 × 32 bit block in place: afterwards bit `c` of `a[r]` is the former bit `r` of
/// `a[c]` (Hacker's Delight 7-3, swapping ever smaller off-diagonal sub-blocks).
fn transpose32(a: &mut [u32; 32]) {
    let mut j = 16;
    let mut m: u32 = 0x0000_ffff;
    while j != 0 {
        let mut k = 0;
        while k < 32 {
            let t = ((a[k] >> j) ^ a[k + j]) & m;
            a[k + j] ^= t;
            a[k] ^= t << j;
            k = (k + j + 1) & !j;
        }
        j >>= 1;
        m ^= m << j;
    }
}

/// The symmetrised adjacency of a square mask as bits: `mask | maskᵀ`, by 32 × 32 block
/// transposes, so that dense rows cost O(N² / 32) rather than O(allowed pairs).
fn symmetrised(mask: &Mask) -> Vec<u32> {
    let (n, wpr) = (mask.seq_q(), mask.words_per_row());
    let src = mask.words(0);
    let mut sym = src.to_vec();
    let mut block = [0u32; 32];
    for bi in 0..wpr {
        for bj in 0..wpr {
            for (r, x) in block.iter_mut().enumerate() {
                let row = bi * 32 + r;
                *x = if row < n { src[row * wpr + bj] } else { 0 };
            }
            if block.iter().all(|&x| x == 0) {
                continue;
            }
            transpose32(&mut block);
            for (c, &x) in block.iter().enumerate() {
                let row = bj * 32 + c;
                if row < n {
                    sym[row * wpr + bi] |= x;
                }
            }
        }
    }
    sym
}

/// Breadth-first search over the symmetrised graph from `start`, visiting only vertices not yet in
/// `visited` (which it updates). Each popped vertex's new neighbours are appended in increasing
/// degree (ties by index), the Cuthill–McKee rule. Appends the visit order to `order` and returns
/// the index in `order` where the last level starts and the number of levels.
fn bfs(
    adj: &[u32],
    wpr: usize,
    degree: &[u32],
    start: usize,
    visited: &mut [u32],
    order: &mut Vec<u32>,
) -> (usize, usize) {
    let first = order.len();
    visited[start / 32] |= 1 << (start % 32);
    order.push(start as u32);
    let (mut level_start, mut level_end) = (first, order.len());
    let (mut last_level, mut levels) = (first, 0);
    let mut next = Vec::new();
    while level_start < level_end {
        (last_level, levels) = (level_start, levels + 1);
        for i in level_start..level_end {
            let v = order[i] as usize;
            next.clear();
            for (w, (&a, seen)) in adj[v * wpr..(v + 1) * wpr]
                .iter()
                .zip(visited.iter_mut())
                .enumerate()
            {
                let mut fresh = a & !*seen;
                *seen |= fresh;
                while fresh != 0 {
                    next.push((w * 32 + fresh.trailing_zeros() as usize) as u32);
                    fresh &= fresh - 1;
                }
            }
            next.sort_unstable_by_key(|&u| (degree[u as usize], u));
            order.extend_from_slice(&next);
        }
        (level_start, level_end) = (level_end, order.len());
    }
    (last_level, levels)
}

/// Reverse Cuthill–McKee permutation of a square shared mask: the graph has an edge `i ~ j` iff
/// `mask(i, j)` or `mask(j, i)`; each connected component (in order of its lowest-degree vertex) is
/// ordered breadth first from a pseudo-peripheral vertex (George–Liu), neighbours in increasing
/// degree, and the whole order is reversed. New position `i` holds old token `perm[i]`, so
/// `mask.permuted(&perm)` is the reordered mask.
///
/// A non-square mask is [`Error::NotSquare`], a per-batch one [`Error::InvalidArgument`].
///
/// ```
/// use blockflash::{mask::SplitMix64, rcm::reverse_cuthill_mckee, Mask};
/// let band = Mask::sliding_window(256, 256, 4, false)?;
/// // Shuffle the tokens, then let RCM find the band again.
/// let mut shuffle: Vec<u32> = (0..256).collect();
/// let mut rng = SplitMix64::new(7);
/// for i in (1..256).rev() {
///     shuffle.swap(i, rng.below(i as u64 + 1) as usize);
/// }
/// let shuffled = band.permuted(&shuffle)?;
/// let back = shuffled.permuted(&reverse_cuthill_mckee(&shuffled)?)?;
/// let bandwidth = |m: &Mask| {
///     (0..256).flat_map(|q| (0..256).map(move |k| (q, k)))
///         .filter(|&(q, k)| m.get(0, q, k))
///         .map(|(q, k)| q.abs_diff(k))
///         .max()
/// };
/// assert!(bandwidth(&back) < Some(16));
/// # Ok::<(), blockflash::Error>(())
/// ```
pub fn reverse_cuthill_mckee(mask: &Mask) -> Result<Vec<u32>> {
    if mask.seq_q() != mask.seq_k() {
        return Err(Error::NotSquare {
            seq_q: mask.seq_q(),
            seq_k: mask.seq_k(),
        });
    }
    if mask.is_per_batch() {
        return Err(Error::InvalidArgument {
            what: "mask",
            why: "reordering needs one mask shared by all batch elements".into(),
        });
    }
    let (n, wpr) = (mask.seq_q(), mask.words_per_row());
    let mut adj = symmetrised(mask);
    // Self-loops are no edges; clearing them keeps them out of degrees and out of the search.
    for v in 0..n {
        adj[v * wpr + v / 32] &= !(1 << (v % 32));
    }
    let degree: Vec<u32> = adj
        .chunks_exact(wpr)
        .map(|row| row.iter().map(|w| w.count_ones()).sum())
        .collect();
    let mut by_degree: Vec<u32> = (0..n as u32).collect();
    by_degree.sort_unstable_by_key(|&v| (degree[v as usize], v));

    let mut visited = vec![0u32; wpr];
    let mut scratch_visited = vec![0u32; wpr];
    let mut scratch = Vec::new();
    let mut order = Vec::with_capacity(n);
    for &seed in &by_degree {
        let seed = seed as usize;
        if visited[seed / 32] >> (seed % 32) & 1 == 1 {
            continue;
        }
        let start = if degree[seed] == 0 {
            seed
        } else {
            pseudo_peripheral(&adj, wpr, &degree, seed, &mut scratch_visited, &mut scratch)
        };
        bfs(&adj, wpr, &degree, start, &mut visited, &mut order);
    }
    order.reverse();
    Ok(order)
}

/// George–Liu: from `v`, restart the search at the lowest-degree vertex of the last level as long
/// as that makes the level structure deeper; returns the last start.
fn pseudo_peripheral(
    adj: &[u32],
    wpr: usize,
    degree: &[u32],
    mut v: usize,
    visited: &mut [u32],
    order: &mut Vec<u32>,
) -> usize {
    let mut search = |start: usize, order: &mut Vec<u32>| {
        visited.fill(0);
        order.clear();
        bfs(adj, wpr, degree, start, visited, order)
    };
    let (mut last_level, mut levels) = search(v, order);
    loop {
        let u = order[last_level..]
            .iter()
            .map(|&u| u as usize)
            .min_by_key(|&u| (degree[u], u))
            .unwrap_or(v);
        let (u_last, u_levels) = search(u, order);
        if u_levels <= levels {
            return v;
        }
        (v, last_level, levels) = (u, u_last, u_levels);
    }
}

#[cfg(test)]
mod tests {
    use super::transpose32;
    use crate::mask::SplitMix64;

    #[test]
    fn transpose32_swaps_rows_and_columns() {
        let mut rng = SplitMix64::new(1);
        let mut a = [0u32; 32];
        a.iter_mut().for_each(|x| *x = rng.next_u64() as u32);
        let mut t = a;
        transpose32(&mut t);
        for (r, row) in a.iter().enumerate() {
            for (c, column) in t.iter().enumerate() {
                assert_eq!(column >> r & 1, row >> c & 1, "bit ({r}, {c})");
            }
        }
    }
}
