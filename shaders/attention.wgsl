// Tiled online-softmax attention forward (FlashAttention-2 order), portable f32 tier.
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
// Thread layout: WG = TY x TX threads. Thread (ty, tx) owns query rows ty + TY*i (i < TM) and, for
// the scores, key columns tx + TX*j (j < BC/TX); for the output, head-dim columns tx + TX*o.
// Scores are kept in log2 units: Q is pre-scaled by scale * log2(e) when loaded.

override BR: u32 = 16u;        // query rows per tile
override BC: u32 = 32u;        // keys per tile (multiple of 32)
override D: u32 = 64u;         // head dim
override DC: u32 = 64u;        // head-dim chunk of K/V held in workgroup memory (divides D)
override TX: u32 = 8u;         // threads per row group
override TY: u32 = 8u;         // row groups; workgroup size = TX * TY
override PATH: u32 = 0u;
override DENSE_MASK: bool = false;
override WRITE_LSE: bool = true;
override PERMUTED: bool = false;  // tokens reordered: row i of the tiles is token perm[i]

const TM_CAP: u32 = 8u;        // max rows per thread (BR / TY)
const S_CAP: u32 = 32u;        // max scores per thread (TM * BC / TX)
const ACC_CAP: u32 = 64u;      // max output accumulators per thread (TM * D / TX)
const NEG: f32 = -3.0e38;      // "minus infinity" that stays finite in arithmetic
const NEG_CUT: f32 = -1.0e38;  // scores below this are masked

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
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q_buf: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse_buf: array<f32>;
// Work items (8 u32 each: query tile, block-mask row, batch base, split slot or NO_SPLIT,
// first and end position within the walk, 2 unused), then the per-row table at rows_off, the
// key-tile list at cols_off, the permutation at perm_off and the merge items at merge_off.
@group(0) @binding(6) var<storage, read> index_buf: array<u32>;
@group(0) @binding(7) var<storage, read> bits_buf: array<u32>;
// Partial results of split work items: O parts [slot][z][head][BR][D], then LSE parts.
@group(0) @binding(8) var<storage, read_write> scratch: array<f32>;

var<workgroup> q_tile: array<vec4<f32>, BR * D / 4u>;
var<workgroup> kv_tile: array<f32, BC * (DC + 4u)>;   // padded rows against bank conflicts
var<workgroup> p_tile: array<f32, BR * BC>;
var<workgroup> red_m: array<f32, BR * TX>;
var<workgroup> red_l: array<f32, BR * TX>;
var<workgroup> walk: vec4<u32>;   // first position, end position, path-specific a, b
var<workgroup> span: vec2<u32>;   // the positions this work item covers

const NO_SPLIT: u32 = 0xffffffffu;
const LN2: f32 = 0.6931471805599453;

const KV_STRIDE_EXTRA: u32 = 4u;

// The token at position `i` of the (possibly reordered) sequence.
fn token(i: u32) -> u32 {
    if (PERMUTED) {
        return index_buf[P.perm_off + i];
    }
    return i;
}

fn kv_stride() -> u32 {
    return DC + KV_STRIDE_EXTRA;
}

// Loads keys [key0, key0 + BC) x head-dim [c0, c0 + DC) of one K or V head into kv_tile.
fn load_kv(from_v: bool, head_base: u32, key0: u32, c0: u32, lid: u32) {
    let per_row = DC / 4u;
    for (var e = lid; e < BC * per_row; e += TX * TY) {
        let r = e / per_row;
        let c4 = e % per_row;
        var val = vec4<f32>(0.0);
        if (key0 + r < P.seq_k) {
            let g = head_base + token(key0 + r) * (D / 4u) + c0 / 4u + c4;
            if (from_v) {
                val = v_buf[g];
            } else {
                val = k_buf[g];
            }
        }
        let s = r * kv_stride() + c4 * 4u;
        kv_tile[s] = val.x;
        kv_tile[s + 1u] = val.y;
        kv_tile[s + 2u] = val.z;
        kv_tile[s + 3u] = val.w;
    }
}

// Whether key `key` (absolute) is allowed for query row `qrow` (absolute) of a masked tile.
fn allowed(state: u32, slot: u32, row_in_tile: u32, qrow: u32, key: u32, b: u32) -> bool {
    if (state == 1u) {
        // partial tile: its own bit slot
        let col = key % BC;
        let w = slot * BR * (BC / 32u) + row_in_tile * (BC / 32u) + col / 32u;
        return ((bits_buf[w] >> (col % 32u)) & 1u) != 0u;
    }
    // state 3: element mask over the whole score matrix (dense path with a mask)
    let w = b * P.mask_batch_stride + qrow * P.words_per_row + key / 32u;
    return ((bits_buf[w] >> (key % 32u)) & 1u) != 0u;
}

@compute @workgroup_size(TX * TY)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let TM = BR / TY;
    let SN = BC / TX;
    let ON = D / TX;
    let tx = lid % TX;
    let ty = lid / TX;

    let item = wg.x * 8u;
    let qt = index_buf[item];
    let row = index_buf[item + 1u];
    let b = index_buf[item + 2u] + wg.z;
    let split = index_buf[item + 3u];
    let h = wg.y;
    let hk = h / P.group;
    let q0 = qt * BR;

    // The walk over positions; uniform for the workgroup.
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
    let w = workgroupUniformLoad(&walk);
    let sp = workgroupUniformLoad(&span);
    var partial_base = 0u;
    if (PATH != 0u) {
        partial_base = index_buf[P.rows_off + row * 8u + 4u];
    }

    // Q tile, pre-scaled into log2 units.
    let q_head = ((b * P.heads + h) * P.seq_q) * (D / 4u);
    for (var e = lid; e < BR * D / 4u; e += TX * TY) {
        let r = e / (D / 4u);
        var val = vec4<f32>(0.0);
        if (q0 + r < P.seq_q) {
            val = q_buf[q_head + token(q0 + r) * (D / 4u) + e % (D / 4u)] * P.scale_log2;
        }
        q_tile[e] = val;
    }

    var m_i: array<f32, TM_CAP>;
    var l_i: array<f32, TM_CAP>;
    var acc: array<f32, ACC_CAP>;
    for (var i = 0u; i < TM; i++) {
        m_i[i] = NEG;
        l_i[i] = 0.0;
    }
    for (var a = 0u; a < TM * ON; a++) {
        acc[a] = 0.0;
    }

    let kv_head = (b * (P.heads / P.group) + hk) * P.seq_k * (D / 4u);
    var s: array<f32, S_CAP>;

    for (var pos = sp.x; pos < sp.y; pos++) {
        // Which key tile, and its state: 1 partial (slot), 2 full, 3 element-masked dense.
        var kt = pos;
        var state = 2u;
        var slot = 0u;
        if (PATH == 0u) {
            if (DENSE_MASK) {
                state = 3u;
            }
        } else if (PATH == 1u) {
            // w = (begin, end, full_begin, full_end)
            if (pos < w.z) {
                state = 1u;
                slot = partial_base + (pos - w.x);
            } else if (pos >= w.w) {
                state = 1u;
                slot = partial_base + (w.z - w.x) + (pos - w.w);
            }
        } else {
            // w = (list begin, list end, full count, _)
            kt = index_buf[P.cols_off + pos];
            if (pos - w.x >= w.z) {
                state = 1u;
                slot = partial_base + (pos - w.x - w.z);
            }
        }
        let key0 = kt * BC;

        // S = (Q * scale * log2 e) K^T, over head-dim chunks.
        for (var a = 0u; a < TM * SN; a++) {
            s[a] = 0.0;
        }
        for (var c0 = 0u; c0 < D; c0 += DC) {
            workgroupBarrier();
            load_kv(false, kv_head, key0, c0, lid);
            workgroupBarrier();
            for (var d4 = 0u; d4 < DC / 4u; d4++) {
                for (var i = 0u; i < TM; i++) {
                    let qv = q_tile[(ty + TY * i) * (D / 4u) + c0 / 4u + d4];
                    for (var j = 0u; j < SN; j++) {
                        let kb = (tx + TX * j) * kv_stride() + d4 * 4u;
                        let kv = vec4<f32>(kv_tile[kb], kv_tile[kb + 1u], kv_tile[kb + 2u], kv_tile[kb + 3u]);
                        s[i * SN + j] += dot(qv, kv);
                    }
                }
            }
        }

        // Masking: keys past the end, then the mask bits of partial / element-masked tiles.
        let edge = key0 + BC > P.seq_k;
        if (edge || state != 2u) {
            for (var i = 0u; i < TM; i++) {
                let r = ty + TY * i;
                for (var j = 0u; j < SN; j++) {
                    let key = key0 + tx + TX * j;
                    var ok = key < P.seq_k && q0 + r < P.seq_q;
                    if (ok && state != 2u) {
                        ok = allowed(state, slot, r, q0 + r, key, b);
                    }
                    if (!ok) {
                        s[i * SN + j] = NEG;
                    }
                }
            }
        }

        // Online softmax: tile row max, rescale, P = exp2(S - m), tile row sum.
        for (var i = 0u; i < TM; i++) {
            var mx = NEG;
            for (var j = 0u; j < SN; j++) {
                mx = max(mx, s[i * SN + j]);
            }
            red_m[(ty + TY * i) * TX + tx] = mx;
        }
        workgroupBarrier();
        for (var i = 0u; i < TM; i++) {
            let r = ty + TY * i;
            var m_new = m_i[i];
            for (var t = 0u; t < TX; t++) {
                m_new = max(m_new, red_m[r * TX + t]);
            }
            let alpha = exp2(m_i[i] - m_new);
            m_i[i] = m_new;
            l_i[i] *= alpha;
            for (var o = 0u; o < ON; o++) {
                acc[i * ON + o] *= alpha;
            }
            var ps = 0.0;
            for (var j = 0u; j < SN; j++) {
                let sv = s[i * SN + j];
                // written so that a NaN score stays NaN (inputs with NaN propagate it)
                let p = select(exp2(sv - m_new), 0.0, sv <= NEG_CUT);
                p_tile[r * BC + tx + TX * j] = p;
                ps += p;
            }
            red_l[r * TX + tx] = ps;
        }

        // O += P V, over head-dim chunks (the first barrier also publishes p_tile and red_l).
        for (var c0 = 0u; c0 < D; c0 += DC) {
            workgroupBarrier();
            load_kv(true, kv_head, key0, c0, lid);
            workgroupBarrier();
            for (var j = 0u; j < BC; j++) {
                for (var i = 0u; i < TM; i++) {
                    let p = p_tile[(ty + TY * i) * BC + j];
                    for (var o = c0 / TX; o < (c0 + DC) / TX; o++) {
                        acc[i * ON + o] += p * kv_tile[j * kv_stride() + tx + TX * o - c0];
                    }
                }
            }
        }
        for (var i = 0u; i < TM; i++) {
            let r = ty + TY * i;
            var ls = 0.0;
            for (var t = 0u; t < TX; t++) {
                ls += red_l[r * TX + t];
            }
            l_i[i] += ls;
        }
    }

    // Normalise and store; rows with no allowed key give O = 0 and LSE = -inf. A split item
    // stores its part (normalised O, log2-domain LSE or NEG) for the merge.
    for (var i = 0u; i < TM; i++) {
        let r = ty + TY * i;
        let qrow = q0 + r;
        if (qrow >= P.seq_q) {
            continue;
        }
        let l = l_i[i];
        let inv = select(0.0, 1.0 / l, l > 0.0);
        if (split != NO_SPLIT) {
            let part = ((split * nwg.z + wg.z) * P.heads + h) * BR + r;
            for (var o = 0u; o < ON; o++) {
                scratch[part * D + tx + TX * o] = acc[i * ON + o] * inv;
            }
            if (tx == 0u) {
                scratch[P.scratch_lse_off + part] = select(NEG, m_i[i] + log2(l), l > 0.0);
            }
            continue;
        }
        let out_row = (b * P.heads + h) * P.seq_q + token(qrow);
        let o_row = out_row * D;
        for (var o = 0u; o < ON; o++) {
            o_buf[o_row + tx + TX * o] = acc[i * ON + o] * inv;
        }
        if (WRITE_LSE && tx == 0u) {
            var lse = bitcast<f32>(P.neg_inf_bits);
            if (l > 0.0) {
                lse = (m_i[i] + log2(l)) * LN2;
            }
            lse_buf[out_row] = lse;
        }
    }
}

// Combines the parts of split query tiles: merge item = (query tile, batch base, first slot,
// slot count); one workgroup per (merge item, head, z).
@compute @workgroup_size(TX * TY)
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
    for (var e = lid; e < BR * D; e += TX * TY) {
        let r = e / D;
        let c = e % D;
        let qrow = qt * BR + r;
        if (qrow >= P.seq_q) {
            continue;
        }
        var mx = NEG;
        for (var s = s0; s < s0 + ns; s++) {
            mx = max(mx, scratch[P.scratch_lse_off + ((s * nwg.z + wg.z) * P.heads + h) * BR + r]);
        }
        var big_l = 0.0;
        var o = 0.0;
        for (var s = s0; s < s0 + ns; s++) {
            let part = ((s * nwg.z + wg.z) * P.heads + h) * BR + r;
            let ls = scratch[P.scratch_lse_off + part];
            if (ls > NEG_CUT) {
                let wt = exp2(ls - mx);
                big_l += wt;
                o += wt * scratch[part * D + c];
            }
        }
        let out_row = (b * P.heads + h) * P.seq_q + token(qrow);
        o_buf[out_row * D + c] = select(0.0, o / big_l, big_l > 0.0);
        if (WRITE_LSE && c == 0u) {
            var lse = bitcast<f32>(P.neg_inf_bits);
            if (big_l > 0.0) {
                lse = (mx + log2(big_l)) * LN2;
            }
            lse_buf[out_row] = lse;
        }
    }
}
