// Attention backward (FlashAttention-2 order, P recomputed from the forward log-sum-exp): dQ, dK
// and dV with the forward pass's tile skipping. Needs common.wgsl (overrides, Params, walk, mask
// bits, permutation) and backward_walk.wgsl (bindings, the pre-pass, the dK/dV pass's rows);
// the host prepends the prologue that defines the storage type (`Elem4`, `load4`, `pack4`): f32
// arithmetic on every storage type, four head-dim columns at a time.
//
// Three entry points, dispatched in this order:
//   pre:  (backward_walk.wgsl) per query row, the row's LSE in log2 units and D = rowsum(dO ∘ O),
//         into `scratch` (2 f32 per row, rows in memory order);
//   dkdv: one workgroup per (key tile, key/value head, batch): walks the query tiles that use
//         its key tile (the transposed block mask: full ones without mask reads, then partial
//         ones with their bit slots; the dense path walks every query tile) over the query
//         heads of its group, and accumulates dV = Pᵀ dO and dK = scale dSᵀ Q in registers;
//   dq:   one workgroup per query tile (the forward walk, never split), dQ = scale dS K in
//         registers.
// With P = exp(S scale − LSE), dP = dO Vᵀ, dS = P ∘ (dP − D).
//
// Both walking passes go in steps of RS query rows by KS keys. The side a pass walks is cut
// into steps as one sequence: dkdv's rows are the rows of its walk's query tiles, head after
// head of the group (so one step may span several small query tiles, and RS may exceed BR);
// dq's keys are the keys of its walk's key tiles (KS a multiple of BC). Every row and key
// carries its tile's state: full pairs read no mask, partial ones their bit slot. The side a
// workgroup owns is its tile: dkdv's BC keys (KS = BC), dq's query tile in steps of RS rows.
// The operands live in workgroup memory, a head-dim chunk of DC columns at a time (rows padded
// by one vec4 against bank conflicts): Q and dO of the step's rows (qs, dos), K and V of its
// keys (ks, vs). Where DC = D the side that stays fixed over the walk (K and V in dkdv, Q and
// dO in dq) is loaded once and kept.
//   scores: THREADS = SY x SX; thread (sy, sx) owns the SM x SN block of S and dP at rows
//           sy + SY i (i < SM = RS / SY) and keys sx + SX j (j < SN = KS / SX), each operand
//           vec4 read from workgroup memory serving SN or SM dot products; P (dkdv only) and
//           dS go to workgroup memory (ps, dss).
//   dkdv:   THREADS = AY x AX; thread (ay, ax) owns keys ay + AY j (j < BC / AY) by vec4 column
//           groups ax + AX o (o < D / (4 AX)) of dK and dV, and adds each row's P and dS times
//           its dO and Q.
//   dq:     THREADS = AY x AX; thread (ay, ax) owns rows ay + AY i (i < RS / AY) by vec4 column
//           groups ax + AX o of dQ, and adds each key's dS times its K.
// Per-thread arrays are indexed only in loops whose trip counts are constant once the overrides
// are applied, so that they stay in registers. The host picks THREADS, RS, KS, DC, SX and AX
// per pass within these capacities and the device's workgroup memory (backward_layout in
// kernel.rs).

override RS: u32 = 16u;        // query rows per step
override KS: u32 = 32u;        // keys per step (a multiple of BC; BC in dkdv)
override DC: u32 = 64u;        // head-dim columns in workgroup memory at once (divides D)
override SX: u32 = 8u;         // score threads along the keys; SY = THREADS / SX
override AX: u32 = 8u;         // accumulator threads along vec4 column groups; AY = THREADS / AX

const S_CAP: u32 = 16u;        // S (and dP) elements per thread
const SIDE_CAP: u32 = 8u;      // rows and keys per thread of S
const ACC_CAP: u32 = 16u;      // vec4 accumulators per thread of dK, dV, dQ, and their rows or keys

var<workgroup> qs: array<vec4<f32>, RS * (DC / 4u + 1u)>;
var<workgroup> dos: array<vec4<f32>, RS * (DC / 4u + 1u)>;
var<workgroup> ks: array<vec4<f32>, KS * (DC / 4u + 1u)>;
var<workgroup> vs: array<vec4<f32>, KS * (DC / 4u + 1u)>;
var<workgroup> ps: array<f32, RS * KS>;
var<workgroup> dss: array<f32, RS * KS>;

// The keys a pass walks: the keys of the key tiles at walk positions [first, end) of a K/V head
// (first row kv_head). Listed positions are the forward walk of `it` (common.wgsl's tile_at);
// otherwise a position is its key tile, full.
struct Keys {
    kv_head: u32,
    first: u32,
    end: u32,
    listed: bool,
}

// Key u of a Keys sequence: the key (seq_k past the end), and its tile's state and bit slot.
struct KeyAt {
    key: u32,
    state: u32,
    slot: u32,
}

fn key_at(keys: Keys, it: Item, u: u32) -> KeyAt {
    let pos = keys.first + u / BC;
    var a = KeyAt(P.seq_k, 2u, 0u);
    if (pos < keys.end) {
        var t = Tile(pos, 2u, 0u);
        if (keys.listed) {
            t = tile_at(pos, it);
        }
        a = KeyAt(min(t.kt * BC + u % BC, P.seq_k), t.state, t.slot);
    }
    return a;
}

// Q and dO of rows [v0, v0 + RS) of `rows`, head-dim columns [c0, c0 + DC), into qs and dos;
// rows past the end load as zeros.
fn stage_rows(rows: Rows, v0: u32, c0: u32, lid: u32) {
    let n4 = DC / 4u;
    for (var e = lid; e < RS * n4; e += THREADS) {
        let r = e / n4;
        let c4 = e % n4;
        let a = row_at(rows, v0 + r);
        var qv = vec4<f32>(0.0);
        var dov = vec4<f32>(0.0);
        if (a.seq < P.seq_q) {
            let g = (a.q_head + token(a.seq)) * (D / 4u) + c0 / 4u + c4;
            qv = load4(q_buf[g]);
            dov = load4(do_buf[g]);
        }
        qs[r * (n4 + 1u) + c4] = qv;
        dos[r * (n4 + 1u) + c4] = dov;
    }
}

// K (and V where with_v) of keys [u0, u0 + KS) of `keys`, head-dim columns [c0, c0 + DC), into
// ks and vs; keys past the end load as zeros.
fn stage_keys(keys: Keys, it: Item, u0: u32, c0: u32, with_v: bool, lid: u32) {
    let n4 = DC / 4u;
    for (var e = lid; e < KS * n4; e += THREADS) {
        let j = e / n4;
        let c4 = e % n4;
        let a = key_at(keys, it, u0 + j);
        var kv = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (a.key < P.seq_k) {
            let g = (keys.kv_head + token(a.key)) * (D / 4u) + c0 / 4u + c4;
            kv = load4(k_buf[g]);
            if (with_v) {
                vv = load4(v_buf[g]);
            }
        }
        ks[j * (n4 + 1u) + c4] = kv;
        if (with_v) {
            vs[j * (n4 + 1u) + c4] = vv;
        }
    }
}

// Adds the staged chunk's part of S = Q Kᵀ and dP = dO Vᵀ to the thread's block (see the top).
fn scores(
    sy: u32,
    sx: u32,
    s: ptr<function, array<f32, S_CAP>>,
    dp: ptr<function, array<f32, S_CAP>>,
) {
    let SY = THREADS / SX;
    let SM = RS / SY;
    let SN = KS / SX;
    let n4 = DC / 4u;
    for (var d4 = 0u; d4 < n4; d4++) {
        var kv: array<vec4<f32>, SIDE_CAP>;
        var vv: array<vec4<f32>, SIDE_CAP>;
        for (var j = 0u; j < SN; j++) {
            kv[j] = ks[(sx + SX * j) * (n4 + 1u) + d4];
            vv[j] = vs[(sx + SX * j) * (n4 + 1u) + d4];
        }
        for (var i = 0u; i < SM; i++) {
            let qv = qs[(sy + SY * i) * (n4 + 1u) + d4];
            let dov = dos[(sy + SY * i) * (n4 + 1u) + d4];
            for (var j = 0u; j < SN; j++) {
                (*s)[i * SN + j] += dot(qv, kv[j]);
                (*dp)[i * SN + j] += dot(dov, vv[j]);
            }
        }
    }
}

// S and dP of the step (rows v0.. of `rows` against keys u0.. of `keys`) over head-dim chunks,
// staging each side per chunk unless it is kept (staged once for the walk).
fn step_scores(
    rows: Rows,
    v0: u32,
    rows_kept: bool,
    keys: Keys,
    it: Item,
    u0: u32,
    keys_kept: bool,
    lid: u32,
    s: ptr<function, array<f32, S_CAP>>,
    dp: ptr<function, array<f32, S_CAP>>,
) {
    for (var a = 0u; a < S_CAP; a++) {
        (*s)[a] = 0.0;
        (*dp)[a] = 0.0;
    }
    for (var c0 = 0u; c0 < D; c0 += DC) {
        workgroupBarrier();
        if (!rows_kept) {
            stage_rows(rows, v0, c0, lid);
        }
        if (!keys_kept) {
            stage_keys(keys, it, u0, c0, true, lid);
        }
        workgroupBarrier();
        scores(lid / SX, lid % SX, s, dp);
    }
}

// The thread's score rows (sy + SY i) of the step at row v0 of `rows`: per row (query tile, row
// in the tile, tile state, bit slot) and the statistics (LSE in log2 units, D); rows past the
// end get (NEG, 0), which masks them. (Arrays of vectors, not of structs: lavapipe keeps those
// in registers.)
struct ThreadRows {
    at: array<vec4<u32>, SIDE_CAP>,
    st: array<vec2<f32>, SIDE_CAP>,
}

fn thread_rows(rows: Rows, v0: u32, lid: u32) -> ThreadRows {
    let SY = THREADS / SX;
    var tr: ThreadRows;
    for (var i = 0u; i < RS / SY; i++) {
        let a = row_at(rows, v0 + lid / SX + SY * i);
        tr.at[i] = vec4<u32>(a.qt, a.r, a.state, a.slot);
        tr.st[i] = vec2<f32>(NEG, 0.0);
        if (a.seq < P.seq_q) {
            let x = 2u * (a.q_head + token(a.seq));
            tr.st[i] = vec2<f32>(scratch[x], scratch[x + 1u]);
        }
    }
    return tr;
}

// The thread's score keys (sx + SX j) of the step at key u0 of `keys`: (key, tile state, bit
// slot) as in KeyAt.
fn thread_keys(keys: Keys, it: Item, u0: u32, lid: u32) -> array<vec3<u32>, SIDE_CAP> {
    var ka: array<vec3<u32>, SIDE_CAP>;
    for (var j = 0u; j < KS / SX; j++) {
        let a = key_at(keys, it, u0 + lid % SX + SX * j);
        ka[j] = vec3<u32>(a.key, a.state, a.slot);
    }
    return ka;
}

// Turns the thread's block of S and dP into P and dS in place. A pair's tile state is its
// row's, or where that is full its key's (one side of every step is full); masked pairs, keys
// past the end and rows without an allowed key give 0.
fn probs(
    it: Item,
    tr: ThreadRows,
    ka: array<vec3<u32>, SIDE_CAP>,
    s: ptr<function, array<f32, S_CAP>>,
    dp: ptr<function, array<f32, S_CAP>>,
) {
    let SM = RS / (THREADS / SX);
    let SN = KS / SX;
    for (var i = 0u; i < SM; i++) {
        let row = tr.at[i];
        for (var j = 0u; j < SN; j++) {
            let key = ka[j].x;
            var ok = tr.st[i].x > NEG_CUT && key < P.seq_k;
            var t = Tile(key / BC, row.z, row.w);
            if (t.state == 2u) {
                t.state = ka[j].y;
                t.slot = ka[j].z;
            }
            if (ok && t.state != 2u) {
                var pair = it;
                pair.qt = row.x;
                ok = allowed(t, pair, row.y, key);
            }
            let a = i * SN + j;
            let p = select(0.0, exp2((*s)[a] * P.scale_log2 - tr.st[i].x), ok);
            (*s)[a] = p;
            (*dp)[a] = p * ((*dp)[a] - tr.st[i].y);
        }
    }
}

// Where element a of the thread's score block goes in ps and dss.
fn block_at(lid: u32, a: u32) -> u32 {
    let SY = THREADS / SX;
    let SN = KS / SX;
    return (lid / SX + SY * (a / SN)) * KS + lid % SX + SX * (a % SN);
}

// Whether the thread's accumulator column group o (ax + AX o) lies in head-dim chunk ci; each
// chunk holds DC / (4 AX) of them. (The accumulators are indexed by o alone, with loops of
// constant trip count, so that they stay in registers also where the chunk loop is not unrolled.)
fn in_chunk(o: u32, ci: u32) -> bool {
    return o / (DC / (4u * AX)) == ci;
}

// The vec4 column within its chunk of the thread's column group o.
fn chunk_col(ax: u32, o: u32) -> u32 {
    return ax + AX * (o % (DC / (4u * AX)));
}

// Key-tile columns at t_cols_off, 8 u32 each: first and end entry of the walk, full entries,
// key tile, batch base, 3 unused. Transposed entries at t_rows_off, 2 u32 each: query tile,
// partial slot. The dense path walks positions = query tiles and reads no entries.
@compute @workgroup_size(THREADS)
fn dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let col = P.t_cols_off + wg.x * 8u;
    let first = index_buf[col];
    let end = index_buf[col + 1u];
    let kt = index_buf[col + 3u];
    var it: Item;
    it.b = index_buf[col + 4u] + wg.z;
    it.split = NO_SPLIT;
    let rows = Rows(
        (it.b * P.heads + wg.y * P.group) * P.seq_q,
        P.group,
        first,
        end,
        first + index_buf[col + 2u],
        PATH != 0u,
        select(2u, 3u, DENSE_MASK),
    );
    let keys = Keys((it.b * (P.heads / P.group) + wg.y) * P.seq_k, kt, kt + 1u, false);
    let ax = lid % AX;
    let ay = lid / AX;
    let AY = THREADS / AX;
    let KM = BC / AY;
    let KO = D / (4u * AX);
    let n4 = DC / 4u;

    var dk: array<vec4<f32>, ACC_CAP>;
    var dv: array<vec4<f32>, ACC_CAP>;
    for (var a = 0u; a < ACC_CAP; a++) {
        dk[a] = vec4<f32>(0.0);
        dv[a] = vec4<f32>(0.0);
    }
    // The key tile stays for the whole walk when a chunk holds all of d.
    let keys_kept = DC == D;
    if (keys_kept) {
        stage_keys(keys, it, 0u, 0u, true, lid);
    }
    let ka = thread_keys(keys, it, 0u, lid);
    var s: array<f32, S_CAP>;
    var dp: array<f32, S_CAP>;
    for (var v0 = 0u; v0 < P.group * (end - first) * BR; v0 += RS) {
        step_scores(rows, v0, false, keys, it, 0u, keys_kept, lid, &s, &dp);
        probs(it, thread_rows(rows, v0, lid), ka, &s, &dp);
        for (var a = 0u; a < RS * KS / THREADS; a++) {
            ps[block_at(lid, a)] = s[a];
            dss[block_at(lid, a)] = dp[a];
        }
        // dV += Pᵀ dO, dK += dSᵀ Q, chunk by chunk from the last one, which is still staged.
        for (var back = 0u; back < D / DC; back++) {
            let ci = D / DC - 1u - back;
            workgroupBarrier();
            if (back > 0u) {
                stage_rows(rows, v0, ci * DC, lid);
                workgroupBarrier();
            }
            for (var r = 0u; r < RS; r++) {
                var p: array<f32, ACC_CAP>;
                var ds: array<f32, ACC_CAP>;
                for (var j = 0u; j < KM; j++) {
                    p[j] = ps[r * KS + ay + AY * j];
                    ds[j] = dss[r * KS + ay + AY * j];
                }
                for (var o = 0u; o < KO; o++) {
                    if (in_chunk(o, ci)) {
                        let c = r * (n4 + 1u) + chunk_col(ax, o);
                        let dov = dos[c];
                        let qv = qs[c];
                        for (var j = 0u; j < KM; j++) {
                            dv[j * KO + o] += p[j] * dov;
                            dk[j * KO + o] += ds[j] * qv;
                        }
                    }
                }
            }
        }
    }
    let scale = P.scale_log2 * LN2;
    for (var j = 0u; j < KM; j++) {
        let key = kt * BC + ay + AY * j;
        if (key < P.seq_k) {
            let dst = (keys.kv_head + token(key)) * (D / 4u) + ax;
            for (var o = 0u; o < KO; o++) {
                dk_buf[dst + AX * o] = pack4(dk[j * KO + o] * scale);
                dv_buf[dst + AX * o] = pack4(dv[j * KO + o]);
            }
        }
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
    let q_head = (it.b * P.heads + it.h) * P.seq_q;
    let rows = Rows(q_head, 1u, it.qt, it.qt + 1u, it.qt + 1u, false, 2u);
    let kv_head = (it.b * (P.heads / P.group) + it.h / P.group) * P.seq_k;
    let keys = Keys(kv_head, it.first, it.end, true);
    let ax = lid % AX;
    let ay = lid / AX;
    let AY = THREADS / AX;
    let QM = RS / AY;
    let QO = D / (4u * AX);
    let n4 = DC / 4u;
    // The query rows stay for the whole walk when a chunk holds all of d.
    let rows_kept = DC == D;
    var s: array<f32, S_CAP>;
    var dp: array<f32, S_CAP>;
    for (var v0 = 0u; v0 < BR && it.qt * BR + v0 < P.seq_q; v0 += RS) {
        if (rows_kept) {
            workgroupBarrier();
            stage_rows(rows, v0, 0u, lid);
        }
        let tr = thread_rows(rows, v0, lid);
        var acc: array<vec4<f32>, ACC_CAP>;
        for (var a = 0u; a < ACC_CAP; a++) {
            acc[a] = vec4<f32>(0.0);
        }
        for (var u0 = 0u; u0 < (it.end - it.first) * BC; u0 += KS) {
            step_scores(rows, v0, rows_kept, keys, it, u0, false, lid, &s, &dp);
            probs(it, tr, thread_keys(keys, it, u0, lid), &s, &dp);
            for (var a = 0u; a < RS * KS / THREADS; a++) {
                dss[block_at(lid, a)] = dp[a];
            }
            // dQ += dS K, chunk by chunk from the last one, whose K is still staged.
            for (var back = 0u; back < D / DC; back++) {
                let ci = D / DC - 1u - back;
                workgroupBarrier();
                if (back > 0u) {
                    stage_keys(keys, it, u0, ci * DC, false, lid);
                    workgroupBarrier();
                }
                for (var j = 0u; j < KS; j++) {
                    var ds: array<f32, ACC_CAP>;
                    for (var i = 0u; i < QM; i++) {
                        ds[i] = dss[(ay + AY * i) * KS + j];
                    }
                    for (var o = 0u; o < QO; o++) {
                        if (in_chunk(o, ci)) {
                            let kv = ks[j * (n4 + 1u) + chunk_col(ax, o)];
                            for (var i = 0u; i < QM; i++) {
                                acc[i * QO + o] += ds[i] * kv;
                            }
                        }
                    }
                }
            }
        }
        let scale = P.scale_log2 * LN2;
        for (var i = 0u; i < QM; i++) {
            let row = it.qt * BR + v0 + ay + AY * i;
            if (row < P.seq_q) {
                let dst = (q_head + token(row)) * (D / 4u) + ax;
                for (var o = 0u; o < QO; o++) {
                    dq_buf[dst + AX * o] = pack4(acc[i * QO + o] * scale);
                }
            }
        }
    }
}
