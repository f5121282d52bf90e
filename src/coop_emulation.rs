//! Cooperative matrices emulated in plain WGSL, so that the tensor-core kernels' logic (tiles,
//! masks, the online softmax, the backward's P and dS, their workgroup-memory traffic) runs and
//! is tested on devices without them, lavapipe included
//! ([`crate::Gpu::with_tensor_core_emulation`]).
//!
//! The rewrite is textual and knows exactly the forms the kernels use:
//! `coop_mat16x16<T, R>` types and zero constructors, `coopLoad`/`coopLoadT` and
//! `coopStore`/`coopStoreT` on `&array[index]` of a workgroup array, and `coopMultiplyAdd`.
//! A 16x16 matrix is spread over each group of 32 consecutive invocations (the kernel's
//! subgroups), 8 elements per invocation: invocation l holds row l / 2, columns 8 (l % 2) to
//! 8 (l % 2) + 7. A product goes through workgroup memory (16 f32 per invocation) between two
//! barriers, in f32 on operands the kernel loaded from f16. `coopLoad`/`coopStore` are
//! column-major, the `T` forms row-major, as in wgpu.
//!
//! Each emulated product is bracketed by two workgroup barriers, so an emulated run cannot
//! reveal a barrier missing around cooperative-matrix operations: only real ones can.

use std::collections::BTreeSet;

/// Workgroup memory the emulation adds per invocation (the operands of a product).
pub(crate) const SCRATCH_BYTES_PER_INVOCATION: usize = 64;

const PROLOGUE: &str = "\
// Emulated cooperative matrices (see src/coop_emulation.rs).
struct CoopEmu {
    e: array<f32, 8>,
}

var<private> emu_lid: u32;
var<workgroup> emu_sh: array<f32, THREADS * 16u>;

fn emu_mma(a: CoopEmu, b: CoopEmu, c: CoopEmu) -> CoopEmu {
    let l = emu_lid % 32u;
    let base = (emu_lid / 32u) * 512u;
    let row = l / 2u;
    let col0 = (l % 2u) * 8u;
    workgroupBarrier();
    for (var i = 0u; i < 8u; i++) {
        emu_sh[base + row * 16u + col0 + i] = a.e[i];
        emu_sh[base + 256u + row * 16u + col0 + i] = b.e[i];
    }
    workgroupBarrier();
    var out = c;
    for (var i = 0u; i < 8u; i++) {
        for (var k = 0u; k < 16u; k++) {
            out.e[i] += emu_sh[base + row * 16u + k] * emu_sh[base + 256u + k * 16u + col0 + i];
        }
    }
    return out;
}
";

/// The tensor-core module `src` with its cooperative-matrix operations emulated.
pub(crate) fn emulated(src: &str) -> String {
    let src = src.replace("enable wgpu_cooperative_matrix;\n", "");
    let mut arrays = BTreeSet::new();
    let mut out = String::with_capacity(src.len() + 4096);
    let mut rest = src.as_str();
    while let Some(at) = rest.find("coop") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(r) = rest.strip_prefix("coopMultiplyAdd(") {
            out.push_str("emu_mma(");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("coop_mat16x16<") {
            out.push_str("CoopEmu");
            rest = &r[r.find('>').expect("coop type") + 1..];
        } else if let Some((op, r)) = ["coopLoadT", "coopLoad", "coopStoreT", "coopStore"]
            .iter()
            .find_map(|op| rest.strip_prefix(op).map(|r| (*op, r)))
        {
            let r = match r.strip_prefix('<') {
                // the type argument of a load: coop_mat16x16<T, R>
                Some(t) => &t[t.find(">>").expect("coop load type") + 2..],
                None => r,
            };
            let (args, after) = call_args(r);
            let layout = if op.ends_with('T') { "rm" } else { "cm" };
            let (value, pointer, stride) = match args.as_slice() {
                [p, s] if op.starts_with("coopLoad") => (None, *p, *s),
                [v, p, s] => (Some(*v), *p, *s),
                _ => panic!("unexpected arguments of {op}: {args:?}"),
            };
            let p = pointer.trim().strip_prefix('&').expect("coop pointer");
            let open = p.find('[').expect("coop pointer index");
            let (array, index) = (&p[..open], &p[open + 1..p.len() - 1]);
            let kind = if op.starts_with("coopLoad") {
                "load"
            } else {
                "store"
            };
            arrays.insert((kind, layout, array.to_string()));
            out.push_str(&format!("emu_{kind}_{layout}_{array}("));
            if let Some(v) = value {
                out.push_str(v.trim());
                out.push_str(", ");
            }
            out.push_str(&format!("{}, {})", index.trim(), stride.trim()));
            rest = after;
        } else {
            out.push_str("coop");
            rest = &rest[4..];
        }
    }
    out.push_str(rest);

    // Every entry point that uses cooperative matrices takes `lid` last, on a line of its own.
    let marker = "@builtin(local_invocation_index) lid: u32,\n) {\n";
    assert!(
        out.contains(marker),
        "emulation needs the entry points' `lid`"
    );
    let out = out.replace(marker, &format!("{marker}    emu_lid = lid;\n"));
    let mut functions = String::from(PROLOGUE);
    for (kind, layout, array) in &arrays {
        functions.push_str(&access_fn(&out, kind, layout, array));
    }
    format!("{out}\n{functions}")
}

/// The top-level comma-separated arguments of a call whose opening parenthesis precedes `s`,
/// and the text after its closing parenthesis.
fn call_args(s: &str) -> (Vec<&str>, &str) {
    let s = s.strip_prefix('(').expect("call");
    let (mut depth, mut start, mut args) = (0usize, 0usize, Vec::new());
    for (i, ch) in s.char_indices() {
        match ch {
            '(' | '[' => depth += 1,
            ')' if depth == 0 => {
                args.push(&s[start..i]);
                return (args, &s[i + 1..]);
            }
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                args.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    panic!("unclosed call");
}

/// The emulated load or store of one workgroup array in one layout.
fn access_fn(module: &str, kind: &str, layout: &str, array: &str) -> String {
    let decl = format!("var<workgroup> {array}: array<");
    let at = module.find(&decl).expect("workgroup array declaration") + decl.len();
    let elem = module[at..].split(',').next().expect("element type").trim();
    // element i of this invocation: row-major index `row * stride + col0 + i`, column-major
    // `(col0 + i) * stride + row`
    let element = if layout == "rm" {
        "row * stride + col0 + i"
    } else {
        "(col0 + i) * stride + row"
    };
    let head = "    let l = emu_lid % 32u;\n    let row = l / 2u;\n    let col0 = (l % 2u) * 8u;\n";
    if kind == "load" {
        format!(
            "\nfn emu_load_{layout}_{array}(at: u32, stride: u32) -> CoopEmu {{\n{head}    \
             var m: CoopEmu;\n    for (var i = 0u; i < 8u; i++) {{\n        \
             m.e[i] = f32({array}[at + {element}]);\n    }}\n    return m;\n}}\n"
        )
    } else {
        format!(
            "\nfn emu_store_{layout}_{array}(m: CoopEmu, at: u32, stride: u32) {{\n{head}    \
             for (var i = 0u; i < 8u; i++) {{\n        \
             {array}[at + {element}] = {elem}(m.e[i]);\n    }}\n}}\n"
        )
    }
}
