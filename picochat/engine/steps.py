"""The decode step behind one interface, chosen once when the Engine is built (`make_decode_step`):

    step(tokens (n,), cache, positions [n], temperature (n,), u (n,)) -> (logits (n, V), sampled (n,) or None)

for the live rows 0..n-1 of the cache, each at its own position; it writes their new k, v into the cache.
- `EagerStep`: the model's forward; returns no sample (the batch samples the logits).
- `CompiledStep`: forward + temperature sampling as one inductor graph, dynamic in batch and kv length: two graphs
  (batch 1, batch >= 2) serve every mix of requests. On CPU the batch-1 graph is usually built ahead of time as one
  C++ library (engine/aot.py).
- `GraphedSteps` (engine/graphs.py): either of them replayed as CUDA graphs.
Each also has `run(tokens (n, 1), pos (n,), ks, vs, temperature, u, batched)`, the step on explicit per-layer cache
slices (what a CUDA graph captures), and `warmup(cache, max_batch)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape, patched when compiling)

from picochat.common import autocast_ctx, pick_dtype
from picochat.engine.cache import KVCache, StepView
from picochat.engine.sampling import sample_plain

StepOut = tuple[torch.Tensor, "torch.Tensor | None"]


class DecodeStep(Protocol):
    def __call__(self, tokens: torch.Tensor, cache: KVCache, positions: list[int], temperature: torch.Tensor,
                 u: torch.Tensor) -> StepOut: ...

    def run(self, tokens: torch.Tensor, pos: torch.Tensor, ks: list, vs: list, temperature: torch.Tensor,
            u: torch.Tensor, batched: bool) -> tuple[torch.Tensor, torch.Tensor]: ...

    def warmup(self, cache: KVCache, max_batch: int) -> None: ...


def decode_step_body(model, tokens: torch.Tensor, pos: torch.Tensor, ks: list, vs: list, device_type: str,
                     dtype: torch.dtype, temperature: torch.Tensor, u: torch.Tensor):
    """The body torch.compile sees: tokens (B, 1), pos (B,) -> last logits (B, V) and a temperature sample of them
    (B,) (sampling in the graph saves ~10 small eager ops per step); writes the new k, v into ks, vs."""
    # no autocast cache: a captured CUDA graph of the eager step must cast the weights inside the graph (a compiled
    # step casts them once at freezing either way)
    with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
        logits = model(tokens, kv_cache=StepView(ks, vs, pos))[:, -1]
    return logits, sample_plain(logits, temperature, u)


def with_weights(model, weights: dict) -> Callable:
    """`model` as a callable that reads `weights` (name -> tensor, e.g. bf16 copies of the linear weights) in place of
    its own parameters of those names; the model itself when `weights` is empty."""
    if not weights:
        return model
    return lambda x, **kw: torch.func.functional_call(model, weights, (x,), kw)


def step_slices(cache: KVCache, n: int, S: int) -> tuple[list, list]:
    """Per layer (n, S, Hkv, D) views of rows 0..n-1 and positions 0..S-1."""
    return [k[:n, :S] for k in cache.k_layers], [v[:n, :S] for v in cache.v_layers]


class EagerStep:
    def __init__(self, model, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, tokens, cache, positions, temperature, u) -> StepOut:
        n = tokens.size(0)
        with autocast_ctx(self.device, self.dtype):
            logits = self.model(tokens[:, None], kv_cache=cache.view(slice(0, n), positions))
        return logits[:, -1], None

    def run(self, tokens, pos, ks, vs, temperature, u, batched):
        return decode_step_body(self.model, tokens, pos, ks, vs, self.device.type, self.dtype, temperature, u)

    def warmup(self, cache, max_batch) -> None:
        pass


class CompiledStep:
    """The step as torch.compile graphs (see the module docstring). `freezing` bakes the weights in, so a compiled
    step is for a model that no longer trains (the Engine checks). `aot_batch1`: build the batch-1 graph ahead of
    time (engine/aot.py) instead, where it uses inductor's C++ GEMVs (`autotune_batch1`)."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, cast_weights: dict, context: int):
        self.model, self.device, self.dtype, self.context = model, device, dtype, context
        self.cast_weights = cast_weights
        self.fn = torch.compile(decode_step_body, fullgraph=True)
        self.compiled: set[bool] = set()  # graph kinds compiled so far (False: batch 1, True: batch >= 2)
        weight_bytes = sum(w.numel() for w in linear_weights(model).values()) * torch.finfo(dtype).bits // 8
        self.autotune = autotune_batch1(device, dtype, weight_bytes, last_level_cache_bytes())
        self.aot_batch1 = self.autotune
        self.aot: Callable | None = None  # the built batch-1 library, once used

    def __call__(self, tokens, cache, positions, temperature, u) -> StepOut:
        n = tokens.size(0)
        ks, vs = step_slices(cache, n, max(positions) + 1)
        # dynamo guards on the inputs' dispatch keys, so every input is an inference tensor: caches come from
        # Engine.new_cache, and the callers (Batch, warmup) build the rest in inference mode
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.run(tokens[:, None], pos, ks, vs, temperature, u, n > 1)  # (n,) -> (n, 1): one token per row

    def run(self, tokens, pos, ks, vs, temperature, u, batched):
        """The graph for batch >= 2 when `batched`, else batch 1 (its GEMV kernels differ from the small-batch
        GEMMs)."""
        args = (self.model, tokens, pos, ks, vs, self.device.type, self.dtype, temperature, u)
        if not batched and self.aot_batch1:
            if self.aot is None:
                from picochat.engine.aot import build_batch1

                opts = compile_options(self.device, True, self.autotune)
                self.aot = build_batch1(self.model, self.dtype, self.cast_weights, self.context, opts,
                                        (tokens, pos, ks, vs, temperature, u))
            return self.aot(tokens, pos, ks, vs, temperature, u)
        if batched in self.compiled:
            return self.fn(*args)
        # first call of this kind: mark the dynamic dims and compile with our inductor options. Later calls skip both
        # (~70 us a step): the compiled graph's guards accept any batch >= 2 and any kv length by themselves.
        for t in ks + vs:
            torch._dynamo.mark_dynamic(t, 1)
        for t in (ks + vs + [pos, tokens, temperature, u]) if batched else ():
            torch._dynamo.mark_dynamic(t, 0)
        # no duck sizing: with a 1-row cache a layer's storage offset equals the row stride, and dynamo would tie the
        # two (a later cache with more rows then recompiled the batch-1 graph at the server's first request)
        with torch._inductor.config.patch(compile_options(self.device, not batched, self.autotune)), \
                torch.fx.experimental._config.patch(use_duck_shape=False):
            out = self.fn(*args)
        self.compiled.add(batched)
        return out

    def warmup(self, cache: KVCache, max_batch: int) -> None:
        for n in (1, 2) if max_batch > 1 else (1,):
            z = torch.zeros(n, device=self.device)
            self(torch.zeros(n, dtype=torch.long, device=self.device), cache, [1] * n, z + 1, z)


def make_decode_step(model, device: torch.device, dtype: torch.dtype, compile: bool, cuda_graphs: bool,
                     cast_weights: dict, context: int) -> DecodeStep:
    step = CompiledStep(model, device, dtype, cast_weights, context) if compile else EagerStep(model, device, dtype)
    if cuda_graphs:
        from picochat.engine.graphs import GraphedSteps

        return GraphedSteps(step, device, context)
    return step


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def inference_dtype(device: torch.device, compile: bool) -> torch.dtype:
    """The engine's compute dtype: bf16 on CUDA (sm80+); on CPU bf16 only for a compiled step on a CPU with native
    bf16, fp32 otherwise. Why: eager autocast re-casts every weight at every decode step, while a compiled, frozen
    step casts them once (measured: see the README, "Compiled decode step")."""
    if device.type == "cpu" and not compile:
        return torch.float32
    return pick_dtype(device, "auto")


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), 0 when unknown."""
    sizes = [0]
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1:] in ("K", "M"):
            sizes.append(int(text[:-1]) * (1024 if text[-1] == "K" else 1024**2))
    return max(sizes)


def autotune_batch1(device: torch.device, dtype: torch.dtype, weight_bytes: int, cache_bytes: int) -> bool:
    """Whether the batch-1 graph lets `max_autotune` pick inductor's C++ GEMV kernels over oneDNN/MKL. The autotuner
    times each GEMM alone, its weights in cache, and there the C++ kernel wins; in a real step the weights come from
    memory unless the whole model fits in cache. In fp32 the C++ GEMV wins either way; in bf16 it streams memory
    ~3x slower than oneDNN, so there only when the weights fit in half the last-level cache (figures: README)."""
    if device.type != "cpu":
        return False
    return dtype == torch.float32 or weight_bytes <= cache_bytes // 2


def compile_options(device: torch.device, batch1: bool, autotune: bool = True) -> dict:
    """Inductor settings for the compiled decode step. `freezing` folds the weights in as constants, which lets
    inductor pre-pack them for oneDNN/MKL and cast them once under bf16. At batch 1 on CPU `max_autotune` (when
    `autotune`, see `autotune_batch1`) also tries its own C++ GEMM kernels, whose GEMVs stream fp32 weights several
    times faster than aten's, for ~15 s of autotuning. Not for batch >= 2: with a dynamic batch size its C++ GEMM ran
    slower than oneDNN. `cpp.enable_concat_linear` (needs freezing) merges the q, k and v projections, which read
    the same input, into one GEMM: one oneDNN call per layer instead of three (figures: README)."""
    opts = {"freezing": True, "cpp.enable_concat_linear": True}
    if device.type == "cpu" and batch1 and autotune:
        opts |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    return opts
