//! Attention masks: the bit-packed [`Mask`] (Nq × Nk, shared or one per batch element), its
//! generators for real workloads, and [`MaskSpec`], a generator description that can also build its
//! block mask without materialising the N² bits.

use std::ops::Range;

use crate::block_mask::{check_tiles, BlockMask};
use crate::error::{Error, Result};

/// An Nq × Nk boolean attention mask, bit-packed, shared by all heads; either one mask for all batch
/// elements or one per batch element.
///
/// Row `q` has [`words_per_row`](Mask::words_per_row) `= ceil(Nk / 32)` u32 words; key `k` of row `q`
/// is bit `k % 32` of word `q * words_per_row + k / 32`. Padding bits beyond Nk are always zero (the
/// kernels and the block-mask builder rely on it). A per-batch mask stores its elements one after
/// the other, each `seq_q * words_per_row` words.
///
/// ```
/// use blockflash::Mask;
/// let m = Mask::causal(4, 4)?;
/// assert!(m.get(0, 2, 1) && !m.get(0, 1, 2));
/// assert_eq!(m.count_allowed(0), 10);
/// # Ok::<(), blockflash::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    seq_q: usize,
    seq_k: usize,
    words_per_row: usize,
    batches: usize,
    per_batch: bool,
    bits: Vec<u32>,
}

/// Checks a mask shape and returns its words per row: zero sizes are [`Error::Empty`], shapes whose
/// bit count overflows are [`Error::InvalidArgument`].
pub(crate) fn mask_geometry(seq_q: usize, seq_k: usize) -> Result<usize> {
    if seq_q == 0 || seq_k == 0 {
        return Err(Error::Empty("mask"));
    }
    // CSR arrays and tile indices are u32 on the GPU, and seq_q * seq_k must be addressable.
    if seq_q > u32::MAX as usize || seq_k > u32::MAX as usize || seq_q.checked_mul(seq_k).is_none()
    {
        return Err(Error::InvalidArgument {
            what: "mask size",
            why: format!("{seq_q} x {seq_k} is too large"),
        });
    }
    Ok(seq_k.div_ceil(32))
}

/// Most bytes of bits one materialised mask holds (16 GiB: N = 370,000 square); block masks of
/// the generators ([`MaskSpec::block_mask`]) need none.
const MAX_MASK_BYTES: u64 = 16 << 30;

/// [`mask_geometry`] for a mask whose bits are allocated: error past [`MAX_MASK_BYTES`].
fn dense_geometry(seq_q: usize, seq_k: usize) -> Result<usize> {
    let wpr = mask_geometry(seq_q, seq_k)?;
    let bytes = (seq_q as u64).saturating_mul(wpr as u64).saturating_mul(4);
    if bytes > MAX_MASK_BYTES || usize::try_from(bytes).is_err() {
        return Err(Error::InvalidArgument {
            what: "mask size",
            why: format!(
                "the bits of a {seq_q} x {seq_k} mask take over {} GiB; build its block mask \
                 from the generator (MaskSpec::block_mask) instead",
                MAX_MASK_BYTES >> 30
            ),
        });
    }
    Ok(wpr)
}

/// The bits of the last word of a row that hold keys (`!0` when `seq_k` is a multiple of 32).
pub(crate) fn tail_bits(seq_k: usize) -> u32 {
    match seq_k % 32 {
        0 => !0,
        r => (1u32 << r) - 1,
    }
}

/// Sets bits `start..end` of a bit-packed row (no-op for an empty range).
pub(crate) fn set_bit_range(words: &mut [u32], start: usize, end: usize) {
    if start >= end {
        return;
    }
    let (first, last) = (start / 32, (end - 1) / 32);
    let lo = !0u32 << (start % 32);
    let hi = !0u32 >> (31 - (end - 1) % 32);
    if first == last {
        words[first] |= lo & hi;
        return;
    }
    words[first] |= lo;
    words[first + 1..last].fill(!0);
    words[last] |= hi;
}

/// Sets bits `start, start + step, ..` below `end` of a bit-packed row (`step >= 1`). Steps below
/// 32 write whole words from a periodic pattern, so the cost is per word rather than per bit.
pub(crate) fn set_strided(words: &mut [u32], start: usize, end: usize, step: usize) {
    if start >= end {
        return;
    }
    if step == 1 {
        return set_bit_range(words, start, end);
    }
    if step >= 32 {
        for k in (start..end).step_by(step) {
            words[k / 32] |= 1 << (k % 32);
        }
        return;
    }
    // Bits 0, step, 2 * step, .. of 64, by doubling.
    let (mut pattern, mut width) = (1u64, step);
    while width < 64 {
        pattern |= pattern << width;
        width *= 2;
    }
    // `offset`: bit of the first key in the current word; from word to word it moves by
    // -32 (mod step), without a division per word.
    let shift = 32 % step;
    let (last, mut offset) = ((end - 1) / 32, start % 32);
    let mut phase = offset % step;
    for (w, word) in words.iter_mut().enumerate().take(last + 1).skip(start / 32) {
        let mut bits = (pattern << offset) as u32;
        if w == last {
            bits &= !0 >> (31 - (end - 1) % 32);
        }
        *word |= bits;
        phase = if phase >= shift {
            phase - shift
        } else {
            phase + step - shift
        };
        offset = phase;
    }
}

/// Calls `f` with the index of every set bit of `words`, in increasing order.
pub(crate) fn for_each_set_bit(words: &[u32], mut f: impl FnMut(usize)) {
    for (w, &word) in words.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            f(w * 32 + x.trailing_zeros() as usize);
            x &= x - 1;
        }
    }
}

impl Mask {
    /// Query length Nq.
    pub fn seq_q(&self) -> usize {
        self.seq_q
    }

    /// Key length Nk.
    pub fn seq_k(&self) -> usize {
        self.seq_k
    }

    /// u32 words per mask row, `ceil(seq_k / 32)`.
    pub fn words_per_row(&self) -> usize {
        self.words_per_row
    }

    /// Number of stored masks: 1 when shared by all batch elements, B for a per-batch mask.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Whether each batch element has its own mask.
    pub fn is_per_batch(&self) -> bool {
        self.per_batch
    }

    fn words_per_batch(&self) -> usize {
        self.seq_q * self.words_per_row
    }

    /// The bits of batch element `b` (ignored for a shared mask): `seq_q * words_per_row` words.
    ///
    /// # Panics
    /// If the mask is per-batch and `b >= batches()`.
    pub fn words(&self, b: usize) -> &[u32] {
        let n = self.words_per_batch();
        if self.per_batch {
            assert!(b < self.batches, "batch {b} of {}", self.batches);
            &self.bits[b * n..(b + 1) * n]
        } else {
            &self.bits
        }
    }

    /// Whether query `q` may attend to key `k` in batch element `b` (ignored for a shared mask).
    ///
    /// # Panics
    /// If `q`, `k` or (per-batch) `b` is out of range.
    pub fn get(&self, b: usize, q: usize, k: usize) -> bool {
        assert!(
            q < self.seq_q && k < self.seq_k,
            "({q}, {k}) outside {} x {}",
            self.seq_q,
            self.seq_k
        );
        self.words(b)[q * self.words_per_row + k / 32] >> (k % 32) & 1 == 1
    }

    /// Number of allowed (query, key) pairs of batch element `b` (ignored for a shared mask).
    pub fn count_allowed(&self, b: usize) -> usize {
        self.words(b).iter().map(|w| w.count_ones() as usize).sum()
    }

    /// A mask from row-major booleans (`values[q * seq_k + k]`).
    pub fn from_bools(seq_q: usize, seq_k: usize, values: &[bool]) -> Result<Mask> {
        Self::check_len("mask bools", seq_q, seq_k, values.len())?;
        Self::from_fn(seq_q, seq_k, |q, k| values[q * seq_k + k])
    }

    /// A mask from row-major bytes (`values[q * seq_k + k]`, nonzero = allowed).
    pub fn from_bytes(seq_q: usize, seq_k: usize, values: &[u8]) -> Result<Mask> {
        Self::check_len("mask bytes", seq_q, seq_k, values.len())?;
        Self::from_fn(seq_q, seq_k, |q, k| values[q * seq_k + k] != 0)
    }

    fn check_len(what: &'static str, seq_q: usize, seq_k: usize, len: usize) -> Result<()> {
        mask_geometry(seq_q, seq_k)?;
        if len != seq_q * seq_k {
            return Err(Error::ShapeMismatch {
                what,
                expected: format!("{seq_q} x {seq_k} = {} values", seq_q * seq_k),
                got: format!("{len} values"),
            });
        }
        Ok(())
    }

    /// A mask where `f(q, k)` says whether query `q` may attend to key `k`.
    pub fn from_fn(seq_q: usize, seq_k: usize, f: impl Fn(usize, usize) -> bool) -> Result<Mask> {
        let wpr = dense_geometry(seq_q, seq_k)?;
        let mut bits = vec![0u32; seq_q * wpr];
        for (q, row) in bits.chunks_exact_mut(wpr).enumerate() {
            for k in 0..seq_k {
                if f(q, k) {
                    row[k / 32] |= 1 << (k % 32);
                }
            }
        }
        Ok(Self::shared(seq_q, seq_k, bits))
    }

    /// A mask from its bit-packed words (layout of [`Mask`]); padding bits beyond `seq_k` are
    /// cleared.
    pub fn from_words(seq_q: usize, seq_k: usize, mut words: Vec<u32>) -> Result<Mask> {
        let wpr = mask_geometry(seq_q, seq_k)?;
        if words.len() != seq_q * wpr {
            return Err(Error::ShapeMismatch {
                what: "mask words",
                expected: format!("{seq_q} rows x {wpr} words = {}", seq_q * wpr),
                got: format!("{} words", words.len()),
            });
        }
        let tail = tail_bits(seq_k);
        if tail != !0 {
            for row in words.chunks_exact_mut(wpr) {
                row[wpr - 1] &= tail;
            }
        }
        Ok(Self::shared(seq_q, seq_k, words))
    }

    /// A mask whose row `q` allows the union of the key ranges that `rows(q, out)` pushes onto `out`
    /// (`out` arrives empty). Ranges may overlap, come in any order and reach outside
    /// `0..seq_k`; they are clipped.
    pub fn from_row_intervals(
        seq_q: usize,
        seq_k: usize,
        mut rows: impl FnMut(usize, &mut Vec<Range<usize>>),
    ) -> Result<Mask> {
        let wpr = dense_geometry(seq_q, seq_k)?;
        let mut bits = vec![0u32; seq_q * wpr];
        let mut buf = Vec::new();
        for (q, row) in bits.chunks_exact_mut(wpr).enumerate() {
            buf.clear();
            rows(q, &mut buf);
            for r in &buf {
                set_bit_range(row, r.start, r.end.min(seq_k));
            }
        }
        Ok(Self::shared(seq_q, seq_k, bits))
    }

    fn shared(seq_q: usize, seq_k: usize, bits: Vec<u32>) -> Mask {
        Mask {
            seq_q,
            seq_k,
            words_per_row: seq_k.div_ceil(32),
            batches: 1,
            per_batch: false,
            bits,
        }
    }

    /// A per-batch mask: element `b` is `masks[b]`. All masks must have the same shape and be
    /// shared masks themselves.
    pub fn per_batch(masks: Vec<Mask>) -> Result<Mask> {
        let first = masks.first().ok_or(Error::Empty("per-batch mask list"))?;
        let (seq_q, seq_k) = (first.seq_q, first.seq_k);
        for (b, m) in masks.iter().enumerate() {
            if m.per_batch {
                return Err(Error::InvalidArgument {
                    what: "per-batch mask",
                    why: format!("element {b} is already a per-batch mask"),
                });
            }
            if (m.seq_q, m.seq_k) != (seq_q, seq_k) {
                return Err(Error::ShapeMismatch {
                    what: "per-batch mask element",
                    expected: format!("{seq_q} x {seq_k}"),
                    got: format!("{} x {} (element {b})", m.seq_q, m.seq_k),
                });
            }
        }
        let batches = masks.len();
        let bits = masks.into_iter().flat_map(|m| m.bits).collect();
        Ok(Mask {
            batches,
            per_batch: true,
            bits,
            ..Self::shared(seq_q, seq_k, Vec::new())
        })
    }

    /// The mask of batch element `b` as a shared mask (a copy of `self` when shared).
    ///
    /// # Panics
    /// If the mask is per-batch and `b >= batches()`.
    pub fn batch(&self, b: usize) -> Mask {
        Self::shared(self.seq_q, self.seq_k, self.words(b).to_vec())
    }

    /// The square mask with tokens reordered: new `(i, j)` = old `(perm[i], perm[j])`, for every
    /// batch element. `perm` must be a permutation of `0..N`, as [`crate::rcm::reverse_cuthill_mckee`]
    /// returns.
    pub fn permuted(&self, perm: &[u32]) -> Result<Mask> {
        let n = self.seq_q;
        if self.seq_k != n {
            return Err(Error::NotSquare {
                seq_q: self.seq_q,
                seq_k: self.seq_k,
            });
        }
        if perm.len() != n {
            return Err(Error::ShapeMismatch {
                what: "permutation",
                expected: format!("{n} entries"),
                got: format!("{} entries", perm.len()),
            });
        }
        let mut inverse = vec![u32::MAX; n];
        for (i, &p) in perm.iter().enumerate() {
            let p = p as usize;
            if p >= n || inverse[p] != u32::MAX {
                return Err(Error::InvalidArgument {
                    what: "permutation",
                    why: format!("entry {i} = {p} is out of range or repeated"),
                });
            }
            inverse[p] = i as u32;
        }
        let wpr = self.words_per_row;
        let mut bits = vec![0u32; self.bits.len()];
        // Walk set bits only, so sparse masks permute in O(allowed pairs + N * words_per_row).
        for (dst, src) in bits
            .chunks_exact_mut(self.words_per_batch())
            .zip(self.bits.chunks_exact(self.words_per_batch()))
        {
            for (i, &p) in perm.iter().enumerate() {
                let old = &src[p as usize * wpr..(p as usize + 1) * wpr];
                let new = &mut dst[i * wpr..(i + 1) * wpr];
                for_each_set_bit(old, |c| {
                    let j = inverse[c] as usize;
                    new[j / 32] |= 1 << (j % 32);
                });
            }
        }
        Ok(Mask {
            bits,
            ..self.clone()
        })
    }

    /// The inverse of [`Mask::permuted`]: the mask whose `permuted(perm)` is this one (new
    /// `(perm[i], perm[j])` = old `(i, j)`).
    pub(crate) fn unpermuted(&self, perm: &[u32]) -> Result<Mask> {
        let mut inverse = vec![u32::MAX; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            match inverse.get_mut(p as usize) {
                Some(slot) => *slot = i as u32,
                None => {
                    return Err(Error::InvalidArgument {
                        what: "permutation",
                        why: format!("entry {i} = {p} is out of range"),
                    })
                }
            }
        }
        // A repeated entry leaves u32::MAX behind, which `permuted` refuses.
        self.permuted(&inverse)
    }

    /// The mask where every query sees every key.
    pub fn full(seq_q: usize, seq_k: usize) -> Result<Mask> {
        MaskSpec::Full { seq_q, seq_k }.mask()
    }

    /// The mask where no query sees any key.
    pub fn empty(seq_q: usize, seq_k: usize) -> Result<Mask> {
        let wpr = dense_geometry(seq_q, seq_k)?;
        Ok(Self::shared(seq_q, seq_k, vec![0; seq_q * wpr]))
    }

    /// Causal mask aligned bottom-right (decoding with a KV cache): query `q` sees key `k` iff
    /// `k <= q + (seq_k - seq_q)`. For `seq_q > seq_k` the first `seq_q - seq_k` rows see nothing.
    pub fn causal(seq_q: usize, seq_k: usize) -> Result<Mask> {
        MaskSpec::Causal { seq_q, seq_k }.mask()
    }

    /// Sliding-window mask, aligned bottom-right like [`Mask::causal`]. With `d = (q + seq_k - seq_q)
    /// - k`, query `q` sees key `k` iff
    /// - causal: `0 <= d < window` (the `window` most recent keys, itself included);
    /// - symmetric: `|d| < window` (`window - 1` keys on each side and itself).
    ///
    /// So the causal window is the symmetric one intersected with the causal mask. `window == 0` is
    /// [`Error::InvalidArgument`].
    pub fn sliding_window(seq_q: usize, seq_k: usize, window: usize, causal: bool) -> Result<Mask> {
        MaskSpec::SlidingWindow {
            seq_q,
            seq_k,
            window,
            causal,
        }
        .mask()
    }

    /// Dilated sliding window on a square `seq × seq` mask: with `d = q - k`, query `q` sees key `k`
    /// iff `d` is a multiple of `dilation` and
    /// - causal: `0 <= d < window * dilation` (`window` keys, itself included);
    /// - symmetric: `|d| < window * dilation` (`2 * window - 1` keys).
    ///
    /// `dilation == 1` is [`Mask::sliding_window`]. `window == 0` or `dilation == 0` is
    /// [`Error::InvalidArgument`].
    pub fn dilated_window(
        seq: usize,
        window: usize,
        dilation: usize,
        causal: bool,
    ) -> Result<Mask> {
        MaskSpec::DilatedWindow {
            seq,
            window,
            dilation,
            causal,
        }
        .mask()
    }

    /// Packed documents (sequence packing): document `d` holds tokens `start_d .. start_d +
    /// lengths[d]` of a square mask of `N = sum(lengths)` tokens, documents in order. Query `q` sees
    /// key `k` iff both are in the same document and, when `causal`, `k <= q`.
    ///
    /// No lengths is [`Error::Empty`]; a zero length is [`Error::InvalidArgument`].
    pub fn documents(lengths: &[usize], causal: bool) -> Result<Mask> {
        MaskSpec::Documents {
            lengths: lengths.to_vec(),
            causal,
        }
        .mask()
    }

    /// [`Mask::documents`] for a caller that knows the sequence length: the lengths must add up to
    /// `seq`, else [`Error::DocumentLengths`].
    pub fn documents_for_seq(seq: usize, lengths: &[usize], causal: bool) -> Result<Mask> {
        check_document_sum(seq, lengths)?;
        Self::documents(lengths, causal)
    }

    /// Document prefix-LM: packed documents as in [`Mask::documents`], where document `d` starting at
    /// `s` has a bidirectional prefix `s .. s + prefix_lens[d]`. Query `q` of document `d` sees key
    /// `k` iff `k` is in document `d` and (`k < s + prefix_lens[d]` or `k <= q`): every token of the
    /// document sees the whole prefix, the rest is causal.
    ///
    /// `prefix_lens` must have one entry per document ([`Error::ShapeMismatch`]), each at most its
    /// document's length ([`Error::InvalidArgument`]).
    pub fn document_prefix_lm(lengths: &[usize], prefix_lens: &[usize]) -> Result<Mask> {
        MaskSpec::DocumentPrefixLm {
            lengths: lengths.to_vec(),
            prefix_lens: prefix_lens.to_vec(),
        }
        .mask()
    }

    /// [`Mask::document_prefix_lm`] with `prefix_lens[d] = floor(fraction * lengths[d])`;
    /// `fraction` outside `[0, 1]` is [`Error::InvalidArgument`].
    pub fn document_prefix_lm_fraction(lengths: &[usize], fraction: f64) -> Result<Mask> {
        MaskSpec::document_prefix_lm_fraction(lengths, fraction)?.mask()
    }

    /// Longformer on a square `seq × seq` mask: query `q` sees key `k` iff `|q - k| <= window`, or
    /// `q` is a global token, or `k` is a global token. `global` lists the global tokens (any order,
    /// repeats allowed); one `>= seq` is [`Error::InvalidArgument`].
    pub fn longformer(seq: usize, window: usize, global: &[usize]) -> Result<Mask> {
        MaskSpec::Longformer {
            seq,
            window,
            global: global.to_vec(),
        }
        .mask()
    }

    /// BigBird on a square `seq × seq` mask: query `q` sees key `k` iff `|q - k| <= window`, or
    /// `q < num_global` or `k < num_global` (global tokens), or the key block `k / block` is one of
    /// the `random_blocks_per_row` random blocks of query block `q / block`.
    ///
    /// The random blocks: with `nb = ceil(seq / block)` blocks and one [`SplitMix64`] stream seeded
    /// with `seed`, query blocks `0, 1, .., nb - 1` in turn draw `random_blocks_per_row` distinct key
    /// blocks uniformly from `0..nb` (Floyd's sampling). They may coincide with band or global
    /// blocks. `block == 0`, `num_global > seq` or `random_blocks_per_row > nb` is
    /// [`Error::InvalidArgument`].
    pub fn bigbird(
        seq: usize,
        window: usize,
        num_global: usize,
        block: usize,
        random_blocks_per_row: usize,
        seed: u64,
    ) -> Result<Mask> {
        MaskSpec::BigBird {
            seq,
            window,
            num_global,
            block,
            random_blocks_per_row,
            seed,
        }
        .mask()
    }

    /// Tree mask (tree attention for speculative decoding): token `i` is node `i`, its parent is
    /// `parents[i]` (`None` for a root; several roots make a forest). Query `q` sees key `k` iff `k`
    /// is `q` or an ancestor of `q`.
    ///
    /// A parent `>= parents.len()` or a cycle (a node its own ancestor) is [`Error::InvalidTree`];
    /// no nodes is [`Error::Empty`].
    pub fn tree(parents: &[Option<usize>]) -> Result<Mask> {
        Self::tree_with_prefix(0, parents)
    }

    /// A causal prompt of `prefix_len` tokens followed by a tree of candidate tokens: tokens
    /// `0..prefix_len` form a causal mask among themselves; token `prefix_len + i` is tree node `i`
    /// (parents indexed as in [`Mask::tree`]) and sees every prompt token, itself and its
    /// ancestors. Prompt tokens see no tree node.
    pub fn tree_with_prefix(prefix_len: usize, parents: &[Option<usize>]) -> Result<Mask> {
        MaskSpec::Tree {
            prefix_len,
            parents: parents.to_vec(),
        }
        .mask()
    }

    /// Tree mask of a complete tree (MEDUSA-style candidates): see [`complete_tree_parents`] for the
    /// node order, then [`Mask::tree`].
    pub fn complete_tree(depth: usize, branching: usize) -> Result<Mask> {
        Self::tree(&complete_tree_parents(depth, branching)?)
    }

    /// Random elements: pair `(q, k)` is allowed iff `unit(SplitMix64::at(seed, q * seq_k + k)) < p`
    /// (see [`SplitMix64`]). `p` outside `[0, 1]` is [`Error::InvalidArgument`].
    pub fn random(seq_q: usize, seq_k: usize, p: f64, seed: u64) -> Result<Mask> {
        MaskSpec::Random {
            seq_q,
            seq_k,
            p,
            seed,
        }
        .mask()
    }

    /// Random blocks: the mask is cut into `block × block` blocks (`nbq = ceil(seq_q / block)` by
    /// `nbk = ceil(seq_k / block)`, the last ones cut short); block `(i, j)` is all allowed iff
    /// `unit(SplitMix64::at(seed, i * nbk + j)) < p`, else all masked. For square masks the diagonal
    /// blocks `(i, i)` are always allowed, so that no query row is empty.
    ///
    /// `block == 0` or `p` outside `[0, 1]` is [`Error::InvalidArgument`].
    pub fn random_blocks(
        seq_q: usize,
        seq_k: usize,
        block: usize,
        p: f64,
        seed: u64,
    ) -> Result<Mask> {
        MaskSpec::RandomBlocks {
            seq_q,
            seq_k,
            block,
            p,
            seed,
        }
        .mask()
    }
}

/// Parent array of a complete `branching`-ary tree of the given depth, nodes numbered level by
/// level (breadth first): node 0 is the root, node `i > 0` has parent `(i - 1) / branching`. The node
/// count is [`complete_tree_size`].
///
/// `branching == 0`, or more than `u32::MAX` nodes, is [`Error::InvalidArgument`].
pub fn complete_tree_parents(depth: usize, branching: usize) -> Result<Vec<Option<usize>>> {
    let count = complete_tree_size(depth, branching)?;
    Ok((0..count)
        .map(|i| (i > 0).then(|| (i - 1) / branching))
        .collect())
}

/// Nodes of a complete `branching`-ary tree of the given depth, `sum(branching^l for l in
/// 0..=depth)` (depth 0: the root alone), without building it.
///
/// `branching == 0`, or more than `u32::MAX` nodes, is [`Error::InvalidArgument`].
pub fn complete_tree_size(depth: usize, branching: usize) -> Result<usize> {
    if branching == 0 {
        return Err(Error::InvalidArgument {
            what: "tree branching",
            why: "must be at least 1".into(),
        });
    }
    let too_large = || Error::InvalidArgument {
        what: "tree size",
        why: format!("depth {depth}, branching {branching} has more than 2^32 nodes"),
    };
    // (at least one node per level: a deeper tree is too large before the loop says so)
    if depth >= u32::MAX as usize {
        return Err(too_large());
    }
    let (mut count, mut level) = (1usize, 1usize);
    for _ in 0..depth {
        level = level.checked_mul(branching).ok_or_else(too_large)?;
        count = count.checked_add(level).ok_or_else(too_large)?;
        if count > u32::MAX as usize {
            return Err(too_large());
        }
    }
    Ok(count)
}

fn check_document_sum(seq: usize, lengths: &[usize]) -> Result<()> {
    let sum = lengths.iter().try_fold(0usize, |a, &l| a.checked_add(l));
    match sum {
        Some(sum) if sum == seq => Ok(()),
        sum => Err(Error::DocumentLengths {
            sum: sum.unwrap_or(usize::MAX),
            seq,
        }),
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014), the small seeded generator behind the random masks; its
/// outputs are also addressable by index ([`SplitMix64::at`]), so a random mask is a pure function
/// of `(seed, position)`.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    /// A generator whose first output is `SplitMix64::at(seed, 0)`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Output number `index` (from 0) of `SplitMix64::new(seed)`, without generating the ones before.
    pub fn at(seed: u64, index: u64) -> u64 {
        Self::mix(seed.wrapping_add(Self::GAMMA.wrapping_mul(index.wrapping_add(1))))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        Self::mix(self.state)
    }

    /// Maps 64 random bits to a uniform `f64` in `[0, 1)` (their top 53 bits).
    pub fn unit(bits: u64) -> f64 {
        (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The next uniform `f64` in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        Self::unit(self.next_u64())
    }

    /// The next integer in `0..n` (multiply-shift; bias below `n / 2^64`). `n == 0` gives 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Depth above which tree rows are built from bits rather than as lists of ancestor intervals (a
/// row of a deep tree is as many intervals as the node's depth).
const TREE_INTERVAL_DEPTH: u32 = 64;

/// A mask generator and its arguments: builds the [`Mask`] and, for generators whose rows are
/// unions of a few key intervals, the [`BlockMask`] directly without the N² bits.
///
/// Each variant's exact definition is on the [`Mask`] constructor of the same name.
///
/// ```
/// use blockflash::{mask::MaskSpec, BlockMask};
/// let spec = MaskSpec::Causal { seq_q: 1000, seq_k: 1000 };
/// let fast = spec.block_mask(64, 64)?;
/// assert_eq!(fast, BlockMask::new(&spec.mask()?, 64, 64)?);
/// # Ok::<(), blockflash::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum MaskSpec {
    /// Every pair allowed ([`Mask::full`]).
    Full {
        /// Query length.
        seq_q: usize,
        /// Key length.
        seq_k: usize,
    },
    /// [`Mask::causal`].
    Causal {
        /// Query length.
        seq_q: usize,
        /// Key length.
        seq_k: usize,
    },
    /// [`Mask::sliding_window`].
    SlidingWindow {
        /// Query length.
        seq_q: usize,
        /// Key length.
        seq_k: usize,
        /// Window size (keys per side, the diagonal included).
        window: usize,
        /// Causal or symmetric window.
        causal: bool,
    },
    /// [`Mask::dilated_window`].
    DilatedWindow {
        /// Sequence length (square mask).
        seq: usize,
        /// Keys per side, the diagonal included.
        window: usize,
        /// Distance between seen keys.
        dilation: usize,
        /// Causal or symmetric window.
        causal: bool,
    },
    /// [`Mask::documents`].
    Documents {
        /// Document lengths, in order.
        lengths: Vec<usize>,
        /// Causal inside each document, else bidirectional.
        causal: bool,
    },
    /// [`Mask::document_prefix_lm`].
    DocumentPrefixLm {
        /// Document lengths, in order.
        lengths: Vec<usize>,
        /// Bidirectional prefix length of each document.
        prefix_lens: Vec<usize>,
    },
    /// [`Mask::longformer`].
    Longformer {
        /// Sequence length (square mask).
        seq: usize,
        /// Band half-width: `|q - k| <= window`.
        window: usize,
        /// Global token indices.
        global: Vec<usize>,
    },
    /// [`Mask::bigbird`].
    BigBird {
        /// Sequence length (square mask).
        seq: usize,
        /// Band half-width: `|q - k| <= window`.
        window: usize,
        /// The first `num_global` tokens are global.
        num_global: usize,
        /// Block size of the random blocks.
        block: usize,
        /// Random key blocks per query block.
        random_blocks_per_row: usize,
        /// Seed of the random blocks.
        seed: u64,
    },
    /// [`Mask::tree_with_prefix`] ([`Mask::tree`] when `prefix_len == 0`).
    Tree {
        /// Causal prompt tokens before the tree.
        prefix_len: usize,
        /// Parent of each tree node, `None` for roots.
        parents: Vec<Option<usize>>,
    },
    /// [`Mask::random`].
    Random {
        /// Query length.
        seq_q: usize,
        /// Key length.
        seq_k: usize,
        /// Probability that a pair is allowed.
        p: f64,
        /// Seed.
        seed: u64,
    },
    /// [`Mask::random_blocks`].
    RandomBlocks {
        /// Query length.
        seq_q: usize,
        /// Key length.
        seq_k: usize,
        /// Block size.
        block: usize,
        /// Probability that a block is allowed.
        p: f64,
        /// Seed.
        seed: u64,
    },
}

/// A row generator: pushes the key ranges of query row `q` onto the vector.
type RowFn<'a> = Box<dyn Fn(usize, &mut Vec<Range<usize>>) + 'a>;

/// A strided row generator: the keys of row `q` are `r.start, r.start + step, ..` below `r.end`.
type StridedFn<'a> = Box<dyn Fn(usize) -> Range<usize> + 'a>;

/// A validated spec, ready to build: rows of few intervals, rows of one key progression, or (for
/// generators with neither shape) the mask itself.
enum Prepared<'a> {
    Rows {
        seq_q: usize,
        seq_k: usize,
        rows: RowFn<'a>,
    },
    Strided {
        seq: usize,
        step: usize,
        rows: StridedFn<'a>,
    },
    Bits(Mask),
}

/// `lo..hi` in signed arithmetic clipped to `0..n`.
fn clipped(lo: i64, hi: i64, n: usize) -> Range<usize> {
    let c = |x: i64| x.clamp(0, n as i64) as usize;
    c(lo)..c(hi)
}

fn invalid(what: &'static str, why: impl Into<String>) -> Error {
    Error::InvalidArgument {
        what,
        why: why.into(),
    }
}

fn check_probability(p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(invalid("density", format!("{p} is outside [0, 1]")))
    }
}

fn check_nonzero(what: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        Err(invalid(what, "must be at least 1"))
    } else {
        Ok(())
    }
}

/// Start offsets of the documents (one more entry than `lengths`: the last is N).
fn document_starts(lengths: &[usize]) -> Result<Vec<usize>> {
    if lengths.is_empty() {
        return Err(Error::Empty("document lengths"));
    }
    let mut starts = Vec::with_capacity(lengths.len() + 1);
    let mut sum = 0usize;
    for (d, &len) in lengths.iter().enumerate() {
        if len == 0 {
            return Err(invalid(
                "document length",
                format!("document {d} has length 0"),
            ));
        }
        starts.push(sum);
        sum = sum
            .checked_add(len)
            .ok_or_else(|| invalid("document lengths", "sum overflows"))?;
    }
    starts.push(sum);
    mask_geometry(sum, sum)?;
    Ok(starts)
}

/// Depth of every tree node (roots 0), or [`Error::InvalidTree`] for an out-of-range parent or a
/// cycle.
fn tree_depths(parents: &[Option<usize>]) -> Result<Vec<u32>> {
    const UNSEEN: u8 = 0;
    const ON_PATH: u8 = 1;
    const DONE: u8 = 2;
    let n = parents.len();
    let mut state = vec![UNSEEN; n];
    let mut depth = vec![0u32; n];
    let mut path = Vec::new();
    for start in 0..n {
        // Walk up until a root or a node whose depth is known, then assign depths on the way back.
        let mut cur = start;
        loop {
            match state[cur] {
                DONE => break,
                ON_PATH => {
                    return Err(Error::InvalidTree(format!(
                        "node {cur} is its own ancestor (cycle)"
                    )))
                }
                _ => {}
            }
            state[cur] = ON_PATH;
            path.push(cur);
            match parents[cur] {
                None => break,
                Some(p) if p >= n => {
                    return Err(Error::InvalidTree(format!(
                        "node {cur} has parent {p}, but there are only {n} nodes"
                    )))
                }
                Some(p) => cur = p,
            }
        }
        while let Some(node) = path.pop() {
            depth[node] = parents[node].map_or(0, |p| depth[p] + 1);
            state[node] = DONE;
        }
    }
    Ok(depth)
}

impl MaskSpec {
    /// [`Mask::document_prefix_lm_fraction`] as a spec: prefix of document `d` is
    /// `floor(fraction * lengths[d])`.
    pub fn document_prefix_lm_fraction(lengths: &[usize], fraction: f64) -> Result<MaskSpec> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(invalid(
                "prefix fraction",
                format!("{fraction} is outside [0, 1]"),
            ));
        }
        Ok(MaskSpec::DocumentPrefixLm {
            lengths: lengths.to_vec(),
            prefix_lens: lengths
                .iter()
                .map(|&l| ((fraction * l as f64).floor() as usize).min(l))
                .collect(),
        })
    }

    /// The mask this spec describes.
    pub fn mask(&self) -> Result<Mask> {
        match self.prepare()? {
            Prepared::Rows { seq_q, seq_k, rows } => Mask::from_row_intervals(seq_q, seq_k, rows),
            Prepared::Strided { seq, step, rows } => {
                let wpr = dense_geometry(seq, seq)?;
                let mut bits = vec![0u32; seq * wpr];
                for (q, row) in bits.chunks_exact_mut(wpr).enumerate() {
                    let keys = rows(q);
                    set_strided(row, keys.start, keys.end, step);
                }
                Ok(Mask::shared(seq, seq, bits))
            }
            Prepared::Bits(mask) => Ok(mask),
        }
    }

    /// The block mask of this spec for `tile_rows × tile_cols` tiles, equal to
    /// `BlockMask::new(&self.mask()?, tile_rows, tile_cols)`. All generators but
    /// [`MaskSpec::Random`] and trees deeper than 64 build it from each row's key intervals (or, for
    /// dilated windows, its key progression) without materialising the mask.
    pub fn block_mask(&self, tile_rows: usize, tile_cols: usize) -> Result<BlockMask> {
        check_tiles(tile_rows, tile_cols)?;
        match self.prepare()? {
            Prepared::Rows { seq_q, seq_k, rows } => {
                BlockMask::from_row_intervals(seq_q, seq_k, tile_rows, tile_cols, rows)
            }
            Prepared::Strided { seq, step, rows } => {
                BlockMask::from_strided_rows(seq, seq, tile_rows, tile_cols, step, rows)
            }
            Prepared::Bits(mask) => BlockMask::new(&mask, tile_rows, tile_cols),
        }
    }

    /// Validates the arguments and precomputes what the rows need.
    fn prepare(&self) -> Result<Prepared<'_>> {
        fn rows(seq_q: usize, seq_k: usize, rows: RowFn<'_>) -> Result<Prepared<'_>> {
            mask_geometry(seq_q, seq_k)?;
            Ok(Prepared::Rows { seq_q, seq_k, rows })
        }
        match *self {
            MaskSpec::Full { seq_q, seq_k } => {
                rows(seq_q, seq_k, Box::new(move |_, out| out.push(0..seq_k)))
            }
            MaskSpec::Causal { seq_q, seq_k } => {
                let shift = seq_k as i64 - seq_q as i64;
                rows(
                    seq_q,
                    seq_k,
                    Box::new(move |q, out| out.push(clipped(0, q as i64 + shift + 1, seq_k))),
                )
            }
            MaskSpec::SlidingWindow {
                seq_q,
                seq_k,
                window,
                causal,
            } => {
                check_nonzero("window", window)?;
                // (windows past both lengths allow the same pairs as one of that size)
                let w = window.min(seq_q + seq_k) as i64;
                let shift = seq_k as i64 - seq_q as i64;
                rows(
                    seq_q,
                    seq_k,
                    Box::new(move |q, out| {
                        let c = q as i64 + shift;
                        let hi = if causal { c + 1 } else { c + w };
                        out.push(clipped(c - w + 1, hi, seq_k));
                    }),
                )
            }
            MaskSpec::DilatedWindow {
                seq,
                window,
                dilation,
                causal,
            } => {
                check_nonzero("window", window)?;
                check_nonzero("dilation", dilation)?;
                mask_geometry(seq, seq)?;
                let span = window.saturating_mul(dilation);
                // Row q's keys are the k = q (mod dilation) within the window.
                Ok(Prepared::Strided {
                    seq,
                    step: dilation,
                    rows: Box::new(move |q| {
                        let lo = q.saturating_sub(span - 1);
                        let hi = if causal {
                            q + 1
                        } else {
                            q.saturating_add(span).min(seq)
                        };
                        q - (q - lo) / dilation * dilation..hi
                    }),
                })
            }
            MaskSpec::Documents {
                ref lengths,
                causal,
            } => {
                let starts = document_starts(lengths)?;
                let n = starts[lengths.len()];
                rows(
                    n,
                    n,
                    Box::new(move |q, out| {
                        let d = starts.partition_point(|&s| s <= q) - 1;
                        let end = if causal { q + 1 } else { starts[d + 1] };
                        out.push(starts[d]..end);
                    }),
                )
            }
            MaskSpec::DocumentPrefixLm {
                ref lengths,
                ref prefix_lens,
            } => {
                let starts = document_starts(lengths)?;
                if prefix_lens.len() != lengths.len() {
                    return Err(Error::ShapeMismatch {
                        what: "prefix lengths",
                        expected: format!("{} entries (one per document)", lengths.len()),
                        got: format!("{} entries", prefix_lens.len()),
                    });
                }
                if let Some(d) = (0..lengths.len()).find(|&d| prefix_lens[d] > lengths[d]) {
                    return Err(invalid(
                        "prefix length",
                        format!(
                            "document {d} has prefix {} but length {}",
                            prefix_lens[d], lengths[d]
                        ),
                    ));
                }
                let n = starts[lengths.len()];
                rows(
                    n,
                    n,
                    Box::new(move |q, out| {
                        let d = starts.partition_point(|&s| s <= q) - 1;
                        out.push(starts[d]..(starts[d] + prefix_lens[d]).max(q + 1));
                    }),
                )
            }
            MaskSpec::Longformer {
                seq,
                window,
                ref global,
            } => {
                mask_geometry(seq, seq)?;
                let mut is_global = vec![false; seq];
                for &g in global {
                    if g >= seq {
                        return Err(invalid(
                            "global token",
                            format!("index {g} is outside 0..{seq}"),
                        ));
                    }
                    is_global[g] = true;
                }
                let runs = true_runs(&is_global);
                let w = window.min(seq) as i64;
                rows(
                    seq,
                    seq,
                    Box::new(move |q, out| {
                        if is_global[q] {
                            out.push(0..seq);
                        } else {
                            out.push(clipped(q as i64 - w, q as i64 + w + 1, seq));
                            out.extend(runs.iter().cloned());
                        }
                    }),
                )
            }
            MaskSpec::BigBird {
                seq,
                window,
                num_global,
                block,
                random_blocks_per_row,
                seed,
            } => {
                mask_geometry(seq, seq)?;
                check_nonzero("block", block)?;
                if num_global > seq {
                    return Err(invalid(
                        "global tokens",
                        format!("{num_global} global tokens in a sequence of {seq}"),
                    ));
                }
                let nb = seq.div_ceil(block);
                if random_blocks_per_row > nb {
                    return Err(invalid(
                        "random blocks per row",
                        format!("{random_blocks_per_row} of only {nb} blocks"),
                    ));
                }
                let random = bigbird_random_blocks(nb, random_blocks_per_row, seed);
                let w = window.min(seq) as i64;
                rows(
                    seq,
                    seq,
                    Box::new(move |q, out| {
                        if q < num_global {
                            out.push(0..seq);
                            return;
                        }
                        out.push(clipped(q as i64 - w, q as i64 + w + 1, seq));
                        out.push(0..num_global);
                        let r = random_blocks_per_row;
                        let qb = q / block;
                        out.extend(
                            random[qb * r..(qb + 1) * r]
                                .iter()
                                .map(|&kb| kb as usize * block..(kb as usize + 1) * block),
                        );
                    }),
                )
            }
            MaskSpec::Tree {
                prefix_len,
                ref parents,
            } => {
                if parents.is_empty() {
                    return Err(Error::Empty("tree"));
                }
                let depth = tree_depths(parents)?;
                let n = prefix_len
                    .checked_add(parents.len())
                    .ok_or_else(|| invalid("tree size", "overflows"))?;
                mask_geometry(n, n)?;
                if depth.iter().any(|&d| d > TREE_INTERVAL_DEPTH) {
                    dense_geometry(n, n)?;
                    return Ok(Prepared::Bits(tree_bits(prefix_len, parents, &depth)));
                }
                rows(
                    n,
                    n,
                    Box::new(move |q, out| {
                        if q < prefix_len {
                            out.push(0..q + 1);
                            return;
                        }
                        out.push(0..prefix_len);
                        let mut node = Some(q - prefix_len);
                        while let Some(v) = node {
                            out.push(prefix_len + v..prefix_len + v + 1);
                            node = parents[v];
                        }
                        // Parents usually precede children: reversed, the list is then sorted.
                        out[1..].reverse();
                    }),
                )
            }
            MaskSpec::Random {
                seq_q,
                seq_k,
                p,
                seed,
            } => {
                let wpr = dense_geometry(seq_q, seq_k)?;
                check_probability(p)?;
                let mut bits = vec![0u32; seq_q * wpr];
                for (q, row) in bits.chunks_exact_mut(wpr).enumerate() {
                    let base = (q * seq_k) as u64;
                    for k in 0..seq_k {
                        if SplitMix64::unit(SplitMix64::at(seed, base + k as u64)) < p {
                            row[k / 32] |= 1 << (k % 32);
                        }
                    }
                }
                Ok(Prepared::Bits(Mask::shared(seq_q, seq_k, bits)))
            }
            MaskSpec::RandomBlocks {
                seq_q,
                seq_k,
                block,
                p,
                seed,
            } => {
                mask_geometry(seq_q, seq_k)?;
                check_nonzero("block", block)?;
                check_probability(p)?;
                let (nbq, nbk) = (seq_q.div_ceil(block), seq_k.div_ceil(block));
                // Key ranges of each block row, adjacent allowed blocks merged.
                let block_rows: Vec<Vec<Range<usize>>> = (0..nbq)
                    .map(|i| {
                        let on: Vec<bool> = (0..nbk)
                            .map(|j| {
                                (seq_q == seq_k && i == j)
                                    || SplitMix64::unit(SplitMix64::at(seed, (i * nbk + j) as u64))
                                        < p
                            })
                            .collect();
                        true_runs(&on)
                            .into_iter()
                            .map(|r| r.start * block..(r.end * block).min(seq_k))
                            .collect()
                    })
                    .collect();
                rows(
                    seq_q,
                    seq_k,
                    Box::new(move |q, out| out.extend(block_rows[q / block].iter().cloned())),
                )
            }
        }
    }
}

/// Maximal runs of `true` in `flags`, as index ranges.
fn true_runs(flags: &[bool]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if flags[i] {
            let start = i;
            while i < flags.len() && flags[i] {
                i += 1;
            }
            runs.push(start..i);
        }
        i += 1;
    }
    runs
}

/// BigBird's random key blocks: `r` distinct blocks of `0..nb` per query block, row after row
/// (`r * nb` entries), drawn with Floyd's algorithm from one SplitMix64 stream.
fn bigbird_random_blocks(nb: usize, r: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    let mut chosen = vec![false; nb];
    let mut out = Vec::with_capacity(nb * r);
    for _ in 0..nb {
        let row = out.len();
        for j in nb - r..nb {
            let t = rng.below(j as u64 + 1) as usize;
            let pick = if chosen[t] { j } else { t };
            chosen[pick] = true;
            out.push(pick as u32);
        }
        for &b in &out[row..] {
            chosen[b as usize] = false;
        }
    }
    out
}

/// Tree mask built row by row from the parent's row, nodes in order of depth: O(N · words) for any
/// depth, where ancestor intervals would cost O(N · depth).
fn tree_bits(prefix_len: usize, parents: &[Option<usize>], depth: &[u32]) -> Mask {
    let n = prefix_len + parents.len();
    let wpr = n.div_ceil(32);
    let mut bits = vec![0u32; n * wpr];
    for q in 0..prefix_len {
        set_bit_range(&mut bits[q * wpr..(q + 1) * wpr], 0, q + 1);
    }
    let mut order: Vec<usize> = (0..parents.len()).collect();
    order.sort_by_key(|&v| depth[v]);
    for v in order {
        let row = (prefix_len + v) * wpr;
        match parents[v] {
            Some(p) => {
                let src = (prefix_len + p) * wpr;
                bits.copy_within(src..src + wpr, row);
            }
            None => set_bit_range(&mut bits[row..row + wpr], 0, prefix_len),
        }
        let k = prefix_len + v;
        bits[row + k / 32] |= 1 << (k % 32);
    }
    Mask::shared(n, n, bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unpermuted` undoes `permuted`, and refuses what is not a permutation.
    #[test]
    fn unpermuted_undoes_permuted() {
        let n = 70;
        let mask = Mask::from_fn(n, n, |q, k| (q * 7 + k * 3) % 5 == 0 || q == k).unwrap();
        let mut rng = SplitMix64::new(9);
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let shuffled = mask.permuted(&perm).unwrap();
        assert_ne!(shuffled, mask);
        assert_eq!(shuffled.unpermuted(&perm).unwrap(), mask);
        let mut repeated = perm.clone();
        repeated[1] = repeated[0];
        assert!(shuffled.unpermuted(&repeated).is_err());
        let mut out_of_range = perm;
        out_of_range[3] = n as u32;
        assert!(shuffled.unpermuted(&out_of_range).is_err());
    }
}
