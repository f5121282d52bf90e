//! `blockflash run`: attention on Q, K, V (and a mask) read from `.npy` or `.safetensors` files,
//! with O and the log-sum-exp written back as float32; given an upstream gradient dO, also the
//! backward pass, with dQ, dK and dV written back as float32.

use std::path::{Path as FsPath, PathBuf};
use std::time::Instant;

use blockflash::kernel::DType;
use blockflash::{Error, Gpu, Mask, Plan, PlanOptions, Result, Shape};
use clap::Args;

use super::io::{self, dims, Format, Tensor};
use super::{parse_tile, PathArg, Precision, TierArg};

/// Arguments of `blockflash run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Queries Q [B, H, Nq, d], float32 or float16 (.safetensors also bfloat16): .npy, or
    /// .safetensors (its only tensor, or the one named "q"; likewise "k", "v", "mask" for the
    /// others).
    #[arg(long, value_name = "FILE", required_unless_present = "inputs", requires_all = ["k", "v"])]
    pub q: Option<PathBuf>,
    /// Keys K [B, Hkv, Nk, d]; Hkv divides H (grouped-query attention).
    #[arg(long, value_name = "FILE", requires = "q")]
    pub k: Option<PathBuf>,
    /// Values V [B, Hkv, Nk, d].
    #[arg(long, value_name = "FILE", requires = "q")]
    pub v: Option<PathBuf>,
    /// Mask, bool or uint8 (true/nonzero = may attend): [Nq, Nk] shared by the batch, or
    /// [B, Nq, Nk] (also [B, 1, Nq, Nk]) one per batch element. Without it: no mask.
    #[arg(long, value_name = "FILE", requires = "q")]
    pub mask: Option<PathBuf>,
    /// One .safetensors file holding tensors "q", "k", "v" and optionally "mask" (F32, F16 or
    /// BF16; mask BOOL or U8) and no others, instead of --q/--k/--v/--mask.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["q", "k", "v", "mask"])]
    pub inputs: Option<PathBuf>,
    /// Output O [B, H, Nq, d] as float32: .npy, or .safetensors (tensor "o").
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the log-sum-exp [B, H, Nq] as float32 (natural log, -inf for rows that see no
    /// key): .npy, or .safetensors (tensor "lse").
    #[arg(long, value_name = "FILE")]
    pub lse: Option<PathBuf>,
    /// Upstream gradient dL/dO [B, H, Nq, d] (the shape of q): runs the backward pass too and
    /// writes --dq, --dk and --dv.
    #[arg(long = "do", value_name = "FILE", requires_all = ["dq", "dk", "dv"])]
    pub d_o: Option<PathBuf>,
    /// Gradient dL/dQ [B, H, Nq, d] as float32: .npy, or .safetensors (tensor "dq").
    #[arg(long, value_name = "FILE", requires = "d_o")]
    pub dq: Option<PathBuf>,
    /// Gradient dL/dK [B, Hkv, Nk, d] as float32 (summed over the query heads of each group).
    #[arg(long, value_name = "FILE", requires = "d_o")]
    pub dk: Option<PathBuf>,
    /// Gradient dL/dV [B, Hkv, Nk, d] as float32 (summed over the query heads of each group).
    #[arg(long, value_name = "FILE", requires = "d_o")]
    pub dv: Option<PathBuf>,
    /// Softmax scale (default 1/sqrt(d)).
    #[arg(long, value_name = "S")]
    pub scale: Option<f32>,
    /// Dispatch path: auto picks with the cost model; forcing runlength on a mask that is not
    /// run-length eligible is an error.
    #[arg(long, value_enum, default_value_t)]
    pub path: PathArg,
    /// Storage precision of the kernel; auto runs f16 when Q, K and V are all float16 and the
    /// adapter has an f16 tier, bf16 when they are all bfloat16, else f32. Output files are
    /// float32 whatever the precision.
    #[arg(long, value_enum, default_value_t)]
    pub precision: Precision,
    /// Kernel tier; auto takes the precision's (portable-f32, -f16 or -bf16). A forced tier
    /// sets the precision when that is auto and must agree with it otherwise.
    #[arg(long, value_enum, default_value_t)]
    pub tier: TierArg,
    /// Force a tile shape, query rows x key columns (default: the plan picks).
    #[arg(long, value_name = "RxC", value_parser = parse_tile)]
    pub tile: Option<(usize, usize)>,
}

/// Q, K, V (as f32) and the mask of one run, with the shape they make.
struct Inputs {
    shape: Shape,
    /// The element type Q, K and V share in their files, if they share one.
    stored: Option<io::Dtype>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Mask>,
}

/// The four dimensions of `t`, or an error that names `what` and its expected layout.
fn rank4(t: &Tensor, what: &str, layout: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape.as_slice()).map_err(|_| {
        Error::Io(format!(
            "{} ({what}): expected 4 dimensions {layout}, got shape {}",
            t.source,
            dims(&t.shape)
        ))
    })
}

/// Checks the shapes of Q, K, V against each other and builds the problem shape.
fn shape_of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Shape> {
    let [b, h, nq, d] = rank4(q, "q", "[B, H, Nq, d]")?;
    let kd = rank4(k, "k", "[B, Hkv, Nk, d]")?;
    let vd = rank4(v, "v", "[B, Hkv, Nk, d]")?;
    if kd != vd {
        return Err(Error::ShapeMismatch {
            what: "k and v",
            expected: format!("the same shape (k is {})", dims(&kd)),
            got: format!("v {}", dims(&vd)),
        });
    }
    let [kb, hkv, nk, kdim] = kd;
    if kb != b || kdim != d {
        return Err(Error::ShapeMismatch {
            what: "k and v",
            expected: format!("[{b}, Hkv, Nk, {d}] (q's batch and head dim)"),
            got: dims(&kd),
        });
    }
    Ok(Shape {
        batch: b,
        heads: h,
        kv_heads: hkv,
        seq_q: nq,
        seq_k: nk,
        head_dim: d,
    })
}

fn load(args: &RunArgs) -> Result<Inputs> {
    let (q, k, v, mask) = match &args.inputs {
        Some(path) => {
            if Format::of(path)? != Format::Safetensors {
                return Err(Error::Io(format!(
                    "{}: --inputs takes a .safetensors file",
                    path.display()
                )));
            }
            let mut all = io::read_safetensors(path)?;
            let mut take = |name: &str| {
                all.remove(name).ok_or_else(|| {
                    Error::Io(format!("{}: no tensor named {name:?}", path.display()))
                })
            };
            let (q, k, v) = (take("q")?, take("k")?, take("v")?);
            let mask = take("mask").ok();
            // A misnamed mask would otherwise run unmasked.
            let mut rest: Vec<&String> = all.keys().collect();
            if !rest.is_empty() {
                rest.sort();
                return Err(Error::Io(format!(
                    "{}: tensors {rest:?} are not used: --inputs reads \"q\", \"k\", \"v\" and \
                     \"mask\"",
                    path.display()
                )));
            }
            (q, k, v, mask)
        }
        None => {
            let read = |p: &Option<PathBuf>, name: &str| {
                io::read_tensor(p.as_deref().expect("clap requires --q, --k, --v"), name)
            };
            let mask = match &args.mask {
                Some(p) => Some(io::read_tensor(p, "mask")?),
                None => None,
            };
            (
                read(&args.q, "q")?,
                read(&args.k, "k")?,
                read(&args.v, "v")?,
                mask,
            )
        }
    };
    let shape = shape_of(&q, &k, &v)?;
    Ok(Inputs {
        shape,
        stored: [&k, &v]
            .iter()
            .all(|t| t.dtype == q.dtype)
            .then_some(q.dtype),
        q: q.to_f32("q")?,
        k: k.to_f32("k")?,
        v: v.to_f32("v")?,
        mask: mask.map(|m| m.to_mask()).transpose()?,
    })
}

/// Runs `blockflash run`.
pub fn run(args: &RunArgs) -> Result<()> {
    // Refuse unknown output types, outputs that would overwrite each other and folders that do
    // not exist before any work.
    let outputs: Vec<&PathBuf> = std::iter::once(&args.out)
        .chain(
            [&args.lse, &args.dq, &args.dk, &args.dv]
                .into_iter()
                .flatten(),
        )
        .collect();
    for (i, p) in outputs.iter().enumerate() {
        Format::of(p)?;
        if outputs[..i].contains(p) {
            return Err(Error::Io(format!(
                "{} is named for two outputs: each needs its own file",
                p.display()
            )));
        }
        let folder = p.parent().filter(|f| !f.as_os_str().is_empty());
        if folder.is_some_and(|f| !f.is_dir()) {
            return Err(Error::Io(format!(
                "{}: the folder {} does not exist",
                p.display(),
                folder.map_or_else(String::new, |f| f.display().to_string())
            )));
        }
    }
    let t0 = Instant::now();
    let inputs = load(args)?;
    let s = inputs.shape;
    eprintln!(
        "read B={} H={} Hkv={} Nq={} Nk={} d={}{} in {:.0} ms",
        s.batch,
        s.heads,
        s.kv_heads,
        s.seq_q,
        s.seq_k,
        s.head_dim,
        match &inputs.mask {
            Some(m) if m.is_per_batch() => " with a per-batch mask",
            Some(_) => " with a mask",
            None => "",
        },
        t0.elapsed().as_secs_f64() * 1e3
    );
    // The upstream gradient, checked against Q's shape before the GPU starts.
    let d_o = match &args.d_o {
        Some(p) => {
            let t = io::read_tensor(p, "do")?;
            let want = [s.batch, s.heads, s.seq_q, s.head_dim];
            if t.shape != want {
                return Err(Error::ShapeMismatch {
                    what: "do",
                    expected: format!("{} (the shape of q)", dims(&want)),
                    got: dims(&t.shape),
                });
            }
            Some(t.to_f32("do")?)
        }
        None => None,
    };
    let gpu = Gpu::new()?;
    // Inputs stored at half precision run at it (f16 where the adapter has an f16 tier).
    let auto = match inputs.stored {
        Some(io::Dtype::F16) if gpu.tier_for(DType::F16).is_ok() => DType::F16,
        Some(io::Dtype::BF16) => DType::BF16,
        _ => DType::F32,
    };
    let (dtype, tier) = args.tier.resolve(args.precision, auto)?;
    let options = PlanOptions {
        dtype,
        tier,
        scale: args.scale,
        path: args.path.forced(),
        tile: args.tile,
        // The backward pass recomputes P from the forward log-sum-exp.
        write_lse: args.lse.is_some() || d_o.is_some(),
        ..Default::default()
    };
    let plan = Plan::new(&gpu, s, inputs.mask.as_ref(), options)?;
    eprint!("{}", plan.describe());
    let t1 = Instant::now();
    let out = plan.run(&inputs.q, &inputs.k, &inputs.v)?;
    eprintln!(
        "ran on {} in {:.1} ms (with transfers)",
        gpu.adapter_info().name,
        t1.elapsed().as_secs_f64() * 1e3
    );
    write(
        &args.out,
        "o",
        &[s.batch, s.heads, s.seq_q, s.head_dim],
        &out.o,
    )?;
    if let Some(p) = &args.lse {
        write(p, "lse", &[s.batch, s.heads, s.seq_q], &out.lse)?;
    }
    if let Some(d_o) = &d_o {
        let t2 = Instant::now();
        let g = plan.backward(&inputs.q, &inputs.k, &inputs.v, &out.o, &out.lse, d_o)?;
        eprintln!(
            "backward in {:.1} ms (with transfers)",
            t2.elapsed().as_secs_f64() * 1e3
        );
        let q_dims = [s.batch, s.heads, s.seq_q, s.head_dim];
        let kv_dims = [s.batch, s.kv_heads, s.seq_k, s.head_dim];
        for (path, name, dims, data) in [
            (&args.dq, "dq", q_dims, &g.dq),
            (&args.dk, "dk", kv_dims, &g.dk),
            (&args.dv, "dv", kv_dims, &g.dv),
        ] {
            write(
                path.as_deref().expect("clap requires it"),
                name,
                &dims,
                data,
            )?;
        }
    }
    Ok(())
}

fn write(path: &FsPath, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
    io::write_f32(path, name, shape, data)?;
    println!("wrote {name} {} to {}", dims(shape), path.display());
    Ok(())
}
