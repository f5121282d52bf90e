// Storage of Q, K, V, O and the gradients as f32 or f16 (`Elem`, which the host defines just
// before this file). The kernels move them four elements at a time: `Elem4` in memory, widened
// to vec4<f32> by load4 and rounded back by pack4; all arithmetic is f32.
alias Elem4 = vec4<Elem>;

fn load4(x: Elem4) -> vec4<f32> {
    return vec4<f32>(x);
}

fn pack4(v: vec4<f32>) -> Elem4 {
    return Elem4(v);
}
