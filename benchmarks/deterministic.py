"""What `--deterministic` costs: training tokens/s of the real loop with it off and on, alternating in one process.

    python benchmarks/deterministic.py                       # the CPU preset's shape (d4, seq 256, 8k batch), fp32
    python benchmarks/deterministic.py --rounds 5 --compile  # compiled (inductor's deterministic mode)

Each round runs benchmarks/train.py's `bench` (synthetic tokens, the first step excluded from timing) once with
`set_deterministic(False)` and once with `set_deterministic(True)`, in alternating order, so drifting load on a
shared machine hits both alike. Prints ONE JSON line: each mode's tokens/s per round and median, the ratio of the
medians, the same for the CPU seconds each measurement took (the process's, all threads: steadier than wall time
when other jobs share the cores), and each mode's final loss (deterministic kernels may round differently). Then
one profiled run per mode (torch.profiler, CPU ops): the operators whose call counts differ between the modes, per
step, with their self CPU time, and that difference as a share of all operators' self CPU time: what deterministic
mode changes in the kernels run, which on a loaded machine is a steadier figure than any timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from picochat.common import set_deterministic
from _env import stamp  # benchmarks/_env.py: machine, date, command
from train import bench  # benchmarks/train.py, this script's neighbour (its folder is sys.path[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--total-batch-size", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per measurement (the first is not timed)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    args.profile = False
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            set_deterministic(mode == "on")
            t0 = time.process_time()
            runs[mode].append({**bench(args, args.dtype), "cpu_s": time.process_time() - t0})
    kernels = {}
    for mode in ("off", "on"):
        set_deterministic(mode == "on")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench(args, args.dtype)
        kernels[mode] = {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}
    set_deterministic(False)
    total_us = {m: sum(us for _, us in k.values()) for m, k in kernels.items()}
    changed = {op: {"calls_per_step_off": kernels["off"].get(op, (0, 0))[0] / args.steps,
                    "calls_per_step_on": kernels["on"].get(op, (0, 0))[0] / args.steps,
                    "self_cpu_ms_off": round(kernels["off"].get(op, (0, 0))[1] / 1e3, 2),
                    "self_cpu_ms_on": round(kernels["on"].get(op, (0, 0))[1] / 1e3, 2)}
               for op in sorted(set(kernels["off"]) | set(kernels["on"]))
               if kernels["off"].get(op, (0, 0))[0] != kernels["on"].get(op, (0, 0))[0]}
    extra_us = sum(kernels["on"].get(op, (0, 0))[1] - kernels["off"].get(op, (0, 0))[1] for op in changed)
    med = {m: statistics.median(x["tok_per_s"] for x in rs) for m, rs in runs.items()}
    cpu = {m: statistics.median(x["cpu_s"] for x in rs) for m, rs in runs.items()}
    print(json.dumps({**stamp(__file__, args.device, argv),
                      "depth": args.depth, "seq_len": args.max_seq_len, "total_batch": args.total_batch_size,
                      "dtype": args.dtype, "compile": args.compile, "threads": torch.get_num_threads(),
                      "tok_per_s_off": [x["tok_per_s"] for x in runs["off"]],
                      "tok_per_s_on": [x["tok_per_s"] for x in runs["on"]],
                      "median_off": med["off"], "median_on": med["on"], "on_over_off": round(med["on"] / med["off"], 3),
                      "cpu_s_off": [round(x["cpu_s"], 2) for x in runs["off"]],
                      "cpu_s_on": [round(x["cpu_s"], 2) for x in runs["on"]],
                      "cpu_on_over_off": round(cpu["on"] / cpu["off"], 3),
                      "final_loss_off": runs["off"][0]["final_loss"], "final_loss_on": runs["on"][0]["final_loss"],
                      "ops_that_differ": changed, "self_cpu_ms_off": round(total_us["off"] / 1e3, 1),
                      "self_cpu_ms_on": round(total_us["on"] / 1e3, 1),
                      "differing_ops_share_on": round(extra_us / total_us["on"], 5)}))


if __name__ == "__main__":
    main()
