"""The fused head + loss against the plain path: forward + backward time and peak memory of the head alone.

    python benchmarks/head.py                                  # 8 x 512 rows, width 512, vocab 8,192 and 65,536
    python benchmarks/head.py --group-mb 32,64,128,256,512     # the fused head at several group budgets

plain: logits = x @ wᵀ (autocast), .float(), softcap, F.cross_entropy, backward (what an unfused model does).
fused: model.head_loss, the training path, with the model's chunking (`head_rows`) at each group budget.
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
from picochat.model import head_loss, head_rows, softcap

CAP = 15.0  # the model's default logit soft cap
CHUNK_ELEMS = 1 << 20  # the model's default element-wise chunk on CPU


def make_paths(rows: int, width: int, vocab: int, dtype: str, budgets: list[int]) -> dict:
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

    def fused(mb):
        with torch.autocast(**ac):
            return head_loss(x, w, t, vocab, CAP, *head_rows(x, vocab, mb << 20, CHUNK_ELEMS), True)

    def run(loss_fn):
        def step():
            x.grad = w.grad = None
            loss_fn().backward()
        return step

    paths = {"plain": run(plain)}
    for mb in budgets:
        paths[f"fused_{mb}mb"] = run(lambda mb=mb: fused(mb))
    with torch.autocast(**ac):
        rows_of = {mb: head_rows(x, vocab, mb << 20, CHUNK_ELEMS) for mb in budgets}
    return paths, rows_of


def child(args) -> dict:
    budgets = [int(m) for m in args.group_mb.split(",")]
    vocab = int(args.vocab)
    if args.one == "time":
        paths, rows_of = make_paths(args.rows, args.width, vocab, args.dtype, budgets)
        best = {name: float("inf") for name in paths}
        for r in range(args.reps + 1):
            for name, step in paths.items():
                t0 = time.perf_counter()
                step()
                if r > 0:  # round 0 is the warm-up
                    best[name] = min(best[name], time.perf_counter() - t0)
        return {"ms": {k: round(v * 1000, 1) for k, v in best.items()}, "rows": {f"fused_{mb}mb": rows_of[mb]
                for mb in budgets}}
    paths, _ = make_paths(args.rows, args.width, vocab, args.dtype, budgets)
    inputs_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    paths[args.one]()
    return {"peak_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - inputs_kb) / 1024)}


def run_child(args, one: str, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--one", one, "--vocab", str(vocab), "--rows", str(args.rows), "--width",
           str(args.width), "--dtype", args.dtype, "--reps", str(args.reps), "--group-mb", args.group_mb]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8 * 512, help="rows (tokens) of the micro-batch: 8 x 512")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", default="8192,65536", help="comma-separated vocabulary sizes")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--group-mb", default="256", help="comma-separated group budgets of the fused head, MB")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: "time", or a path name for its peak memory
    args = p.parse_args(argv)
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
                res[f"{name}_group_chunk_rows"] = timed["rows"][name]
        out[str(vocab)] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
