// Attention backward (FlashAttention-2 order, P recomputed from the forward log-sum-exp): dQ, dK
// and dV with the forward pass's tile skipping. Needs common.wgsl (overrides, Params, walk, mask
// bits, permutation); the host prepends the prologue that defines the storage type (`Elem4`,
// `load4`, `pack4`): f32 arithmetic on every storage type, four head-dim columns at a time.
//
// Three entry points, dispatched in this order:
//   pre:  per query row, the row's LSE in log2 units and D = rowsum(dO ∘ O), into `scratch`
//         (2 f32 per row, rows in memory order);
//   dkdv: one workgroup per (key tile, key/value head, batch): walks the query tiles that use
//         its key tile (the transposed block mask: full ones without mask reads, then partial
//         ones with their bit slots; the dense path walks every query tile) over the query
//         heads of its group, and accumulates dV = Pᵀ dO and dK = scale dSᵀ Q;
//   dq:   one workgroup per query tile (the forward walk, never split), dQ = scale dS K.
// With P = exp(S scale − LSE), dP = dO Vᵀ, dS = P ∘ (dP − D).
//
// Query rows go RS at a time (RS divides BR; the host sizes it to workgroup memory): their Q and
// dO rows sit in workgroup memory, P and dS of RS rows × one key tile too. K and V are read from
// global memory, so that every tile shape and head dim fits the WebGPU baseline of 16 KiB.
// Threads own groups of four consecutive head-dim columns (D4 = D / 4 per row).

override RS: u32 = 8u;         // query rows per step

const ACC_CAP: u32 = 16u;      // dK (and dV) vec4 accumulators per thread: BC * D4 / THREADS
const DQ_CAP: u32 = 4u;        // dQ vec4 accumulators per thread: RS * D4 / THREADS
const LOG2E: f32 = 1.4426950408889634;

@group(0) @binding(1) var<storage, read> q_buf: array<Elem4>;
@group(0) @binding(2) var<storage, read> k_buf: array<Elem4>;
@group(0) @binding(3) var<storage, read> v_buf: array<Elem4>;
@group(0) @binding(9) var<storage, read> do_buf: array<Elem4>;
@group(0) @binding(10) var<storage, read_write> dq_buf: array<Elem4>;
@group(0) @binding(11) var<storage, read_write> dk_buf: array<Elem4>;
@group(0) @binding(12) var<storage, read_write> dv_buf: array<Elem4>;

// The mask bits follow the index data in the backward index buffer.
fn mask_word(i: u32) -> u32 {
    return index_buf[P.bits_off + i];
}

var<workgroup> qs: array<vec4<f32>, RS * D / 4u>;
var<workgroup> dos: array<vec4<f32>, RS * D / 4u>;
var<workgroup> ps: array<f32, RS * BC>;
var<workgroup> dss: array<f32, RS * BC>;
var<workgroup> row_stats: array<vec2<f32>, RS>;   // (LSE in log2 units, D)

// One thread per query row: x row, y head, z batch element.
@compute @workgroup_size(THREADS)
fn pre(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= P.seq_q) {
        return;
    }
    let row = (gid.z * P.heads + gid.y) * P.seq_q + gid.x;
    let D4 = D / 4u;
    var delta = 0.0;
    for (var c4 = 0u; c4 < D4; c4++) {
        delta += dot(load4(do_buf[row * D4 + c4]), load4(o_buf[row * D4 + c4]));
    }
    // Rows with no allowed key (LSE −∞) get NEG, which masks all their pairs below.
    let lse = lse_buf[row];
    scratch[2u * row] = select(NEG, lse * LOG2E, lse > NEG_CUT);
    scratch[2u * row + 1u] = delta;
}

// Loads Q, dO and the row statistics of query rows [row0, row0 + RS) of head (b, h), in
// sequence positions; rows past the end load as zeros with no allowed key.
fn load_rows(b: u32, h: u32, row0: u32, lid: u32) {
    let head = (b * P.heads + h) * P.seq_q;
    let D4 = D / 4u;
    for (var e = lid; e < RS * D4; e += THREADS) {
        let r = e / D4;
        var qv = vec4<f32>(0.0);
        var dov = vec4<f32>(0.0);
        if (row0 + r < P.seq_q) {
            let g = (head + token(row0 + r)) * D4 + e % D4;
            qv = load4(q_buf[g]);
            dov = load4(do_buf[g]);
        }
        qs[e] = qv;
        dos[e] = dov;
    }
    for (var r = lid; r < RS; r += THREADS) {
        var st = vec2<f32>(NEG, 0.0);
        if (row0 + r < P.seq_q) {
            let s = 2u * (head + token(row0 + r));
            st = vec2<f32>(scratch[s], scratch[s + 1u]);
        }
        row_stats[r] = st;
    }
}

// P and dS of the loaded rows (rows r0.. of query tile it.qt) against key tile t of the K/V
// head whose first row is kv_head, into ps and dss; masked pairs and pairs past the ends are 0.
fn probs(t: Tile, it: Item, r0: u32, kv_head: u32, lid: u32) {
    let key0 = t.kt * BC;
    for (var e = lid; e < RS * BC; e += THREADS) {
        let r = e / BC;
        let key = key0 + e % BC;
        let st = row_stats[r];
        var p = 0.0;
        var ds = 0.0;
        if (key < P.seq_k && st.x > NEG_CUT && allowed(t, it, r0 + r, key)) {
            let D4 = D / 4u;
            let g = (kv_head + token(key)) * D4;
            var s = 0.0;
            var dp = 0.0;
            for (var c4 = 0u; c4 < D4; c4++) {
                s += dot(qs[r * D4 + c4], load4(k_buf[g + c4]));
                dp += dot(dos[r * D4 + c4], load4(v_buf[g + c4]));
            }
            p = exp2(s * P.scale_log2 - st.x);
            ds = p * (dp - st.y);
        }
        ps[e] = p;
        dss[e] = ds;
    }
}

// Key-tile columns at t_cols_off, 8 u32 each: first and end entry of the walk, full entries,
// key tile, batch base, 3 unused. Transposed entries at t_rows_off, 2 u32 each: query tile,
// partial slot. The dense path walks positions = query tiles and reads no entries.
@compute @workgroup_size(THREADS)
fn dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let col = P.t_cols_off + wg.x * 8u;
    let first = index_buf[col];
    let end = index_buf[col + 1u];
    let full_end = first + index_buf[col + 2u];
    let kt = index_buf[col + 3u];
    let b = index_buf[col + 4u] + wg.z;
    let kv_head = (b * (P.heads / P.group) + wg.y) * P.seq_k;
    let D4 = D / 4u;
    let na = (BC * D4 + THREADS - 1u) / THREADS;

    var dk: array<vec4<f32>, ACC_CAP>;
    var dv: array<vec4<f32>, ACC_CAP>;
    for (var a = 0u; a < na; a++) {
        dk[a] = vec4<f32>(0.0);
        dv[a] = vec4<f32>(0.0);
    }
    var it: Item;
    it.b = b;
    it.split = NO_SPLIT;
    for (var g = 0u; g < P.group; g++) {
        it.h = wg.y * P.group + g;
        for (var pos = first; pos < end; pos++) {
            var t = Tile(kt, 2u, 0u);
            it.qt = pos;
            if (PATH == 0u) {
                if (DENSE_MASK) {
                    t.state = 3u;
                }
            } else {
                let e = P.t_rows_off + 2u * pos;
                it.qt = index_buf[e];
                if (pos >= full_end) {
                    t.state = 1u;
                    t.slot = index_buf[e + 1u];
                }
            }
            for (var r0 = 0u; r0 < BR && it.qt * BR + r0 < P.seq_q; r0 += RS) {
                workgroupBarrier();
                load_rows(b, it.h, it.qt * BR + r0, lid);
                workgroupBarrier();
                probs(t, it, r0, kv_head, lid);
                workgroupBarrier();
                for (var a = 0u; a < na; a++) {
                    let e = lid + THREADS * a;
                    if (e < BC * D4) {
                        let j = e / D4;
                        let c4 = e % D4;
                        var sv = vec4<f32>(0.0);
                        var sk = vec4<f32>(0.0);
                        for (var r = 0u; r < RS; r++) {
                            sv += ps[r * BC + j] * dos[r * D4 + c4];
                            sk += dss[r * BC + j] * qs[r * D4 + c4];
                        }
                        dv[a] += sv;
                        dk[a] += sk;
                    }
                }
            }
        }
    }
    let scale = P.scale_log2 * LN2;
    for (var a = 0u; a < na; a++) {
        let e = lid + THREADS * a;
        let key = kt * BC + e / D4;
        if (e < BC * D4 && key < P.seq_k) {
            let dst = (kv_head + token(key)) * D4 + e % D4;
            dk_buf[dst] = pack4(dk[a] * scale);
            dv_buf[dst] = pack4(dv[a]);
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
    let kv_head = (it.b * (P.heads / P.group) + it.h / P.group) * P.seq_k;
    let scale = P.scale_log2 * LN2;
    let D4 = D / 4u;
    let na = (RS * D4 + THREADS - 1u) / THREADS;
    let q0 = it.qt * BR;
    for (var r0 = 0u; r0 < BR && q0 + r0 < P.seq_q; r0 += RS) {
        workgroupBarrier();
        load_rows(it.b, it.h, q0 + r0, lid);
        var acc: array<vec4<f32>, DQ_CAP>;
        for (var a = 0u; a < na; a++) {
            acc[a] = vec4<f32>(0.0);
        }
        for (var pos = it.first; pos < it.end; pos++) {
            let t = tile_at(pos, it);
            let key0 = t.kt * BC;
            workgroupBarrier();
            probs(t, it, r0, kv_head, lid);
            workgroupBarrier();
            let keys = min(BC, P.seq_k - key0);
            for (var a = 0u; a < na; a++) {
                let e = lid + THREADS * a;
                if (e < RS * D4) {
                    let r = e / D4;
                    let c4 = e % D4;
                    var s = vec4<f32>(0.0);
                    for (var j = 0u; j < keys; j++) {
                        s += dss[r * BC + j] * load4(k_buf[(kv_head + token(key0 + j)) * D4 + c4]);
                    }
                    acc[a] += s;
                }
            }
        }
        let head = (it.b * P.heads + it.h) * P.seq_q;
        for (var a = 0u; a < na; a++) {
            let e = lid + THREADS * a;
            let r = e / D4;
            if (e < RS * D4 && q0 + r0 + r < P.seq_q) {
                dq_buf[(head + token(q0 + r0 + r)) * D4 + e % D4] = pack4(acc[a] * scale);
            }
        }
    }
}
