//! The f64 CPU reference that every GPU path is checked against.

use crate::error::{Error, Result};
use crate::mask::Mask;
use crate::parallel::par_map;
use crate::shape::Shape;

/// Output of attention: O `[B, H, Nq, d]` and the log-sum-exp `[B, H, Nq]` (natural log).
#[derive(Clone, Debug, PartialEq)]
pub struct Output<T> {
    /// Attention output.
    pub o: Vec<T>,
    /// Log-sum-exp of the scaled scores of each query row; −∞ for rows with no allowed key.
    pub lse: Vec<T>,
}

/// Checks that a mask fits the shape: `[Nq, Nk]`, or one per batch element.
pub fn check_mask(shape: &Shape, mask: &Mask) -> Result<()> {
    if mask.seq_q() != shape.seq_q
        || mask.seq_k() != shape.seq_k
        || (mask.is_per_batch() && mask.batches() != shape.batch)
    {
        let want = format!(
            "[{}, {}] or [{}, {}, {}]",
            shape.seq_q, shape.seq_k, shape.batch, shape.seq_q, shape.seq_k
        );
        let got = if mask.is_per_batch() {
            format!("[{}, {}, {}]", mask.batches(), mask.seq_q(), mask.seq_k())
        } else {
            format!("[{}, {}]", mask.seq_q(), mask.seq_k())
        };
        return Err(Error::ShapeMismatch {
            what: "mask",
            expected: want,
            got,
        });
    }
    Ok(())
}

/// One query row of attention in f64: returns (O row, LSE).
///
/// A row with no allowed key gives O = 0 and LSE = −∞.
#[allow(clippy::too_many_arguments)]
pub fn attention_row(
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&Mask>,
    scale: f32,
    b: usize,
    h: usize,
    i: usize,
) -> (Vec<f64>, f64) {
    let d = shape.head_dim;
    let hk = h / shape.group();
    let qrow = &q[((b * shape.heads + h) * shape.seq_q + i) * d..][..d];
    let kv_base = (b * shape.kv_heads + hk) * shape.seq_k * d;
    let scores: Vec<Option<f64>> = (0..shape.seq_k)
        .map(|j| {
            if mask.is_some_and(|m| !m.get(b, i, j)) {
                return None;
            }
            let krow = &k[kv_base + j * d..][..d];
            let dot: f64 = qrow
                .iter()
                .zip(krow)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            Some(dot * scale as f64)
        })
        .collect();
    // f64::max drops NaN; the reference propagates it, as the kernels do.
    let m = scores.iter().flatten().fold(f64::NEG_INFINITY, |a, &s| {
        if s.is_nan() || a.is_nan() {
            f64::NAN
        } else {
            a.max(s)
        }
    });
    let mut out = vec![0.0f64; d];
    if m == f64::NEG_INFINITY {
        return (out, f64::NEG_INFINITY);
    }
    let mut l = 0.0;
    for (j, s) in scores.iter().enumerate() {
        if let Some(s) = s {
            let p = (s - m).exp();
            l += p;
            for (o, &vv) in out.iter_mut().zip(&v[kv_base + j * d..][..d]) {
                *o += p * vv as f64;
            }
        }
    }
    out.iter_mut().for_each(|o| *o /= l);
    (out, m + l.ln())
}

/// Attention in f64 on the CPU: the reference every kernel is checked against.
///
/// `scale` defaults to 1/sqrt(d). The mask, if any, is `[Nq, Nk]` shared by the batch or one
/// per batch element; `true` means the pair is allowed.
pub fn attention(
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&Mask>,
    scale: Option<f32>,
) -> Result<Output<f64>> {
    shape.validate()?;
    shape.check_inputs(q.len(), k.len(), v.len())?;
    if let Some(m) = mask {
        check_mask(shape, m)?;
    }
    let scale = scale.unwrap_or(shape.default_scale());
    // Rows r = (b H + h) Nq + i, on all cores.
    let rows: Vec<usize> = (0..shape.batch * shape.heads * shape.seq_q).collect();
    let per_row = par_map(&rows, |&r| {
        let (bh, i) = (r / shape.seq_q, r % shape.seq_q);
        attention_row(
            shape,
            q,
            k,
            v,
            mask,
            scale,
            bh / shape.heads,
            bh % shape.heads,
            i,
        )
    });
    let mut o = Vec::with_capacity(shape.q_len());
    let mut lse = Vec::with_capacity(shape.lse_len());
    for (row, l) in per_row {
        o.extend(row);
        lse.push(l);
    }
    Ok(Output { o, lse })
}

/// Largest relative L2 error of `o` (a GPU output of shape `shape`) against the reference on
/// `samples` query rows spread over the batch, heads and sequence: a cheap check of big runs.
#[allow(clippy::too_many_arguments)]
pub fn sampled_error(
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&Mask>,
    scale: Option<f32>,
    o: &[f32],
    samples: usize,
) -> f64 {
    let scale = scale.unwrap_or(shape.default_scale());
    let d = shape.head_dim;
    let rows = shape.batch * shape.heads * shape.seq_q;
    let step = (rows / samples.max(1)).max(1);
    // An odd stride visits rows at many positions inside their tiles.
    let sampled: Vec<usize> = (0..rows).step_by(step | 1).collect();
    let errors = par_map(&sampled, |&r| {
        let (bh, i) = (r / shape.seq_q, r % shape.seq_q);
        let (b, h) = (bh / shape.heads, bh % shape.heads);
        let (want, _) = attention_row(shape, q, k, v, mask, scale, b, h, i);
        let got = &o[r * d..][..d];
        let num: f64 = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).powi(2))
            .sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    });
    // A NaN error (a NaN or missing output) is the worst.
    errors.into_iter().fold(0.0f64, |worst, err| {
        if err.is_nan() || worst.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        }
    })
}

/// Gradients of attention with respect to Q, K and V (shapes of Q, K and V).
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients<T> {
    /// dL/dQ `[B, H, Nq, d]`.
    pub dq: Vec<T>,
    /// dL/dK `[B, Hkv, Nk, d]` (summed over the query heads of each group).
    pub dk: Vec<T>,
    /// dL/dV `[B, Hkv, Nk, d]` (summed over the query heads of each group).
    pub dv: Vec<T>,
}

/// The attention backward pass in f64 on the CPU: the gradients of `sum(O ∘ dO)` with respect to
/// Q, K and V, for the same arguments as [`attention`] plus the upstream gradient `d_o`
/// `[B, H, Nq, d]`.
///
/// Per row it recomputes P = softmax(scale·q·Kᵀ) over the allowed keys, then dV += Pᵀ dO,
/// dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = scale·dS K, dK += scale·dSᵀ Q. Rows with no
/// allowed key contribute nothing (their dQ is 0).
pub fn attention_backward(
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&Mask>,
    scale: Option<f32>,
    d_o: &[f32],
) -> Result<Gradients<f64>> {
    shape.validate()?;
    shape.check_inputs(q.len(), k.len(), v.len())?;
    if d_o.len() != shape.q_len() {
        return Err(Error::ShapeMismatch {
            what: "d_o",
            expected: format!("{} elements (the shape of q)", shape.q_len()),
            got: format!("{} elements", d_o.len()),
        });
    }
    if let Some(m) = mask {
        check_mask(shape, m)?;
    }
    let scale = scale.unwrap_or(shape.default_scale());
    let sc = scale as f64;
    let d = shape.head_dim;
    let t = [q, k, v, d_o];
    let g = shape.group();
    // One task per (batch element, key/value head) on all cores: the dQ rows of its group of
    // query heads and its dK, dV, each summed in the same order as one after the other, and
    // contiguous in their tensors in task order.
    let tasks: Vec<(usize, usize)> = (0..shape.batch)
        .flat_map(|b| (0..shape.kv_heads).map(move |hk| (b, hk)))
        .collect();
    let parts = par_map(&tasks, |&(b, hk)| {
        let mut dq = vec![0.0f64; g * shape.seq_q * d];
        let mut dk = vec![0.0f64; shape.seq_k * d];
        let mut dv = vec![0.0f64; shape.seq_k * d];
        let kv_base = (b * shape.kv_heads + hk) * shape.seq_k * d;
        for (hg, h) in (hk * g..(hk + 1) * g).enumerate() {
            for i in 0..shape.seq_q {
                let row = ((b * shape.heads + h) * shape.seq_q + i) * d;
                let Some(stats) = row_stats(shape, t, mask, scale, b, h, i) else {
                    continue;
                };
                let (qrow, dorow) = (&q[row..][..d], &d_o[row..][..d]);
                let dq_row = &mut dq[(hg * shape.seq_q + i) * d..][..d];
                for j in 0..shape.seq_k {
                    if mask.is_some_and(|m| !m.get(b, i, j)) {
                        continue;
                    }
                    let (krow, vrow) = (&k[kv_base + j * d..][..d], &v[kv_base + j * d..][..d]);
                    let (p, ds) = pair_grad(qrow, krow, vrow, dorow, sc, stats);
                    for c in 0..d {
                        dv[j * d + c] += p * dorow[c] as f64;
                        dk[j * d + c] += sc * ds * qrow[c] as f64;
                        dq_row[c] += sc * ds * krow[c] as f64;
                    }
                }
            }
        }
        (dq, dk, dv)
    });
    let mut grads = Gradients {
        dq: Vec::with_capacity(shape.q_len()),
        dk: Vec::with_capacity(shape.kv_len()),
        dv: Vec::with_capacity(shape.kv_len()),
    };
    for (dq, dk, dv) in parts {
        grads.dq.extend(dq);
        grads.dk.extend(dk);
        grads.dv.extend(dv);
    }
    Ok(grads)
}

/// What the backward needs of query row `i` of batch element `b` and head `h` from the f64
/// forward: (LSE, D = rowsum(dO ∘ O)); `None` for a row with no allowed key. `t` is
/// `[q, k, v, d_o]`.
fn row_stats(
    shape: &Shape,
    [q, k, v, d_o]: [&[f32]; 4],
    mask: Option<&Mask>,
    scale: f32,
    b: usize,
    h: usize,
    i: usize,
) -> Option<(f64, f64)> {
    let (o, lse) = attention_row(shape, q, k, v, mask, scale, b, h, i);
    if lse == f64::NEG_INFINITY {
        return None;
    }
    let d = shape.head_dim;
    let dorow = &d_o[((b * shape.heads + h) * shape.seq_q + i) * d..][..d];
    Some((lse, dorow.iter().zip(&o).map(|(&g, &o)| g as f64 * o).sum()))
}

/// P and dS = P·(dO·v − D) of one allowed (query, key) pair, given the row's (LSE, D).
fn pair_grad(
    qrow: &[f32],
    krow: &[f32],
    vrow: &[f32],
    dorow: &[f32],
    scale: f64,
    (lse, delta): (f64, f64),
) -> (f64, f64) {
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum() };
    let p = (dot(qrow, krow) * scale - lse).exp();
    (p, p * (dot(dorow, vrow) - delta))
}

/// What [`sampled_gradient_errors`] checks, for reports.
pub const SAMPLED_GRADIENT_CHECK: &str = "dQ on sampled query rows of every head, dK and dV on \
     sampled keys of the last batch element's last key/value head, against the f64 reference";

/// Relative L2 errors `[dQ, dK, dV]` of GPU gradients `got` (of the loss `sum(O ∘ dO)`, for the
/// arguments of [`attention_backward`]) against the f64 reference on samples: a cheap check of
/// big runs, exact on what it samples.
///
/// dQ is checked on `samples` query rows spread over the batch, heads and sequence (each costs
/// one reference row). dK and dV are checked on `samples` keys spread over the sequence of the
/// last batch element's last key/value head: each sums over every query row that sees it, so
/// the reference forward of those rows (at most the whole head group's) runs on every core.
/// Each error is the relative L2 error over the sampled rows together, NaN when any element of
/// that gradient is not finite (an element the kernels never wrote, if the buffers were
/// poisoned with NaN).
#[allow(clippy::too_many_arguments)]
pub fn sampled_gradient_errors(
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&Mask>,
    scale: Option<f32>,
    d_o: &[f32],
    got: &Gradients<f32>,
    samples: usize,
) -> [f64; 3] {
    let scale = scale.unwrap_or(shape.default_scale());
    let sc = scale as f64;
    let (d, g) = (shape.head_dim, shape.group());
    let t = [q, k, v, d_o];
    // Rows (or keys) at an odd stride, which visits many positions inside their tiles.
    let spread = |n: usize| (0..n).step_by((n / samples.max(1)).max(1) | 1);
    // Sums of squared differences and of squared reference values.
    let mut sums = [(0.0f64, 0.0f64); 3];
    let mut add = |which: usize, got: &[f32], want: &[f64]| {
        for (&a, &w) in got.iter().zip(want) {
            sums[which].0 += (a as f64 - w).powi(2);
            sums[which].1 += w * w;
        }
    };
    // dQ: one reference row each.
    for r in spread(shape.batch * shape.heads * shape.seq_q) {
        let (bh, i) = (r / shape.seq_q, r % shape.seq_q);
        let (b, h) = (bh / shape.heads, bh % shape.heads);
        let kv_base = (b * shape.kv_heads + h / g) * shape.seq_k * d;
        let mut want = vec![0.0f64; d];
        if let Some(stats) = row_stats(shape, t, mask, scale, b, h, i) {
            let (qrow, dorow) = (&q[r * d..][..d], &d_o[r * d..][..d]);
            for j in 0..shape.seq_k {
                if mask.is_some_and(|m| !m.get(b, i, j)) {
                    continue;
                }
                let krow = &k[kv_base + j * d..][..d];
                let (_, ds) = pair_grad(qrow, krow, &v[kv_base + j * d..][..d], dorow, sc, stats);
                for (w, &kc) in want.iter_mut().zip(krow) {
                    *w += sc * ds * kc as f64;
                }
            }
        }
        add(0, &got.dq[r * d..][..d], &want);
    }
    // dK, dV: the sampled keys of the last (batch element, key/value head), from the reference
    // statistics of the rows of its query heads that see any of them.
    let (b, hk) = (shape.batch - 1, shape.kv_heads - 1);
    let keys: Vec<usize> = spread(shape.seq_k).collect();
    let rows: Vec<(usize, usize)> = (hk * g..(hk + 1) * g)
        .flat_map(|h| (0..shape.seq_q).map(move |i| (h, i)))
        .filter(|&(_, i)| mask.is_none_or(|m| keys.iter().any(|&j| m.get(b, i, j))))
        .collect();
    let stats = par_map(&rows, |&(h, i)| row_stats(shape, t, mask, scale, b, h, i));
    let kv_base = (b * shape.kv_heads + hk) * shape.seq_k * d;
    for &j in &keys {
        let (krow, vrow) = (&k[kv_base + j * d..][..d], &v[kv_base + j * d..][..d]);
        let (mut dk, mut dv) = (vec![0.0f64; d], vec![0.0f64; d]);
        for (&(h, i), st) in rows.iter().zip(&stats) {
            let Some(st) = *st else { continue };
            if mask.is_some_and(|m| !m.get(b, i, j)) {
                continue;
            }
            let row = ((b * shape.heads + h) * shape.seq_q + i) * d;
            let (qrow, dorow) = (&q[row..][..d], &d_o[row..][..d]);
            let (p, ds) = pair_grad(qrow, krow, vrow, dorow, sc, st);
            for c in 0..d {
                dk[c] += sc * ds * qrow[c] as f64;
                dv[c] += p * dorow[c] as f64;
            }
        }
        add(1, &got.dk[kv_base + j * d..][..d], &dk);
        add(2, &got.dv[kv_base + j * d..][..d], &dv);
    }
    let tensors = [&got.dq, &got.dk, &got.dv];
    std::array::from_fn(|x| {
        let (num, den) = sums[x];
        if tensors[x].iter().any(|e| !e.is_finite()) {
            f64::NAN
        } else if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    })
}
