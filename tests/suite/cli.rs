//! The `blockflash` binary end to end: `run` on .npy and .safetensors files written here by hand
//! (against the f64 reference), `mask --json`/`--png`, `bench --json`, and every documented error
//! case (non-zero exit, a message on stderr).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockflash::kernel::DType;
use blockflash::suite::family_mask;
use blockflash::{reference, BlockMask, Mask, Shape};
use serde_json::Value;

use crate::common::{assert_close, gpu, rel_l2, tolerance, Rng};

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blockflash-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// The arguments of `line` split at whitespace, each `{}` replaced by the next of `files`.
fn argv(line: &str, files: &[&Path]) -> Vec<OsString> {
    let mut files = files.iter();
    let args: Vec<OsString> = line
        .split_whitespace()
        .map(|word| match word {
            "{}" => files.next().expect("a file for each {}").into(),
            w => w.into(),
        })
        .collect();
    assert!(files.next().is_none(), "more files than {{}} in {line:?}");
    args
}

/// Runs the binary with `line` (see [`argv`]).
fn blockflash(line: &str, files: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockflash"))
        .args(argv(line, files))
        .output()
        .expect("the blockflash binary runs")
}

/// Runs the binary and requires success; returns stdout.
fn ok(line: &str, files: &[&Path]) -> String {
    let out = blockflash(line, files);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "blockflash {line} failed:\n{stderr}");
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs the binary and requires a non-zero exit with `needle` in stderr.
fn fails(line: &str, files: &[&Path], needle: &str) {
    let out = blockflash(line, files);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "blockflash {line} {files:?} succeeded"
    );
    assert!(
        stderr.contains(needle),
        "blockflash {line} {files:?}: stderr lacks {needle:?}:\n{stderr}"
    );
}

// ---- Files by hand ------------------------------------------------------------------------

/// A .npy file (format 1.0) as numpy writes it.
fn npy(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if shape.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let order = if fortran { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {tuple}, }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// The bfloat16 bytes of `x` (nearest, ties to even) and the values they hold.
fn bf16_bytes(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bytes = DType::BF16.encode(x);
    let values = DType::BF16.decode(&bytes, x.len());
    (bytes, values)
}

/// Rounds through float16, as the file stores the values.
fn f16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// Reads a .npy file as numpy writes it (version 1.0, 64-byte aligned header ending in a
/// newline, C order) whose dtype is `descr`: its shape and data bytes.
fn read_npy_bytes(path: &Path, descr: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).expect("npy file");
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "header alignment");
    let header = std::str::from_utf8(&bytes[10..10 + len]).expect("header");
    assert!(header.ends_with('\n'), "{header:?}");
    assert!(header.contains(&format!("'descr': '{descr}'")), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let inner = &header[header.find("'shape': (").expect("shape") + 10..];
    let shape = inner[..inner.find(')').expect("shape end")]
        .split(',')
        .filter(|d| !d.trim().is_empty())
        .map(|d| d.trim().parse().expect("dimension"))
        .collect();
    (shape, bytes[10 + len..].to_vec())
}

/// Reads a float32 .npy file: shape and data.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let (shape, bytes) = read_npy_bytes(path, "<f4");
    let data = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    (shape, data)
}

/// A .safetensors file of the given (name, dtype, shape, bytes) tensors.
fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut text = Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
    }
    out
}

/// Reads the float32 tensor `name` of a .safetensors file: shape and data.
fn read_safetensors(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("output file");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("JSON header");
    let t = &header[name];
    assert_eq!(t["dtype"], "F32");
    let shape = t["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let (a, b) = (
        t["data_offsets"][0].as_u64().expect("offset") as usize,
        t["data_offsets"][1].as_u64().expect("offset") as usize,
    );
    let data = bytes[8 + n + a..8 + n + b]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    (shape, data)
}

/// Random 0/1 bytes with about `p` ones, and every query row's diagonal key set.
fn mask_bytes(rng: &mut Rng, batches: usize, nq: usize, nk: usize, p: f64) -> Vec<u8> {
    (0..batches * nq * nk)
        .map(|i| {
            let (q, k) = ((i / nk) % nq, i % nk);
            u8::from(q == k || (rng.next_u64() as f64 / u64::MAX as f64) < p)
        })
        .collect()
}

// ---- run ----------------------------------------------------------------------------------

#[test]
fn run_on_npy_files_matches_the_reference() {
    let mut rng = Rng::fresh("cli run npy");
    let dir = scratch("run-npy");
    let file = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write input");
        p
    };

    // float32, grouped-query heads, a shared uint8 mask, LSE, lengths off the tile grid.
    let shape = Shape {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 100,
        seq_k: 100,
        head_dim: 32,
    };
    let (q, k, v) = (
        rng.vec(shape.q_len()),
        rng.vec(shape.kv_len()),
        rng.vec(shape.kv_len()),
    );
    let bytes = mask_bytes(&mut rng, 1, 100, 100, 0.3);
    let mask = Mask::from_bytes(100, 100, &bytes).unwrap();
    let (qf, kf, vf) = (
        file("q.npy", npy("<f4", false, &[2, 4, 100, 32], &f32_bytes(&q))),
        file("k.npy", npy("<f4", false, &[2, 2, 100, 32], &f32_bytes(&k))),
        file("v.npy", npy("<f4", false, &[2, 2, 100, 32], &f32_bytes(&v))),
    );
    let mf = file("mask.npy", npy("|u1", false, &[100, 100], &bytes));
    let (of, lf) = (dir.join("o.npy"), dir.join("lse.npy"));
    ok(
        "run --q {} --k {} --v {} --mask {} --out {} --lse {}",
        &[&qf, &kf, &vf, &mf, &of, &lf],
    );
    let (o_shape, o) = read_npy(&of);
    let (l_shape, lse) = read_npy(&lf);
    assert_eq!((o_shape, l_shape), (vec![2, 4, 100, 32], vec![2, 4, 100]));
    let want = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
    assert_close("run npy f32", &blockflash::Output { o, lse }, &want, 1e-5);

    // float16 inputs, a per-batch bool mask, a scale, a forced path, no LSE: widened to f32,
    // and (auto) on the f16 tier where the adapter has one.
    let shape = Shape {
        batch: 2,
        heads: 2,
        kv_heads: 2,
        seq_q: 70,
        seq_k: 130,
        head_dim: 64,
    };
    let (q, k, v) = (
        f16_round(&rng.vec(shape.q_len())),
        f16_round(&rng.vec(shape.kv_len())),
        f16_round(&rng.vec(shape.kv_len())),
    );
    let bytes = mask_bytes(&mut rng, 2, 70, 130, 0.2);
    let mask = Mask::per_batch(vec![
        Mask::from_bytes(70, 130, &bytes[..70 * 130]).unwrap(),
        Mask::from_bytes(70, 130, &bytes[70 * 130..]).unwrap(),
    ])
    .unwrap();
    let half = |name: &str, shape: &[usize], x: &[f32]| {
        file(name, npy("<f2", false, shape, &f16_bytes(x)))
    };
    let (qf, kf, vf) = (
        half("q16.npy", &[2, 2, 70, 64], &q),
        half("k16.npy", &[2, 2, 130, 64], &k),
        half("v16.npy", &[2, 2, 130, 64], &v),
    );
    let mf = file("mask-b.npy", npy("|b1", false, &[2, 70, 130], &bytes));
    let of = dir.join("o16.npy");
    let want = reference::attention(&shape, &q, &k, &v, Some(&mask), Some(0.3)).unwrap();
    let has_f16 = gpu().tier_for(DType::F16).is_ok();
    for (precision, dtype) in [
        ("f32", DType::F32),
        ("auto", if has_f16 { DType::F16 } else { DType::F32 }),
    ] {
        let line = format!(
            "run --q {{}} --k {{}} --v {{}} --mask {{}} --out {{}} --scale 0.3 --path sparse \
             --precision {precision}"
        );
        ok(&line, &[&qf, &kf, &vf, &mf, &of]);
        let (o_shape, o) = read_npy(&of);
        assert_eq!(o_shape, vec![2, 2, 70, 64]);
        let got = blockflash::Output { o, lse: vec![] };
        let what = format!("run npy f16 per-batch, --precision {precision}");
        assert_close(&what, &got, &want, tolerance(dtype));
    }
    if !has_f16 {
        let line = "run --q {} --k {} --v {} --out {} --precision f16";
        fails(line, &[&qf, &kf, &vf, &of], "kernel tier unavailable");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_with_an_upstream_gradient_writes_the_gradients() {
    let mut rng = Rng::fresh("cli run backward");
    let dir = scratch("run-backward");
    let file = |name: &str, shape: &[usize], x: &[f32]| {
        let p = dir.join(name);
        std::fs::write(&p, npy("<f4", false, shape, &f32_bytes(x))).expect("write input");
        p
    };
    // Grouped-query heads, Nq != Nk, lengths off the tile grid, a causal mask (the first rows
    // see no key).
    let shape = Shape {
        batch: 1,
        heads: 4,
        kv_heads: 2,
        seq_q: 60,
        seq_k: 45,
        head_dim: 32,
    };
    let (q_dims, kv_dims) = ([1, 4, 60, 32], [1, 2, 45, 32]);
    let (q, k, v, d_o) = (
        rng.vec(shape.q_len()),
        rng.vec(shape.kv_len()),
        rng.vec(shape.kv_len()),
        rng.vec(shape.q_len()),
    );
    let mask = Mask::causal(60, 45).unwrap();
    let bytes: Vec<u8> = (0..60 * 45)
        .map(|i| u8::from(mask.get(0, i / 45, i % 45)))
        .collect();
    let (qf, kf, vf, df) = (
        file("q.npy", &q_dims, &q),
        file("k.npy", &kv_dims, &k),
        file("v.npy", &kv_dims, &v),
        file("do.npy", &q_dims, &d_o),
    );
    let mf = dir.join("mask.npy");
    std::fs::write(&mf, npy("|u1", false, &[60, 45], &bytes)).unwrap();
    let (of, dqf, dkf, dvf) = (
        dir.join("o.npy"),
        dir.join("dq.npy"),
        dir.join("dk.npy"),
        dir.join("dv.npy"),
    );
    ok(
        "run --q {} --k {} --v {} --mask {} --out {} --do {} --dq {} --dk {} --dv {}",
        &[&qf, &kf, &vf, &mf, &of, &df, &dqf, &dkf, &dvf],
    );
    let want = reference::attention_backward(&shape, &q, &k, &v, Some(&mask), None, &d_o).unwrap();
    for (f, dims, w) in [
        (&dqf, q_dims, &want.dq),
        (&dkf, kv_dims, &want.dk),
        (&dvf, kv_dims, &want.dv),
    ] {
        let (got_dims, got) = read_npy(f);
        assert_eq!(got_dims, dims.to_vec(), "{}", f.display());
        let err = crate::common::rel_l2(&got, w);
        assert!(err <= 1e-4, "{}: relative L2 error {err:e}", f.display());
    }
    // dO must have q's shape; the gradients need --do and all three outputs.
    let kv_as_do = file("bad-do.npy", &kv_dims, &k);
    fails(
        "run --q {} --k {} --v {} --out {} --do {} --dq {} --dk {} --dv {}",
        &[&qf, &kf, &vf, &of, &kv_as_do, &dqf, &dkf, &dvf],
        "do: expected [1, 4, 60, 32]",
    );
    fails(
        "run --q {} --k {} --v {} --out {} --do {} --dq {}",
        &[&qf, &kf, &vf, &of, &df, &dqf],
        "--dk",
    );
    fails(
        "run --q {} --k {} --v {} --out {} --dq {}",
        &[&qf, &kf, &vf, &of, &dqf],
        "--do",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_on_a_safetensors_file_round_trips() {
    let mut rng = Rng::fresh("cli run safetensors");
    let dir = scratch("run-safetensors");
    let shape = Shape::new(1, 2, 96, 32);
    let (q, k, v) = (
        rng.vec(shape.q_len()),
        f16_round(&rng.vec(shape.kv_len())),
        rng.vec(shape.kv_len()),
    );
    let bytes = mask_bytes(&mut rng, 1, 96, 96, 0.25);
    let mask = Mask::from_bytes(96, 96, &bytes).unwrap();
    let inputs = dir.join("inputs.safetensors");
    let file = safetensors(&[
        ("q", "F32", vec![1, 2, 96, 32], f32_bytes(&q)),
        ("k", "F16", vec![1, 2, 96, 32], f16_bytes(&k)),
        ("v", "F32", vec![1, 2, 96, 32], f32_bytes(&v)),
        ("mask", "BOOL", vec![96, 96], bytes),
    ]);
    std::fs::write(&inputs, file).unwrap();
    let (of, lf) = (dir.join("o.safetensors"), dir.join("lse.safetensors"));
    ok("run --inputs {} --out {} --lse {}", &[&inputs, &of, &lf]);
    let (o_shape, o) = read_safetensors(&of, "o");
    let (l_shape, lse) = read_safetensors(&lf, "lse");
    assert_eq!((o_shape, l_shape), (vec![1, 2, 96, 32], vec![1, 2, 96]));
    let want = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
    assert_close(
        "run safetensors",
        &blockflash::Output { o, lse },
        &want,
        1e-5,
    );
    // A misnamed mask is refused, not run unmasked.
    let misnamed = dir.join("misnamed.safetensors");
    let file = safetensors(&[
        ("q", "F32", vec![1, 2, 96, 32], f32_bytes(&q)),
        ("k", "F16", vec![1, 2, 96, 32], f16_bytes(&k)),
        ("v", "F32", vec![1, 2, 96, 32], f32_bytes(&v)),
        ("Mask", "BOOL", vec![96, 96], vec![1u8; 96 * 96]),
    ]);
    std::fs::write(&misnamed, file).unwrap();
    fails(
        "run --inputs {} --out {}",
        &[&misnamed, &of],
        "[\"Mask\"] are not used",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_on_bf16_safetensors_runs_bf16_forward_and_backward() {
    let mut rng = Rng::fresh("cli run bf16");
    let dir = scratch("run-bf16");
    let shape = Shape {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_q: 80,
        seq_k: 80,
        head_dim: 32,
    };
    let (q_bytes, q) = bf16_bytes(&rng.vec(shape.q_len()));
    let (k_bytes, k) = bf16_bytes(&rng.vec(shape.kv_len()));
    let (v_bytes, v) = bf16_bytes(&rng.vec(shape.kv_len()));
    // dO as float32 .npy holding bf16 values, so that the upload to bf16 rounds nothing.
    let (_, d_o) = bf16_bytes(&rng.vec(shape.q_len()));
    let bytes = mask_bytes(&mut rng, 2, 80, 80, 0.2);
    let mask = Mask::per_batch(vec![
        Mask::from_bytes(80, 80, &bytes[..6400]).unwrap(),
        Mask::from_bytes(80, 80, &bytes[6400..]).unwrap(),
    ])
    .unwrap();
    let inputs = dir.join("inputs.safetensors");
    let file = safetensors(&[
        ("q", "BF16", vec![2, 4, 80, 32], q_bytes),
        ("k", "BF16", vec![2, 2, 80, 32], k_bytes),
        ("v", "BF16", vec![2, 2, 80, 32], v_bytes),
        ("mask", "U8", vec![2, 80, 80], bytes),
    ]);
    std::fs::write(&inputs, file).unwrap();
    let dof = dir.join("do.npy");
    std::fs::write(&dof, npy("<f4", false, &[2, 4, 80, 32], &f32_bytes(&d_o))).unwrap();
    let outs = ["o", "lse", "dq", "dk", "dv"].map(|n| dir.join(format!("{n}.safetensors")));
    let want = reference::attention(&shape, &q, &k, &v, Some(&mask), None).unwrap();
    let grads = reference::attention_backward(&shape, &q, &k, &v, Some(&mask), None, &d_o).unwrap();
    // auto runs bf16 inputs in bf16; --precision f32 widens them. Gradient tolerances as in
    // backward.rs.
    for (precision, tier, dtype, grad_tol) in [
        ("auto", "portable-bf16", DType::BF16, 1e-2),
        ("f32", "portable-f32", DType::F32, 1e-4),
    ] {
        let line = format!(
            "run --inputs {{}} --out {{}} --lse {{}} --do {{}} --dq {{}} --dk {{}} --dv {{}} \
             --precision {precision}"
        );
        let [o, lse, dq, dk, dv] = &outs;
        let out = blockflash(&line, &[&inputs, o, lse, &dof, dq, dk, dv]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{line}:\n{stderr}");
        assert!(stderr.contains(&format!("tier: {tier};")), "{stderr}");
        let got = blockflash::Output {
            o: read_safetensors(o, "o").1,
            lse: read_safetensors(lse, "lse").1,
        };
        assert_close(
            &format!("run bf16 {precision}"),
            &got,
            &want,
            tolerance(dtype),
        );
        for (name, path, want) in [
            ("dq", dq, &grads.dq),
            ("dk", dk, &grads.dk),
            ("dv", dv, &grads.dv),
        ] {
            let err = rel_l2(&read_safetensors(path, name).1, want);
            assert!(err <= grad_tol, "{precision} {name}: {err:e}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---- mask ---------------------------------------------------------------------------------

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("field {key} missing or not a number in {v}"))
}

/// Checks `mask --json` output against the library's block mask of the same mask.
fn assert_stats(stats: &Value, bm: &BlockMask) {
    for (key, want) in [
        ("seq_q", bm.seq_q()),
        ("seq_k", bm.seq_k()),
        ("tile_rows", bm.tile_rows()),
        ("tile_cols", bm.tile_cols()),
        ("mask_bytes", bm.mask_bytes()),
        ("dense_mask_bytes", bm.dense_mask_bytes()),
    ] {
        assert_eq!(num(stats, key), want as f64, "{key}");
    }
    let (a, p, f) = (
        num(stats, "active_tiles"),
        num(stats, "partial_tiles"),
        num(stats, "full_tiles"),
    );
    assert!((a - bm.active_fraction()).abs() < 1e-12);
    assert!((p - bm.partial_fraction()).abs() < 1e-12);
    assert!((f - bm.full_fraction()).abs() < 1e-12);
    assert!((a - p - f).abs() < 1e-12, "active = partial + full");
    assert_eq!(stats["run_length_eligible"], bm.run_length_eligible());
    assert!(num(stats, "ms_build") >= 0.0);
}

#[test]
fn mask_json_matches_the_library_and_files() {
    for kind in ["causal", "documents", "bigbird", "tree"] {
        let stats = json(&ok(
            &format!("mask --kind {kind} --seq 1000 --tile 32x64 --json"),
            &[],
        ));
        let bm = BlockMask::new(&family_mask(kind, 1000, 7).unwrap(), 32, 64).unwrap();
        assert_stats(&stats, &bm);
    }
    // The same mask from a file, and per batch element.
    let dir = scratch("mask");
    let causal = Mask::causal(300, 300).unwrap();
    let bytes: Vec<u8> = (0..300 * 300)
        .map(|i| u8::from(causal.get(0, i / 300, i % 300)))
        .collect();
    let from = dir.join("causal.npy");
    std::fs::write(&from, npy("|u1", false, &[300, 300], &bytes)).unwrap();
    let stats = json(&ok("mask --from {} --json", &[&from]));
    assert_stats(&stats, &BlockMask::new(&causal, 64, 64).unwrap());
    let generated = json(&ok("mask --kind causal --seq 300 --json", &[]));
    assert_eq!(stats["active_tiles"], generated["active_tiles"]);
    let two: Vec<u8> = bytes.iter().chain(&vec![1u8; 300 * 300]).copied().collect();
    std::fs::write(&from, npy("|b1", false, &[2, 300, 300], &two)).unwrap();
    let stats = json(&ok("mask --from {} --json", &[&from]));
    assert_eq!(num(&stats, "batches"), 2.0);

    // The text form and the picture.
    let png = dir.join("mask.png");
    let text = ok("mask --kind documents --seq 4096 --png {}", &[&png]);
    assert!(
        text.contains("active") && text.contains("mask.png"),
        "{text}"
    );
    let picture = std::fs::read(&png).unwrap();
    assert_eq!(&picture[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (
        u32::from_be_bytes(picture[16..20].try_into().unwrap()),
        u32::from_be_bytes(picture[20..24].try_into().unwrap()),
    );
    assert!(w >= 256 && h >= 256, "{w}x{h}");
    // Many batch elements: the first ones are drawn, and the output says so.
    let many = dir.join("many.npy");
    std::fs::write(
        &many,
        npy("|b1", false, &[40, 64, 64], &vec![1u8; 40 * 64 * 64]),
    )
    .unwrap();
    let text = ok("mask --from {} --png {}", &[&many, &png]);
    assert!(text.contains("the first 16 of 40 batch elements"), "{text}");
    let text = ok(
        "mask --kind sliding-window --seq 512 --window 200 --symmetric",
        &[],
    );
    assert!(
        text.contains('█') && text.contains("BlockMask 512x512"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Reads a bool .npy file as numpy writes it: shape and bytes.
fn read_bool_npy(path: &Path) -> (Vec<usize>, Vec<u8>) {
    read_npy_bytes(path, "|b1")
}

/// The JSON statistics without the fields that name the source or time the build.
fn stats_only(mut v: Value) -> Value {
    let map = v.as_object_mut().expect("a JSON object");
    map.remove("mask");
    map.remove("ms_build");
    v
}

#[test]
fn mask_out_writes_the_bench_mask_as_npy_and_round_trips() {
    let dir = scratch("mask-out");
    let file = dir.join("mask.npy");
    for (kind, seq) in [("documents", 1000), ("tree", 300), ("random-blocks", 512)] {
        let line = format!("mask --kind {kind} --seq {seq} --json");
        let generated = json(&ok(&format!("{line} --out {{}}"), &[&file]));
        // The mask bench runs: the suite family at the default seed, bit for bit.
        let (shape, bytes) = read_bool_npy(&file);
        assert_eq!(shape, vec![seq, seq], "{kind}");
        let want = family_mask(kind, seq, 7).unwrap();
        let got = Mask::from_bytes(seq, seq, &bytes).unwrap();
        assert!(
            bytes.iter().all(|&b| b <= 1),
            "{kind}: bool bytes are 0 or 1"
        );
        assert_eq!(got, want, "{kind}");
        let read = json(&ok("mask --from {} --json", &[&file]));
        assert_eq!(stats_only(read), stats_only(generated), "{kind}");
    }
    // Generator options apply; text output names the file.
    let text = ok(
        "mask --kind sliding-window --seq 256 --window 40 --symmetric --out {}",
        &[&file],
    );
    assert!(text.contains("mask.npy"), "{text}");
    let (_, bytes) = read_bool_npy(&file);
    let want = Mask::sliding_window(256, 256, 40, false).unwrap();
    assert_eq!(Mask::from_bytes(256, 256, &bytes).unwrap(), want);
    // A per-batch mask read with --from is written back [B, Nq, Nk].
    let two: Vec<u8> = (0..2 * 64 * 96).map(|i| u8::from(i % 7 == 0) * 3).collect();
    let from = dir.join("two.npy");
    std::fs::write(&from, npy("|u1", false, &[2, 64, 96], &two)).unwrap();
    ok("mask --from {} --out {}", &[&from, &file]);
    let (shape, bytes) = read_bool_npy(&file);
    assert_eq!(shape, vec![2, 64, 96]);
    let normalised: Vec<u8> = two.iter().map(|&b| u8::from(b != 0)).collect();
    assert_eq!(bytes, normalised);
    fails(
        "mask --kind causal --seq 64 --out {}",
        &[&dir.join("mask.safetensors")],
        ".npy files only",
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---- bench --------------------------------------------------------------------------------

#[test]
fn bench_json_rows_hold_every_field() {
    let dir = scratch("bench");
    let rows = dir.join("rows.jsonl");
    let table = ok(
        "bench --mask causal --seq 128 --batch 1 --heads 1 --head-dim 32 --repeat 2 --precision f32 --json {}",
        &[&rows],
    );
    assert!(
        table.contains("| mask |") && table.contains("| causal |"),
        "{table}"
    );
    let text = std::fs::read_to_string(&rows).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let row = json(lines[0]);
    for key in [
        "pass",
        "mask",
        "seq",
        "seq_q",
        "batch",
        "heads",
        "kv_heads",
        "head_dim",
        "precision",
        "tier",
        "path",
        "tile",
        "active_tiles",
        "ms_dense",
        "ms_masked",
        "speedup",
        "ideal_speedup",
        "tflops",
        "max_rel_error",
        "ms_plan",
        "clock",
        "adapter",
        "backend",
        "driver",
    ] {
        assert!(!row[key].is_null(), "field {key} missing in {row}");
    }
    assert_eq!(row["mask"], "causal");
    assert_eq!(row["pass"], "fwd");
    assert!(table.contains("| fwd | causal |"), "{table}");
    assert!(row.get("ms_fwd_masked").is_none(), "{row}");
    assert_eq!((num(&row, "seq"), num(&row, "head_dim")), (128.0, 32.0));
    assert_eq!(row["precision"], "f32");
    assert_timing(&row);
    assert!(num(&row, "max_rel_error") <= 1e-4);
    assert!(num(&row, "ms_plan") >= 0.0);
    std::fs::remove_dir_all(&dir).ok();
}

/// --seq-q M runs the mask's last M rows over every key (decoding); more rows than the mask
/// has, or none, are errors.
#[test]
fn bench_runs_the_last_rows_of_a_mask() {
    let dir = scratch("bench-seq-q");
    let rows = dir.join("rows.jsonl");
    ok(
        "bench --mask causal --seq 2048 --seq-q 3 --batch 1 --heads 2 --head-dim 32 --repeat 1 --precision f32 --json {}",
        &[&rows],
    );
    let row = json(std::fs::read_to_string(&rows).unwrap().trim());
    assert_eq!(
        (num(&row, "seq"), num(&row, "seq_q")),
        (2048.0, 3.0),
        "{row}"
    );
    // The causal mask's last rows see every key tile.
    assert_eq!(num(&row, "active_tiles"), 1.0, "{row}");
    assert!(num(&row, "max_rel_error") <= 1e-4, "{row}");
    fails("bench --mask causal --seq 64 --seq-q 65", &[], "seq-q");
    fails("bench --mask causal --seq 64 --seq-q 0", &[], "seq_q");
    std::fs::remove_dir_all(&dir).ok();
}

/// Checks a bench row's times: speedup = ms_dense / ms_masked, ideal = 1 / active.
fn assert_timing(row: &Value) {
    let (dense, masked) = (num(row, "ms_dense"), num(row, "ms_masked"));
    let speedup = num(row, "speedup");
    assert!(dense > 0.0 && masked > 0.0);
    assert!((speedup - dense / masked).abs() <= 1e-9 * speedup, "{row}");
    let ideal = num(row, "ideal_speedup") * num(row, "active_tiles");
    assert!((ideal - 1.0).abs() < 1e-9, "{row}");
}

#[test]
fn bench_backward_rows_time_and_verify_forward_and_backward() {
    let dir = scratch("bench-backward");
    let rows = dir.join("rows.jsonl");
    // GQA: dK and dV sum over two query heads.
    let table = ok(
        "bench --backward --mask all --seq 128 --batch 1 --heads 2 --kv-heads 1 --head-dim 32 --repeat 2 --precision f32 --json {}",
        &[&rows],
    );
    assert!(
        table.contains("| pass | mask |") && table.contains("| dQ err | dK err | dV err |"),
        "{table}"
    );
    let text = std::fs::read_to_string(&rows).unwrap();
    let rows: Vec<Value> = text.lines().map(json).collect();
    assert_eq!(rows.len(), 8, "{text}");
    for row in &rows {
        let mask = row["mask"].as_str().expect("mask");
        assert!(table.contains(&format!("| fwd+bwd | {mask} |")), "{table}");
        assert_eq!(row["pass"], "fwd+bwd");
        assert_eq!(row["kv_heads"], 1);
        assert!(
            !row["grad_check"].as_str().unwrap_or("").is_empty(),
            "{row}"
        );
        assert_timing(row);
        let (fwd_dense, fwd_masked) = (num(row, "ms_fwd_dense"), num(row, "ms_fwd_masked"));
        assert!(fwd_dense > 0.0 && fwd_masked > 0.0, "{row}");
        if row["clock"] == "gpu-timestamps" {
            // The forward parts are spans of the same timed runs.
            assert!(fwd_dense <= num(row, "ms_dense") && fwd_masked <= num(row, "ms_masked"));
        }
        // The dense plan is the same for every mask: timed once.
        assert_eq!(row["ms_dense"], rows[0]["ms_dense"]);
        for key in [
            "max_rel_error",
            "max_rel_error_dq",
            "max_rel_error_dk",
            "max_rel_error_dv",
        ] {
            assert!(num(row, key) <= 1e-4, "{key} of {row}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_tier_forces_the_kernel_tier() {
    let dir = scratch("bench-tier");
    let rows = dir.join("rows.jsonl");
    ok(
        "bench --mask causal --seq 128 --batch 1 --heads 1 --head-dim 32 --repeat 1 --tier portable-f32 --json {}",
        &[&rows],
    );
    let row = json(std::fs::read_to_string(&rows).unwrap().trim());
    assert_eq!(
        (&row["tier"], &row["precision"]),
        (&"portable-f32".into(), &"f32".into())
    );
    fails(
        "bench --mask causal --seq 128 --batch 1 --heads 1 --head-dim 32 --precision f32 --tier tensor-core-f16",
        &[],
        "invalid --tier",
    );
    fails(
        "bench --mask causal --seq 128 --tier cuda",
        &[],
        "invalid value 'cuda' for '--tier",
    );
    // Every family at a length of two tokens (BigBird's default random blocks shrink to fit).
    let text = ok(
        "bench --seq 2 --batch 1 --heads 1 --head-dim 32 --repeat 1 --tier portable-f32",
        &[],
    );
    assert!(text.contains("| bigbird |"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_runs_bf16_with_either_row_reduction() {
    let dir = scratch("bench-bf16");
    let rows = dir.join("rows.jsonl");
    // 16x32 tiles run 8 threads per row: subgroup reductions fit subgroups of 8 and more.
    let line = "bench --mask causal --seq 128 --batch 1 --heads 2 --kv-heads 1 --head-dim 32 \
                --repeat 1 --precision bf16 --tile 16x32 --json {}";
    let with_env = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_blockflash"))
            .args(argv(line, &[&rows]))
            .env("BLOCKFLASH_SUBGROUP_REDUCTIONS", value)
            .output()
            .expect("the blockflash binary runs")
    };
    let has_subgroups = gpu().min_subgroup_size().is_some_and(|n| n >= 8);
    for value in ["", "0", "1"] {
        let out = with_env(value);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if value == "1" && !has_subgroups {
            assert!(stderr.contains("subgroup reductions need"), "{stderr}");
            continue;
        }
        assert!(out.status.success(), "{value:?}: {stderr}");
        let row = json(std::fs::read_to_string(&rows).unwrap().trim());
        assert_eq!(
            (&row["tier"], &row["precision"]),
            (&"portable-bf16".into(), &"bf16".into())
        );
        assert!(
            num(&row, "max_rel_error") <= tolerance(DType::BF16),
            "{row}"
        );
    }
    let out = with_env("yes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid BLOCKFLASH_SUBGROUP_REDUCTIONS"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---- errors -------------------------------------------------------------------------------

#[test]
fn documented_errors_exit_non_zero_with_a_message() {
    let dir = scratch("errors");
    // A .npy file of zeros; `elements` may disagree with the shape (a truncated file).
    let npy_file = |name: &str, descr: &str, fortran: bool, shape: &[usize], elements: usize| {
        let size = descr[2..].parse::<usize>().expect("item size");
        let p = dir.join(name);
        std::fs::write(&p, npy(descr, fortran, shape, &vec![0; elements * size])).unwrap();
        p
    };
    let full = |shape: &[usize]| shape.iter().product::<usize>();
    let good = [1, 2, 64, 32];
    let q = npy_file("q.npy", "<f4", false, &good, full(&good));
    let kv = npy_file("kv.npy", "<f4", false, &good, full(&good));
    let out = dir.join("o.npy");
    let inputs = dir.join("inputs.safetensors");
    let only_q = safetensors(&[("q", "F32", good.to_vec(), vec![0; full(&good) * 4])]);
    std::fs::write(&inputs, only_q).unwrap();
    let odd = |name: &str, descr: &str, fortran: bool, shape: &[usize]| {
        npy_file(name, descr, fortran, shape, full(shape))
    };
    let (rank3, f64s, bools) = (
        odd("rank3.npy", "<f4", false, &[2, 64, 32]),
        odd("f64.npy", "<f8", false, &good),
        odd("bool.npy", "|b1", false, &good),
    );
    let (fortran, big) = (
        odd("fortran.npy", "<f4", true, &good),
        odd("big.npy", ">f4", false, &good),
    );
    let short = npy_file("short.npy", "<f4", false, &good, 100);
    let (v65, q3) = (
        odd("v65.npy", "<f4", false, &[1, 2, 65, 32]),
        odd("q3.npy", "<f4", false, &[1, 3, 64, 32]),
    );
    let (float_mask, mask65) = (
        odd("fmask.npy", "<f4", false, &[64, 64]),
        odd("mask65.npy", "|u1", false, &[64, 65]),
    );
    let missing = dir.join("missing.npy");
    // A version-2 file cut off inside its header length.
    let cut = dir.join("cut.npy");
    std::fs::write(&cut, b"\x93NUMPY\x02\x00\x10\x00").unwrap();
    let nowhere = dir.join("no-such-folder").join("lse.npy");
    let json = dir.join("rows.jsonl");
    let run = "run --q {} --k {} --v {} --out {}";
    let cases: Vec<(String, Vec<&Path>, &str)> = vec![
        // Unreadable files.
        (run.into(), vec![&missing, &kv, &kv, &out], "cannot read"),
        (
            run.into(),
            vec![&short, &kv, &kv, &out],
            "needs 16384 bytes",
        ),
        (
            run.into(),
            vec![&cut, &kv, &kv, &out],
            "truncated .npy header",
        ),
        (run.into(), vec![&fortran, &kv, &kv, &out], "Fortran"),
        (run.into(), vec![&big, &kv, &kv, &out], "big-endian"),
        // Wrong ranks and dtypes.
        (
            run.into(),
            vec![&rank3, &kv, &kv, &out],
            "expected 4 dimensions",
        ),
        (
            run.into(),
            vec![&f64s, &kv, &kv, &out],
            "dtype <f8 is not supported",
        ),
        (
            run.into(),
            vec![&q, &bools, &kv, &out],
            "expected float32, float16 or bfloat16",
        ),
        (
            format!("{run} --mask {{}}"),
            vec![&q, &kv, &kv, &out, &float_mask],
            "expected bool or uint8",
        ),
        // Mismatched shapes.
        (run.into(), vec![&q, &kv, &v65, &out], "k and v"),
        (run.into(), vec![&q3, &kv, &kv, &out], "not a multiple"),
        (
            format!("{run} --mask {{}}"),
            vec![&q, &kv, &kv, &out, &mask65],
            "mask: expected [64, 64]",
        ),
        (
            "run --inputs {} --out {}".into(),
            vec![&inputs, &out],
            "no tensor named \"k\"",
        ),
        // Bad options.
        (
            format!("{run} --path diagonal"),
            vec![&q, &kv, &kv, &out],
            "invalid value 'diagonal' for '--path",
        ),
        (
            format!("{run} --lse lse.txt"),
            vec![&q, &kv, &kv, &out],
            ".npy or .safetensors",
        ),
        ("mask --kind zigzag --seq 64".into(), vec![], "not one of"),
        (
            "mask --kind causal --seq 64 --window 3".into(),
            vec![],
            "--window does not apply",
        ),
        ("mask --from {}".into(), vec![&missing], "cannot read"),
        // Outputs that would overwrite each other or go to a folder that does not exist,
        // refused before any work.
        (
            format!("{run} --lse {{}}"),
            vec![&q, &kv, &kv, &out, &out],
            "named for two outputs",
        ),
        (
            format!("{run} --lse {{}}"),
            vec![&q, &kv, &kv, &out, &nowhere],
            "does not exist",
        ),
        // Sizes that would not fit the host: an error, not an abort.
        (
            "mask --kind random --seq 1048576".into(),
            vec![],
            "take over 16 GiB",
        ),
        (
            "mask --kind causal --seq 2147483648".into(),
            vec![],
            "tiles is over",
        ),
        (
            "bench --mask causal --seq 64 --batch 100000000000 --heads 1 --head-dim 32".into(),
            vec![],
            "cannot allocate",
        ),
        // Bench options out of range, and a bad mask kind before the JSON file is made.
        (
            "bench --mask causal --seq 64 --repeat 0".into(),
            vec![],
            "--repeat",
        ),
        (
            "bench --mask causal --seq 64 --samples 0".into(),
            vec![],
            "--samples",
        ),
        (
            "bench --mask zigzag --seq 64 --json {}".into(),
            vec![&json],
            "not one of",
        ),
    ];
    for (line, files, needle) in cases {
        fails(&line, &files, needle);
    }
    assert!(!json.exists(), "a failed bench left {}", json.display());
    std::fs::remove_dir_all(&dir).ok();
}

/// BLOCKFLASH_SHADER_DIR: a kernel source found there replaces the built-in one (a warning
/// says so, and the bench still checks its results against the f64 reference on poisoned
/// outputs); a broken one is an error with a message, not a panic.
#[test]
fn a_shader_folder_replaces_kernel_sources_and_a_broken_one_is_an_error() {
    let dir = scratch("shader-dir");
    let bench = || {
        Command::new(env!("CARGO_BIN_EXE_blockflash"))
            .env(blockflash::kernel::SHADER_DIR_ENV, &dir)
            .args(argv(
                "bench --mask causal --seq 128 --batch 1 --heads 2 --repeat 1 --precision f32",
                &[],
            ))
            .output()
            .expect("the blockflash binary runs")
    };
    std::fs::write(
        dir.join("attention.wgsl"),
        blockflash::kernel::ATTENTION_WGSL,
    )
    .unwrap();
    let out = bench();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("attention.wgsl read from"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified against the f64 reference"));

    std::fs::write(dir.join("attention.wgsl"), "fn broken( {\n").unwrap();
    let out = bench();
    let stderr = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success(), "a broken kernel source ran");
    assert!(stderr.contains("failed to build"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
