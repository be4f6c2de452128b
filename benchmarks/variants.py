"""Training ms/step of the architecture variants, alternated round by round, so a loaded machine's drift hits all alike.

    python benchmarks/variants.py                  # the CPU preset's shape, bf16, 3 rounds of the five variants
    python benchmarks/variants.py --rounds 5 --steps 4 --variants baseline,depth6

Each round times every variant once (baseline, sssl, value_embeds, resid_scalars, depth6: A B C D E, B C D E A, ...)
with benchmarks/train.py's `bench` (the real training loop on synthetic tokens), then prints ONE JSON line: each
variant's ms/step per round, the median, and the median's ratio to the baseline's. The ratios are what equal-wall-clock
step counts come from (README: Measured, "Pretraining quality per compute"): a variant gets the baseline's steps x
(baseline ms/step / its ms/step).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package: import train.py
import torch  # noqa: E402
import train as train_bench  # noqa: E402

from picochat.common import UserError  # noqa: E402

_MODEL_CONFIG = train_bench.ModelConfig

# variant -> (its ModelConfig fields on top of the baseline's, its depth); the flags are `picochat pretrain`'s
VARIANTS = {
    "baseline": ({}, 4),
    "sssl": ({"window_pattern": "SSSL"}, 4),
    "value_embeds": ({"value_embeds": True}, 4),
    "resid_scalars": ({"resid_scalars": True}, 4),
    "depth6": ({}, 6),
}


def measure(args, name: str) -> float:
    """One timing of `name`: ms/step over args.steps steps (bench leaves the first out)."""
    extra, depth = VARIANTS[name]
    # bench builds its ModelConfig from the shape flags alone: hand it one with this variant's fields preset, so the
    # timed loop is bench's own rather than a second copy of it
    train_bench.ModelConfig = functools.partial(_MODEL_CONFIG, **extra)
    with contextlib.redirect_stdout(sys.stderr):  # the loop prints its own summary line: stdout keeps only ours
        return train_bench.bench(argparse.Namespace(**{**vars(args), "depth": depth}), args.dtype)["ms_per_step"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per timing (the first is excluded)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--total-batch-size", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "baseline" not in names:
        raise UserError(f"--variants {args.variants}: give 'baseline' and any of {', '.join(VARIANTS)}"
                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    # the fields bench reads besides the shape: plain timing, no compile, no profile, the default fused-head cut
    bench_args = {**vars(args), "compile": False, "profile": False, "top": 0,
                  "head_plain_mb": train_bench.HEAD_PLAIN_BYTES >> 20}
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {v: [] for v in names}
    # a process's first timing reads slow (first-use costs outside bench's excluded first step): one discarded
    # warm-up, and each round starts one variant later, so no variant always goes first
    measure(argparse.Namespace(**bench_args), names[0])
    for r in range(args.rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(measure(argparse.Namespace(**bench_args), v))
    median = {v: statistics.median(t) for v, t in times.items()}
    out = {"shape": {k: bench_args[k] for k in ("head_dim", "max_seq_len", "device_batch_size", "total_batch_size",
                                                "vocab_size", "dtype")},
           "threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps,
           "ms_per_step": times, "median_ms_per_step": median,
           "ratio_to_baseline": {v: round(m / median["baseline"], 3) for v, m in median.items()},
           "load_avg_1_5_15": {"start": [round(x, 2) for x in load_start],
                               "end": [round(x, 2) for x in os.getloadavg()]}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
