"""Learning-rate and momentum schedules, as pure functions of training progress.

Progress is a number in [0, 1]: steps done / total steps, or, under a wall-clock budget, the larger of that and
elapsed / budget, so a run that is slower than planned still reaches its warmdown instead of being cut off at
full LR (the warmdown is where most of the final loss improvement comes from).
"""

from __future__ import annotations

import math


def lr_factor(step: int, progress: float, *, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float,
              schedule: str = "trapezoid") -> float:
    """Multiplier on each group's initial LR."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":  # as in GPT-2/3: cosine from the peak to final_lr_frac over the whole run
        return final_lr_frac + (1 - final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule != "trapezoid":
        raise ValueError(f"unknown schedule {schedule!r}")
    if warmdown_ratio <= 0 or progress < 1 - warmdown_ratio:
        return 1.0
    frac = (1 - progress) / warmdown_ratio  # 1 at the start of the warmdown, 0 at the end
    return final_lr_frac + (1 - final_lr_frac) * frac


def muon_momentum(step: int, warmup: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum warms up from 0.85 to 0.95 over the first 300 steps: high momentum early amplifies the noisy
    first gradients (value used by the Muon speedrun records)."""
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return start + (end - start) * frac


def set_rates(optimizer, step: int, progress: float, cfg) -> float:
    """This step's LR on every param group (initial LR x `lr_factor`) and Muon's momentum; returns the factor. One
    place for the supervised loop and RL, so both follow the same schedule flags (cfg: a TrainConfig)."""
    lrf = lr_factor(step, progress, warmup_steps=cfg.warmup_steps, warmdown_ratio=cfg.warmdown_ratio,
                    final_lr_frac=cfg.final_lr_frac, schedule=cfg.schedule)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lrf
        if g.get("kind") == "muon":
            g["momentum"] = muon_momentum(step, end=g["initial_momentum"])
    return lrf
