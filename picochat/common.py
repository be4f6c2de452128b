"""Shared plumbing: device and dtype choice, distributed setup, rank-0 printing, base dir, seeding, JSONL metrics.

Nothing here runs on import. Every stage calls `setup_runtime()` once at the start of its main() and
`teardown_runtime()` at the end; under `torchrun` that joins the process group from the environment
(NCCL on CUDA, gloo on CPU), otherwise it is a single process. On an exception a stage calls `fail_runtime(e)`
instead: an orderly teardown waits in a barrier for every rank, and a rank that failed (or a peer blocked in a
collective the failed rank never joins) never arrives, so both would hang until the NCCL timeout.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input (flag, file, checkpoint, request): printed as one line, no traceback."""


_REPORTED = "_picochat_reported"  # set on an exception fail_runtime() already printed, so run_main prints it once
# teardown's store handshake normally takes milliseconds after its barrier; 60 s means a rank is gone
TEARDOWN_WAIT_S = 60


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (RANK from torchrun's environment), flushed so progress shows under pipes."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def get_base_dir() -> Path:
    """Where tokenizers, corpora and checkpoints live: $PICOCHAT_BASE_DIR, else ~/.cache/picochat."""
    env = os.environ.get("PICOCHAT_BASE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "picochat"
    base.mkdir(parents=True, exist_ok=True)
    return base


def seed_all(seed: int) -> None:
    """Python's, numpy's and torch's generators (torch.manual_seed seeds every CUDA device too)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must not be the thing that breaks
        pass


# ---------------------------------------------------------------------------------------------------------------------
# device and dtype


def autodetect_device(requested: str = "auto") -> torch.device:
    """CUDA > MPS > CPU unless `requested` names one ('cpu', 'cuda', 'cuda:1', 'mps')."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@lru_cache(maxsize=None)
def measure_matmul_flops(dtype_name: str = "float32", device_type: str = "cpu", n: int = 0,
                         min_seconds: float = 0.25) -> float:
    """Measured dense matmul throughput in FLOP/s (the 'peak' MFU is quoted against): the best single timing of a
    square product, over several sizes (n = 0) or size n, each timed for `min_seconds` after a warm-up as long.

    Sizes: 256-1024 on CPU, 4096 and 8192 on GPUs (a small product cannot fill an H100). On CPU each of the run's
    threads times its own single-threaded products, all at once, and their rates are summed: the cores' combined
    peak at the clocks they run together. Why not one multi-threaded product: on a shared, oversubscribed 2-core VM
    a product that needs both cores at once is preempted part-way in nearly every try (1536 fp32 products read 28-32
    GFLOP/s for whole seconds, 512 ones 6-170 from one quarter second to the next), while one core's product fits
    between preemptions. The warm-up is there because vector and matrix units start slow: on a Xeon with AMX the
    old probe (one size, 1536, one untimed product, then 0.3 s) read 700 and 2,178 GFLOP/s bf16 in two runs."""
    dtype = getattr(torch, dtype_name)
    dev = torch.device(device_type)
    if n:
        sizes = [n]
    elif dtype == torch.bfloat16 and dev.type == "cpu" and not (_cpu_flags() & {"avx512_bf16", "amx_bf16"}):
        sizes = [256]  # emulated bf16 runs ~100x slower: a small product is enough to show that
    else:
        sizes = [4096, 8192] if dev.type == "cuda" else [256, 512, 1024]
    if dev.type != "cpu":
        return _best_matmul_rate(dtype, dev, sizes, min_seconds)
    threads = torch.get_num_threads()
    rates = [0.0] * threads

    def one_core(i: int) -> None:
        # set here, not only by the caller: OpenMP's thread count is per calling thread, and a new thread's default
        # is every core (MKL's fp32 products in a worker ran a team of 2 on 2 cores, 2 workers oversubscribing them)
        torch.set_num_threads(1)
        rates[i] = _best_matmul_rate(dtype, dev, sizes, min_seconds)

    workers = [threading.Thread(target=one_core, args=(i,)) for i in range(threads)]
    try:
        for w in workers:  # matmul releases the GIL, so the workers' products run at the same time
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(threads)  # the workers' calls set the process-wide count too
    return sum(rates)


def _best_matmul_rate(dtype: torch.dtype, dev: torch.device, sizes: list[int], seconds: float) -> float:
    """The best FLOP/s of one k×k×k product over `sizes`, each timed for `seconds`; the first size twice as long,
    the first half being the warm-up (clocks, caches, matrix units)."""
    best = 0.0
    for i, k in enumerate(sizes):
        a = torch.randn(k, k, device=dev).to(dtype)
        b = torch.randn(k, k, device=dev).to(dtype)
        a @ b  # the first product of a shape picks (oneDNN: compiles) and packs its kernel
        _sync(dev)
        end = time.perf_counter() + seconds * (2 if i == 0 else 1)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            _sync(dev)
            best = max(best, 2 * k**3 / (time.perf_counter() - t0))
    return best


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The compute dtype for autocast: bf16 where the hardware runs it fast, fp32 otherwise.

    On CPUs this is decided by the hardware, not assumed: CPUs here differ by ~400× in bf16 matmul speed (a Zen 5 ran
    bf16 at 907 GFLOP/s vs 213 fp32; an AVX2-only one ran bf16 ~100× slower than fp32). With the avx512_bf16/amx_bf16
    flags we still confirm with a 0.1 s measurement. Override with `requested` or $PICOCHAT_DTYPE.
    """
    requested = os.environ.get("PICOCHAT_DTYPE", requested) or "auto"
    if requested != "auto":
        table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if requested not in table:
            raise UserError(f"dtype '{requested}' is not one of auto, fp32, bf16")
        return table[requested]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float32
    if device.type == "cpu":
        flags = _cpu_flags()
        if flags & {"avx512_bf16", "amx_bf16"}:
            fast = measure_matmul_flops("bfloat16", "cpu", 512, min_seconds=0.1) > 1.5 * measure_matmul_flops(
                "float32", "cpu", 512, min_seconds=0.1)
            return torch.bfloat16 if fast else torch.float32
        return torch.float32
    return torch.float32


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    """Autocast for bf16, a no-op context for fp32 (so the same training code serves both)."""
    if dtype == torch.float32:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# distributed


@dataclass
class Runtime:
    """What a stage needs to know about where it runs. rank/world_size are 0/1 outside torchrun."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


# cuBLAS picks a reduction split per call from its workspace unless the workspace is fixed (CUDA docs, "cuBLAS:
# Results reproducibility"); ":4096:8" (8 buffers of 4 MB) is the setting PyTorch's reproducibility notes give
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def set_deterministic(enabled: bool = True) -> None:
    """Process-wide reproducibility for `--deterministic` (False restores torch's defaults, for A/B runs and tests):
    only deterministic kernels (an op without one raises, naming itself), uninitialised memory filled (torch.empty
    gives NaN, so a read of it shows instead of varying), cuDNN's autotuner off, inductor's numerics-changing
    benchmarks off (compiled graphs stay reproducible), and the cuBLAS workspace fixed. On, it stays on until the
    process ends (a pipeline's later stages inherit it). The seeds are `seed_all`'s; PYTHONHASHSEED (str hashes, set
    order) can only be set before Python starts."""
    import torch._inductor.config as inductor_config

    if enabled:  # read by cuBLAS when it creates its handle (a device's first matmul): set before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False  # torch's default too: autotuning picks kernels by timing
    inductor_config.deterministic = enabled


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 0, deterministic: bool = False) -> Runtime:
    """Pick device/dtype and join torchrun's process group when WORLD_SIZE > 1; `deterministic` turns on
    `set_deterministic()` first (False leaves the process's setting as it is)."""
    if deterministic:
        set_deterministic(True)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = autodetect_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    seed_all(seed + rank)
    return Runtime(device=dev, dtype=pick_dtype(dev, dtype), rank=rank, local_rank=local_rank, world_size=world_size)


def is_fsdp(module: torch.nn.Module) -> bool:
    """True when `module` was wrapped with FSDP2 `fully_shard` (its parameters are sharded DTensors): then every rank
    must join each forward pass and each full state-dict gather, because both all-gather the shards."""
    if not dist.is_available():  # builds without torch.distributed have no FSDP either
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fail_runtime(error: BaseException) -> None:
    """The failure path under torchrun: print `error` to stderr with this rank first (a rank's message must not wait
    on the other ranks), then abort the process group without a barrier and return; the caller re-raises and
    `run_main` exits non-zero. Peers blocked in a collective with this rank get a connection error within about a
    second (gloo: "Connection closed by peer") and fail the same way. A no-op outside a process group, so a stage can
    call it from its `except` unconditionally; `teardown_runtime` after it does nothing."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    where = f"rank {dist.get_rank()} of {dist.get_world_size()}"
    if isinstance(error, UserError):
        print(f"picochat: error ({where}): {error}", file=sys.stderr, flush=True)
    elif isinstance(error, Exception):  # KeyboardInterrupt/SystemExit: nothing to report, only leave quickly
        text = "".join(traceback.format_exception(error))
        print(f"picochat: error ({where}):\n{text}", file=sys.stderr, end="", flush=True)
    setattr(error, _REPORTED, True)
    try:
        # abort, not destroy: destroy_process_group waits for work in flight on NCCL; torch marks this API private
        # and NCCL-only, yet on gloo it aborts too (torch 2.13)
        dist.distributed_c10d._abort_process_group()
    except (AttributeError, RuntimeError, ValueError):
        dist.destroy_process_group()


@contextmanager
def runtime(device: str = "auto", dtype: str = "auto", seed: int = 0, deterministic: bool = False) -> Iterator[Runtime]:
    """`with runtime(...) as rt:` around a stage's body: setup_runtime, then on any error `fail_runtime` (print it
    with the rank, abort the group: a barrier would hang) and re-raise, else `teardown_runtime`. The one shape of
    every command that may run under torchrun."""
    rt = setup_runtime(device, dtype, seed, deterministic=deterministic)
    try:
        yield rt
    except BaseException as e:
        fail_runtime(e)
        raise
    finally:
        teardown_runtime()  # a no-op after fail_runtime


def teardown_runtime() -> None:
    """The success path: settle the collectives, then leave the process group (every rank must call it)."""
    if dist.is_available() and dist.is_initialized():
        # gloo aborts the process ("terminate called without an active exception") when one rank tears down while
        # a peer is still talking to it (gloo issue 155: a barrier followed by teardown can still do it; it happened
        # once in this project's CI). So: the barrier settles the collectives; then, over the store (its own
        # connection), every rank announces it has left the barrier and waits for the others; rank 0, which hosts
        # the store, destroys last, after every other rank's final store call.
        dist.barrier()
        store, n, rank = dist.distributed_c10d._get_default_store(), dist.get_world_size(), dist.get_rank()
        deadline = time.monotonic() + TEARDOWN_WAIT_S

        def wait_for(key: str, count: int) -> None:
            while store.add(key, 0) < count:
                if time.monotonic() > deadline:  # a peer died after the barrier: leave rather than spin forever
                    print(f"picochat: warning (rank {rank} of {n}): teardown: only {store.add(key, 0)} of {count} "
                          f"ranks reached {key!r} within {TEARDOWN_WAIT_S} s; leaving without them",
                          file=sys.stderr, flush=True)
                    return
                time.sleep(0.005)

        store.add("picochat/teardown/left_barrier", 1)
        wait_for("picochat/teardown/left_barrier", n)
        if rank != 0:
            store.add("picochat/teardown/done", 1)  # this rank's last use of the store
        else:
            wait_for("picochat/teardown/done", n - 1)
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# metrics


class MetricsLogger:
    """Append-only JSONL file: one object per line, flushed per write, so tools can tail it during a run.

    Only rank 0 writes (other ranks get a logger whose log() does nothing). Every record gets `time` (unix seconds).
    """

    def __init__(self, path: str | Path | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is not None and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        if self._f is None:
            return
        rec = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(rec, default=_json_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_main(fn, argv=None) -> int:
    """Run a stage's body, turning UserError into one clear line on stderr and exit status 2; an error that
    `fail_runtime` already printed (with its rank) exits 2 or 1 without printing it again."""
    try:
        fn(argv)
        return 0
    except UserError as e:
        if not getattr(e, _REPORTED, False):
            print(f"picochat: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if getattr(e, _REPORTED, False):
            return 1
        raise
