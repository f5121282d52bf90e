// Tensor-core backward: backward.wgsl's dK/dV and dQ passes with their products (Sᵀ = K Qᵀ,
// dPᵀ = V dOᵀ, dV += Pᵀ dO, dK += dSᵀ Q; S = Q Kᵀ, dP = dO Vᵀ, dQ += dS K) through cooperative
// matrices (16x16x16, f16 operands, f32 accumulators), and P and dS by the threads through
// workgroup memory. Needs common.wgsl and backward_walk.wgsl (bindings, the pre-pass, the
// dK/dV pass's rows); the prologue enables f16 and wgpu_cooperative_matrix with Elem = f16. No
// subgroup operations here (see attention_coop.wgsl).
//
// SPLIT subgroups of 32 share each block of 16 keys (dkdv) or 16 query rows (dq): subgroup w
// works on block w / SPLIT as part p = w % SPLIT of it. The block's products come in pairs
// with the same shape, one on the scores' side and one on the values' (S and dP; dV and dK),
// and with SPLIT = 2 part p computes the p-th of each pair, with its operands and accumulators
// only; dQ, which has no pair, is split by head-dim columns [p D / SPLIT, (p + 1) D / SPLIT).
// A thread thus holds half the accumulators and half the Q/dO fragments, as in
// attention_coop.wgsl.
//
//   dkdv: one workgroup per (key tile, key/value head, batch) as in backward.wgsl, SPLIT BC / 16
//         subgroups of 32 (THREADS = 2 SPLIT BC): block b owns keys [16 b, 16 b + 16) of the
//         tile and their dV (part 0) and dK (part 1) accumulators. K and V of the tile stay in
//         workgroup memory. The walk (the query tiles of the transposed block mask over the
//         query heads of the group) goes in steps of RS rows of one query tile (RS divides
//         BR): Q and dO of the step's rows staged with their statistics, Sᵀ and dPᵀ stored
//         (f32), Pᵀ and dSᵀ by the threads (f16; thread t takes query column t % RS of the
//         step, so it reads one row's mask bits), then the two products. With PREFETCH, the
//         next step's Q and dO are read into registers while this step computes.
//   dq:   one workgroup per query tile (the forward walk, never split), SPLIT BR / 16 subgroups
//         (THREADS = 2 SPLIT BR): block b owns rows [16 b, 16 b + 16) with their Q (part 0)
//         and dO (part 1) fragments and dQ accumulators in registers. Per key tile: K and V
//         staged, S and dP stored, dS by the threads (the 2 SPLIT threads from 2 SPLIT r take
//         row r), dQ += dS K. With PREFETCH, the next key tile's K and V are read into
//         registers while this one computes.
// Results leave through workgroup memory 16 head-dim columns at a time (dK and dQ times the
// softmax scale). P and dS are rounded to f16 as product operands (P <= 1; |dS| beyond f16's
// range, 65504, would overflow where the portable kernels stay finite). Every loop that indexes
// a register array has a constant trip count once the overrides are applied, and the host builds
// this module without bounds checks (see kernel.rs), so that those arrays stay in registers.
// Workgroup variables of this file are arrays (see attention_coop.wgsl); common.wgsl's walk and
// span vectors serve the walks, as in the forward kernel.

override RS: u32 = 16u;        // dkdv: query rows per step (a multiple of 16 dividing BR)
override SPLIT: u32 = 1u;      // subgroups per 16 keys (dkdv) or query rows (dq): 1 or 2
// Whether the pass reads the next step's Q and dO (dkdv) or the next key tile's K and V (dq)
// into registers one step ahead, so that the loads overlap a step of work: set by the host
// where a thread's share is at most PF_CAP vec4 and divides evenly.
override PREFETCH: bool = false;

const DT_CAP: u32 = 8u;        // max D / 16
const RT_CAP: u32 = 4u;        // max RS / 16 (dkdv) and BC / 16 (dq)
override OPS: u32 = 2u / SPLIT;  // products of each pair a subgroup computes
const PF_CAP: u32 = 8u;        // max vec4 per thread of a prefetched operand

// K (rows [0, BC)) and V (rows [BC, 2 BC)), rows padded by 8: dkdv's tile for the whole walk,
// dq's current key tile (and first its Q and dO, BR <= 2 BC rows).
var<workgroup> kv_sh: array<f16, 2u * BC * (D + 8u)>;
// dkdv: Q (rows [0, RS)) and dO (rows [RS, 2 RS)) of a step; (LSE in log2 units, D) per row.
var<workgroup> qd_sh: array<f16, 2u * RS * (D + 8u)>;
var<workgroup> st_sh: array<f32, 2u * RS>;
// dkdv: Sᵀ (rows [0, BC)) and dPᵀ (rows [BC, 2 BC)) of a step, then dK and dV on the way out;
// Pᵀ and dSᵀ likewise, as f16 operands.
var<workgroup> ft_sh: array<f32, 2u * BC * (RS + 4u)>;
var<workgroup> pd_sh: array<f16, 2u * BC * (RS + 8u)>;
// dq: S (rows [0, BR)) and dP (rows [BR, 2 BR)) of a key tile, then dQ on the way out; dS.
var<workgroup> fq_sh: array<f32, 2u * BR * (BC + 4u)>;
var<workgroup> ds_sh: array<f16, BR * (BC + 8u)>;

fn put4h(dst: u32, val: vec4<f16>) {
    kv_sh[dst] = val.x;
    kv_sh[dst + 1u] = val.y;
    kv_sh[dst + 2u] = val.z;
    kv_sh[dst + 3u] = val.w;
}

// Element e (four values) of the K (or V) tile of keys [key0, key0 + BC) of the K/V head at row
// kv_head (zeros past the end), and where it goes in kv_sh.
fn kv_elem(from_v: bool, kv_head: u32, key0: u32, e: u32) -> vec4<f16> {
    let j = e / (D / 4u);
    if (key0 + j >= P.seq_k) {
        return vec4<f16>(0.0);
    }
    let g = (kv_head + token(key0 + j)) * (D / 4u) + e % (D / 4u);
    if (from_v) {
        return v_buf[g];
    }
    return k_buf[g];
}

fn put_kv(from_v: bool, e: u32, val: vec4<f16>) {
    put4h((select(0u, BC, from_v) + e / (D / 4u)) * (D + 8u) + 4u * (e % (D / 4u)), val);
}

// K and V of keys [key0, key0 + BC) into kv_sh.
fn stage_kv(kv_head: u32, key0: u32, lid: u32) {
    for (var e = lid; e < BC * (D / 4u); e += THREADS) {
        put_kv(false, e, kv_elem(false, kv_head, key0, e));
        put_kv(true, e, kv_elem(true, kv_head, key0, e));
    }
}

// With PREFETCH: this thread's share of a K (or V) tile, read into registers a tile ahead, and
// written into kv_sh.
fn fetch_kv(regs: ptr<function, array<vec4<f16>, PF_CAP>>, from_v: bool, kv_head: u32, key0: u32, lid: u32) {
    for (var i = 0u; i < min(BC * D / 4u / THREADS, PF_CAP); i++) {
        (*regs)[i] = kv_elem(from_v, kv_head, key0, lid + i * THREADS);
    }
}

fn put_kv_regs(regs: ptr<function, array<vec4<f16>, PF_CAP>>, from_v: bool, lid: u32) {
    for (var i = 0u; i < min(BC * D / 4u / THREADS, PF_CAP); i++) {
        put_kv(from_v, lid + i * THREADS, (*regs)[i]);
    }
}

// Q (or dO) of rows [q0, q0 + BR) of the query head at row q_head into kv_sh (zeros past the
// end).
fn stage_tile_rows(from_do: bool, q_head: u32, q0: u32, lid: u32) {
    for (var e = lid; e < BR * (D / 4u); e += THREADS) {
        let r = e / (D / 4u);
        let c4 = e % (D / 4u);
        var x = vec4<f16>(0.0);
        if (q0 + r < P.seq_q) {
            let g = (q_head + token(q0 + r)) * (D / 4u) + c4;
            if (from_do) {
                x = do_buf[g];
            } else {
                x = q_buf[g];
            }
        }
        put4h(r * (D + 8u) + 4u * c4, x);
    }
}

// Element e (four values) of Q and of dO of rows [v0, v0 + RS) of `rows` (zeros past the end).
struct RowElem {
    q: vec4<f16>,
    d: vec4<f16>,
}

fn row_elem(rows: Rows, v0: u32, e: u32) -> RowElem {
    let a = row_at(rows, v0 + e / (D / 4u));
    var x = RowElem(vec4<f16>(0.0), vec4<f16>(0.0));
    if (a.seq < P.seq_q) {
        let g = (a.q_head + token(a.seq)) * (D / 4u) + e % (D / 4u);
        x = RowElem(q_buf[g], do_buf[g]);
    }
    return x;
}

fn put_row_elem(e: u32, x: RowElem) {
    let s = (e / (D / 4u)) * (D + 8u) + 4u * (e % (D / 4u));
    let t = s + RS * (D + 8u);
    qd_sh[s] = x.q.x;
    qd_sh[s + 1u] = x.q.y;
    qd_sh[s + 2u] = x.q.z;
    qd_sh[s + 3u] = x.q.w;
    qd_sh[t] = x.d.x;
    qd_sh[t + 1u] = x.d.y;
    qd_sh[t + 2u] = x.d.z;
    qd_sh[t + 3u] = x.d.w;
}

// (LSE in log2 units, D) of row v of `rows`; (NEG, 0) past the end, which masks the row.
fn row_stats(rows: Rows, v: u32) -> vec2<f32> {
    let a = row_at(rows, v);
    if (a.seq >= P.seq_q) {
        return vec2<f32>(NEG, 0.0);
    }
    let x = 2u * (a.q_head + token(a.seq));
    return vec2<f32>(scratch[x], scratch[x + 1u]);
}

// Q and dO of rows [v0, v0 + RS) of `rows` into qd_sh, their statistics into st_sh.
fn stage_step(rows: Rows, v0: u32, lid: u32) {
    for (var e = lid; e < RS * (D / 4u); e += THREADS) {
        put_row_elem(e, row_elem(rows, v0, e));
    }
    if (lid < RS) {
        let st = row_stats(rows, v0 + lid);
        st_sh[2u * lid] = st.x;
        st_sh[2u * lid + 1u] = st.y;
    }
}

// With PREFETCH: this thread's share of a step's Q and dO (and its row's statistics, threads
// below RS), read into registers a step ahead, and written into qd_sh and st_sh.
struct StepRegs {
    q: array<vec4<f16>, PF_CAP>,
    d: array<vec4<f16>, PF_CAP>,
    st: vec2<f32>,
}

fn fetch_step(regs: ptr<function, StepRegs>, rows: Rows, v0: u32, lid: u32) {
    for (var i = 0u; i < min(RS * D / 4u / THREADS, PF_CAP); i++) {
        let x = row_elem(rows, v0, lid + i * THREADS);
        (*regs).q[i] = x.q;
        (*regs).d[i] = x.d;
    }
    if (lid < RS) {
        (*regs).st = row_stats(rows, v0 + lid);
    }
}

fn put_step(regs: ptr<function, StepRegs>, lid: u32) {
    for (var i = 0u; i < min(RS * D / 4u / THREADS, PF_CAP); i++) {
        put_row_elem(lid + i * THREADS, RowElem((*regs).q[i], (*regs).d[i]));
    }
    if (lid < RS) {
        st_sh[2u * lid] = (*regs).st.x;
        st_sh[2u * lid + 1u] = (*regs).st.y;
    }
}

// The mask bits of row r of query tile it.qt against keys [key0, key0 + 32) (BC = 32) in tile
// t: all ones for full tiles, and where the row has no allowed key (lse2 = NEG: it may lie past
// the end) or the keys start past the end; bit j is key0 + j.
fn row_bits(t: Tile, it: Item, r: u32, key0: u32, lse2: f32) -> u32 {
    if (t.state == 2u || lse2 <= NEG_CUT || key0 >= P.seq_k) {
        return 0xffffffffu;
    }
    return mask_word(mask_word_at(t, it, r, key0));
}

// Key-tile columns and transposed entries as in backward.wgsl's dkdv.
@compute @workgroup_size(THREADS)
fn dkdv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let col = P.t_cols_off + wg.x * 8u;
    let kt = index_buf[col + 3u];
    let b = index_buf[col + 4u] + wg.z;
    let kv_head = (b * (P.heads / P.group) + wg.y) * P.seq_k;
    let blk = lid / 32u / SPLIT;
    let part = lid / 32u % SPLIT;
    stage_kv(kv_head, kt * BC, lid);
    if (lid == 0u) {
        walk = vec4<u32>(index_buf[col], index_buf[col + 1u], index_buf[col + 2u], 0u);
    }
    // (also the barrier after staging K and V)
    let w = workgroupUniformLoad(&walk);
    let rows = Rows(
        (b * P.heads + wg.y * P.group) * P.seq_q,
        P.group,
        w.x,
        w.y,
        w.x + w.z,
        PATH != 0u,
        select(2u, 3u, DENSE_MASK),
    );
    // Product o of this subgroup is op = part + o of each pair: 0 Sᵀ = K Qᵀ then dV += Pᵀ dO,
    // 1 dPᵀ = V dOᵀ then dK += dSᵀ Q. acc[o D / 16 + n]: head-dim columns 16 n .. of dV or dK.
    var acc: array<coop_mat16x16<f32, C>, 2u * DT_CAP>;
    for (var n = 0u; n < OPS * D / 16u; n++) {
        acc[n] = coop_mat16x16<f32, C>();
    }
    var pa: array<coop_mat16x16<f16, A>, 2u * RT_CAP>;
    let i = lid % RS;
    var pair: Item;
    pair.b = b;
    let total = P.group * (w.y - w.x) * BR;
    var pf: StepRegs;
    if (PREFETCH && total > 0u) {
        fetch_step(&pf, rows, 0u, lid);
    }
    for (var v0 = 0u; v0 < total; v0 += RS) {
        if (PREFETCH) {
            put_step(&pf, lid);
        } else {
            stage_step(rows, v0, lid);
        }
        workgroupBarrier();
        if (PREFETCH && v0 + RS < total) {
            fetch_step(&pf, rows, v0 + RS, lid);
        }
        // Sᵀ (K rows, Q rows) and dPᵀ (V rows, dO rows): sc[o RS / 16 + n], query columns
        // 16 n ... (each K or V fragment loaded once per step)
        var sc: array<coop_mat16x16<f32, C>, 2u * RT_CAP>;
        for (var n = 0u; n < OPS * RS / 16u; n++) {
            sc[n] = coop_mat16x16<f32, C>();
        }
        for (var kk = 0u; kk < D / 16u; kk++) {
            for (var o = 0u; o < OPS; o++) {
                let op = part + o;
                let a = coopLoadT<coop_mat16x16<f16, A>>(&kv_sh[(op * BC + blk * 16u) * (D + 8u) + kk * 16u], D + 8u);
                for (var n = 0u; n < RS / 16u; n++) {
                    let b = coopLoad<coop_mat16x16<f16, B>>(&qd_sh[(op * RS + n * 16u) * (D + 8u) + kk * 16u], D + 8u);
                    sc[o * (RS / 16u) + n] = coopMultiplyAdd(a, b, sc[o * (RS / 16u) + n]);
                }
            }
        }
        for (var o = 0u; o < OPS; o++) {
            for (var n = 0u; n < RS / 16u; n++) {
                coopStoreT(sc[o * (RS / 16u) + n], &ft_sh[((part + o) * BC + blk * 16u) * (RS + 4u) + n * 16u], RS + 4u);
            }
        }
        workgroupBarrier();
        // Pᵀ and dSᵀ of query column i against keys lid / RS + (THREADS / RS) m. A pair's state
        // is its query tile's (the key tile is the column's own).
        let a = row_at(rows, v0 + i);
        let t = Tile(kt, a.state, a.slot);
        pair.qt = a.qt;
        let lse2 = st_sh[2u * i];
        let delta = st_sh[2u * i + 1u];
        let bits = row_bits(t, pair, a.r, kt * BC, lse2);
        for (var m = 0u; m < BC * RS / THREADS; m++) {
            let j = lid / RS + (THREADS / RS) * m;
            let ok = lse2 > NEG_CUT && kt * BC + j < P.seq_k && ((bits >> j) & 1u) != 0u;
            let p = select(0.0, exp2(ft_sh[j * (RS + 4u) + i] * P.scale_log2 - lse2), ok);
            pd_sh[j * (RS + 8u) + i] = f16(p);
            pd_sh[(BC + j) * (RS + 8u) + i] = f16(p * (ft_sh[(BC + j) * (RS + 4u) + i] - delta));
        }
        workgroupBarrier();
        // dV += Pᵀ dO and dK += dSᵀ Q: Pᵀ (op 0) or dSᵀ (op 1) rows of the block, dO or Q.
        for (var o = 0u; o < OPS; o++) {
            for (var kk = 0u; kk < RS / 16u; kk++) {
                pa[o * (RS / 16u) + kk] = coopLoadT<coop_mat16x16<f16, A>>(&pd_sh[((part + o) * BC + blk * 16u) * (RS + 8u) + kk * 16u], RS + 8u);
            }
        }
        for (var n = 0u; n < D / 16u; n++) {
            for (var o = 0u; o < OPS; o++) {
                for (var kk = 0u; kk < RS / 16u; kk++) {
                    let b = coopLoadT<coop_mat16x16<f16, B>>(&qd_sh[((1u - part - o) * RS + kk * 16u) * (D + 8u) + n * 16u], D + 8u);
                    acc[o * (D / 16u) + n] = coopMultiplyAdd(pa[o * (RS / 16u) + kk], b, acc[o * (D / 16u) + n]);
                }
            }
        }
        workgroupBarrier();
    }
    // Head-dim columns 16 n .. of dV (ft_sh rows [0, BC)) and dK (rows [BC, 2 BC)) at a time:
    // key j = lid / (2 SPLIT) writes columns 8 (lid % 2) .. of op (lid % (2 SPLIT)) / 2 + o.
    let j = lid / (2u * SPLIT);
    let h = lid % 2u;
    let key = kt * BC + j;
    let scale = P.scale_log2 * LN2;
    for (var n = 0u; n < D / 16u; n++) {
        for (var o = 0u; o < OPS; o++) {
            coopStoreT(acc[o * (D / 16u) + n], &ft_sh[((part + o) * BC + blk * 16u) * (RS + 4u)], RS + 4u);
        }
        workgroupBarrier();
        if (key < P.seq_k) {
            let dst = (kv_head + token(key)) * (D / 4u) + 4u * n + 2u * h;
            for (var o = 0u; o < OPS; o++) {
                let op = lid % (2u * SPLIT) / 2u + o;
                for (var c = 0u; c < 2u; c++) {
                    let x = (op * BC + j) * (RS + 4u) + 8u * h + 4u * c;
                    let v = vec4<f32>(ft_sh[x], ft_sh[x + 1u], ft_sh[x + 2u], ft_sh[x + 3u]);
                    if (op == 1u) {
                        dk_buf[dst + c] = pack4(v * scale);
                    } else {
                        dv_buf[dst + c] = pack4(v);
                    }
                }
            }
        }
        workgroupBarrier();
    }
}

// Work items as the forward pass's (common.wgsl's work_item), none of them split.
@compute @workgroup_size(THREADS)
fn dq(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let it = work_item(wg, nwg, lid);
    let blk = lid / 32u / SPLIT;
    let part = lid / 32u % SPLIT;
    let r = lid / (2u * SPLIT);
    let lane = lid % (2u * SPLIT);
    let q0 = it.qt * BR;
    let q_head = (it.b * P.heads + it.h) * P.seq_q;
    let kv_head = (it.b * (P.heads / P.group) + it.h / P.group) * P.seq_k;
    var kr: array<vec4<f16>, PF_CAP>;
    var vr: array<vec4<f16>, PF_CAP>;
    if (PREFETCH && it.first < it.end) {
        let key0 = tile_at(it.first, it).kt * BC;
        fetch_kv(&kr, false, kv_head, key0, lid);
        fetch_kv(&vr, true, kv_head, key0, lid);
    }

    // Q (op 0, for S = Q Kᵀ), then dO (op 1, dP = dO Vᵀ), of the tile through kv_sh into the
    // fragments of the subgroups that compute with them: fa[o D / 16 + kk] for op part + o.
    // Every subgroup loads in both passes (a cooperative load needs uniform control flow).
    var fa: array<coop_mat16x16<f16, A>, 2u * DT_CAP>;
    for (var ph = 0u; ph < 2u; ph++) {
        stage_tile_rows(ph == 1u, q_head, q0, lid);
        workgroupBarrier();
        for (var kk = 0u; kk < D / 16u; kk++) {
            let f = coopLoadT<coop_mat16x16<f16, A>>(&kv_sh[blk * 16u * (D + 8u) + kk * 16u], D + 8u);
            if (SPLIT == 1u) {
                fa[ph * (D / 16u) + kk] = f;
            } else if (part == ph) {
                fa[kk] = f;
            }
        }
        workgroupBarrier();
    }
    var lse2 = NEG;
    var delta = 0.0;
    if (q0 + r < P.seq_q) {
        let x = 2u * (q_head + token(q0 + r));
        lse2 = scratch[x];
        delta = scratch[x + 1u];
    }
    var acc: array<coop_mat16x16<f32, C>, DT_CAP>;
    for (var n = 0u; n < D / 16u / SPLIT; n++) {
        acc[n] = coop_mat16x16<f32, C>();
    }
    var dsa: array<coop_mat16x16<f16, A>, RT_CAP>;

    for (var pos = it.first; pos < it.end; pos++) {
        let t = tile_at(pos, it);
        let key0 = t.kt * BC;
        workgroupBarrier();
        if (PREFETCH) {
            put_kv_regs(&kr, false, lid);
            put_kv_regs(&vr, true, lid);
        } else {
            stage_kv(kv_head, key0, lid);
        }
        workgroupBarrier();
        if (PREFETCH && pos + 1u < it.end) {
            let key1 = tile_at(pos + 1u, it).kt * BC;
            fetch_kv(&kr, false, kv_head, key1, lid);
            fetch_kv(&vr, true, kv_head, key1, lid);
        }
        // S (Q, K rows) and dP (dO, V rows): sc[o BC / 16 + n], keys 16 n ...
        var sc: array<coop_mat16x16<f32, C>, 2u * RT_CAP>;
        for (var n = 0u; n < OPS * BC / 16u; n++) {
            sc[n] = coop_mat16x16<f32, C>();
        }
        for (var kk = 0u; kk < D / 16u; kk++) {
            for (var o = 0u; o < OPS; o++) {
                for (var n = 0u; n < BC / 16u; n++) {
                    let b = coopLoad<coop_mat16x16<f16, B>>(&kv_sh[((part + o) * BC + n * 16u) * (D + 8u) + kk * 16u], D + 8u);
                    sc[o * (BC / 16u) + n] = coopMultiplyAdd(fa[o * (D / 16u) + kk], b, sc[o * (BC / 16u) + n]);
                }
            }
        }
        for (var o = 0u; o < OPS; o++) {
            for (var n = 0u; n < BC / 16u; n++) {
                coopStoreT(sc[o * (BC / 16u) + n], &fq_sh[((part + o) * BR + blk * 16u) * (BC + 4u) + n * 16u], BC + 4u);
            }
        }
        workgroupBarrier();
        // dS of row r, columns 2 SPLIT m + lane.
        let bits = row_bits(t, it, r, key0, lse2);
        for (var m = 0u; m < BC / (2u * SPLIT); m++) {
            let j = 2u * SPLIT * m + lane;
            let ok = lse2 > NEG_CUT && key0 + j < P.seq_k && ((bits >> j) & 1u) != 0u;
            let p = select(0.0, exp2(fq_sh[r * (BC + 4u) + j] * P.scale_log2 - lse2), ok);
            ds_sh[r * (BC + 8u) + j] = f16(p * (fq_sh[(BR + r) * (BC + 4u) + j] - delta));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BC / 16u; kk++) {
            dsa[kk] = coopLoadT<coop_mat16x16<f16, A>>(&ds_sh[blk * 16u * (BC + 8u) + kk * 16u], BC + 8u);
        }
        for (var n = 0u; n < D / 16u / SPLIT; n++) {
            let c = part * (D / SPLIT) + n * 16u;
            for (var kk = 0u; kk < BC / 16u; kk++) {
                let kb = coopLoadT<coop_mat16x16<f16, B>>(&kv_sh[kk * 16u * (D + 8u) + c], D + 8u);
                acc[n] = coopMultiplyAdd(dsa[kk], kb, acc[n]);
            }
        }
    }
    // Fragment n of each part at a time, part p's at columns [16 p, 16 p + 16) of fq_sh
    // (16 SPLIT <= BC): row r's thread lane = 2 p + h writes its columns 8 h .., head-dim
    // columns p D / SPLIT + 16 n + 8 h ...
    let scale = P.scale_log2 * LN2;
    for (var n = 0u; n < D / 16u / SPLIT; n++) {
        workgroupBarrier();
        coopStoreT(acc[n], &fq_sh[blk * 16u * (BC + 4u) + part * 16u], BC + 4u);
        workgroupBarrier();
        if (q0 + r < P.seq_q) {
            let dst = (q_head + token(q0 + r)) * (D / 4u) + ((lane / 2u) * (D / SPLIT) + 16u * n + 8u * (lane % 2u)) / 4u;
            for (var c = 0u; c < 2u; c++) {
                let x = r * (BC + 4u) + 8u * lane + 4u * c;
                dq_buf[dst + c] = pack4(vec4<f32>(fq_sh[x], fq_sh[x + 1u], fq_sh[x + 2u], fq_sh[x + 3u]) * scale);
            }
        }
    }
}
