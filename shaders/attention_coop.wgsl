// Tensor-core kernel: S = Q K^T and O += P V through cooperative matrices (16x16x16, f16
// operands, f32 accumulators); masking and the online softmax by the threads, through
// workgroup memory, since a cooperative matrix has no element access. Needs common.wgsl; the
// prologue enables f16 and wgpu_cooperative_matrix with Elem = f16. No subgroup operations here:
// one NVIDIA driver crashes on modules that mix them with cooperative matrices.
//
// BR / 16 subgroups of 32 threads (THREADS = 2 BR); subgroup w computes query rows
// [16 w, 16 w + 16) of the tile. For the softmax, threads 2r and 2r+1 own row r, half of its BC
// columns each. The output accumulator lives in workgroup memory (f32) so that the threads can
// rescale it when a row's running max grows.

const HALF_CAP: u32 = 32u;     // max BC / 2

@group(0) @binding(1) var<storage, read> q_buf: array<f16>;
@group(0) @binding(2) var<storage, read> k_buf: array<f16>;
@group(0) @binding(3) var<storage, read> v_buf: array<f16>;
@group(0) @binding(7) var<storage, read> bits_buf: array<u32>;

// The forward kernels read mask bits from their own binding.
fn mask_word(i: u32) -> u32 {
    return bits_buf[i];
}

var<workgroup> q_sh: array<f16, BR * D>;
var<workgroup> kv_sh: array<f16, BC * D>;
var<workgroup> s_sh: array<f32, BR * BC>;
var<workgroup> p_sh: array<f16, BR * BC>;
var<workgroup> o_sh: array<f32, BR * D>;
var<workgroup> red: array<f32, 4u * BR>;   // row max partials, then row sum partials

// Loads keys [key0, key0 + BC) of one K or V head into kv_sh (zeros past the end).
fn load_kv(from_v: bool, head_base: u32, key0: u32, lid: u32) {
    for (var e = lid; e < BC * D; e += THREADS) {
        let r = e / D;
        var val = f16(0.0);
        if (key0 + r < P.seq_k) {
            let g = head_base + token(key0 + r) * D + e % D;
            if (from_v) {
                val = v_buf[g];
            } else {
                val = k_buf[g];
            }
        }
        kv_sh[e] = val;
    }
}

@compute @workgroup_size(THREADS)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let it = work_item(wg, nwg, lid);
    let sg = lid / 32u;
    let r = lid / 2u;
    let half = lid % 2u;
    let q0 = it.qt * BR;
    let hk = it.h / P.group;

    let q_head = (it.b * P.heads + it.h) * P.seq_q * D;
    for (var e = lid; e < BR * D; e += THREADS) {
        let row = e / D;
        var val = f16(0.0);
        if (q0 + row < P.seq_q) {
            val = q_buf[q_head + token(q0 + row) * D + e % D];
        }
        q_sh[e] = val;
        o_sh[e] = 0.0;
    }
    var m_i = NEG;
    var l_i = 0.0;
    let kv_head = (it.b * (P.heads / P.group) + hk) * P.seq_k * D;
    var sv: array<f32, HALF_CAP>;

    for (var pos = it.first; pos < it.end; pos++) {
        let t = tile_at(pos, it);
        let key0 = t.kt * BC;

        workgroupBarrier();
        load_kv(false, kv_head, key0, lid);
        workgroupBarrier();
        // S rows of this subgroup: K^T is K read column-major.
        for (var n = 0u; n < BC / 16u; n++) {
            var c = coop_mat16x16<f32, C>();
            for (var kk = 0u; kk < D / 16u; kk++) {
                let a = coopLoadT<coop_mat16x16<f16, A>>(&q_sh[sg * 16u * D + kk * 16u], D);
                let b = coopLoad<coop_mat16x16<f16, B>>(&kv_sh[n * 16u * D + kk * 16u], D);
                c = coopMultiplyAdd(a, b, c);
            }
            coopStoreT(c, &s_sh[sg * 16u * BC + n * 16u], BC);
        }
        workgroupBarrier();
        load_kv(true, kv_head, key0, lid);

        // Scale into log2 units, mask, and this thread's half-row max.
        let masked = key0 + BC > P.seq_k || t.state != 2u;
        var mx = NEG;
        for (var j = 0u; j < BC / 2u; j++) {
            let col = half * (BC / 2u) + j;
            let key = key0 + col;
            var x = s_sh[r * BC + col] * P.scale_log2;
            if (masked && (key >= P.seq_k || q0 + r >= P.seq_q || !allowed(t, it, r, key))) {
                x = NEG;
            }
            sv[j] = x;
            mx = max(mx, x);
        }
        red[lid] = mx;
        workgroupBarrier();
        let m_new = max(m_i, max(red[2u * r], red[2u * r + 1u]));
        let alpha = exp2(m_i - m_new);
        m_i = m_new;
        var ps = 0.0;
        for (var j = 0u; j < BC / 2u; j++) {
            // written so that a NaN score stays NaN (inputs with NaN propagate it)
            let p = select(exp2(sv[j] - m_new), 0.0, sv[j] <= NEG_CUT);
            p_sh[r * BC + half * (BC / 2u) + j] = f16(p);
            ps += p;
        }
        red[2u * BR + lid] = ps;
        for (var c = half * (D / 2u); c < (half + 1u) * (D / 2u); c++) {
            o_sh[r * D + c] *= alpha;
        }
        workgroupBarrier();
        l_i = l_i * alpha + red[2u * BR + 2u * r] + red[2u * BR + 2u * r + 1u];

        // O rows of this subgroup += P V.
        for (var n = 0u; n < D / 16u; n++) {
            var c = coopLoadT<coop_mat16x16<f32, C>>(&o_sh[sg * 16u * D + n * 16u], D);
            for (var kk = 0u; kk < BC / 16u; kk++) {
                let a = coopLoadT<coop_mat16x16<f16, A>>(&p_sh[sg * 16u * BC + kk * 16u], BC);
                let b = coopLoadT<coop_mat16x16<f16, B>>(&kv_sh[kk * 16u * D + n * 16u], D);
                c = coopMultiplyAdd(a, b, c);
            }
            coopStoreT(c, &o_sh[sg * 16u * D + n * 16u], D);
        }
    }
    workgroupBarrier();

    // Normalise and store; rows with no allowed key give O = 0 and LSE = -inf.
    if (q0 + r < P.seq_q) {
        let inv = select(0.0, 1.0 / l_i, l_i > 0.0);
        let dest = dest_row(it, r);
        for (var c = half * (D / 2u); c < (half + 1u) * (D / 2u); c++) {
            store_o(it, dest, c, o_sh[r * D + c] * inv);
        }
        if (half == 0u) {
            store_lse(it, dest, m_i, l_i);
        }
    }
}
