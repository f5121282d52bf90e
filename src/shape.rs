//! The problem shape of one attention call and the checks every entry point shares.

use crate::error::{Error, Result};

/// Head dimensions the kernels support.
pub const HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

/// Shape of an attention problem: Q `[batch, heads, seq_q, head_dim]`, K and V
/// `[batch, kv_heads, seq_k, head_dim]`, O like Q, LSE `[batch, heads, seq_q]`.
///
/// `kv_heads` divides `heads` (grouped-query attention; `kv_heads == 1` is multi-query).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch size B.
    pub batch: usize,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads Hkv (divides H).
    pub kv_heads: usize,
    /// Query length Nq.
    pub seq_q: usize,
    /// Key length Nk.
    pub seq_k: usize,
    /// Head dimension d.
    pub head_dim: usize,
}

impl Shape {
    /// Self-attention with as many key/value heads as query heads.
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Shape {
        Shape {
            batch,
            heads,
            kv_heads: heads,
            seq_q: seq,
            seq_k: seq,
            head_dim,
        }
    }

    /// Checks that the shape is one the kernels can run.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("seq_q", self.seq_q),
            ("seq_k", self.seq_k),
            ("head_dim", self.head_dim),
        ];
        if let Some((what, _)) = dims.iter().find(|(_, n)| *n == 0) {
            return Err(Error::Empty(what));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::HeadsNotDivisible {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::UnsupportedHeadDim(self.head_dim));
        }
        let elements = |h: usize, n: usize| {
            [h, n, self.head_dim]
                .into_iter()
                .try_fold(self.batch, usize::checked_mul)
        };
        if elements(self.heads, self.seq_q)
            .zip(elements(self.kv_heads, self.seq_k))
            .is_none()
        {
            return Err(Error::InvalidArgument {
                what: "shape",
                why: format!(
                    "B·H·N·d of B={} H={} Hkv={} Nq={} Nk={} d={} overflows usize",
                    self.batch, self.heads, self.kv_heads, self.seq_q, self.seq_k, self.head_dim
                ),
            });
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Elements of Q (and of O).
    pub fn q_len(&self) -> usize {
        self.batch * self.heads * self.seq_q * self.head_dim
    }

    /// Elements of K (and of V).
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq_k * self.head_dim
    }

    /// Elements of the log-sum-exp output.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.seq_q
    }

    /// The default softmax scale, 1/sqrt(d).
    pub fn default_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// FLOPs of dense attention (2 matmuls of 2·Nq·Nk·d each, per head).
    pub fn dense_flops(&self) -> f64 {
        4.0 * (self.batch * self.heads) as f64
            * self.seq_q as f64
            * self.seq_k as f64
            * self.head_dim as f64
    }

    /// Checks that Q, K, V slices have this shape's lengths.
    pub fn check_inputs(&self, q: usize, k: usize, v: usize) -> Result<()> {
        let q_dims = format!(
            "[{}, {}, {}, {}]",
            self.batch, self.heads, self.seq_q, self.head_dim
        );
        let kv_dims = format!(
            "[{}, {}, {}, {}]",
            self.batch, self.kv_heads, self.seq_k, self.head_dim
        );
        for (what, got, want, dims) in [
            ("q", q, self.q_len(), &q_dims),
            ("k", k, self.kv_len(), &kv_dims),
            ("v", v, self.kv_len(), &kv_dims),
        ] {
            if got != want {
                return Err(Error::ShapeMismatch {
                    what,
                    expected: format!("{want} elements {dims}"),
                    got: format!("{got} elements"),
                });
            }
        }
        Ok(())
    }
}
