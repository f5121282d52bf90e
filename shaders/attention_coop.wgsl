// Tensor-core kernel: S = Q K^T and O += P V through cooperative matrices (16x16x16, f16
// operands, f32 accumulators); masking and the online softmax by the threads, through
// workgroup memory, since a cooperative matrix has no element access. Needs common.wgsl; the
// prologue enables f16 and wgpu_cooperative_matrix with Elem = f16. No subgroup operations here:
// one NVIDIA driver crashes on modules that mix them with cooperative matrices.
//
// SPLIT subgroups of 32 threads for each block of 16 query rows (THREADS = 2 SPLIT BR = TX BR):
// subgroup w works on rows [16 b, 16 b + 16) of the tile, b = w / SPLIT, and as part
// p = w % SPLIT of them computes keys [p BC / SPLIT, (p + 1) BC / SPLIT) of S and head-dim
// columns [p D / SPLIT, (p + 1) D / SPLIT) of O; it keeps the block's Q fragments and its O
// accumulators in registers (D <= 16 * DT_CAP). With SPLIT = 2 a thread holds half the
// accumulators and half the scores, and twice the threads share the softmax: the dense plan
// ran 1.97x faster at d = 128 (64x32 tiles) and 1.11x at d = 64 (128x32) on the H200. For the
// softmax, the TX threads TX r .. TX r + TX - 1 own row r: thread TX r + i its columns
// TX j + i; each reads only its own columns.
//
// Lazy rescaling: P = exp2(S - m) with a per-row reference max m that moves only when some
// thread's columns exceed its row's m by more than RESCALE_GAP, so P <= 2^RESCALE_GAP stays well
// inside f16. Only then are the row's maximum (its TX threads' shares, exchanged through `red`)
// needed and the accumulators rescaled, through workgroup memory by the threads; after the
// first key tiles of a row that is rare (reading each score once, not the whole row per thread,
// made the dense kernel 1.23x faster at d = 64 on the H200).
//
// K and V pipeline: one K buffer and two V buffers in workgroup memory. Right after S of tile t
// is computed, K of tile t+1 is written over K of tile t and V of tile t+1 into the V buffer
// that tile t-1 used; with PREFETCH, tile t+1 was fetched from global memory into registers one
// tile earlier, so the loads overlap a whole tile of work (the host sets it where a thread's
// share is at most KV_CAP vec4 per K or V: more registers spill; without it the next tile is
// copied straight from global memory at the same point). Two barriers per tile where no row
// rescales: S stored, and the rescale flag read. P is written with the current reference max
// before the flag is read (that read's barrier makes it visible to the subgroup's cooperative
// load); on a tile where any thread sets the flag, every row writes P again with its new max,
// behind barriers of its own (one, and three per O chunk where the accumulators are rescaled).
// The flag alternates between two slots of `red`, so clearing one needs no barrier of its own
// (this made the dense kernel 1.04x faster at 64x32 and 128x32 on the H200).
//
// At the end, the threads write O row-major and coalesced: consecutive threads write
// consecutive vec4 of one row (DC / 4 threads per row, contiguous in O over runs of DC / SPLIT
// columns) rather than TX threads a row.
//
// Workgroup memory: tiles with padded rows (16 bytes) against bank conflicts; f_sh holds S each
// key tile, and O in chunks of DC columns when rescaling and at the end (DC = D where that fits,
// else BC: 64-row tiles then fit 48 KiB at d = 128, 128-row ones at d = 64). The chunks are
// written out as calls with constant chunk numbers (o_chunks): as a loop with barriers inside,
// the driver indexed the accumulators by the loop variable and kept them in local memory (432
// bytes a thread at 128x32 d = 64; out of it, the 128x32 dense plan ran 1.66x faster on the
// H200). The Q tile passes through the K/V buffers first.
// Every workgroup variable here is an array: on the H100's Vulkan driver (580.159) a scalar
// workgroup variable beside the cooperative-matrix tiles corrupted the results, so the rescale
// flag lives in a slot of `red`.
//
// The host builds this module without wgpu's bounds checks (see kernel.rs): with them, every
// index into the register arrays below is clamped and the driver keeps those arrays in local
// memory (the kernel ran 9x slower on the H100).

override PREFETCH: bool = false;
override DC: u32 = 64u;        // head-dim columns of O staged in f_sh at once (divides D)
override SPLIT: u32 = 1u;      // subgroups per 16 query rows (1 or 2)
override TX: u32 = 2u * SPLIT; // threads per query row
// Q rows staged in the K/V buffers at once at the start (all of them where they fit; the
// host keeps BR / 2 a multiple of 16 where they do not)
override QROWS: u32 = select(BR, BR / 2u, BR > 3u * BC);

const DT_CAP: u32 = 8u;        // max D / 16
const KT_CAP: u32 = 4u;        // max BC / 16
const HALF_CAP: u32 = 32u;     // max BC / TX
const KV_CAP: u32 = 8u;        // max BC * D / 4 / THREADS with PREFETCH
const RESCALE_GAP: f32 = 8.0;
const Q_CAP: u32 = 8u;         // max BR * D / 4 / THREADS for Q_AHEAD
// Whether a thread reads its whole share of the Q tile into registers at the start, beside the
// first K/V fetch, so that every load of a work item's prologue waits for memory at once
// (otherwise each pass of Q through the K/V buffers reads its rows straight from memory).
override Q_AHEAD: bool = QROWS * D / 4u % THREADS == 0u && BR * D / 4u <= Q_CAP * THREADS;

@group(0) @binding(1) var<storage, read> q_buf: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<f16>>;
@group(0) @binding(7) var<storage, read> bits_buf: array<u32>;

fn mask_word(i: u32) -> u32 {
    return bits_buf[i];
}

// K, then the V buffers of even and odd steps; rows padded by 8. Q passes through it at the
// start (in two halves where BR > 3 BC).
var<workgroup> kv_sh: array<f16, 3u * BC * (D + 8u)>;
var<workgroup> p_sh: array<f16, BR * (BC + 8u)>;
var<workgroup> f_sh: array<f32, BR * (max(BC, DC) + 4u)>;
// each thread's tile max, then its l at the end; the rescale flags of even and odd walk
// positions (pos) at TX BR and TX BR + 1
var<workgroup> red: array<f32, TX * BR + 4u>;

// Keys [key0, key0 + BC) of one K or V head, as this thread's share (zeros past the end).
fn fetch(regs: ptr<function, array<vec4<f16>, KV_CAP>>, from_v: bool, head_base: u32, key0: u32, lid: u32) {
    for (var i = 0u; i < min(BC * D / 4u / THREADS, KV_CAP); i++) {
        (*regs)[i] = kv_elem4(from_v, head_base, key0, lid + i * THREADS);
    }
}

// Writes a fetched share into the buffer at `base` of kv_sh.
fn put(regs: array<vec4<f16>, KV_CAP>, base: u32, lid: u32) {
    for (var i = 0u; i < min(BC * D / 4u / THREADS, KV_CAP); i++) {
        put4(regs[i], base, lid + i * THREADS);
    }
}

// Copies keys [key0, key0 + BC) of one K or V head into the buffer at `base` (no PREFETCH).
fn copy_kv(from_v: bool, head_base: u32, key0: u32, base: u32, lid: u32) {
    for (var e = lid; e < BC * (D / 4u); e += THREADS) {
        put4(kv_elem4(from_v, head_base, key0, e), base, e);
    }
}

// Element e (four values) of a K or V tile: row e / (D / 4) of it.
fn kv_elem4(from_v: bool, head_base: u32, key0: u32, e: u32) -> vec4<f16> {
    let r = e / (D / 4u);
    if (key0 + r >= P.seq_k) {
        return vec4<f16>(0.0);
    }
    let g = head_base / 4u + token(key0 + r) * (D / 4u) + e % (D / 4u);
    if (from_v) {
        return v_buf[g];
    }
    return k_buf[g];
}

// Element e (four values) of the Q tile at `q0` of the head at `q_head`: row e / (D / 4) of
// it (zeros past the end).
fn q_elem4(q_head: u32, q0: u32, e: u32) -> vec4<f16> {
    let row = e / (D / 4u);
    if (q0 + row >= P.seq_q) {
        return vec4<f16>(0.0);
    }
    return q_buf[(q_head + token(q0 + row) * D) / 4u + e % (D / 4u)];
}

fn put4(val: vec4<f16>, base: u32, e: u32) {
    let s = base + (e / (D / 4u)) * (D + 8u) + (e % (D / 4u)) * 4u;
    kv_sh[s] = val.x;
    kv_sh[s + 1u] = val.y;
    kv_sh[s + 2u] = val.z;
    kv_sh[s + 3u] = val.w;
}

// Mask word `wi` (keys key0 + 32 wi ..) of row r in tile t; all ones for full tiles and where
// there is no word (keys or rows past the end are masked by the caller).
fn row_word(t: Tile, it: Item, r: u32, key0: u32, wi: u32) -> u32 {
    let key = key0 + 32u * wi;
    if (t.state == 1u || (t.state == 3u && key < P.seq_k && it.qt * BR + r < P.seq_q)) {
        return mask_word(mask_word_at(t, it, r, key));
    }
    return 0xffffffffu;
}

@compute @workgroup_size(THREADS)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let it = work_item(wg, nwg, lid);
    let blk = lid / 32u / SPLIT;
    let part = lid / 32u % SPLIT;
    let r = lid / TX;
    let lane = lid % TX;
    let q0 = it.qt * BR;
    let hk = it.h / P.group;

    let kv_head = (it.b * (P.heads / P.group) + hk) * P.seq_k * D;
    let kvt = BC * (D + 8u);
    let q_head = (it.b * P.heads + it.h) * P.seq_q * D;
    // Q (with Q_AHEAD) and, with PREFETCH, the first K/V tile are read into registers before
    // Q passes through the K/V buffers, so that they wait for global memory together.
    var qr: array<vec4<f16>, Q_CAP>;
    if (Q_AHEAD) {
        for (var i = 0u; i < BR * D / 4u / THREADS; i++) {
            qr[i] = q_elem4(q_head, q0, lid + i * THREADS);
        }
    }
    var kr: array<vec4<f16>, KV_CAP>;
    var vr: array<vec4<f16>, KV_CAP>;
    if (PREFETCH && it.first < it.end) {
        let key0 = tile_at(it.first, it).kt * BC;
        fetch(&kr, false, kv_head, key0, lid);
        fetch(&vr, true, kv_head, key0, lid);
    }
    if (lid == 0u) {
        red[TX * BR] = 0.0;
        red[TX * BR + 1u] = 0.0;
    }
    // Q through the K/V buffers, QROWS rows at a time; every subgroup loads in each pass (a
    // cooperative load needs uniform control flow) and keeps the fragments of its own pass.
    var qa: array<coop_mat16x16<f16, A>, DT_CAP>;
    for (var qp = 0u; qp < BR / QROWS; qp++) {
        if (Q_AHEAD) {
            let per = QROWS * D / 4u / THREADS;
            for (var i = 0u; i < per; i++) {
                put4(qr[qp * per + i], 0u, lid + i * THREADS);
            }
        } else {
            for (var e = lid; e < QROWS * (D / 4u); e += THREADS) {
                put4(q_elem4(q_head, q0, qp * QROWS * (D / 4u) + e), 0u, e);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < D / 16u; kk++) {
            let f = coopLoadT<coop_mat16x16<f16, A>>(&kv_sh[(blk * 16u) % QROWS * (D + 8u) + kk * 16u], D + 8u);
            if (blk * 16u / QROWS == qp) {
                qa[kk] = f;
            }
        }
        workgroupBarrier();
    }
    var acc: array<coop_mat16x16<f32, C>, DT_CAP>;
    for (var n = 0u; n < D / 16u / SPLIT; n++) {
        acc[n] = coop_mat16x16<f32, C>();
    }
    var m_i = NEG;
    var l_i = 0.0;
    var watch = 0.0;  // this thread's scores, scaled (see WATCH in common.wgsl)
    var sv: array<f32, HALF_CAP>;
    var pa: array<coop_mat16x16<f16, A>, KT_CAP>;

    // Once every subgroup has its Q fragments, the first tile goes into the K/V buffers
    // (without PREFETCH straight from global memory) and, with PREFETCH, the second is fetched.
    if (PREFETCH) {
        put(kr, 0u, lid);
        put(vr, kvt, lid);
    } else if (it.first < it.end) {
        let key0 = tile_at(it.first, it).kt * BC;
        copy_kv(false, kv_head, key0, 0u, lid);
        copy_kv(true, kv_head, key0, kvt, lid);
    }
    if (PREFETCH && it.first + 1u < it.end) {
        let key0 = tile_at(it.first + 1u, it).kt * BC;
        fetch(&kr, false, kv_head, key0, lid);
        fetch(&vr, true, kv_head, key0, lid);
    }
    workgroupBarrier();

    for (var pos = it.first; pos < it.end; pos++) {
        let t = tile_at(pos, it);
        let key0 = t.kt * BC;
        let vb = kvt * (1u + (pos - it.first) % 2u);
        // This row's mask words, read before S so that the products hide their latency.
        let masked = key0 + BC > P.seq_k || t.state != 2u;
        var words = array<u32, 2>(0xffffffffu, 0xffffffffu);
        if (masked) {
            for (var wi = 0u; wi < BC / 32u; wi++) {
                words[wi] = row_word(t, it, r, key0, wi);
            }
        }
        // This subgroup's BC / SPLIT columns of S in independent accumulator chains.
        var cs: array<coop_mat16x16<f32, C>, KT_CAP>;
        for (var n = 0u; n < BC / 16u / SPLIT; n++) {
            cs[n] = coop_mat16x16<f32, C>();
        }
        for (var kk = 0u; kk < D / 16u; kk++) {
            for (var n = 0u; n < BC / 16u / SPLIT; n++) {
                let b = coopLoad<coop_mat16x16<f16, B>>(&kv_sh[(part * (BC / SPLIT) + n * 16u) * (D + 8u) + kk * 16u], D + 8u);
                cs[n] = coopMultiplyAdd(qa[kk], b, cs[n]);
            }
        }
        for (var n = 0u; n < BC / 16u / SPLIT; n++) {
            coopStoreT(cs[n], &f_sh[blk * 16u * (max(BC, DC) + 4u) + part * (BC / SPLIT) + n * 16u], max(BC, DC) + 4u);
        }
        workgroupBarrier();
        // The previous tile's flag was read before this barrier: clear its slot for the next.
        if (lid == 0u) {
            red[TX * BR + 1u - pos % 2u] = 0.0;
        }
        // K of the next tile over this one's, V into the other V buffer; with PREFETCH, fetch
        // the tile after it.
        let vb_next = kvt * (1u + (pos + 1u - it.first) % 2u);
        if (PREFETCH) {
            if (pos + 1u < it.end) {
                put(kr, 0u, lid);
                put(vr, vb_next, lid);
            }
            if (pos + 2u < it.end) {
                let key2 = tile_at(pos + 2u, it).kt * BC;
                fetch(&kr, false, kv_head, key2, lid);
                fetch(&vr, true, kv_head, key2, lid);
            }
        } else if (pos + 1u < it.end) {
            let key1 = tile_at(pos + 1u, it).kt * BC;
            copy_kv(false, kv_head, key1, 0u, lid);
            copy_kv(true, kv_head, key1, vb_next, lid);
        }

        // Scale into log2 units and mask this thread's columns TX j + lane; the maximum over
        // four independent chains.
        var mx4 = vec4<f32>(NEG);
        for (var j = 0u; j < BC / TX; j++) {
            let col = TX * j + lane;
            let key = key0 + col;
            var x = f_sh[r * (max(BC, DC) + 4u) + col] * P.scale_log2;
            if (masked && (key >= P.seq_k || q0 + r >= P.seq_q || ((words[col / 32u] >> (col % 32u)) & 1u) == 0u)) {
                x = NEG;
            }
            sv[j] = x;
            mx4[j % 4u] = max(mx4[j % 4u], x);
            watch = fma(x, WATCH, watch);
        }
        let mx = max(max(mx4.x, mx4.y), max(mx4.z, mx4.w));
        red[lid] = mx;
        // The flag says 2 on the work item's first tile, where the accumulators are still zero
        // and need no rescaling.
        if (mx > m_i + RESCALE_GAP) {
            red[TX * BR + pos % 2u] = select(1.0, 2.0, pos == it.first);
        }
        // P with the current reference max, before the flag is read. Where no thread sets the
        // flag, every score is at most m_i + RESCALE_GAP; where one does, every row writes P
        // again below. The clamp only keeps the discarded values finite (on the first tile m_i
        // is NEG); NaN scores are caught by `watch`, not here.
        var ps = 0.0;
        for (var j = 0u; j < BC / TX; j++) {
            let e = sv[j] - m_i;
            let p = select(exp2(min(e, RESCALE_GAP)), 0.0, sv[j] <= NEG_CUT);
            p_sh[r * (BC + 8u) + TX * j + lane] = f16(p);
            ps += p;
        }
        let flag = workgroupUniformLoad(&red[TX * BR + pos % 2u]);
        if (flag != 0.0) {
            var m_new = m_i;
            for (var i = 0u; i < TX; i++) {
                m_new = max(m_new, red[r * TX + i]);
            }
            ps = 0.0;
            for (var j = 0u; j < BC / TX; j++) {
                let p = select(exp2(sv[j] - m_new), 0.0, sv[j] <= NEG_CUT);
                p_sh[r * (BC + 8u) + TX * j + lane] = f16(p);
                ps += p;
            }
            if (flag == 1.0) {
                let alpha = exp2(m_i - m_new);
                l_i *= alpha;
                o_chunks(&acc, lid, it, alpha, false);
            }
            m_i = m_new;
            workgroupBarrier();
        }
        l_i += ps;

        for (var kk = 0u; kk < BC / 16u; kk++) {
            pa[kk] = coopLoadT<coop_mat16x16<f16, A>>(&p_sh[blk * 16u * (BC + 8u) + kk * 16u], BC + 8u);
        }
        for (var n = 0u; n < D / 16u / SPLIT; n++) {
            for (var kk = 0u; kk < BC / 16u; kk++) {
                let b = coopLoadT<coop_mat16x16<f16, B>>(&kv_sh[vb + kk * 16u * (D + 8u) + part * (D / SPLIT) + n * 16u], D + 8u);
                acc[n] = coopMultiplyAdd(pa[kk], b, acc[n]);
            }
        }
    }
    // Each thread's row sum, and in p_sh (free now) whether its scores were spoiled (NaN or
    // +inf). The verdict has slots of its own: a row sum can be NaN on a healthy thread too
    // (its reference max is +inf from another thread's score in its row, and a later rescale
    // of the workgroup multiplies by exp2(inf - inf)).
    workgroupBarrier();
    red[lid] = l_i;
    p_sh[lid] = select(f16(0.0), f16(1.0), spoiled(watch));
    o_chunks(&acc, lid, it, 1.0, true);
    if (lane == 0u && q0 + r < P.seq_q) {
        store_lse(it, dest_row(it, r), m_i, row_sum(r), row_spoiled(r));
    }
}

// O through f_sh in chunks of DC head-dim columns: each row scaled by `alpha` and loaded back
// (a rescale), or written out normalised (`write`, at the end). Chunk ci holds DC / SPLIT
// columns of each subgroup's part of the row: f_sh column c is O column
// (c / (DC / SPLIT)) (D / SPLIT) + ci (DC / SPLIT) + c % (DC / SPLIT). Every chunk is a call
// with a constant chunk number (D / DC <= 4): as a loop around the barriers, the accumulators
// were indexed by the loop variable and stayed in local memory.
fn o_chunks(acc: ptr<function, array<coop_mat16x16<f32, C>, DT_CAP>>, lid: u32, it: Item, alpha: f32, write: bool) {
    o_chunk(acc, 0u, lid, it, alpha, write);
    if (D / DC > 1u) {
        o_chunk(acc, 1u, lid, it, alpha, write);
    }
    if (D / DC > 2u) {
        o_chunk(acc, 2u, lid, it, alpha, write);
    }
    if (D / DC > 3u) {
        o_chunk(acc, 3u, lid, it, alpha, write);
    }
}

fn o_chunk(acc: ptr<function, array<coop_mat16x16<f32, C>, DT_CAP>>, ci: u32, lid: u32, it: Item, alpha: f32, write: bool) {
    let at = lid / 32u / SPLIT * 16u * (max(BC, DC) + 4u) + lid / 32u % SPLIT * (DC / SPLIT);
    let frags = DC / 16u / SPLIT;
    for (var m = 0u; m < frags; m++) {
        coopStoreT((*acc)[ci * frags + m], &f_sh[at + m * 16u], max(BC, DC) + 4u);
    }
    workgroupBarrier();
    if (write) {
        for (var e = lid; e < BR * (DC / 4u); e += THREADS) {
            let row = e / (DC / 4u);
            let c = 4u * (e % (DC / 4u));
            if (it.qt * BR + row < P.seq_q) {
                let l_row = row_sum(row);
                let inv = select(select(0.0, 1.0 / l_row, l_row > 0.0), nan_value(), row_spoiled(row));
                let o = row * (max(BC, DC) + 4u) + c;
                let col = c / (DC / SPLIT) * (D / SPLIT) + ci * (DC / SPLIT) + c % (DC / SPLIT);
                store_o4(it, dest_row(it, row), col, vec4<f32>(f_sh[o], f_sh[o + 1u], f_sh[o + 2u], f_sh[o + 3u]) * inv);
            }
        }
    } else {
        for (var j = 0u; j < DC / TX; j++) {
            f_sh[(lid / TX) * (max(BC, DC) + 4u) + TX * j + lid % TX] *= alpha;
        }
    }
    // Loaded back in both cases: cooperative loads need uniform control flow, and `write` is
    // a parameter (an extra load once per work item at the end).
    workgroupBarrier();
    for (var m = 0u; m < frags; m++) {
        (*acc)[ci * frags + m] = coopLoadT<coop_mat16x16<f32, C>>(&f_sh[at + m * 16u], max(BC, DC) + 4u);
    }
    workgroupBarrier();
}

// Row r's sum of P over its threads' slots of `red` (written at the end).
fn row_sum(r: u32) -> f32 {
    var l = 0.0;
    for (var i = 0u; i < TX; i++) {
        l += red[TX * r + i];
    }
    return l;
}

// Whether any thread of row r found a NaN or +inf score (written to p_sh at the end).
fn row_spoiled(r: u32) -> bool {
    var any = false;
    for (var i = 0u; i < TX; i++) {
        any = any || p_sh[TX * r + i] != f16(0.0);
    }
    return any;
}
