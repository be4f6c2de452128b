"""Where and when a benchmark ran: the fields every benchmark's JSON line carries, so benchmarks/table.py can put
each figure in the README's table with its machine and date.

    from _env import stamp                      # a script's neighbour (benchmarks/ is sys.path[0] when it runs)
    print(json.dumps({**stamp(__file__, device), **figures}))

stamp(__file__, device) -> {"benchmark": the script's name, "machine": the GPU's name for a CUDA device, else the
CPU's model, its cores and its native bf16 units ("AMD EPYC, 2 cores, avx512_bf16"), "load": the 1-minute load
average when the figures were taken (a shared machine's figures are upper bounds on its time, lower bounds on its
speed), "torch": the version, "date": the UTC date (ISO), "command": the command line, with the PICOCHAT_* settings
that change what runs, as they were when the script started (PICOCHAT_BASE_DIR is left out: a path of one machine)}.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# read at import, before a script sets any itself (train.py sets PICOCHAT_DTYPE per measurement, sandbox.py
# PICOCHAT_SANDBOX per mode)
SETTINGS = {k: v for k, v in os.environ.items() if k.startswith("PICOCHAT_") and k != "PICOCHAT_BASE_DIR"}


def machine(device: torch.device | str = "cpu") -> str:
    """The GPU's name on CUDA; else the CPU model, the cores this process may use and its native bf16 units."""
    from picochat.common import _cpu_flags
    from picochat.report.collect import cpu_model

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    units = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"}) or ["no native bf16"]
    return f"{cpu_model()}, {cores} cores, {'+'.join(units)}"


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line of `script` (a benchmark's __file__) with `argv` (default: this process's arguments), as one
    could type it in the repo's root."""
    path = Path(script).resolve()
    try:
        path = path.relative_to(REPO)
    except ValueError:
        pass
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(SETTINGS.items())]
    return " ".join([*env, "python", str(path), *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def stamp(script: str, device: torch.device | str = "cpu", argv: list[str] | None = None) -> dict:
    """The fields a benchmark's JSON line starts with (see the module's doc); `script` is the benchmark's __file__."""
    return {"benchmark": Path(script).stem, "machine": machine(device),
            "load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": command(script, argv)}
