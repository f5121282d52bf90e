// Tiled online-softmax attention forward (FlashAttention-2 order): the portable kernel, f32
// arithmetic on f32, f16 or bf16 storage (`Elem4`, `load4`, `pack4` from the host's prologue).
// Needs common.wgsl (walk, masks, stores, merge).
//
// Thread layout: THREADS = TY x TX. Thread (ty, tx) owns query rows ty + TY*i (i < TM) and, for
// the scores, key columns tx + TX*j (j < BC/TX); for the output, the head-dim columns of vec4
// groups tx + TX*o (o < D/(4 TX)).
// Scores are kept in log2 units: Q is pre-scaled by scale * log2(e) when loaded.
//
// The row max and row sum of a tile combine the TX threads of a row. Through workgroup memory
// (red_m, red_l) by default; with SUBGROUP_RED by shuffle-xor butterflies over lanes, since the
// TX threads of a row (tx = lid % TX) are TX contiguous lanes of one subgroup when TX is a power
// of two no larger than the subgroup (the host checks the adapter's minimum subgroup size and
// defines `lane_xor` in the prologue).

override DC: u32 = 64u;        // head-dim chunk of K/V held in workgroup memory (divides D)
override TX: u32 = 8u;         // threads per row group; TY = THREADS / TX
override SUBGROUP_RED: bool = false;  // row max and sum by subgroup shuffles, not red_m/red_l

const TM_CAP: u32 = 8u;        // max rows per thread (BR / TY)
const S_CAP: u32 = 32u;        // max scores per thread (TM * BC / TX)
const ACC_CAP: u32 = 16u;      // max output vec4 accumulators per thread (TM * D / (4 TX))

@group(0) @binding(1) var<storage, read> q_buf: array<Elem4>;
@group(0) @binding(2) var<storage, read> k_buf: array<Elem4>;
@group(0) @binding(3) var<storage, read> v_buf: array<Elem4>;
@group(0) @binding(7) var<storage, read> bits_buf: array<u32>;

// The forward kernels read mask bits from their own binding.
fn mask_word(i: u32) -> u32 {
    return bits_buf[i];
}

var<workgroup> q_tile: array<vec4<f32>, BR * D / 4u>;
// K or V chunk: rows of DC/4 + 1 vec4 (the pad spreads rows over memory banks)
var<workgroup> kv_tile: array<vec4<f32>, BC * (DC / 4u + 1u)>;
var<workgroup> p_tile: array<f32, BR * BC>;
var<workgroup> red_m: array<f32, BR * TX>;
var<workgroup> red_l: array<f32, BR * TX>;

// Loads keys [key0, key0 + BC) x head-dim [c0, c0 + DC) of one K or V head into kv_tile.
fn load_kv(from_v: bool, head_base: u32, key0: u32, c0: u32, lid: u32) {
    let per_row = DC / 4u;
    for (var e = lid; e < BC * per_row; e += THREADS) {
        let r = e / per_row;
        let c4 = e % per_row;
        var val = vec4<f32>(0.0);
        if (key0 + r < P.seq_k) {
            let g = head_base + token(key0 + r) * (D / 4u) + c0 / 4u + c4;
            if (from_v) {
                val = load4(v_buf[g]);
            } else {
                val = load4(k_buf[g]);
            }
        }
        kv_tile[r * (per_row + 1u) + c4] = val;
    }
}

// The max and the sum of `x` over the TX threads of a row (SUBGROUP_RED): log2(TX) butterfly
// steps, after which every thread of the row holds the result.
fn lanes_max(x: f32) -> f32 {
    var v = x;
    for (var m = 1u; m < TX; m <<= 1u) {
        v = max(v, lane_xor(v, m));
    }
    return v;
}

fn lanes_sum(x: f32) -> f32 {
    var v = x;
    for (var m = 1u; m < TX; m <<= 1u) {
        v += lane_xor(v, m);
    }
    return v;
}

@compute @workgroup_size(THREADS)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let TY = THREADS / TX;
    let TM = BR / TY;
    let SN = BC / TX;
    let ON = D / (4u * TX);
    let tx = lid % TX;
    let ty = lid / TX;

    let it = work_item(wg, nwg, lid);
    let b = it.b;
    let h = it.h;
    let hk = h / P.group;
    let q0 = it.qt * BR;

    // Q tile, pre-scaled into log2 units.
    let q_head = ((b * P.heads + h) * P.seq_q) * (D / 4u);
    for (var e = lid; e < BR * D / 4u; e += THREADS) {
        let r = e / (D / 4u);
        var val = vec4<f32>(0.0);
        if (q0 + r < P.seq_q) {
            val = load4(q_buf[q_head + token(q0 + r) * (D / 4u) + e % (D / 4u)]) * P.scale_log2;
        }
        q_tile[e] = val;
    }

    var m_i: array<f32, TM_CAP>;
    var l_i: array<f32, TM_CAP>;
    var watch: array<f32, TM_CAP>;  // this thread's scores of each row, scaled (see WATCH)
    var acc: array<vec4<f32>, ACC_CAP>;
    for (var i = 0u; i < TM; i++) {
        m_i[i] = NEG;
        l_i[i] = 0.0;
        watch[i] = 0.0;
    }
    for (var a = 0u; a < TM * ON; a++) {
        acc[a] = vec4<f32>(0.0);
    }

    let kv_head = (b * (P.heads / P.group) + hk) * P.seq_k * (D / 4u);
    var s: array<f32, S_CAP>;

    for (var pos = it.first; pos < it.end; pos++) {
        let t = tile_at(pos, it);
        let key0 = t.kt * BC;

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
                        s[i * SN + j] += dot(qv, kv_tile[(tx + TX * j) * (DC / 4u + 1u) + d4]);
                    }
                }
            }
        }

        // Masking: keys past the end, then the mask bits of partial / element-masked tiles.
        if (key0 + BC > P.seq_k || t.state != 2u) {
            for (var i = 0u; i < TM; i++) {
                let r = ty + TY * i;
                for (var j = 0u; j < SN; j++) {
                    let key = key0 + tx + TX * j;
                    if (key >= P.seq_k || q0 + r >= P.seq_q || !allowed(t, it, r, key)) {
                        s[i * SN + j] = NEG;
                    }
                }
            }
        }
        // Online softmax: tile row max, rescale, P = exp2(S - m), tile row sum.
        var tile_max: array<f32, TM_CAP>;
        for (var i = 0u; i < TM; i++) {
            var mx = NEG;
            for (var j = 0u; j < SN; j++) {
                mx = max(mx, s[i * SN + j]);
                watch[i] = fma(s[i * SN + j], WATCH, watch[i]);
            }
            if (SUBGROUP_RED) {
                tile_max[i] = lanes_max(mx);
            } else {
                red_m[(ty + TY * i) * TX + tx] = mx;
            }
        }
        if (!SUBGROUP_RED) {
            workgroupBarrier();
        }
        for (var i = 0u; i < TM; i++) {
            let r = ty + TY * i;
            var m_new = m_i[i];
            if (SUBGROUP_RED) {
                m_new = max(m_new, tile_max[i]);
            } else {
                for (var t = 0u; t < TX; t++) {
                    m_new = max(m_new, red_m[r * TX + t]);
                }
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
                let p = select(exp2(sv - m_new), 0.0, sv <= NEG_CUT);
                p_tile[r * BC + tx + TX * j] = p;
                ps += p;
            }
            if (SUBGROUP_RED) {
                l_i[i] += lanes_sum(ps);
            } else {
                red_l[r * TX + tx] = ps;
            }
        }

        // O += P V, over head-dim chunks (the first barrier also publishes p_tile and red_l).
        for (var c0 = 0u; c0 < D; c0 += DC) {
            workgroupBarrier();
            load_kv(true, kv_head, key0, c0, lid);
            workgroupBarrier();
            for (var j = 0u; j < BC; j++) {
                for (var i = 0u; i < TM; i++) {
                    let p = p_tile[(ty + TY * i) * BC + j];
                    for (var o = c0 / (4u * TX); o < (c0 + DC) / (4u * TX); o++) {
                        acc[i * ON + o] += p * kv_tile[j * (DC / 4u + 1u) + tx + TX * o - c0 / 4u];
                    }
                }
            }
        }
        if (!SUBGROUP_RED) {
            for (var i = 0u; i < TM; i++) {
                let r = ty + TY * i;
                var ls = 0.0;
                for (var t = 0u; t < TX; t++) {
                    ls += red_l[r * TX + t];
                }
                l_i[i] += ls;
            }
        }
    }

    // Normalise and store; rows with no allowed key give O = 0 and LSE = -inf, rows with a NaN
    // or +inf score NaN (the verdicts of the row's TX threads combined by max).
    var bad: array<f32, TM_CAP>;
    for (var i = 0u; i < TM; i++) {
        bad[i] = select(0.0, 1.0, spoiled(watch[i]));
        if (SUBGROUP_RED) {
            bad[i] = lanes_max(bad[i]);
        } else {
            red_m[(ty + TY * i) * TX + tx] = bad[i];
        }
    }
    if (!SUBGROUP_RED) {
        workgroupBarrier();
        for (var i = 0u; i < TM; i++) {
            for (var t = 0u; t < TX; t++) {
                bad[i] = max(bad[i], red_m[(ty + TY * i) * TX + t]);
            }
        }
    }
    for (var i = 0u; i < TM; i++) {
        let r = ty + TY * i;
        if (q0 + r >= P.seq_q) {
            continue;
        }
        let l = l_i[i];
        let inv = select(select(0.0, 1.0 / l, l > 0.0), nan_value(), bad[i] != 0.0);
        let dest = dest_row(it, r);
        for (var o = 0u; o < ON; o++) {
            store_o4(it, dest, 4u * (tx + TX * o), acc[i * ON + o] * inv);
        }
        if (tx == 0u) {
            store_lse(it, dest, m_i[i], l, bad[i] != 0.0);
        }
    }
}
