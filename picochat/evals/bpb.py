"""Bits per byte: the tokenizer-independent validation loss, used during training and by `picochat eval`.

bpb = (sum of per-token losses in nats) / (ln 2 * sum of the UTF-8 bytes those target tokens decode to).
Special tokens (0 bytes) and ignored targets (-1) are excluded from both sums, so models with different vocabularies
are comparable.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor, autocast=None) -> float:
    """Averages over `steps` batches from `next_batch` on this rank, summed across ranks when distributed."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for _ in range(steps):
        x, y = next_batch()
        if autocast is not None:
            with autocast():
                loss = model(x, targets=y, loss_reduction="none")  # (B, T) nats, 0 where y == -1
        else:
            loss = model(x, targets=y, loss_reduction="none")
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)  # (B, T) bytes per target
        nats += (loss.double() * (b > 0)).sum()
        nbytes += b.sum()
    if dist.is_available() and dist.is_initialized():
        both = torch.stack([nats, nbytes])
        dist.all_reduce(both)
        nats, nbytes = both[0], both[1]
    model.train(was_training)
    return float(nats / (math.log(2) * nbytes.clamp(min=1)))
