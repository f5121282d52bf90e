// Storage of Q, K, V, O and the gradients as bfloat16 (the upper half of an f32), which WGSL
// lacks: two per u32 word, the lower half first (the order of a little-endian bf16 array), so
// four elements make a vec2<u32>. The kernels move them four at a time: `Elem4` in memory,
// widened to vec4<f32> by load4 and rounded back by pack4; all arithmetic is f32.
alias Elem4 = vec2<u32>;

fn load4(x: Elem4) -> vec4<f32> {
    return vec4<f32>(
        bitcast<f32>(x.x << 16u),
        bitcast<f32>(x.x & 0xffff0000u),
        bitcast<f32>(x.y << 16u),
        bitcast<f32>(x.y & 0xffff0000u),
    );
}

// The bf16 nearest to `v` (ties to even) in the low 16 bits; NaN stays a quiet NaN, as the
// host's conversion (half::bf16::from_f32) does.
fn bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn pack4(v: vec4<f32>) -> Elem4 {
    return vec2<u32>(
        bf16_bits(v.x) | (bf16_bits(v.y) << 16u),
        bf16_bits(v.z) | (bf16_bits(v.w) << 16u),
    );
}
