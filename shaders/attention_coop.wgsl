// Tensor-core kernel: S = Q K^T and O += P V through cooperative matrices (16x16x16, f16
// operands, f32 accumulators); masking and the online softmax by the threads, through
// workgroup memory, since a cooperative matrix has no element access. Needs common.wgsl; the
// prologue enables f16 and wgpu_cooperative_matrix with Elem = f16. No subgroup operations here:
// one NVIDIA driver crashes on modules that mix them with cooperative matrices.
//
// BR / 16 subgroups of 32 threads (THREADS = 2 BR); subgroup w computes query rows
// [16 w, 16 w + 16) of the tile and keeps their Q fragments and O accumulators in registers
// (D <= 16 * DT_CAP). For the softmax, threads 2r and 2r+1 own row r, half of its BC columns
// each.
//
// Lazy rescaling: P = exp2(S - m) with a per-row reference max m that moves only when some row's
// tile max exceeds its m by more than RESCALE_GAP, so P <= 2^RESCALE_GAP stays well inside f16.
// Only then do the accumulators go through workgroup memory to be rescaled by the threads; after
// the first key tiles of a row that is rare.
//
// Workgroup memory: tiles with padded rows (16 bytes) against bank conflicts; f_sh holds S each
// key tile and O when rescaling and at the end. Every workgroup variable here is an array: on the
// H100's Vulkan driver (580.159) a scalar workgroup variable beside the cooperative-matrix tiles
// corrupted the results, so the rescale flag lives in the last slot of `red`.

const DT_CAP: u32 = 8u;        // max D / 16
const HALF_CAP: u32 = 32u;     // max BC / 2
const RESCALE_GAP: f32 = 8.0;

@group(0) @binding(1) var<storage, read> q_buf: array<f16>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<f16>>;
@group(0) @binding(7) var<storage, read> bits_buf: array<u32>;

// The forward kernels read mask bits from their own binding.
fn mask_word(i: u32) -> u32 {
    return bits_buf[i];
}

var<workgroup> q_sh: array<f16, BR * (D + 8u)>;
var<workgroup> kv_sh: array<f16, BC * (D + 8u)>;
var<workgroup> f_sh: array<f32, BR * (max(BC, D) + 4u)>;
var<workgroup> p_sh: array<f16, BR * (BC + 8u)>;
// row max partials, row sum partials, then the rescale flag at 4 BR
var<workgroup> red: array<f32, 4u * BR + 4u>;

// Loads keys [key0, key0 + BC) of one K or V head into kv_sh (zeros past the end).
fn load_kv(from_v: bool, head_base: u32, key0: u32, lid: u32) {
    for (var e = lid; e < BC * (D / 4u); e += THREADS) {
        let r = e / (D / 4u);
        let c = (e % (D / 4u)) * 4u;
        var val = vec4<f16>(0.0);
        if (key0 + r < P.seq_k) {
            let g = head_base / 4u + token(key0 + r) * (D / 4u) + c / 4u;
            if (from_v) {
                val = v_buf[g];
            } else {
                val = k_buf[g];
            }
        }
        let s = r * (D + 8u) + c;
        kv_sh[s] = val.x;
        kv_sh[s + 1u] = val.y;
        kv_sh[s + 2u] = val.z;
        kv_sh[s + 3u] = val.w;
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
        q_sh[row * (D + 8u) + e % D] = val;
    }
    if (lid == 0u) {
        red[4u * BR] = 0.0;
    }
    workgroupBarrier();
    // Q fragments of this subgroup's rows, loaded once.
    var qa: array<coop_mat16x16<f16, A>, DT_CAP>;
    for (var kk = 0u; kk < D / 16u; kk++) {
        qa[kk] = coopLoadT<coop_mat16x16<f16, A>>(&q_sh[sg * 16u * (D + 8u) + kk * 16u], D + 8u);
    }
    var acc: array<coop_mat16x16<f32, C>, DT_CAP>;
    for (var n = 0u; n < D / 16u; n++) {
        acc[n] = coop_mat16x16<f32, C>();
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
                let b = coopLoad<coop_mat16x16<f16, B>>(&kv_sh[n * 16u * (D + 8u) + kk * 16u], D + 8u);
                c = coopMultiplyAdd(qa[kk], b, c);
            }
            coopStoreT(c, &f_sh[sg * 16u * (max(BC, D) + 4u) + n * 16u], (max(BC, D) + 4u));
        }
        workgroupBarrier();
        load_kv(true, kv_head, key0, lid);

        // Scale into log2 units, mask, and this thread's half-row max.
        let masked = key0 + BC > P.seq_k || t.state != 2u;
        var mx = NEG;
        for (var j = 0u; j < BC / 2u; j++) {
            let col = half * (BC / 2u) + j;
            let key = key0 + col;
            var x = f_sh[r * (max(BC, D) + 4u) + col] * P.scale_log2;
            if (masked && (key >= P.seq_k || q0 + r >= P.seq_q || !allowed(t, it, r, key))) {
                x = NEG;
            }
            sv[j] = x;
            mx = max(mx, x);
        }
        red[lid] = mx;
        workgroupBarrier();
        // Lazy rescale: raise the flag if this row's max ran away from its reference.
        let m_tile = max(red[2u * r], red[2u * r + 1u]);
        if (m_tile > m_i + RESCALE_GAP) {
            red[4u * BR] = 1.0;
        }
        let resc = workgroupUniformLoad(&red[4u * BR]) != 0.0;
        var m_new = m_i;
        if (resc) {
            m_new = max(m_i, m_tile);
        }
        var ps = 0.0;
        for (var j = 0u; j < BC / 2u; j++) {
            // written so that a NaN score stays NaN (inputs with NaN propagate it)
            let p = select(exp2(sv[j] - m_new), 0.0, sv[j] <= NEG_CUT);
            p_sh[r * (BC + 8u) + half * (BC / 2u) + j] = f16(p);
            ps += p;
        }
        red[2u * BR + lid] = ps;
        if (resc) {
            let alpha = exp2(m_i - m_new);
            l_i *= alpha;
            for (var n = 0u; n < D / 16u; n++) {
                coopStoreT(acc[n], &f_sh[sg * 16u * (max(BC, D) + 4u) + n * 16u], (max(BC, D) + 4u));
            }
            workgroupBarrier();
            for (var c = half * (D / 2u); c < (half + 1u) * (D / 2u); c++) {
                f_sh[r * (max(BC, D) + 4u) + c] *= alpha;
            }
            workgroupBarrier();
            for (var n = 0u; n < D / 16u; n++) {
                acc[n] = coopLoadT<coop_mat16x16<f32, C>>(&f_sh[sg * 16u * (max(BC, D) + 4u) + n * 16u], (max(BC, D) + 4u));
            }
        }
        m_i = m_new;
        workgroupBarrier();
        // Everyone has read the flag (and P and the row sums are published): lower it.
        if (lid == 0u) {
            red[4u * BR] = 0.0;
        }
        l_i += red[2u * BR + 2u * r] + red[2u * BR + 2u * r + 1u];

        // O rows of this subgroup += P V.
        for (var n = 0u; n < D / 16u; n++) {
            for (var kk = 0u; kk < BC / 16u; kk++) {
                let a = coopLoadT<coop_mat16x16<f16, A>>(&p_sh[sg * 16u * (BC + 8u) + kk * 16u], BC + 8u);
                let b = coopLoadT<coop_mat16x16<f16, B>>(&kv_sh[kk * 16u * (D + 8u) + n * 16u], D + 8u);
                acc[n] = coopMultiplyAdd(a, b, acc[n]);
            }
        }
    }
    // O through workgroup memory to the threads that own its rows.
    workgroupBarrier();
    for (var n = 0u; n < D / 16u; n++) {
        coopStoreT(acc[n], &f_sh[sg * 16u * (max(BC, D) + 4u) + n * 16u], (max(BC, D) + 4u));
    }
    workgroupBarrier();

    // Normalise and store; rows with no allowed key give O = 0 and LSE = -inf.
    if (q0 + r < P.seq_q) {
        let inv = select(0.0, 1.0 / l_i, l_i > 0.0);
        let dest = dest_row(it, r);
        for (var c = half * (D / 2u); c < (half + 1u) * (D / 2u); c += 4u) {
            let o = r * (max(BC, D) + 4u) + c;
            store_o4(it, dest, c, vec4<f32>(f_sh[o], f_sh[o + 1u], f_sh[o + 2u], f_sh[o + 3u]) * inv);
        }
        if (half == 0u) {
            store_lse(it, dest, m_i, l_i);
        }
    }
}
