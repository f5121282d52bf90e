// What both backward modules share (shaders/backward.wgsl, portable; backward_coop.wgsl, tensor
// cores): the bindings of the backward passes, the pre-pass, and the query rows that a dK/dV
// pass walks. Needs common.wgsl and a storage prologue.

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

// The query rows a pass walks: the rows of the query tiles at walk positions [first, end), for
// `heads` query heads from the one whose first row is q_head0, one after the other. Listed
// positions name their query tile and state in the transposed entries (full before full_end);
// otherwise a position is its query tile, of state `state` (2 full, 3 dense mask).
struct Rows {
    q_head0: u32,
    heads: u32,
    first: u32,
    end: u32,
    full_end: u32,
    listed: bool,
    state: u32,
}

// Row v of a Rows sequence: its query head's first row, its query tile and row in the tile,
// its sequence position (seq_q past the end), and its tile's state and bit slot.
struct RowAt {
    q_head: u32,
    qt: u32,
    r: u32,
    seq: u32,
    state: u32,
    slot: u32,
}

fn row_at(rows: Rows, v: u32) -> RowAt {
    let per_head = (rows.end - rows.first) * BR;
    var hh = 0u;
    if (rows.heads > 1u) {
        hh = v / per_head;
    }
    let w = v - hh * per_head;
    let pos = rows.first + w / BR;
    var a = RowAt(rows.q_head0 + hh * P.seq_q, pos, w % BR, P.seq_q, rows.state, 0u);
    if (hh >= rows.heads || pos >= rows.end) {
        return a;
    }
    if (rows.listed) {
        let e = P.t_rows_off + 2u * pos;
        a.qt = index_buf[e];
        a.state = 2u;
        if (pos >= rows.full_end) {
            a.state = 1u;
            a.slot = index_buf[e + 1u];
        }
    }
    a.seq = min(a.qt * BR + a.r, P.seq_q);
    return a;
}

