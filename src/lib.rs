//! blockflash: mask-aware FlashAttention (Binary Block Masking) as WGSL compute shaders through
//! wgpu.
//!
//! The data path, one module each: [`mask`] (which query/key pairs are allowed) →
//! [`block_mask`] (empty, partial and full tiles) → [`plan`] (tile shape, path, work order,
//! buffers) → [`kernel`] (the WGSL kernel and its pipelines) → read back.
//! [`reference`](mod@reference) is the f64 CPU attention every kernel is checked against;
//! [`gpu`] wraps the wgpu device. A plan also runs the backward pass ([`Plan::backward`],
//! [`Plan::encode_backward`]) with the same tile skipping, checked against
//! [`reference::attention_backward`].
//!
//! ```no_run
//! use blockflash::{Gpu, Mask, Plan, PlanOptions, Shape};
//! let gpu = Gpu::new()?;
//! let shape = Shape::new(2, 8, 4096, 64);
//! let mask = Mask::causal(4096, 4096)?;
//! let plan = Plan::new(&gpu, shape, Some(&mask), PlanOptions::default())?;
//! let (q, k, v) = (vec![0.1f32; shape.q_len()], vec![0.2; shape.kv_len()], vec![0.3; shape.kv_len()]);
//! let out = plan.run(&q, &k, &v)?; // out.o [B, H, Nq, d], out.lse [B, H, Nq]
//! # Ok::<(), blockflash::Error>(())
//! ```

pub mod block_mask;
mod coop_emulation;
pub mod error;
pub mod gpu;
pub mod kernel;
pub mod mask;
mod parallel;
pub mod plan;
pub mod rcm;
mod readback;
pub mod reference;
pub mod shape;
pub mod suite;
pub mod timing;

pub use block_mask::{BlockMask, TileState};
pub use error::{Error, Result};
pub use gpu::{Gpu, Tier};
pub use kernel::{KernelConfig, Path};
pub use mask::Mask;
pub use plan::{BackwardTensors, Plan, PlanOptions, Reorder, Tensors};
pub use reference::{Gradients, Output};
pub use shape::Shape;
