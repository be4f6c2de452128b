"""Before pretraining starts: the largest micro-batch that fits the device (`--device-batch-size auto`), and the
expected wall time and cost of the run from its FLOPs.

    from picochat.train.autobatch import auto_device_batch_size, describe_expected, resolve_device_batch_size
    B = auto_device_batch_size(model, start=32, seq_len=2048, total_batch_size=524288, world_size=8, device=dev,
                               autocast=lambda: autocast_ctx(dev, dtype))
    B = resolve_device_batch_size(cfg, model, T, world_size, dev, autocast, checkpoint)  # cfg's int or "auto"
    print0(describe_expected(flops_per_token, num_steps * total_batch_size, peak, world_size, dev.type, gpu_name))

On CUDA the probe runs one forward + backward at each candidate size, largest first, and keeps the first that
neither runs out of memory nor leaves less than the optimizer state and a margin free; on CPU (and MPS) it returns
`start` unchanged: host memory is rarely what limits a micro-batch there, and running out of it swaps or kills the
process instead of raising an error one can catch. A sharded (--fsdp) model is not probed either: a rank that runs
out of memory inside an all-gather would leave its peers waiting.

`picochat pretrain --device-batch-size auto` (the GPU presets' default) resolves the size with
resolve_device_batch_size and records the number in the run config of every checkpoint, so a resumed run and the
chat stages (which inherit device_batch_size from their parent) use that number, not "auto".
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch

# The fraction of the card a probe's peak (plus the optimizer state it cannot see) may use. The rest is for what a
# single eager probe does not show: the caching allocator's fragmentation over a long run, and the compiled graph's
# different temporaries. A guess, not a measurement (no GPU session has tried it yet).
MEMORY_MARGIN = 0.90

# Model FLOPs utilisation assumed for the time estimate, per device type: 20% is what depth-12 bf16 training reached
# on an H200 (README: Measured, GPU table) and what the CPU preset reached in bf16 on the 2-core Zen 5 (README:
# Quickstart); a run prints its measured MFU as it trains.
ASSUMED_MFU = {"cuda": 0.20, "cpu": 0.20, "mps": 0.20}


def candidate_sizes(start: int, seq_len: int, total_batch_size: int, world_size: int = 1) -> list[int]:
    """Micro-batch sizes to try, largest first: start doubled while the step's tokens still hold a whole number of
    micro-batches on every rank, then start halved down to 1. Every size divides the step (gradient accumulation
    needs total_batch_size = B x seq_len x world_size x accum)."""
    if start < 1:
        raise ValueError(f"start must be >= 1, got {start}")

    def divides(b: int) -> bool:
        per = b * seq_len * world_size
        return per <= total_batch_size and total_batch_size % per == 0

    up, b = [], start * 2
    while divides(b):
        up.append(b)
        b *= 2
    down, b = [], start
    while b >= 1:
        if divides(b):
            down.append(b)
        b //= 2
    return up[::-1] + down


def largest_that_fits(sizes: list[int], fits: Callable[[int], bool]) -> int | None:
    """The first of `sizes` (largest first) for which `fits(size)`; None when none does."""
    return next((b for b in sizes if fits(b)), None)


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """An upper bound on the optimizer state the first step allocates: two fp32 moments per parameter (AdamW's; Muon
    keeps one momentum buffer for its matrices, so this over-counts them)."""
    return sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)


def _cuda_fits(model: torch.nn.Module, batch: int, seq_len: int, device: torch.device,
               autocast: Callable[[], ContextManager], reserve_bytes: int) -> bool:
    """One forward + backward at `batch` rows; True when it ran and its peak plus `reserve_bytes` stays within
    MEMORY_MARGIN of the card. Gradients are dropped and the cache emptied either way."""
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: the run's RNG stream is not consumed
    vocab = model.config.vocab_size
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x = torch.randint(0, vocab, (batch, seq_len + 1), device=device, generator=g)
        with autocast():
            loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        ok = True
    except torch.OutOfMemoryError:
        peak, ok = 0, False
    finally:
        x = loss = None  # noqa: F841 (frees the activations before emptying the cache)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    return ok and peak + reserve_bytes <= MEMORY_MARGIN * total


def auto_device_batch_size(model: torch.nn.Module, start: int, seq_len: int, total_batch_size: int,
                           world_size: int, device: torch.device, autocast: Callable[[], ContextManager],
                           reserve_bytes: int | None = None) -> int:
    """The micro-batch for `--device-batch-size auto`: on CUDA the largest of candidate_sizes(start, ...) whose
    forward + backward fits (every rank probes; the smallest answer wins, so the ranks agree), on other devices
    and for an --fsdp model `start`. `reserve_bytes` defaults to optimizer_state_bytes(model). Call it before the
    first optimizer step."""
    from picochat.common import UserError, is_fsdp, print0

    if device.type != "cuda":
        print0(f"device batch size auto: {start} (--auto-batch-start; no memory probe on {device.type})")
        return start
    if is_fsdp(model):
        print0(f"device batch size auto: {start} (--auto-batch-start; no memory probe of a sharded --fsdp model)")
        return start
    reserve = optimizer_state_bytes(model) if reserve_bytes is None else reserve_bytes
    sizes = candidate_sizes(start, seq_len, total_batch_size, world_size)
    was_training = model.training
    model.train()

    def fits(b: int) -> bool:
        ok = torch.tensor(int(_cuda_fits(model, b, seq_len, device, autocast, reserve)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)  # every rank tries the same sizes
        return bool(ok.item())

    chosen = largest_that_fits(sizes, fits)
    model.train(was_training)
    if chosen is None:
        raise UserError(f"not even one sequence of {seq_len} tokens fits a forward + backward on {device}; use a "
                        f"smaller --depth or --max-seq-len, or --fsdp")
    print0(f"device batch size auto: {chosen} (tried {', '.join(map(str, sizes[:sizes.index(chosen) + 1]))}; "
           f"{reserve / 2**30:.1f} GiB kept for the optimizer state, {MEMORY_MARGIN:.0%} of the card at most)")
    return chosen


def resolve_device_batch_size(cfg, model: torch.nn.Module, seq_len: int, world_size: int, device: torch.device,
                              autocast: Callable[[], ContextManager], checkpoint: dict | None = None) -> int:
    """The number behind `cfg.device_batch_size` (a PretrainConfig: an int, or "auto" with cfg.auto_batch_start).
    A resumed run keeps the number its checkpoint's run config recorded: its loader state was written at that size,
    and a probe on a card that is busier now could pick another."""
    from picochat.common import UserError, print0

    b = cfg.device_batch_size
    if b != "auto":
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise UserError(f"device_batch_size must be a number >= 1 or 'auto', got {b!r}")
        return b
    saved = ((checkpoint or {}).get("meta") or {}).get("run_config", {}).get("device_batch_size")
    if isinstance(saved, int) and not isinstance(saved, bool):
        print0(f"device batch size auto: {saved} (the resumed checkpoint's)")
        return saved
    return auto_device_batch_size(model, cfg.auto_batch_start, seq_len, cfg.total_batch_size, world_size, device,
                                  autocast)


def expected_time_cost(flops_per_token: float, tokens: float, peak_flops: float, devices: int, mfu: float,
                       usd_per_device_hour: float | None) -> tuple[float, float | None]:
    """(seconds, USD or None): the run's FLOPs over the devices' peak at `mfu` utilisation."""
    seconds = flops_per_token * tokens / (peak_flops * devices * mfu)
    usd = None if usd_per_device_hour is None else seconds / 3600 * devices * usd_per_device_hour
    return seconds, usd


def describe_expected(flops_per_token: float, tokens: float, peak_flops: float, devices: int, device_type: str,
                      gpu_name: str | None = None, mfu: float | None = None,
                      usd_per_device_hour: float | None = None) -> str:
    """The line printed before training: expected time and cost. The price defaults to the report's built-in one
    for the GPU kind (report.render.gpu_price; 0 on CPU)."""
    from picochat.report.render import fmt_time, gpu_price

    mfu = ASSUMED_MFU.get(device_type, 0.2) if mfu is None else mfu
    price = usd_per_device_hour if usd_per_device_hour is not None else gpu_price(gpu_name)
    seconds, usd = expected_time_cost(flops_per_token, tokens, peak_flops, devices, mfu, price)
    where = f"{devices} x {gpu_name}" if gpu_name else f"{devices} x {device_type}"
    cost = ("no cost estimate (no built-in price for this GPU)" if usd is None
            else f"~${usd:,.2f} at ${price:g} per device-hour")
    return (f"expected: {flops_per_token * tokens:.3g} FLOPs ({flops_per_token:.3g}/token x {tokens:.3g} tokens) on "
            f"{where} at {peak_flops / 1e12:.3g} TFLOP/s peak each and {mfu:.0%} MFU: {fmt_time(seconds)}, {cost}")
