"""Training throughput: tokens/s, ms/step, FLOPs/token and MFU of the real training loop on synthetic tokens.

    python benchmarks/train.py                              # the reference setting (d6, hd64, seq 512, 16k batch)
    python benchmarks/train.py --compile --dtype both       # fp32 and bf16 in the same run (bf16 only if native)
    python benchmarks/train.py --depth 20 --head-dim 128 --max-seq-len 2048 --device-batch-size 32 \
        --total-batch-size 524288 --compile                 # a GPU preset

Takes the model and batch flags of `picochat pretrain` and prints ONE JSON line. MFU is against the matmul peak
*measured on this machine in this run* for the dtype used (fp32 and bf16 peaks are both reported).
FLOPs/token = 6 x (parameters of the linear layers, lm_head included) + the causal attention term
(model.estimate_flops); embeddings are excluded. `--profile` profiles one steady step (see top_ops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from picochat.common import _cpu_flags, measure_matmul_flops, setup_runtime
from picochat.config import ModelConfig, derive_model_config
from picochat.model import GPT, HEAD_PLAIN_BYTES
from picochat.train.loop import Prepared, Stage, make_optimizer, micro_batches, train
from picochat.config import PretrainConfig

from _env import stamp  # benchmarks/_env.py: machine, date, command


def bench(args, dtype: str) -> dict:
    os.environ["PICOCHAT_DTYPE"] = dtype
    rt = setup_runtime(args.device, dtype, 0)
    cfg = PretrainConfig(depth=args.depth, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                         device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                         num_steps=args.steps, compile=args.compile, warmup_steps=0, eval_every=0,
                         metrics="", device=args.device, dtype=dtype)
    mcfg = derive_model_config(ModelConfig(depth=args.depth, head_dim=args.head_dim, vocab_size=args.vocab_size,
                                           sequence_len=args.max_seq_len))
    torch.manual_seed(0)
    model = GPT(mcfg).to(rt.device)
    model.init_weights(0)
    model.head_plain_bytes = args.head_plain_mb << 20
    opt = make_optimizer(model, cfg, rt)  # the loop's own: Muon's Newton–Schulz in bf16 for a bf16 run
    B, T = args.device_batch_size, args.max_seq_len
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (8, B, T + 1), generator=g)  # cycled: the loader is not measured here
    state = {"i": 0}

    def next_batch():
        row = data[state["i"] % len(data)].to(rt.device)
        state["i"] += 1
        return row[:, :-1], row[:, 1:]

    def stage(steps: int) -> Stage:
        return Stage(name="base", cfg=cfg, next_batch=next_batch, num_steps=steps,
                     grad_accum=micro_batches(cfg, T, rt.world_size), checkpoints=False)

    prep = Prepared(model, opt, None)
    prof = None
    if args.profile:
        train(stage(1), prep, rt)  # warm-up (and compile): the profiled step is a steady one
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            summary = train(stage(1), prep, rt)
        summary["tok_per_s"] = cfg.total_batch_size / summary["elapsed_s"]
    else:
        summary = train(stage(args.steps), prep, rt)
    fl = model.estimate_flops()
    tok_s = summary["tok_per_s"]
    return {"dtype": dtype, "tok_per_s": round(tok_s, 1), "ms_per_step": round(cfg.total_batch_size / tok_s * 1000, 1),
            "mfu": round(summary["mfu"], 4), "mfu_palm_convention": round(tok_s * fl["palm_convention"] /
            measure_matmul_flops("bfloat16" if dtype == "bf16" else "float32", rt.device.type), 4),
            "final_loss": round(summary["final_loss"], 4), **({"profile": top_ops(prof, args.top)} if prof else {})}


def top_ops(prof, n: int) -> dict:
    """The profiled step's operators by self CPU time: each one's share of the step's total self time and its call
    count, and the inclusive share of the `picochat::` regions (the fused head). Shares and counts are what compare
    across runs on a loaded machine; the absolute times are printed to stderr as the profiler's table."""
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=n), file=sys.stderr)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]
    out = {"total_self_ms": round(total / 1000, 1),
           "ops": {e.key: {"share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in ops}}
    out["regions"] = {e.key: {"share": round(e.cpu_time_total / total, 3), "calls": e.count}
                      for e in events if e.key.startswith("picochat::")}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=16384)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto", "both"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is excluded from timing)")
    p.add_argument("--head-plain-mb", type=int, default=HEAD_PLAIN_BYTES >> 20, help="compiled: micro-batches whose "
                   "logits fit this many MB take the plain head in the graph (model.HEAD_PLAIN_BYTES); 0 = always the "
                   "fused head")
    p.add_argument("--profile", action="store_true", help="profile one step after a warm-up one instead of timing "
                   "--steps: top operators by self CPU time (shares and call counts) in the JSON, the table on stderr")
    p.add_argument("--top", type=int, default=15, help="operators listed by --profile")
    args = p.parse_args(argv)
    rt = setup_runtime(args.device, "fp32", 0)
    dev = rt.device.type
    native_bf16 = dev == "cuda" or bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    out = {**stamp(__file__, rt.device), "depth": args.depth, "head_dim": args.head_dim, "seq_len": args.max_seq_len,
           "device_batch": args.device_batch_size, "total_batch": args.total_batch_size, "vocab": args.vocab_size,
           "device": str(rt.device), "compile": args.compile, "threads": torch.get_num_threads(),
           "peak_fp32_gflops": round(measure_matmul_flops("float32", dev) / 1e9, 1),
           "peak_bf16_gflops": round(measure_matmul_flops("bfloat16", dev) / 1e9, 1)}
    for dt in dtypes:
        if dt == "bf16" and not native_bf16:
            out["bf16"] = "skipped: this CPU has no native bf16 matmul (avx512_bf16/amx_bf16)"
            continue
        r = bench(args, dt)
        out[dt] = r
    m = GPT(derive_model_config(ModelConfig(depth=args.depth, head_dim=args.head_dim, vocab_size=args.vocab_size,
                                            sequence_len=args.max_seq_len)))
    out["flops_per_token"] = m.estimate_flops()["total"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
