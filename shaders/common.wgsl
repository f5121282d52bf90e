// What every attention kernel shares: overrides, parameters, bindings other than Q/K/V, the
// walk over a work item's key tiles, mask bits, the token permutation, storing results, and the
// split-KV merge. The host prepends a prologue that enables extensions and defines the storage
// type of Q, K, V and O (f32, f16 or bf16): `Elem4`, four elements in memory, with `load4` and
// `pack4` to widen them to vec4<f32> and round them back (storage_float.wgsl, storage_bf16.wgsl).
//
// A workgroup owns one query tile of BR rows of one (batch, head) and walks the key tiles that its
// work item names; each key tile is BC keys. The walk is one of three paths (PATH):
//   0 dense:      every key tile; with DENSE_MASK, mask bits of a full bit-packed mask are applied
//   1 run-length: key tiles [begin, end), the full ones [full_begin, full_end), the rest partial
//   2 sparse:     a CSR list of key tiles, full ones first, then partial ones
// Full tiles read no mask; partial tiles read their bit slot (BR rows x BC/32 words).
// A work item may cover only part of its query tile's walk (split-KV for heavy query tiles): it
// then writes its normalised partial output and log-sum-exp to `scratch`, and the `merge` entry
// point combines the parts of each query tile by log-sum-exp.
//
// Each kernel says where the mask bits live by defining `fn mask_word(i: u32) -> u32` (word i of
// the bit-packed partial slots or dense mask): the forward kernels bind them on their own, the
// backward kernels append them to their index buffer to stay within 8 storage buffers.

override BR: u32 = 16u;        // query rows per tile
override BC: u32 = 32u;        // keys per tile (multiple of 32)
override D: u32 = 64u;         // head dim
override THREADS: u32 = 64u;   // workgroup size
override PATH: u32 = 0u;
override DENSE_MASK: bool = false;
override WRITE_LSE: bool = true;
override PERMUTED: bool = false;  // tokens reordered: row i of the tiles is token perm[i]

const NEG: f32 = -3.0e38;      // "minus infinity" that stays finite in arithmetic
const NEG_CUT: f32 = -1.0e38;  // scores below this are masked
const NO_SPLIT: u32 = 0xffffffffu;
const LN2: f32 = 0.6931471805599453;
// Non-finite scores. WGSL lets an implementation assume that no value is NaN or infinite, and
// drivers do: max() drops a NaN, and a select on a comparison may become a min() that drops it
// too (the H200's did, in the tensor-core kernel's P). So no kernel relies on float arithmetic
// to carry a NaN or +inf score to its row's output: each thread sums its row's scores after
// masking, scaled by WATCH so that finite scores cannot overflow the sum (2^-64 x 3.4e38 x 2^32
// keys stays finite); a row whose sum is NaN or +inf (`spoiled`, an integer test) gets NaN as
// its output and log-sum-exp, as in the reference. A score of -inf weighs nothing.
const WATCH: f32 = 5.421010862427522e-20;   // 2^-64

struct Params {
    seq_q: u32,
    seq_k: u32,
    heads: u32,
    group: u32,             // query heads per key/value head
    scale_log2: f32,        // softmax scale * log2(e)
    words_per_row: u32,     // dense mask: u32 words per query row
    mask_batch_stride: u32, // dense mask: words between batch elements (0 when shared)
    rows_off: u32,          // index buffer: offset of the per-row table (2 x vec4 per row)
    cols_off: u32,          // index buffer: offset of the CSR key-tile list
    neg_inf_bits: u32,      // bits of -inf, written as the LSE of rows with no allowed key
    k_tiles: u32,
    perm_off: u32,          // index buffer: offset of the token permutation (PERMUTED)
    merge_off: u32,         // index buffer: offset of the merge items (4 u32 each)
    scratch_lse_off: u32,   // scratch: offset of the partial log-sum-exps (after partial O)
    t_cols_off: u32,        // backward index buffer: offset of the key-tile columns (8 u32 each)
    t_rows_off: u32,        // backward index buffer: offset of the transposed entries (2 u32 each)
    bits_off: u32,          // backward index buffer: offset of the mask bits
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(4) var<storage, read_write> o_buf: array<Elem4>;
@group(0) @binding(5) var<storage, read_write> lse_buf: array<f32>;
// Work items (8 u32 each: query tile, block-mask row, batch base, split slot or NO_SPLIT,
// first and end position within the walk, 2 unused), then the per-row table at rows_off, the
// key-tile list at cols_off, the permutation at perm_off and the merge items at merge_off.
@group(0) @binding(6) var<storage, read> index_buf: array<u32>;
// Partial results of split work items: O parts [slot][z][head][BR][D], then LSE parts.
@group(0) @binding(8) var<storage, read_write> scratch: array<f32>;

var<workgroup> walk: vec4<u32>;   // first position, end position, path-specific a, b
var<workgroup> span: vec2<u32>;   // the positions this work item covers

// One workgroup's work: which query tile of which (batch, head), and its walk.
struct Item {
    qt: u32,
    b: u32,
    h: u32,
    split: u32,
    z: u32,             // workgroup_id.z, and the number of them, for split-KV parts
    nz: u32,
    walk: vec4<u32>,    // path-specific: see tile_at
    first: u32,         // positions [first, end) of the walk are this item's
    end: u32,
    partial_base: u32,  // first partial-tile slot of the query tile
}

// Reads the work item of this workgroup; call from uniform control flow.
fn work_item(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Item {
    let item = wg.x * 8u;
    let row = index_buf[item + 1u];
    if (lid == 0u) {
        if (PATH == 0u) {
            walk = vec4<u32>(0u, P.k_tiles, 0u, 0u);
        } else {
            let r = P.rows_off + row * 8u;
            walk = vec4<u32>(index_buf[r], index_buf[r + 1u], index_buf[r + 2u], index_buf[r + 3u]);
        }
        let len = walk.y - walk.x;
        span = walk.x + vec2<u32>(min(index_buf[item + 4u], len), min(index_buf[item + 5u], len));
    }
    var it: Item;
    it.walk = workgroupUniformLoad(&walk);
    let sp = workgroupUniformLoad(&span);
    it.first = sp.x;
    it.end = sp.y;
    it.qt = index_buf[item];
    it.b = index_buf[item + 2u] + wg.z;
    it.h = wg.y;
    it.split = index_buf[item + 3u];
    it.z = wg.z;
    it.nz = nwg.z;
    it.partial_base = 0u;
    if (PATH != 0u) {
        it.partial_base = index_buf[P.rows_off + row * 8u + 4u];
    }
    return it;
}

// A key tile of the walk: its index, state (1 partial, 2 full, 3 element-masked dense) and,
// for partial tiles, its bit slot.
struct Tile {
    kt: u32,
    state: u32,
    slot: u32,
}

fn tile_at(pos: u32, it: Item) -> Tile {
    let w = it.walk;
    var t = Tile(pos, 2u, 0u);
    if (PATH == 0u) {
        if (DENSE_MASK) {
            t.state = 3u;
        }
    } else if (PATH == 1u) {
        // w = (begin, end, full_begin, full_end)
        if (pos < w.z) {
            t.state = 1u;
            t.slot = it.partial_base + (pos - w.x);
        } else if (pos >= w.w) {
            t.state = 1u;
            t.slot = it.partial_base + (w.z - w.x) + (pos - w.w);
        }
    } else {
        // w = (list begin, list end, full count, _)
        t.kt = index_buf[P.cols_off + pos];
        if (pos - w.x >= w.z) {
            t.state = 1u;
            t.slot = it.partial_base + (pos - w.x - w.z);
        }
    }
    return t;
}

// The token at position `i` of the (possibly reordered) sequence.
fn token(i: u32) -> u32 {
    if (PERMUTED) {
        return index_buf[P.perm_off + i];
    }
    return i;
}

// Whether `key` (absolute, in range) is allowed for row `r` of query tile `it.qt` in tile `t`.
fn allowed(t: Tile, it: Item, r: u32, key: u32) -> bool {
    if (t.state == 2u) {
        return true;
    }
    return ((mask_word(mask_word_at(t, it, r, key)) >> (key % 32u)) & 1u) != 0u;
}

// Index of the mask word that holds `key`'s bit (absolute, in range) for row `r` of query tile
// `it.qt` in a partial (1) or element-masked (3) tile `t`; bit key % 32 of it (BC is a multiple
// of 32).
fn mask_word_at(t: Tile, it: Item, r: u32, key: u32) -> u32 {
    if (t.state == 1u) {
        return t.slot * BR * (BC / 32u) + r * (BC / 32u) + (key % BC) / 32u;
    }
    return it.b * P.mask_batch_stride + (it.qt * BR + r) * P.words_per_row + key / 32u;
}

// Where row `r` of the item's query tile goes: an output row, or a split part.
fn dest_row(it: Item, r: u32) -> u32 {
    if (it.split != NO_SPLIT) {
        return ((it.split * it.nz + it.z) * P.heads + it.h) * BR + r;
    }
    return (it.b * P.heads + it.h) * P.seq_q + token(it.qt * BR + r);
}

// NaN or +inf, tested on the bits (see WATCH).
fn spoiled(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

// A NaN made at run time (a NaN constant is a shader-creation error in WGSL).
fn nan_value() -> f32 {
    return bitcast<f32>(P.neg_inf_bits | 0x7fc00000u);
}

// Stores columns c..c+3 (c a multiple of 4) of normalised output row `dest` (from dest_row).
fn store_o4(it: Item, dest: u32, c: u32, v: vec4<f32>) {
    if (it.split != NO_SPLIT) {
        let s = dest * D + c;
        scratch[s] = v.x;
        scratch[s + 1u] = v.y;
        scratch[s + 2u] = v.z;
        scratch[s + 3u] = v.w;
    } else {
        o_buf[(dest * D + c) / 4u] = pack4(v);
    }
}

// Stores the log-sum-exp of row `dest` from the running max `m` (log2 units) and sum `l`; NaN
// where the row is `bad` (a NaN or +inf score).
fn store_lse(it: Item, dest: u32, m: f32, l: f32, bad: bool) {
    if (it.split != NO_SPLIT) {
        scratch[P.scratch_lse_off + dest] = select(select(NEG, m + log2(l), l > 0.0), nan_value(), bad);
    } else if (WRITE_LSE) {
        var lse = bitcast<f32>(P.neg_inf_bits);
        if (l > 0.0) {
            lse = (m + log2(l)) * LN2;
        }
        lse_buf[dest] = select(lse, nan_value(), bad);
    }
}

// Combines the parts of split query tiles: merge item = (query tile, batch base, first slot,
// slot count); one workgroup per (merge item, head, z), one thread per four columns of a row.
@compute @workgroup_size(THREADS)
fn merge(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m = P.merge_off + wg.x * 4u;
    let qt = index_buf[m];
    let b = index_buf[m + 1u] + wg.z;
    let s0 = index_buf[m + 2u];
    let ns = index_buf[m + 3u];
    let h = wg.y;
    for (var e = lid; e < BR * D / 4u; e += THREADS) {
        let r = e / (D / 4u);
        let c4 = e % (D / 4u);
        let qrow = qt * BR + r;
        if (qrow >= P.seq_q) {
            continue;
        }
        var mx = NEG;
        for (var s = s0; s < s0 + ns; s++) {
            mx = max(mx, scratch[P.scratch_lse_off + ((s * nwg.z + wg.z) * P.heads + h) * BR + r]);
        }
        var big_l = 0.0;
        var o = vec4<f32>(0.0);
        var bad = false;
        for (var s = s0; s < s0 + ns; s++) {
            let part = ((s * nwg.z + wg.z) * P.heads + h) * BR + r;
            let ls = scratch[P.scratch_lse_off + part];
            bad = bad || spoiled(ls);
            if (ls > NEG_CUT) {
                let wt = exp2(ls - mx);
                big_l += wt;
                let x = part * D + 4u * c4;
                o += wt * vec4<f32>(scratch[x], scratch[x + 1u], scratch[x + 2u], scratch[x + 3u]);
            }
        }
        let out_row = (b * P.heads + h) * P.seq_q + token(qrow);
        let out = select(select(vec4<f32>(0.0), o / big_l, big_l > 0.0), vec4<f32>(nan_value()), bad);
        o_buf[out_row * (D / 4u) + c4] = pack4(out);
        if (WRITE_LSE && c4 == 0u) {
            var lse = bitcast<f32>(P.neg_inf_bits);
            if (big_l > 0.0) {
                lse = (mx + log2(big_l)) * LN2;
            }
            lse_buf[out_row] = select(lse, nan_value(), bad);
        }
    }
}
