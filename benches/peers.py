#!/usr/bin/env python3
"""blockflash beside PyTorch SDPA and FlexAttention (fp16, forward and forward + backward, one GPU).

What it measures, for B4 H32 d64 and B2 H16 d128 at N = 4096 and 16384 and each mask kind
(none, causal, sliding-window, documents, prefix-lm, longformer, tree, random-blocks, bigbird):

* blockflash: `blockflash bench --mask K --precision f16 --repeat 10` (`--mask full` for none):
  GPU-timestamp medians of the masked plan and of blockflash's own dense plan on the same inputs,
  its tier, active-tile fraction and own check against the f64 reference on sampled rows. At d64
  and the smallest N each mask runs once more with `--tier portable-f16` (rows marked [pf16];
  not with --no-portable).
* PyTorch on the same mask (`blockflash mask --out`: bit for bit the mask blockflash benches):
  `scaled_dot_product_attention` without a mask (`is_causal=True` for causal); SDPA with the bool
  mask [1, 1, N, N] (efficient/cuDNN kernels: every tile computed, the mask-unaware baseline); and
  `torch.compile(flex_attention)` with a BlockMask built once (BLOCK_SIZE 128) from a mask_mod
  that reads the dense bool mask. CUDA events around each call, 3 warm-ups, median of 10.
* correctness: per mask at N=4096, B1 H2, `blockflash run --precision f16` on fp16 .npy inputs
  against SDPA on the fp32-upcast inputs (math backend): relative L2 error.
* forward + backward (after all forward tables; --no-backward skips it, --no-forward runs only
  it), for the first configuration (B4 H32 d64) at each N and the suite's eight mask families:
  PyTorch first, SDPA without a mask (`is_causal=True` for causal) as the dense reference and
  FlexAttention (the same compiled flex_attention, BlockMask built once), each as forward then
  `out.backward(dO)` on inputs with requires_grad (gradients reset before each step), timed as
  above; then `blockflash bench --backward --mask all --precision f16 --repeat 3` (forward then
  backward of each masked plan and of the dense plan, the latter timed once per N; dQ, dK, dV
  checked against the f64 reference on samples). The whole run (both configurations, both N,
  forward + backward) takes longer than one 10-minute device call on the H200: the forward
  tables of one N, or the forward + backward table of one N (`--no-forward --seqs 16384`), fit
  one call.

Output: one markdown table per configuration and N on stdout, then one forward + backward table
per N; under --out DIR: peers.md (tables, GPU, driver, torch version, date, command), peers.json
(every number), bf_*.jsonl (blockflash's rows) and blockflash.log. Masks and q/k/v files go to
--scratch (default a temporary directory, removed at the end), so DIR stays small enough to copy
back from the device.

Run on the GPU machine (PyTorch 2.11 + Triton + numpy, no network), after the Vulkan setup of
../shared/docs/gpu.md:

    python3 benches/peers.py --blockflash target/release/blockflash --out $OUT/peers [--quick]

--quick: N=4096 and five masks. --no-portable: no [pf16] rows. --dry-run: print the blockflash
commands only. Failures print "n/a (reason)" and the run goes on; past --budget seconds (default
540) what is left is skipped (forward first, so the forward tables always finish), so the script
stays inside one 10-minute device call. Results are rewritten after each block.
"""
import argparse, datetime, json, os, shlex, shutil, statistics, subprocess, sys, tempfile, time

try:
    import numpy as np
except ImportError:  # --dry-run works without it
    np = None

CONFIGS = [(4, 32, 64), (2, 16, 128)]  # (B, H, d)
SEQS = [4096, 16384]
KINDS = ["none", "causal", "sliding-window", "documents", "prefix-lm", "longformer", "tree",
         "random-blocks", "bigbird"]
QUICK_KINDS = ["none", "causal", "sliding-window", "documents", "tree"]
FAMILIES = [k for k in KINDS if k != "none"]  # `blockflash bench --mask all`: the suite's masks
CHECK_B, CHECK_H = 1, 2  # shape of the correctness check (at the smallest N)
T0 = time.time()
DEV = os.environ.get("PEERS_TORCH_DEVICE", "cuda")  # "cpu" only to test this script without a GPU
ENV = dict(os.environ)
ICD = "/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json"
if "VK_DRIVER_FILES" not in ENV and os.path.exists(ICD):
    ENV["VK_DRIVER_FILES"] = ICD


def log(*a):
    print(*a, flush=True)


def why(e):
    """A one-line reason for a failure."""
    text = str(e).strip()
    return (text.splitlines()[-1] if text else type(e).__name__)[:90]


class Budget(Exception):
    """The time budget is spent."""


def check_budget(args, need=5):
    if not args.dry_run and time.time() - T0 > args.budget - need:
        raise Budget("time budget spent")


def bf(args, cmd, timeout):
    """Runs `blockflash CMD`; output goes to DIR/blockflash.log. Returns the CompletedProcess."""
    full = [args.blockflash] + [str(c) for c in cmd]
    if args.dry_run:
        log("$ " + shlex.join(full))
        return subprocess.CompletedProcess(full, 0, "", "")
    check_budget(args)
    left = args.budget - (time.time() - T0)
    p = subprocess.run(full, capture_output=True, text=True, env=ENV,
                       timeout=max(5, min(timeout, left)))
    with open(os.path.join(args.out, "blockflash.log"), "a") as f:
        f.write(f"$ {shlex.join(full)}\n{p.stdout}{p.stderr}\n")
    return p


def failure(p):
    """The error line of a failed blockflash call."""
    lines = [l for l in p.stderr.splitlines() if l.startswith("error")] or p.stderr.splitlines()
    return (lines[-1].removeprefix("error: ") if lines else f"exit {p.returncode}")[:90]


def make_mask(args, kind, n):
    """Writes the mask of `kind` to scratch; returns (path, active fraction of 128x128 tiles)."""
    path = os.path.join(args.scratch, f"mask_{kind}_{n}.npy")
    p = bf(args, ["mask", "--kind", kind, "--seq", n, "--tile", "128x128", "--json", "--out", path], 120)
    if p.returncode != 0:
        raise RuntimeError(failure(p))
    return path, (json.loads(p.stdout)["active_tiles"] if p.stdout else None)


def bench(args, kind, n, b, h, d, tier=None):
    """blockflash's JSON row of one case (a failed verification is kept as a note)."""
    path = os.path.join(args.out, f"bf_{kind}_{n}_{d}{'_tc' if tier else ''}.jsonl")
    if os.path.exists(path):
        os.remove(path)
    cmd = ["bench", "--mask", "full" if kind == "none" else kind, "--seq", n, "--batch", b,
           "--heads", h, "--head-dim", d, "--precision", "f16", "--repeat", args.repeat,
           "--json", path] + (["--tier", tier] if tier else [])
    p = bf(args, cmd, 300)
    if args.dry_run:
        return {}
    if not (os.path.exists(path) and os.path.getsize(path)):
        raise RuntimeError(failure(p))
    with open(path) as f:
        row = json.loads(f.readline())
    if p.returncode != 0:
        row["note"] = failure(p)
    return row


def bench_backward(args, n, b, h, d):
    """blockflash's forward + backward rows of the suite's masks at length n, by mask kind (rows
    written before a failure or the time budget are kept; a failed verification is a note)."""
    path = os.path.join(args.out, f"bf_bwd_{n}_{d}.jsonl")
    if os.path.exists(path):
        os.remove(path)
    cmd = ["bench", "--backward", "--mask", "all", "--seq", n, "--batch", b, "--heads", h,
           "--head-dim", d, "--precision", "f16", "--repeat", args.backward_repeat, "--json", path]
    try:
        p = bf(args, cmd, 600)
        note = None if p.returncode == 0 else failure(p)
    except subprocess.TimeoutExpired:
        note = "time budget spent"
    except Exception as e:  # noqa: BLE001 -- Budget, or the binary failing to start
        note = why(e)
    if args.dry_run:
        return {}
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut short when the time budget ended the run
                    continue
                rows[r["mask"]] = r
    # Rows written before the time budget ran out are whole and checked; a failure taints all.
    for r in rows.values():
        if note and note != "time budget spent":
            r["note"] = note
    return rows or {k: f"n/a ({note or 'no rows'})" for k in FAMILIES}


class Torch:
    """PyTorch's SDPA and FlexAttention on CUDA, with one mask buffer (and mask_mod) per N."""

    def __init__(self):
        import torch
        import torch._dynamo
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        self.torch, self.F, self.sdpa_kernel, self.B = torch, F, sdpa_kernel, SDPBackend
        self.create_block_mask = create_block_mask
        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape, not per mask
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        torch.backends.cuda.matmul.allow_tf32 = False
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.bufs, self.mods = {}, {}

    def mask_mod(self, n):
        """The mask_mod of length n: reads a buffer that set_mask fills, so that every mask of
        one shape shares one compiled kernel."""
        if n not in self.mods:
            buf = self.torch.ones(n, n, dtype=self.torch.bool, device=DEV)
            self.bufs[n] = buf
            self.mods[n] = lambda b, h, q, kv: buf[q, kv]
        return self.mods[n]

    def set_mask(self, n, mask_np):
        """Loads the dense bool mask (None: all true) into the buffer of length n."""
        self.mask_mod(n)
        if mask_np is None:
            self.bufs[n].fill_(True)
        else:
            self.bufs[n].copy_(self.torch.from_numpy(mask_np))
        return self.bufs[n]

    def inputs(self, b, h, n, d):
        g = self.torch.Generator(device=DEV).manual_seed(0)
        return [self.torch.randn(b, h, n, d, device=DEV, dtype=self.torch.float16, generator=g)
                for _ in range(3)]

    def time(self, fn):
        """Median ms of 10 calls after 3 warm-ups, CUDA events around each call."""
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            if DEV != "cuda":
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
                continue
            self.torch.cuda.synchronize()
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def sdpa_dense(self, q, k, v, causal=False):
        return self.time(lambda: self.F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def sdpa_masked(self, q, k, v, buf):
        m = buf[None, None]
        b, h, n, _ = q.shape
        # The math fallback materialises B*H*N*N scores: allowed only under 20 GB of them.
        allowed = [self.B.EFFICIENT_ATTENTION, self.B.CUDNN_ATTENTION]
        with self.sdpa_kernel(allowed + ([self.B.MATH] if b * h * n * n * 4 <= 20e9 else [])):
            return self.time(lambda: self.F.scaled_dot_product_attention(q, k, v, attn_mask=m))

    def flex_ms(self, q, k, v, n):
        bm = self.create_block_mask(self.mask_mod(n), None, None, n, n, device=DEV)  # once
        return self.time(lambda: self.flex(q, k, v, block_mask=bm))

    def grad_inputs(self, b, h, n, d):
        """q, k, v with requires_grad, and dO."""
        q, k, v = (x.requires_grad_() for x in self.inputs(b, h, n, d))
        g = self.torch.Generator(device=DEV).manual_seed(1)
        do = self.torch.randn(b, h, n, d, device=DEV, dtype=self.torch.float16, generator=g)
        return q, k, v, do

    def fwd_bwd(self, attend, qkv, do):
        """Median ms of forward (`attend(q, k, v)`) then `out.backward(dO)`, gradients reset
        before each step so that none accumulate."""
        def step():
            for x in qkv:
                x.grad = None
            attend(*qkv).backward(do)
        return self.time(step)

    def sdpa_dense_fwd_bwd(self, qkv, do, causal=False):
        sdpa = lambda q, k, v: self.F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.fwd_bwd(sdpa, qkv, do)

    def flex_fwd_bwd(self, qkv, do, n):
        bm = self.create_block_mask(self.mask_mod(n), None, None, n, n, device=DEV)  # once
        return self.fwd_bwd(lambda q, k, v: self.flex(q, k, v, block_mask=bm), qkv, do)

    def reference(self, q, k, v, mask_np):
        """SDPA on fp32-upcast inputs, math backend, as numpy."""
        t = self.torch
        q, k, v = (t.from_numpy(x).to(DEV).float() for x in (q, k, v))
        m = None if mask_np is None else t.from_numpy(mask_np).to(DEV)[None, None]
        with self.sdpa_kernel(self.B.MATH):
            return self.F.scaled_dot_product_attention(q, k, v, attn_mask=m).cpu().numpy()


def numpy_reference(q, k, v, mask_np):
    """float64 attention, for machines without torch."""
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(q.shape[-1])
    if mask_np is not None:
        s = np.where(mask_np, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v.astype(np.float64))


def check(args, peers, d, n, mask_path):
    """Relative L2 error of `blockflash run` against SDPA fp32 at B1 H2, length n."""
    paths = {x: os.path.join(args.scratch, f"{x}_{d}_{n}.npy") for x in "qkvo"}
    cmd = ["run", "--q", paths["q"], "--k", paths["k"], "--v", paths["v"], "--out", paths["o"],
           "--precision", "f16"] + (["--mask", mask_path] if mask_path else [])
    if args.dry_run:
        return bf(args, cmd, 120) and None
    rng = np.random.default_rng(d)
    qkv = [rng.standard_normal((CHECK_B, CHECK_H, n, d)).astype(np.float16) for _ in range(3)]
    for name, x in zip("qkv", qkv):
        np.save(paths[name], x)
    p = bf(args, cmd, 120)
    if p.returncode != 0:
        raise RuntimeError(failure(p))
    mask = np.load(mask_path) if mask_path else None
    ref = peers.reference(*qkv, mask) if peers else numpy_reference(*qkv, mask)
    return float(np.linalg.norm(np.load(paths["o"]) - ref) / np.linalg.norm(ref))


def attempt(args, row, key, fn):
    """row[key] = fn(), or the reason it failed (or that the time budget is spent)."""
    try:
        check_budget(args)
        row[key] = fn()
    except Budget as e:
        row[key] = f"n/a ({e})"
    except Exception as e:  # noqa: BLE001 -- a peer failing must not end the run
        row[key] = f"n/a ({why(e)})"
        log(f"  {row.get('mask', '')}{row.get('variant', '')} {key}: {row[key]}")


def blockflash_rows(args, masks, n, b, h, d, tc):
    """One row per mask kind with blockflash's bench row (and a [pf16] row per kind if tc)."""
    rows = []
    for kind, (path, active128) in masks.items():
        rows.append({"mask": kind, "active_128": active128})
        if kind != "none" and path is None:
            rows[-1]["bf"] = active128  # the reason the mask failed
            continue
        log(f"  blockflash {kind}")
        attempt(args, rows[-1], "bf", lambda: bench(args, kind, n, b, h, d))
        if tc:
            rows.append({"mask": kind, "variant": " [pf16]"})
            attempt(args, rows[-1], "bf", lambda: bench(args, kind, n, b, h, d, "portable-f16"))
            tc = "unavailable" not in str(rows[-1]["bf"])  # tier unavailable: stop trying
    return rows


def torch_columns(args, peers, masks, rows, n, b, h, d):
    """Adds SDPA dense, SDPA with the mask and Flex times to the rows ([pf16] rows share them)."""
    q, k, v = peers.inputs(b, h, n, d)
    dense = {}
    attempt(args, dense, "plain", lambda: peers.sdpa_dense(q, k, v))
    for r in rows:
        peer = next(p for p in rows if p["mask"] == r["mask"] and "variant" not in p)
        if r is not peer:
            r.update({x: peer.get(x) for x in ("sdpa_dense", "sdpa_mask", "flex")})
            continue
        path = masks[r["mask"]][0]
        if r["mask"] != "none" and path is None:
            continue
        log(f"  torch {r['mask']}")
        buf = peers.set_mask(n, np.load(path) if path else None)
        if r["mask"] == "causal":
            attempt(args, r, "sdpa_dense", lambda: peers.sdpa_dense(q, k, v, causal=True))
        else:
            r["sdpa_dense"] = dense.get("plain")
        if path:
            attempt(args, r, "sdpa_mask", lambda: peers.sdpa_masked(q, k, v, buf))
        attempt(args, r, "flex", lambda: peers.flex_ms(q, k, v, n))
    del q, k, v
    if DEV == "cuda":
        peers.torch.cuda.empty_cache()


COLUMNS = ["mask", "active", "bf tier", "bf ms", "bf dense ms", "SDPA dense ms", "SDPA+mask ms",
           "Flex ms", "bf/SDPA-dense", "bf/Flex", "bf speedup vs own dense", "ideal (1/active)",
           "rel err vs SDPA", "bf self err"]


def cells(r):
    bfr = r.get("bf") if isinstance(r.get("bf"), dict) else {}
    num = lambda x: isinstance(x, (int, float))
    f = lambda x, spec: format(x, spec) if num(x) else (x or "—") if isinstance(x, str) else "—"
    ratio = lambda a, b: f"{a / b:.2f}" if num(a) and num(b) and b > 0 else "—"
    bf_ms = bfr.get("ms_masked", r.get("bf") if isinstance(r.get("bf"), str) else None)
    sd = r.get("sdpa_dense")
    return [r["mask"] + r.get("variant", ""), f(bfr.get("active_tiles"), ".3f"), bfr.get("tier", "—"),
            f(bf_ms, ".3f"), f(bfr.get("ms_dense"), ".3f"),
            f(sd, ".3f") + (" (is_causal)" if r["mask"] == "causal" and num(sd) else ""),
            f(r.get("sdpa_mask"), ".3f"), f(r.get("flex"), ".3f"), ratio(bf_ms, sd),
            ratio(bf_ms, r.get("flex")), f(bfr.get("speedup"), ".2f"),
            f(bfr.get("ideal_speedup"), ".2f"), f(r.get("rel_err"), ".1e"),
            f(bfr.get("max_rel_error"), ".1e") + (" (!)" if bfr.get("note") else "")]


BWD_COLUMNS = ["mask", "active", "bf tier", "bf fwd+bwd ms", "bf dense fwd+bwd ms",
               "bf fwd ms (of fwd+bwd)", "SDPA dense fwd+bwd ms", "Flex fwd+bwd ms",
               "bf/Flex", "bf/SDPA-dense", "bf speedup vs own dense", "ideal (1/active)",
               "bf speedup / ideal", "Flex speedup vs SDPA dense", "bf grad err (dQ/dK/dV)"]


def bwd_cells(r):
    bfr = r.get("bf") if isinstance(r.get("bf"), dict) else {}
    num = lambda x: isinstance(x, (int, float))
    f = lambda x, spec: format(x, spec) if num(x) else (x or "—") if isinstance(x, str) else "—"
    ratio = lambda a, b, spec=".2f": format(a / b, spec) if num(a) and num(b) and b > 0 else "—"
    bf_ms = bfr.get("ms_masked", r.get("bf") if isinstance(r.get("bf"), str) else None)
    sd, flex = r.get("sdpa_dense"), r.get("flex")
    errs = [bfr.get(f"max_rel_error_{g}") for g in ("dq", "dk", "dv")]
    err = "/".join(f(e, ".1e") for e in errs) if bfr else "—"
    return [r["mask"], f(bfr.get("active_tiles"), ".3f"), bfr.get("tier", "—"), f(bf_ms, ".3f"),
            f(bfr.get("ms_dense"), ".3f"), f(bfr.get("ms_fwd_masked"), ".3f"),
            f(sd, ".3f") + (" (is_causal)" if r["mask"] == "causal" and num(sd) else ""),
            f(flex, ".3f"), ratio(bf_ms, flex), ratio(bf_ms, sd), f(bfr.get("speedup"), ".2f"),
            f(bfr.get("ideal_speedup"), ".2f"), ratio(bfr.get("speedup"), bfr.get("ideal_speedup")),
            ratio(r.get("sdpa_plain"), flex), err + (" (!)" if bfr.get("note") else "")]


def table(rows, backward=False):
    columns, row_cells = (BWD_COLUMNS, bwd_cells) if backward else (COLUMNS, cells)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(out + ["| " + " | ".join(row_cells(r)) + " |" for r in rows])


def write_results(args, meta, blocks):
    md = [f"# blockflash vs PyTorch SDPA and FlexAttention ({meta['date']})", "",
          f"- GPU: {meta['gpu']}", f"- torch {meta['torch']}, triton {meta['triton']}",
          f"- blockflash adapter: {meta.get('bf_adapter', '?')}", f"- command: `{meta['command']}`",
          f"- fp16 forward. Medians: blockflash GPU timestamps ({args.repeat} after 2 warm-ups), "
          "PyTorch CUDA events (10 after 3). Ratios < 1: blockflash is faster. active: fraction of"
          " blockflash's tiles (its plan's tile shape) that are computed. rel err: `blockflash run`"
          f" at B{CHECK_B} H{CHECK_H} N{meta['check_n']} vs {meta['reference']} (relative L2)."
          " bf self err: bench's own check vs the f64 reference on sampled rows ((!) = failed)."
          " [pf16]: --tier portable-f16.",
          "- fp16 forward + backward (tables marked fwd+bwd): one training step, forward then"
          f" backward of dQ, dK, dV. Medians: blockflash GPU timestamps ({args.backward_repeat}"
          " after 2 warm-ups; its dense plan timed once per N), PyTorch CUDA events"
          " (10 after 3). Flex speedup vs SDPA dense uses SDPA without a"
          " mask. bf grad err: bench's check of dQ (sampled rows) and dK, dV (sampled keys of"
          " one key/value head) vs the f64 reference (relative L2).", ""]
    for title, rows, backward in blocks:
        md += [f"## {title}", "", table(rows, backward), ""]
    with open(os.path.join(args.out, "peers.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump({"meta": meta, "blocks": [{"title": t, "pass": "fwd+bwd" if bw else "fwd",
                                             "rows": r} for t, r, bw in blocks]}, f, indent=1)


def backward_block(args, peers, n, b, h, d, kinds):
    """The forward + backward rows at length n: PyTorch's (cheap) first, then blockflash's (its
    dense plan's training step takes about a second at N16384), so that the budget cuts
    blockflash's rows last."""
    rows = [{"mask": k} for k in kinds]
    if peers:
        torch_fwd_bwd(args, peers, rows, n, b, h, d)
    log("  blockflash fwd+bwd, all masks")
    bf_rows = bench_backward(args, n, b, h, d)
    missing = None if args.dry_run else "n/a (no row)"
    for r in rows:
        r["bf"] = bf_rows.get(r["mask"], missing)
    return rows


def torch_fwd_bwd(args, peers, rows, n, b, h, d):
    """Adds SDPA dense (no mask; is_causal for causal) and Flex forward + backward times."""
    try:
        check_budget(args)
        *qkv, do = peers.grad_inputs(b, h, n, d)
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory or the budget
        for r in rows:
            r["flex"] = f"n/a ({why(e)})"
        return
    plain = {}
    attempt(args, plain, "ms", lambda: peers.sdpa_dense_fwd_bwd(qkv, do))
    for r in rows:
        log(f"  torch fwd+bwd {r['mask']}")
        r["sdpa_plain"] = plain.get("ms")
        if r["mask"] == "causal":
            attempt(args, r, "sdpa_dense", lambda: peers.sdpa_dense_fwd_bwd(qkv, do, True))
        else:
            r["sdpa_dense"] = plain.get("ms")
        try:
            check_budget(args)
            path = make_mask(args, r["mask"], n)[0]
        except Exception as e:  # noqa: BLE001
            r["flex"] = f"n/a ({why(e)})"
            continue
        peers.set_mask(n, np.load(path))
        os.remove(path)
        attempt(args, r, "flex", lambda: peers.flex_fwd_bwd(qkv, do, n))
    del qkv, do
    if DEV == "cuda":
        peers.torch.cuda.empty_cache()


def note_adapter(meta, rows):
    """Records the adapter that blockflash's first measured row names, once."""
    if meta.get("bf_adapter", "?") == "?":
        meta["bf_adapter"] = next((f"{r['bf']['adapter']} ({r['bf']['backend']}, driver "
                                   f"{r['bf']['driver']})" for r in rows
                                   if isinstance(r.get("bf"), dict) and r["bf"]), "?")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blockflash", required=True, help="path of the blockflash binary")
    ap.add_argument("--out", required=True, help="directory for peers.md, peers.json, logs")
    ap.add_argument("--quick", action="store_true", help="N=4096 and five masks only")
    ap.add_argument("--dry-run", action="store_true", help="print the blockflash commands only")
    ap.add_argument("--scratch", help="directory for masks and q/k/v (default: a temporary one)")
    ap.add_argument("--budget", type=float, default=540, help="seconds before skipping the rest")
    ap.add_argument("--repeat", type=int, default=10, help="blockflash bench --repeat")
    ap.add_argument("--no-backward", action="store_true", help="forward tables only")
    ap.add_argument("--no-forward", action="store_true", help="forward + backward tables only")
    ap.add_argument("--no-portable", action="store_true",
                    help="no [pf16] rows (the portable f16 tier takes most of the forward's time)")
    ap.add_argument("--backward-repeat", type=int, default=3,
                    help="blockflash bench --backward --repeat")
    ap.add_argument("--seqs", help="comma-separated N (testing; default 4096,16384)")
    ap.add_argument("--configs", help="B,H,d;B,H,d (testing; default 4,32,64;2,16,128)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    own_scratch = args.scratch is None
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="peers-")
    os.makedirs(args.scratch, exist_ok=True)
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else SEQS[:1] if args.quick else SEQS
    configs = ([tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
               if args.configs else CONFIGS)
    kinds = QUICK_KINDS if args.quick else KINDS
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 " + shlex.join(sys.argv), "gpu": "?", "torch": "n/a", "triton": "n/a"}
    try:
        meta["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True,
                                     timeout=30).stdout.strip().replace(", ", ", driver ")
    except Exception as e:  # noqa: BLE001
        meta["gpu"] = f"n/a ({why(e)})"
    peers = None
    if not args.dry_run:
        try:
            peers = Torch()
            meta["torch"] = peers.torch.__version__
            import triton
            meta["triton"] = triton.__version__
        except Exception as e:  # noqa: BLE001
            log(f"PyTorch peers unavailable: {why(e)}")
            meta["torch"] = meta["torch"] if peers else f"n/a ({why(e)})"
    meta["check_n"] = min(seqs)
    meta["reference"] = "SDPA on fp32-upcast inputs (math)" if peers else "numpy float64"
    log(f"{meta['gpu']}; torch {meta['torch']}; configs {configs}; N {seqs}; masks {kinds}")
    blocks, state = [], {"tc": True}
    for n in [] if args.no_forward else seqs:
        masks = {"none": (None, 1.0)}
        for kind in kinds[1:]:
            try:
                masks[kind] = make_mask(args, kind, n)
            except Exception as e:  # noqa: BLE001
                masks[kind] = (None, f"n/a ({why(e)})")
        for b, h, d in configs:
            title = f"B{b} H{h} d{d}, N={n}"
            log(f"\n== {title} ({time.time() - T0:.0f} s)")
            portable = state["tc"] and not args.no_portable and (d, n) == (64, min(seqs))
            rows = blockflash_rows(args, masks, n, b, h, d, tc=portable)
            state["tc"] &= not any("unavailable" in str(r.get("bf")) for r in rows if "variant" in r)
            if peers:
                torch_columns(args, peers, masks, rows, n, b, h, d)
            if n == min(seqs):
                for r in rows:
                    path = masks[r["mask"]][0]
                    if "variant" in r or (r["mask"] != "none" and path is None):
                        continue
                    attempt(args, r, "rel_err", lambda: check(args, peers, d, n, path))
                    if isinstance(r["rel_err"], float):
                        log(f"  check {r['mask']}: relative L2 error {r['rel_err']:.2e}")
            note_adapter(meta, rows)
            blocks.append((title, rows, False))
            log(f"\n### {title}\n\n{table(rows)}\n")
            if not args.dry_run:
                write_results(args, meta, blocks)
        for path, _ in masks.values():
            if path and os.path.exists(path) and own_scratch:
                os.remove(path)
    # Forward + backward, after every forward table: the first configuration at each N.
    b, h, d = configs[0]
    for n in [] if args.no_backward else seqs:
        title = f"fwd+bwd: B{b} H{h} d{d}, N={n}"
        log(f"\n== {title} ({time.time() - T0:.0f} s)")
        bwd_kinds = [k for k in kinds if k != "none"]
        rows = backward_block(args, peers, n, b, h, d, bwd_kinds)
        note_adapter(meta, rows)
        blocks.append((title, rows, True))
        log(f"\n### {title}\n\n{table(rows, backward=True)}\n")
        if not args.dry_run:
            write_results(args, meta, blocks)
    if own_scratch:
        shutil.rmtree(args.scratch, ignore_errors=True)
    log(f"done in {time.time() - T0:.0f} s; wrote {args.out}/peers.md and peers.json")


if __name__ == "__main__":
    main()
