#!/usr/bin/env python3
"""Decoding: blockflash beside PyTorch SDPA and FlexAttention (fp16, forward, one GPU).

Each case is M new query rows over N keys with grouped-query heads (B, H, Hkv, d, N, M), with no
mask and with the last M rows of a causal mask (row i sees keys 0 .. N - M + i):

* blockflash: `blockflash bench --mask causal --seq N --seq-q M --precision f16 --repeat 10`:
  GPU-timestamp medians of its dense plan (no mask) and of the masked plan, its tile, path and
  own check against the f64 reference on sampled rows.
* PyTorch (peers.py's timing: CUDA events, 3 warm-ups, median of 10):
  `scaled_dot_product_attention` with `enable_gqa=True`, without a mask and with the bool mask
  [M, N] (whichever backend takes a mask with grouped heads); `torch.compile(flex_attention)`
  with `enable_gqa=True` and a BlockMask built once from the causal mask_mod offset by N - M
  (FlexAttention takes its decoding kernel for short queries).

Run on the GPU machine after the Vulkan setup of ../shared/docs/gpu.md:

    python3 benches/decode_peers.py --blockflash target/release/blockflash --out $OUT/decode

Output: a markdown table on stdout and in DIR/decode.md (after a line of JSON: date, GPU,
driver, torch version, command), every number in DIR/decode.json.
"""
import argparse, datetime, json, os, subprocess, sys, tempfile

from peers import DEV, ENV, Torch, log, why

# (B, H, Hkv, d, N, M)
CASES = [
    (1, 32, 8, 128, 16384, 1),
    (1, 32, 8, 128, 16384, 16),
    (1, 32, 8, 128, 65536, 16),
    (4, 32, 8, 128, 16384, 16),
    (1, 32, 32, 64, 16384, 1),
    (1, 32, 32, 64, 65536, 16),
]


def blockflash(args, case):
    """blockflash's bench row of one case."""
    b, h, hkv, d, n, m = case
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
        cmd = [args.blockflash, "bench", "--mask", "causal", "--seq", n, "--seq-q", m,
               "--batch", b, "--heads", h, "--kv-heads", hkv, "--head-dim", d,
               "--precision", "f16", "--repeat", 10, "--json", f.name]
        try:
            p = subprocess.run([str(x) for x in cmd], capture_output=True, text=True, env=ENV,
                               timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"note": why(e)}
        with open(f.name) as rows:
            row = json.loads(rows.readline() or "{}")
    if p.returncode != 0:
        row["note"] = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:90]
    return row


def torch_times(peers, case):
    """SDPA without and with the mask, and FlexAttention with it, in ms."""
    torch, F = peers.torch, peers.F
    b, h, hkv, d, n, m = case
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(b, h, m, d, device=DEV, dtype=torch.float16, generator=g)
    k, v = (torch.randn(b, hkv, n, d, device=DEV, dtype=torch.float16, generator=g)
            for _ in range(2))
    rows = torch.arange(m, device=DEV)[:, None] + (n - m)
    mask = torch.arange(n, device=DEV)[None, :] <= rows

    def flex():
        bm = peers.create_block_mask(lambda b_, h_, qi, kv: kv <= qi + (n - m), None, None, m, n,
                                     device=DEV)
        return peers.time(lambda: peers.flex(q, k, v, block_mask=bm, enable_gqa=True))

    out = {}
    for name, fn in [
        ("sdpa_dense", lambda: peers.time(
            lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))),
        ("sdpa_mask", lambda: peers.time(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[None, None], enable_gqa=True))),
        ("flex", flex),
    ]:
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 -- a peer failing must not end the run
            log(f"  {name}: n/a ({why(e)})")
            out[name] = float("nan")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blockflash", required=True, help="path of the blockflash binary")
    ap.add_argument("--out", required=True, help="directory for decode.md and decode.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    peers = Torch()
    head = ("| B H Hkv d | N | M | bf dense ms | bf causal ms | bf tile, path | SDPA ms | "
            "SDPA + mask ms | Flex ms | bf causal / Flex | bf dense / SDPA |")
    lines = [head, "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    results = []
    for case in CASES:
        b, h, hkv, d, n, m = case
        log(f"B{b} H{h} Hkv{hkv} d{d} N{n} M{m}")
        r = {"case": dict(zip(["batch", "heads", "kv_heads", "head_dim", "seq", "seq_q"], case))}
        r["blockflash"] = blockflash(args, case)
        r["torch"] = torch_times(peers, case)
        results.append(r)
        bf, t = r["blockflash"], r["torch"]
        dense, masked = bf.get("ms_dense", float("nan")), bf.get("ms_masked", float("nan"))
        lines.append(
            f"| B{b} H{h} Hkv{hkv} d{d} | {n} | {m} | {dense:.3f} | {masked:.3f} | "
            f"{bf.get('tile')}, {bf.get('path')}{' (' + bf['note'] + ')' if 'note' in bf else ''} | "
            f"{t['sdpa_dense']:.3f} | {t['sdpa_mask']:.3f} | {t['flex']:.3f} | "
            f"{masked / t['flex']:.2f} | {dense / t['sdpa_dense']:.2f} |")
        log(lines[-1])
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": peers.torch.__version__,
            "gpu": peers.torch.cuda.get_device_name() if DEV == "cuda" else DEV,
            "command": " ".join(sys.argv),
            "adapter": results[0]["blockflash"].get("adapter") if results else None,
            "driver": results[0]["blockflash"].get("driver") if results else None}
    table = "\n".join(lines)
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write(f"{json.dumps(meta)}\n\n{table}\n")
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
