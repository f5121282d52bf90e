//! The f64 CPU reference that every GPU path is checked against.

use crate::error::{Error, Result};
use crate::mask::Mask;
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
    let mut o = Vec::with_capacity(shape.q_len());
    let mut lse = Vec::with_capacity(shape.lse_len());
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            for i in 0..shape.seq_q {
                let (row, l) = attention_row(shape, q, k, v, mask, scale, b, h, i);
                o.extend(row);
                lse.push(l);
            }
        }
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
    let mut worst = 0.0f64;
    // An odd stride visits rows at many positions inside their tiles.
    for r in (0..rows).step_by(step | 1) {
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
        let err = if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        };
        worst = if err.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        };
        if worst.is_nan() {
            break;
        }
    }
    worst
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
    let scale = scale.unwrap_or(shape.default_scale()) as f64;
    let d = shape.head_dim;
    let mut dq = vec![0.0f64; shape.q_len()];
    let mut dk = vec![0.0f64; shape.kv_len()];
    let mut dv = vec![0.0f64; shape.kv_len()];
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum() };
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            let hk = h / shape.group();
            let kv_base = (b * shape.kv_heads + hk) * shape.seq_k * d;
            for i in 0..shape.seq_q {
                let row = ((b * shape.heads + h) * shape.seq_q + i) * d;
                let (o, lse) = attention_row(shape, q, k, v, mask, scale as f32, b, h, i);
                if lse == f64::NEG_INFINITY {
                    continue;
                }
                let (qrow, dorow) = (&q[row..][..d], &d_o[row..][..d]);
                let delta: f64 = dorow.iter().zip(&o).map(|(&g, &o)| g as f64 * o).sum();
                for j in 0..shape.seq_k {
                    if mask.is_some_and(|m| !m.get(b, i, j)) {
                        continue;
                    }
                    let (krow, vrow) = (&k[kv_base + j * d..][..d], &v[kv_base + j * d..][..d]);
                    let p = (dot(qrow, krow) * scale - lse).exp();
                    let ds = p * (dot(dorow, vrow) - delta);
                    for c in 0..d {
                        dv[kv_base + j * d + c] += p * dorow[c] as f64;
                        dk[kv_base + j * d + c] += scale * ds * qrow[c] as f64;
                        dq[row + c] += scale * ds * krow[c] as f64;
                    }
                }
            }
        }
    }
    Ok(Gradients { dq, dk, dv })
}
