"""The fused head + loss against the plain path: forward + backward time and peak memory of the head alone.

    python benchmarks/head.py                                  # 4 x 512 rows, width 256, vocab 8,192 and 65,536
    python benchmarks/head.py --group-mb 64,256 --chunk-m 1,4,16 # the fused head at several group and chunk sizes

plain: logits = x @ wᵀ (autocast), .float(), softcap, F.cross_entropy, backward (what an unfused model does).
fused: model.head_loss, the training path, chunked by `head_rows` at each group budget (MB of logits in the compute
dtype) and element-wise chunk (millions of fp32 logits); the defaults are the model's.
The dtype is the one training picks on this machine (bf16 where the CPU has native bf16) unless --dtype says. Times:
one process runs every path in turn, --reps rounds after a warm-up, best of each (on a shared machine, alternating
keeps the ratio fair). Peak memory: each path once in its own process, the rise of its RSS high-water mark over the
inputs (ru_maxrss sees torch's allocations; tracemalloc does not). Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from picochat.common import pick_dtype
from picochat.model import HEAD_CHUNK_ELEMS, HEAD_GROUP_BYTES, head_loss, head_rows, softcap

CAP = 15.0  # the model's default logit soft cap


def variants(args) -> dict[str, tuple[int, int]]:
    """{name: (group bytes, chunk elements)} of the fused paths asked for; "fused" alone for the model's defaults."""
    sizes = [(int(g) << 20, int(c) << 20) for g in args.group_mb.split(",") for c in args.chunk_m.split(",")]
    return {"fused" if len(sizes) == 1 else f"fused_g{g >> 20}mb_c{c >> 20}m": (g, c) for g, c in sizes}


def make_paths(rows: int, width: int, vocab: int, dtype: str, sizes: dict[str, tuple[int, int]]) -> tuple:
    """{name: fn} where fn() runs one forward + backward of the head; `rows_of` gives the fused paths' chunking."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).requires_grad_()  # normed activations, ~N(0, 1)
    w = (torch.randn(math.ceil(vocab / 64) * 64, width, generator=g) / math.sqrt(width)).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g)
    ac = dict(device_type="cpu", dtype=dt, enabled=dt != torch.float32)

    def plain():
        with torch.autocast(**ac):
            loss = F.cross_entropy(softcap(F.linear(x, w)[:, :vocab].float(), CAP), t, reduction="sum")
        return loss

    def fused(group_bytes, chunk_elems):
        with torch.autocast(**ac):
            return head_loss(x, w, t, vocab, CAP, *head_rows(x, vocab, group_bytes, chunk_elems), True)

    def run(loss_fn):
        def step():
            x.grad = w.grad = None
            loss_fn().backward()
        return step

    paths = {"plain": run(plain)}
    for name, size in sizes.items():
        paths[name] = run(lambda size=size: fused(*size))
    with torch.autocast(**ac):
        rows_of = {name: head_rows(x, vocab, *size) for name, size in sizes.items()}
    return paths, rows_of


def child(args) -> dict:
    vocab = int(args.vocab)
    if args.one == "time":
        paths, rows_of = make_paths(args.rows, args.width, vocab, args.dtype, variants(args))
        best = {name: float("inf") for name in paths}
        for r in range(args.reps + 1):
            for name, step in paths.items():
                t0 = time.perf_counter()
                step()
                if r > 0:  # round 0 is the warm-up
                    best[name] = min(best[name], time.perf_counter() - t0)
        return {"ms": {k: round(v * 1000, 1) for k, v in best.items()}, "rows": rows_of}
    paths, _ = make_paths(args.rows, args.width, vocab, args.dtype, variants(args))
    inputs_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    paths[args.one]()
    return {"peak_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - inputs_kb) / 1024)}


def run_child(args, one: str, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--one", one, "--vocab", str(vocab), "--rows", str(args.rows), "--width",
           str(args.width), "--dtype", args.dtype, "--reps", str(args.reps), "--group-mb", args.group_mb,
           "--chunk-m", args.chunk_m, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4 * 512, help="rows (tokens) of the micro-batch: 4 x 512")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", default="8192,65536", help="comma-separated vocabulary sizes")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--group-mb", default=str(HEAD_GROUP_BYTES >> 20), help="comma-separated group budgets, MB")
    p.add_argument("--chunk-m", default=str(HEAD_CHUNK_ELEMS >> 20),
                   help="comma-separated element-wise chunks, millions of fp32 logits")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: "time", or a path name for its peak memory
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        args.dtype = "bf16" if pick_dtype(torch.device("cpu")) == torch.bfloat16 else "fp32"
    if args.one:
        print(json.dumps(child(args)))
        return
    out = {"rows": args.rows, "width": args.width, "dtype": args.dtype, "threads": torch.get_num_threads()}
    for vocab in (int(v) for v in args.vocab.split(",")):
        timed = run_child(args, "time", vocab)
        res = {}
        for name, ms in timed["ms"].items():
            res[f"{name}_ms"] = ms
            res[f"{name}_peak_mb"] = run_child(args, name, vocab)["peak_mb"]
            if name != "plain":
                res[f"{name}_ratio"] = round(ms / timed["ms"]["plain"], 3)
                res[f"{name}_rows"] = timed["rows"][name]  # (group, chunk)
        out[str(vocab)] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
