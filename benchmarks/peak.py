"""The matmul peak probe that MFU figures are quoted against, read several times in a row: how stable it is.

    python benchmarks/peak.py                 # 5 readings each of fp32 and bf16 (bf16 only where native)
    python benchmarks/peak.py --readings 10 --device cuda

Prints ONE JSON line: each dtype's readings in GFLOP/s, and their spread (max / min - 1).
"""

from __future__ import annotations

import argparse
import json

import torch

from picochat.common import _cpu_flags, autodetect_device, measure_matmul_flops

from _env import stamp  # benchmarks/_env.py: machine, date, command


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--readings", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    dev = autodetect_device(args.device).type
    native_bf16 = dev == "cuda" or bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    out = {**stamp(__file__, dev), "device": dev, "threads": torch.get_num_threads()}
    for name in ("float32", "bfloat16") if native_bf16 else ("float32",):
        readings = []
        for _ in range(args.readings):
            measure_matmul_flops.cache_clear()  # a fresh measurement each time, not the cached first one
            readings.append(round(measure_matmul_flops(name, dev) / 1e9, 1))
        out[name] = {"gflops": readings, "spread": round(max(readings) / min(readings) - 1, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
