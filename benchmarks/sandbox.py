"""Cost of one sandboxed python tool call, with bubblewrap and with the fallback layers, in one run.

    python benchmarks/sandbox.py [--runs 20]

Prints ONE JSON line: per mode the median and best wall time of `run_python("print(1)")` in ms and the layers that
took effect (bwrap is null where it is not installed or cannot create namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from picochat.sandbox import run_python

from _env import stamp  # benchmarks/_env.py: machine, date, command


def measure(mode: str, runs: int) -> dict | None:
    os.environ["PICOCHAT_SANDBOX"] = mode
    first = run_python("print(1)")  # also the one-time bubblewrap probe: not timed below
    if mode == "bwrap" and "bwrap" not in first.layers:
        return None
    times = []
    for _ in range(runs):
        r = run_python("print(1)")
        assert r.stdout == "1\n", r
        times.append(r.duration_s * 1000)
    return {"median_ms": round(statistics.median(times), 1), "best_ms": round(min(times), 1),
            "layers": list(first.layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed calls per mode")
    args = ap.parse_args()
    try:
        bwrap = measure("bwrap", args.runs)
    except Exception:  # noqa: BLE001 - PICOCHAT_SANDBOX=bwrap raises a UserError where bubblewrap cannot run
        bwrap = None
    print(json.dumps({**stamp(__file__), "runs": args.runs, "bwrap": bwrap,
                      "fallback": measure("fallback", args.runs)}))


if __name__ == "__main__":
    main()
