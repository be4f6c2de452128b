"""The inference engine: KV cache, prefill/decode, sampling, tool use, streaming. The ONLY sampling code in picochat.

Everything that generates text goes through here: the chat CLI, the server (continuous batching: serve/scheduler.py),
training-time samples, evaluation and RL.

    engine = Engine(model, tokenizer, tool=make_tool("calculator"))
    for events in engine.generate(prompt_ids, num_samples=4, params=SamplingParams(temperature=0.8)):
        ...                                  # one Event per live row per step
    seqs, masks = engine.generate_batch(prompt_ids, num_samples=4)

How a request runs (the same code path for one call and for the server's batch):
1. prefill: the prompt is run ONCE at batch 1 straight into a free row of the preallocated cache; that row's cache
   is then copied into the other num_samples-1 rows (so N samples cost one prefill).
2. decode: all live rows advance one token per step (`decode_one_token`); each row has its own position, so rows of
   different requests (different prompt lengths) share a step. Finished rows leave between steps: the last live row is
   moved into the hole so live rows stay contiguous and the batch never computes dead rows.
   With compile=True the step (forward + temperature sampling) is one inductor graph, dynamic in batch and kv length
   (see `_decode_step`): two graphs, batch 1 and batch >= 2, serve every mix of requests. On CPU the batch-1 graph is
   usually built ahead of time as one C++ library instead (`_aot_step`); on CUDA the steps replay as CUDA graphs
   (`GraphedSteps`).
3. per row, after sampling: forced tokens (a tool's output block) override the sample; the python-block state machine
   collects code between <|python_start|> and <|python_end|>, runs the tool and queues
   <|output_start|> result <|output_end|> as forced tokens; a row completes on <|assistant_end|> or <|bos|>, a stop
   string, max_tokens or the context limit.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape, patched when compiling)

from picochat.common import UserError, _cpu_flags, autocast_ctx, get_base_dir, pick_dtype

# ---------------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values, (layers, batch, time, kv_heads, head_dim). Owned by the engine.

    The model sees a `CacheView` of some rows: `.pos` (int when the rows are aligned, else a (B,) int64 tensor of
    start positions), `.kv_len(T)` and `.layer(i) -> (k, v)` of shape (B, Tmax, Hkv, D). Attention writes the new
    entries in place; the engine advances positions after the forward pass.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_head: int, head_dim: int, device, dtype):
        shape = (n_layers, batch, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once
        self.max_len = max_len

    def view(self, rows: slice, positions: list[int]) -> "CacheView":
        return CacheView(self.k[:, rows], self.v[:, rows], positions)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]


class CacheView:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: list[int]):
        self.k, self.v = k, v
        self._max = max(positions)
        if all(p == positions[0] for p in positions):
            self.pos: int | torch.Tensor = positions[0]
        else:
            self.pos = torch.tensor(positions, dtype=torch.long, device=k.device)

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def kv_len(self, T: int) -> int:
        return self._max + T


class StepView:
    """The compiled decode step's view of the cache: per-layer (B, S, Hkv, D) slices of the rows and of the first
    S = longest row's position + 1 entries, and a (B,) tensor of positions. S and B are dynamic dimensions of the
    compiled graph, so one graph serves every step (a graph per kv length recompiled at every token, measured 144 tok/s).
    Per-layer inputs rather than one (L, B, S, ..) slice: writing into `k[i]` of a single input made the compiled
    graph copy the whole input back (an index_put into a view of an input); into an input itself it is done in place.
    """

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor], pos: torch.Tensor):
        self.ks, self.vs, self.pos = ks, vs, pos

    def layer(self, i: int):
        return self.ks[i], self.vs[i]

    def kv_len(self, T: int) -> int:
        return self.ks[0].size(1)


def _decode_step(model, tokens: torch.Tensor, pos: torch.Tensor, ks: list, vs: list, device_type: str,
                 dtype: torch.dtype, temperature: torch.Tensor, u: torch.Tensor):
    """The body torch.compile sees: tokens (B, 1), pos (B,) -> last logits (B, V) and a temperature sample of them
    (B,) (sampling in the graph saves ~10 small eager ops per step); writes the new k, v into ks, vs."""
    # no autocast cache: a captured CUDA graph of the eager step must cast the weights inside the graph (a compiled
    # step casts them once at freezing either way)
    with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
        logits = model(tokens, kv_cache=StepView(ks, vs, pos))[:, -1]
    return logits, sample_plain(logits, temperature, u)


def _with_weights(model, weights: dict) -> Callable:
    """`model` as a callable that reads `weights` (name -> tensor, e.g. bf16 copies of the linear weights) in place of
    its own parameters of those names; the model itself when `weights` is empty."""
    if not weights:
        return model
    return lambda x, **kw: torch.func.functional_call(model, weights, (x,), kw)


class _StepModule(torch.nn.Module):
    """`_decode_step` as a module (torch.export takes modules, not functions), reading `weights` in place of the
    model's own (see `_with_weights`)."""

    def __init__(self, model, device_type: str, dtype: torch.dtype, weights: dict):
        super().__init__()
        self.model, self.device_type, self.dtype, self.weights = model, device_type, dtype, weights

    def forward(self, tokens, pos, ks, vs, temperature, u):
        ks, vs = [k[None] for k in ks], [v[None] for v in vs]  # (S, Hkv, D) -> (1, S, Hkv, D), views
        model = _with_weights(self.model, self.weights)
        return _decode_step(model, tokens, pos, ks, vs, self.device_type, self.dtype, temperature, u)


def _aot_step(model, args: tuple, weights: dict, context: int, options: dict) -> Callable:
    """The batch-1 decode step built ahead of time with AOTInductor: torch.export, then inductor's C++ kernels AND its
    C++ wrapper in one shared library. Why, on CPU: the same kernels called through torch.compile pay its Python on
    every call (dynamo's frame and guards, the runtime wrappers, ~40 kernel calls and ~70 buffer allocations from
    Python): a depth-6 fp32 step took 1,340-1,350 us that way vs 1,042-1,070 us as one library call (same process,
    alternating runs; the same logits, bit for bit); depth 4 in bf16 (one thread) 404-431 vs 274-284 us.
    Only where the batch-1 graph uses inductor's own C++ GEMVs (`_autotune_batch1`): with oneDNN's kernels the
    exported graph ran slower (depth 6 bf16 1.75 vs 1.1 ms; batch 8 likewise, which is why batch >= 2 stays compiled).
    bf16 needs `weights`, the linear weights already cast (the engine's prefill copies): exported under autocast,
    the casts of the fp32 weights stayed in the graph, one per weight per step (4.7x slower).
    `args` are _decode_step's at batch 1 (example values); the kv length is the one dynamic dimension. The library
    takes each layer's cache row as (S, Hkv, D): with the batch dimension, exporting a bf16 step specialised on
    S * row size < the cache's row stride (a layout check in a dtype conversion), i.e. on S < the context.
    The library is kept in `aot_cache_dir()` under a key of everything it depends on (`_aot_key`), so the next engine
    over the same weights loads it in well under a second instead of rebuilding (12-42 s on 2 cores)."""
    _, x, pos, ks, vs, device_type, dtype, temperature, u = args
    folder = aot_cache_dir()
    path = folder / f"decode_batch1-{_aot_key(model, context, dtype, options)}.pt2" if folder else None
    if path is not None and path.exists():
        try:
            return _aot_runner(path)
        except Exception as exc:  # a truncated or foreign file: say so, drop it, build anew
            print(f"picochat: ignoring unreadable AOT cache entry {path.name} ({type(exc).__name__}); rebuilding",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
    S = torch.export.Dim("S", min=2, max=context)
    with torch.inference_mode(False), torch.no_grad(), tempfile.TemporaryDirectory(prefix="picochat-aot-") as tmp:
        example = (x.clone(), pos.clone(), [k[0].clone() for k in ks], [v[0].clone() for v in vs],
                   temperature.clone(), u.clone())
        dims = (None, None, [{0: S}] * len(ks), [{0: S}] * len(vs), None, None)
        program = torch.export.export(_StepModule(model, device_type, dtype, weights), example, dynamic_shapes=dims)
        built = torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/step.pt2",
                                                         inductor_configs=options)
        if path is None:
            return _aot_runner(Path(built))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(f".part{os.getpid()}")
            shutil.copyfile(built, part)
            os.replace(part, path)  # atomic: another process sees the whole file or none
        except OSError as exc:  # a read-only or full cache folder costs the next start a rebuild, nothing more
            print(f"picochat: could not keep the built decode step in {folder} ({exc.strerror or exc}); set "
                  f"PICOCHAT_AOT_CACHE to a writable folder, or to off", file=sys.stderr)
            return _aot_runner(Path(built))
    for old in sorted(folder.glob("decode_batch1-*.pt2"), key=lambda f: f.stat().st_mtime)[:-AOT_CACHE_KEEP]:
        old.unlink(missing_ok=True)  # keep the newest few: each holds a copy of its model's weights
    return _aot_runner(path)


AOT_CACHE_KEEP = 4


def aot_cache_dir() -> Path | None:
    """Where built decode libraries are kept: $PICOCHAT_AOT_CACHE ("off": nowhere, build every time), else
    <base dir>/aot."""
    env = os.environ.get("PICOCHAT_AOT_CACHE", "")
    if env.lower() == "off":
        return None
    return Path(env) if env else get_base_dir() / "aot"


def _aot_key(model, context: int, dtype: torch.dtype, options: dict) -> str:
    """A hash of what the library depends on: every weight's bytes, the dtype (the cast copies in `weights` follow
    from the two), the model's config, the inductor options, torch's version, the CPU (its kernels use its
    instruction set) and the thread count (the autotuner timed its kernel choices at it)."""
    h = hashlib.sha256()
    for value in (torch.__version__, platform.machine(), sorted(_cpu_flags()), torch.get_num_threads(), context,
                  str(dtype), sorted(options.items()), repr(model.config)):
        h.update(repr(value).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _aot_runner(path: Path) -> Callable:
    # the package's own __call__ re-parses its input/output tree specs from JSON and walks them at every call (~60 us
    # of a ~1 ms step at depth 6); the loader takes the flat list, in the tree's order, and returns [logits, sampled]
    run = torch._inductor.aoti_load_package(str(path)).loader.boxed_run

    def step(*args):
        _, x, pos, ks, vs, _, _, temperature, u = args
        # boxed: the call empties the list it is given; k[0]: the row of the (1, S, Hkv, D) slice
        logits, sampled = run([x, pos, *(k[0] for k in ks), *(v[0] for v in vs), temperature, u])
        return logits, sampled
    return step


def inference_dtype(device: torch.device, compile: bool) -> torch.dtype:
    """The engine's compute dtype: bf16 on CUDA (sm80+); on CPU bf16 only for a compiled step on a CPU with native
    bf16, fp32 otherwise. Why: eager autocast re-casts every weight at every decode step (a batch-1 server stream
    measured 203 tok/s in bf16 vs 707 in fp32 on a 2-core Zen 5), while a compiled, frozen step casts them once
    (d6 model: 16 samples 5,021-5,148 tok/s in bf16 vs 3,634-3,804 in fp32; batch 1 652-837 vs 693-900)."""
    if device.type == "cpu" and not compile:
        return torch.float32
    return pick_dtype(device, "auto")


def _last_level_cache_bytes() -> int:
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


def _autotune_batch1(device: torch.device, dtype: torch.dtype, weight_bytes: int, cache_bytes: int) -> bool:
    """Whether the batch-1 graph lets `max_autotune` pick inductor's C++ GEMV kernels over oneDNN/MKL. The autotuner
    times each GEMM alone, its weights in cache, and there the C++ kernel wins; in a real step the weights come from
    memory unless the whole model fits in cache. In fp32 the C++ GEMV wins either way (d6, 55 MB: the linears took
    0.63 ms/token vs 3.3 with aten). In bf16 it streams only ~13 GB/s per thread from memory, where oneDNN reaches
    ~36: at depth 6 (27 MB of bf16 weights, one thread) a batch-1 step took 2.5 ms with it vs 1.6 without (2 threads:
    684-785 vs 856-905 tok/s), while at depth 4 (10 MB, in cache) it won, 0.40 vs 0.60 ms. So in bf16 only when the
    weights fit in half the last-level cache (32 MB here)."""
    if device.type != "cpu":
        return False
    return dtype == torch.float32 or weight_bytes <= cache_bytes // 2


def _compile_options(device: torch.device, batch1: bool, autotune: bool = True) -> dict:
    """Inductor settings for the compiled decode step. `freezing` folds the weights in as constants, which lets
    inductor pre-pack them for oneDNN/MKL and cast them once under bf16. At batch 1 on CPU `max_autotune` (when
    `autotune`, see `_autotune_batch1`) also tries its own C++ GEMM kernels, whose GEMVs stream fp32 weights ~5x
    faster than aten's; the price is ~15 s of autotuning. Not for batch >= 2: with a dynamic batch
    size its C++ GEMM ran 2.6x slower than oneDNN (bf16, M=8). `cpp.enable_concat_linear` (needs freezing) merges
    the q, k and v projections, which read the same input, into one GEMM: one oneDNN call per layer instead of three
    (~20 us each at M=8); a depth-4 step at batch 8 went 1.23 -> 1.04 ms, batch 1 unchanged."""
    opts = {"freezing": True, "cpp.enable_concat_linear": True}
    if device.type == "cpu" and batch1 and autotune:
        opts |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    return opts


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs of the decode step


def _bucket(n: int, limit: int) -> int:
    """The batch a graph is captured at: the smallest power of two >= n, at most `limit` (the cache's rows)."""
    return min(1 << (n - 1).bit_length(), limit)


def cuda_graph(fn: Callable[[], tuple], pool) -> tuple[Callable[[], None], tuple]:
    """Capture `fn` (no arguments: it reads and writes fixed tensors) as a CUDA graph -> (replay, outputs). The
    warm-up calls run it for real, off the capture stream (compiling, cuBLAS workspaces), as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


@dataclass
class _Graph:
    tokens: torch.Tensor  # (nb, 1) int64  \
    pos: torch.Tensor  # (nb,) int64        | the inputs the graph reads: copied in before each replay
    temperature: torch.Tensor  # (nb,)     |
    u: torch.Tensor  # (nb,)                /
    replay: Callable[[], None]
    logits: torch.Tensor  # (nb, V), written by replay
    sampled: torch.Tensor  # (nb,)


class GraphedSteps:
    """The decode step as replays of CUDA graphs (Engine(cuda_graphs=True)): at batch 1 a decode step is a few hundred
    small kernels, and launching them one by one from Python costs more than running them; a replay launches all of
    them in one call.

    A graph has fixed shapes and addresses, so there is one per (batch bucket, kv-length bucket) of one cache, captured
    on first use: the live rows are padded to a power of two (padding rows feed token 0 at position 0 into free rows
    of the cache, which a prefill overwrites before they are used), and the attended cache length is rounded up to a
    multiple of `kv_step` (the padding positions are masked: every row attends only up to its own position). Fewer
    graphs than one per length, and at most `kv_step` - 1 masked positions read per row and layer.
    `capture(fn, pool)` is `cuda_graph`; a test passes one that re-runs fn eagerly to check the padding on CPU."""

    def __init__(self, engine: "Engine", capture=cuda_graph, kv_step: int = 256):
        self.e = engine
        self.capture = capture
        self.kv_step = kv_step
        self.cache: KVCache | None = None
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None

    def __call__(self, tokens: torch.Tensor, cache: KVCache, positions: list[int], temperature: torch.Tensor,
                 u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is not self.cache:  # graphs read one cache's memory: a new cache (generate() grew it) recaptures
            self.cache, self.graphs = cache, {}
            # the graphs of one cache share one memory pool; a new pool with the new cache (the allocator frees a
            # pool when its last graph goes, and a capture into a freed pool's handle fails an internal assert)
            self.pool = torch.cuda.graph_pool_handle() if self.capture is cuda_graph else None
        n = tokens.size(0)
        nb = _bucket(n, cache.k.size(1))
        S = min(-(-(max(positions) + 1) // self.kv_step) * self.kv_step, self.e.context)
        g = self.graphs.get((nb, S))
        if g is None:
            g = self.graphs[(nb, S)] = self._capture(cache, nb, S)
        g.tokens[:n, 0] = tokens
        g.pos.copy_(torch.tensor(positions + [0] * (nb - n)))  # one host-to-device copy, padding rows at 0
        g.temperature[:n], g.u[:n] = temperature, u
        if nb > n:
            g.tokens[n:], g.temperature[n:], g.u[n:] = 0, 0.0, 0.0
        g.replay()
        # copies: the next replay overwrites the graph's outputs, and decode_n keeps every step's tokens
        return g.logits[:n].clone(), g.sampled[:n].clone()

    def _capture(self, cache: KVCache, nb: int, S: int) -> _Graph:
        e, dev = self.e, self.e.device
        with torch.inference_mode():
            tokens = torch.zeros(nb, 1, dtype=torch.long, device=dev)
            # the capture's warm-up runs write their k, v at position S - 1 of rows 0..nb-1: no live row has an entry
            # there yet (S > every row's position), so nothing is lost
            pos = torch.full((nb,), S - 1, dtype=torch.long, device=dev)
            temperature, u = torch.zeros(nb, device=dev), torch.zeros(nb, device=dev)
            ks = [k[:nb, :S] for k in cache.k_layers]  # per layer (nb, S, Hkv, D)
            vs = [v[:nb, :S] for v in cache.v_layers]
            args = (e.model, tokens, pos, ks, vs, dev.type, e.dtype, temperature, u)
            replay, (logits, sampled) = self.capture(lambda: e.run_step(args, nb > 1), self.pool)
        return _Graph(tokens, pos, temperature, u, replay, logits, sampled)


# ---------------------------------------------------------------------------------------------------------------------
# sampling


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: keep the smallest set with cumulative probability >= top_p
    max_tokens: int = 256  # completion tokens per row, forced tool tokens included
    seed: int | None = None  # per-call generator: the same seed reproduces the same tokens
    stop: tuple[str, ...] = ()  # generation ends when the text contains one of these; it is never emitted

    @property
    def filtered(self) -> bool:
        """top-k or top-p is on: such rows are sampled by `sample_rows` outside the compiled graph."""
        return bool(self.top_k) or (self.top_p is not None and 0 < self.top_p < 1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 0) -> torch.Tensor:
    """probs (n, V) >= 0 (unnormalised is fine; every row with some mass), u (n,) in [0, 1) -> (n,) int64: the first
    token whose cumulative mass exceeds u * total. One uniform number per row: torch.multinomial draws an exponential
    per vocabulary entry on one thread (131k draws per step at 16 rows x 8k vocab: 18% of a 16-sample decode step on
    2 CPU cores).

    block = 0: one cumsum over the vocabulary (eager: the fewest ops). block > 0, for the compiled step: inductor has
    no CPU cumsum, so the flat one runs as a scalar aten call (55 us at 8 rows x 8k vocab); instead sum blocks of
    `block` tokens (one vectorised pass), pick the block by the cumsum of the block sums, then the token by the cumsum
    within that block (two cumsums of 64 and 128 entries per row: ~3-4 us together). Where rounding would step past
    the row's mass (t at the total, or past the block's own sum), it stops at the last token with mass."""
    n, V = probs.shape
    if block <= 0:
        cdf = probs.cumsum(dim=-1)  # (n, V)
        tok = torch.searchsorted(cdf, u.to(cdf.dtype)[:, None] * cdf[:, -1:], right=True).squeeze(-1)
        return tok.clamp(max=V - 1)
    nb = -(-V // block)
    if nb * block != V:
        probs = torch.nn.functional.pad(probs, (0, nb * block - V))  # zero mass past the vocabulary
    pb = probs.view(n, nb, block)  # (n, nb * block) -> (n, nb, block)
    mass = pb.sum(-1)  # (n, nb)
    cdf = mass.cumsum(-1)  # (n, nb)
    t = u.to(cdf.dtype)[:, None] * cdf[:, -1:]  # (n, 1): the target cumulative mass
    # the first block whose cumulative mass exceeds t (it has mass), or the last block with mass when t reaches the total
    last = torch.where(mass > 0, torch.arange(nb, device=probs.device), 0).amax(-1, keepdim=True)  # (n, 1)
    b = torch.minimum((cdf <= t).sum(-1, keepdim=True), last)  # (n, 1)
    # t less the mass before block b; >= 0, so the search below skips the block's leading zero-mass tokens
    rest = (t - (cdf.gather(1, b) - mass.gather(1, b))).clamp(min=0)  # (n, 1)
    w = pb.gather(1, b[:, :, None].expand(n, 1, block)).squeeze(1)  # (n, 1, block) -> (n, block): block b's masses
    last = torch.where(w > 0, torch.arange(block, device=probs.device), 0).amax(-1, keepdim=True)  # (n, 1)
    j = torch.minimum((w.cumsum(-1) <= rest).sum(-1, keepdim=True), last)  # (n, 1)
    return (b * block + j).squeeze(-1)


def _pick(logits: torch.Tensor, temperature: torch.Tensor, probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The argmax for greedy rows (temperature <= 0), an inverse-CDF draw from `probs` for the others."""
    return torch.where(temperature <= 0, logits.argmax(dim=-1), _inverse_cdf(probs, u))


def sample_plain(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Temperature sampling (<= 0: greedy) per row, without data-dependent branches, so the compiled decode step
    runs it inside its graph. logits (n, V) fp32, temperature (n,), u (n,) -> (n,) int64.

    Compiled, the same draw in fewer passes over the vocabulary (a microbenchmark at 8 rows x 8k vocab: 114 -> ~50 us
    on top of the model's softcap, the aten cumsum included):
    - the probabilities stay unnormalised, exp(z - max z): the inverse CDF scales u by the total, so no sum and
      divide passes. z - max z is taken as logits/T - (max logits)/T (equal: 1/T > 0): written as
      `z - amax(z)`, inductor adds passes that check every entry for inf/nan;
    - a greedy row draws u = 0 from the indicator of its maxima, i.e. its first maximum, which is what argmax returns:
      no argmax pass (13 us);
    - the two-level inverse CDF (`_inverse_cdf` with block > 0).
    Eager keeps softmax + argmax + the flat cumsum: there the cost is the number of ops (this formulation run eagerly
    took a batch-1 draw from 33 to 84 us)."""
    if not torch.compiler.is_compiling():
        return _pick(logits, temperature, torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1), u)
    greedy = temperature <= 0
    inv = 1.0 / temperature.clamp(min=1e-6)[:, None]  # (n, 1)
    top = logits.amax(-1, keepdim=True)  # (n, 1)
    w = torch.where(greedy[:, None], (logits == top).float(), torch.exp(logits * inv - top * inv))  # (n, V)
    return _inverse_cdf(w, torch.where(greedy, 0.0, u), block=128)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: list, top_p: list,
                u: torch.Tensor) -> torch.Tensor:
    """One token per row, each row with its own settings, in one pass over the batch (the server's rows belong to
    different requests; sampling them request by request cost ~70 us per request per step).

    logits (n, V) fp32; temperature (n,) (<= 0: greedy); top_k, top_p: per-row lists (None = off); u (n,) uniforms
    in [0, 1), drawn by the caller from each row's own generator -> (n,) int64."""
    n, V = logits.shape
    ks = [k if k is not None and 0 < k < V else V for k in top_k]
    ps = [p if p is not None and 0 < p < 1 else 1.0 for p in top_p]
    if min(ks) == V and min(ps) == 1.0:
        return sample_plain(logits, temperature, u)
    z = logits / temperature.clamp(min=1e-6)[:, None]
    if min(ks) < V:
        kmax = max(k for k in ks if k < V)
        vals = torch.topk(z, kmax, dim=-1).values  # (n, kmax), descending
        kt = torch.tensor(ks, device=z.device)[:, None]  # (n, 1)
        kth = vals.gather(1, kt.clamp(max=kmax) - 1)
        kth = kth.masked_fill(kt >= V, float("-inf"))  # rows without top-k keep everything
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if min(ps) < 1:
        sp, si = torch.sort(probs, dim=-1, descending=True)
        pt = torch.tensor(ps, device=z.device, dtype=sp.dtype)[:, None]  # (n, 1)
        drop = (sp.cumsum(-1) - sp > pt) & (pt < 1)  # dropped when the mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
    return _pick(logits, temperature, probs, u)


# ---------------------------------------------------------------------------------------------------------------------
# per-row state


@dataclass
class Event:
    row: int  # sample index within the request, 0..n-1
    token: int  # token id appended at this step (-1 on a pure finish event)
    forced: bool  # True for tokens forced by the tool (the output block)
    segment: str  # "text" | "python" (the code block, delimiters included) | "output" (tool output block)
    text: str  # printable delta: UTF-8 complete, special tokens -> "", stop strings never emitted
    finish_reason: str | None = None  # None while running; "stop" | "length" | "cancelled" | "error"


class _Text:
    """Turns a row's token bytes into printable deltas: complete UTF-8 only, stop strings held back and cut."""

    def __init__(self, stop: tuple[str, ...]):
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # all decoded text
        self.emitted = 0  # chars of self.text already given out

    def push(self, data: bytes) -> tuple[str, bool]:
        """Returns (delta, hit_stop)."""
        self.text += self.dec.decode(data)
        if self.stop:
            # search from a little before the unemitted tail so a stop string spanning the boundary is found
            start = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                delta = self.text[self.emitted : cut] if cut > self.emitted else ""
                self.emitted = max(self.emitted, cut)
                return delta, True
            hold = 0  # longest suffix that could still become a stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            end = len(self.text) - hold
        else:
            end = len(self.text)
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta, False


@dataclass
class _Row:
    request: "_Request"
    index: int  # sample index within its request
    pos: int  # tokens in the cache for this row
    last_token: int = -1  # the token to feed at the next decode step
    produced: int = 0
    forced: deque = field(default_factory=deque)
    segment: str = "text"
    code: list[int] = field(default_factory=list)
    text: _Text | None = None
    done: bool = False


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    n: int
    params: SamplingParams
    on_event: Callable[[Event], None]
    generator: torch.Generator | None = None
    cancelled: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# the engine


def check_prompt(ids: list[int], context: int) -> None:
    """A prompt must leave room for at least one generated token."""
    if not ids:
        raise UserError("prompt is empty")
    if len(ids) >= context:
        raise UserError(f"prompt is {len(ids)} tokens; the model's context is {context} "
                        f"(shorten the prompt or conversation)")


class Engine:
    """Owns the model, the tokenizer's special ids and the tool. Cheap to construct; caches are per batch."""

    def __init__(self, model, tokenizer, *, tool: Callable[[str], str] | None = None, compile: bool = False,
                 dtype: torch.dtype | None = None, cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.tool = tool
        self.device = next(model.parameters()).device
        self.dtype = dtype or inference_dtype(self.device, compile)
        self.context = model.config.sequence_len
        sid = tokenizer.special_id
        self.bos = tokenizer.bos_id
        self.assistant_end = sid("<|assistant_end|>")
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")
        # compile: the decode step becomes one graph (two: batch 1 and batch >= 2). Freezing bakes in the weights, so
        # a compiled engine is for a model that no longer trains (chat, serve, eval); check_frozen enforces it.
        self._step = torch.compile(_decode_step, fullgraph=True) if compile else None
        self._compiled: set[bool] = set()  # graph kinds compiled so far (False: batch 1, True: batch >= 2)
        linears = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        weight_bytes = sum(w.numel() for w in linears.values()) * torch.finfo(self.dtype).bits // 8
        self._autotune = _autotune_batch1(self.device, self.dtype, weight_bytes, _last_level_cache_bytes())
        # where the batch-1 graph uses inductor's C++ GEMVs (CPU) it is built ahead of time instead (see _aot_step)
        self._aot_batch1 = compile and self._autotune
        self._aot: Callable | None = None
        self._versions = self._weight_versions() if compile else None
        # CUDA graphs (see GraphedSteps): by default for a compiled engine on CUDA, i.e. a model that no longer trains
        # (an eager graph would read updated weights correctly, but training-time samples are few and short)
        if cuda_graphs is None:
            cuda_graphs = compile and self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise UserError(f"cuda_graphs=True needs a CUDA device; this model is on {self.device}")
        self._graphs = GraphedSteps(self) if cuda_graphs else None
        # the eager prefill of a compiled bf16 engine (and its ahead-of-time batch-1 step) reads bf16 copies of the
        # linear weights: autocast would cast every weight at every prefill (1.2 of 2.8 ms for a 25-token prompt at
        # depth 4), and casting once gives the same values. Only when compiled: its weights are frozen, an eager
        # engine's may still be training.
        self._cast_weights = {}
        if compile and self.dtype != torch.float32:
            self._cast_weights = {name: w.detach().to(self.dtype) for name, w in linears.items()}
        # generate() decodes up to this many tokens per Python round trip (decode_n); the server's scheduler steps one
        # at a time so requests join and leave between tokens
        self.chunk = 8
        self._spare: KVCache | None = None  # generate()'s cache, kept for the next call
        # token id -> bytes, specials -> b"" (built lazily: 8k-65k entries)
        self._bytes: list[bytes] | None = None

    # -- the compile-sized pieces -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: KVCache, row: int) -> torch.Tensor:
        """Run the prompt at batch 1 into `row` of the cache; returns the last position's logits (1, V)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with autocast_ctx(self.device, self.dtype):
            logits = _with_weights(self.model, self._cast_weights)(
                x, kv_cache=cache.view(slice(row, row + 1), [0]), last=True)
        return logits[:, -1]

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, cache: KVCache, positions: list[int], temperature: torch.Tensor,
                         u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (n,) for live rows 0..n-1 at their positions -> (logits (n, V), sampled (n,) or None).
        The compiled step also samples at `temperature` with uniforms `u` (n,) in its graph; eager returns None."""
        if self._graphs is not None:
            return self._graphs(tokens, cache, positions, temperature, u)
        return self._direct_step(tokens, cache, positions, temperature, u)

    def _direct_step(self, tokens, cache, positions, temperature, u):
        """decode_one_token without CUDA graphs: the eager model, or the compiled step on exactly the live rows."""
        n = tokens.size(0)
        if self._step is None:
            with autocast_ctx(self.device, self.dtype):
                logits = self.model(tokens[:, None], kv_cache=cache.view(slice(0, n), positions))
            return logits[:, -1], None
        S = max(positions) + 1
        ks = [k[:n, :S] for k in cache.k_layers]  # per layer (n, S, Hkv, D)
        vs = [v[:n, :S] for v in cache.v_layers]
        # dynamo guards on the inputs' dispatch keys, so every input is an inference tensor: caches come from
        # new_cache, and the callers (_Batch.add/step, warmup) build the rest in inference mode
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        x = tokens[:, None]  # (n,) -> (n, 1): one new token per row
        return self.run_step((self.model, x, pos, ks, vs, self.device.type, self.dtype, temperature, u), n > 1)

    def run_step(self, args: tuple, kind: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`_decode_step(*args)`, compiled when the engine is: the graph for batch >= 2 when `kind`, else batch 1
        (its GEMV kernels differ from the small-batch GEMMs). Eager here only under CUDA graph capture."""
        if self._step is None:
            return _decode_step(*args)
        if not kind and self._aot_batch1:
            if self._aot is None:
                opts = _compile_options(self.device, True, self._autotune)
                self._aot = _aot_step(self.model, args, self._cast_weights, self.context, opts)
            return self._aot(*args)
        if kind in self._compiled:
            return self._step(*args)
        _, x, pos, ks, vs, _, _, temperature, u = args
        # first call of this kind: mark the dynamic dims and compile with our inductor options. Later calls skip both
        # (~70 us a step): the compiled graph's guards accept any batch >= 2 and any kv length by themselves.
        for t in ks + vs:
            torch._dynamo.mark_dynamic(t, 1)
        for t in (ks + vs + [pos, x, temperature, u]) if kind else ():
            torch._dynamo.mark_dynamic(t, 0)
        # no duck sizing: with a 1-row cache a layer's storage offset equals the row stride, and dynamo would tie the
        # two (a later cache with more rows then recompiled the batch-1 graph at the server's first request)
        with torch._inductor.config.patch(_compile_options(self.device, not kind, self._autotune)), \
                torch.fx.experimental._config.patch(use_duck_shape=False):
            out = self._step(*args)
        self._compiled.add(kind)
        return out

    @torch.inference_mode()
    def decode_n(self, tokens: torch.Tensor, cache: KVCache, positions: list[int], temperature: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
        """u.size(0) steps in one call, each step's temperature sample fed straight back as the next input, with no
        per-row Python in between -> (steps, n) tokens. u: (steps, n) uniforms. The caller keeps the tokens up to a
        row's first event (finish, tool call) and rolls that row's position back to there."""
        out = []
        for j in range(u.size(0)):
            logits, sampled = self.decode_one_token(tokens, cache, [p + j for p in positions], temperature, u[j])
            tokens = sample_plain(logits.float(), temperature, u[j]) if sampled is None else sampled
            out.append(tokens)
        return torch.stack(out)

    def new_cache(self, rows: int) -> KVCache:
        """A cache for `rows` rows, always of the whole context (the compiled step's guards include the cache's time
        length: its slices are views) and made of inference tensors: the compiled step then writes it in place (on
        normal tensors a batch-1 step ran ~2x slower), and every caller's cache has the same dispatch keys."""
        cfg = self.model.config
        with torch.inference_mode():
            return KVCache(cfg.depth, rows, self.context, cfg.n_kv_head, cfg.head_dim, self.device, self.dtype)

    @torch.inference_mode()
    def warmup(self, max_batch: int = 2) -> float:
        """Compile the decode graphs now (batch 1, and batch >= 2 when max_batch > 1) rather than on the first
        request; returns the seconds it took. A no-op without compile."""
        if self._step is None:
            return 0.0
        t0 = time.perf_counter()
        cache = self.new_cache(2)
        for n in (1, 2) if max_batch > 1 else (1,):
            z = torch.zeros(n, device=self.device)
            # not through CUDA graphs: they are captured on the cache they will serve, at first use
            self._direct_step(torch.zeros(n, dtype=torch.long, device=self.device), cache, [1] * n, z + 1, z)
        return time.perf_counter() - t0

    def _weight_versions(self) -> list[int]:
        return [p._version for p in self.model.parameters()]

    def check_frozen(self) -> None:
        """A compiled engine baked the weights in; refuse to sample stale weights after they changed."""
        if self._versions is not None and self._weight_versions() != self._versions:
            raise RuntimeError("the model's weights changed after this compiled Engine was built (compile freezes "
                               "them); build a new Engine, or use compile=False for a model that is still training")

    def token_bytes(self, t: int) -> bytes:
        if self._bytes is None:
            self._bytes = [b"" if self.tok.is_special(i) else self.tok.decode_bytes([i])
                           for i in range(self.tok.vocab_size)]
        return self._bytes[t]

    # -- public API ---------------------------------------------------------------------------------------------------

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.context)

    def check_score(self, ids: list[int], top: int = 0) -> None:
        """What `score` accepts: 1..context token ids of the vocabulary, 0 <= top <= vocab."""
        V = self.model.config.vocab_size
        if not ids:
            raise UserError("prompt to score is empty")
        if len(ids) > self.context:
            raise UserError(f"prompt to score is {len(ids)} tokens; the model's context is {self.context}")
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        if not 0 <= top <= V:
            raise UserError(f"top={top} must be between 0 and the vocabulary size {V}")

    @torch.inference_mode()
    def score(self, ids: list[int], top: int = 0) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """Log-probability of each token given the ones before it (None for the first) and, per position, the `top`
        most likely (token, logprob) there ([] for the first): one forward over the whole prompt at batch 1, in the
        engine's dtype as prefill runs it, log-softmax in fp32. What an evaluation client scores choices with."""
        self.check_score(ids, top)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with autocast_ctx(self.device, self.dtype):
            logits = _with_weights(self.model, self._cast_weights)(x)  # (1, T, V)
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V): position i predicts token i+1
        target = torch.tensor(ids[1:], dtype=torch.long, device=self.device)
        picked = logp.gather(1, target[:, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]]] = [[]]
        if top > 0:
            vals, idx = logp.topk(top, dim=-1)  # (T-1, top)
            tops += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            tops += [[] for _ in picked]
        return [None, *picked], tops

    def generate(self, prompt_ids: list[int], num_samples: int = 1,
                 params: SamplingParams | None = None) -> Iterator[list[Event]]:
        """Stream a request: yields the list of Events of each step until every row has finished."""
        params = params or SamplingParams()
        self.check_prompt(prompt_ids)
        out: list[Event] = []
        # reuse the last call's cache when it has the rows: a fresh one is zeroed and faulted in at every call
        # (16 samples x 512 positions at depth 6: 75 MB, ~4% of a 128-token generate). Stale entries are masked (a
        # row attends only to positions it has written) and finite (they are model outputs), so they add nothing.
        cache, self._spare = self._spare, None
        if cache is None or cache.k.size(1) < num_samples:
            cache = self.new_cache(num_samples)
        batch = _Batch(self, max_rows=num_samples, cache=cache)
        try:
            batch.add(_Request(0, list(prompt_ids), num_samples, params, out.append))
            while batch.rows:
                batch.step(max_steps=self.chunk)
                if out:
                    yield list(out)
                    out.clear()
        finally:
            self._spare = cache

    def generate_batch(self, prompt_ids: list[int], num_samples: int = 1,
                       params: SamplingParams | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Whole completions (terminal token excluded) and masks (1 = sampled, 0 = forced by a tool)."""
        seqs: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        for events in self.generate(prompt_ids, num_samples, params):
            for ev in events:
                if ev.token >= 0 and not (ev.finish_reason == "stop" and ev.token in (self.assistant_end, self.bos)):
                    seqs[ev.row].append(ev.token)
                    masks[ev.row].append(0 if ev.forced else 1)
        return seqs, masks


class _Batch:
    """Live rows [0, len(rows)) of one KV cache, stepped together. Used by Engine.generate and by serve.Scheduler."""

    def __init__(self, engine: Engine, max_rows: int, cache: KVCache | None = None):
        self.e = engine
        self.max_rows = max_rows
        self.cache = cache if cache is not None else engine.new_cache(max_rows)
        self.rows: list[_Row] = []

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    @torch.inference_mode()
    def add(self, req: _Request) -> None:
        """Prefill once at batch 1 into the first free row, clone into the request's other rows, sample each row's
        first token from the prompt's last logits."""
        e = self.e
        e.check_frozen()
        if req.params.seed is not None:
            req.generator = torch.Generator(device=e.device)
            req.generator.manual_seed(req.params.seed % 2**63)  # any int is a valid seed; torch takes 64-bit
        elif req.params.temperature > 0:
            req.generator = torch.Generator(device=e.device)
            req.generator.manual_seed(random.getrandbits(63))
        first = len(self.rows)
        logits = e.prefill(req.prompt, self.cache, first)  # (1, V)
        P = len(req.prompt)
        for i in range(1, req.n):
            self.cache.copy_row(first, first + i, P)
        new_rows = [_Row(req, i, P, text=_Text(req.params.stop)) for i in range(req.n)]
        self.rows.extend(new_rows)
        temps, u = self._sampling_inputs(new_rows)
        self._advance(new_rows, logits.expand(req.n, -1), temps, u[0])

    @torch.inference_mode()
    def step(self, max_steps: int = 1) -> None:
        """Decode every live row by one token, or by up to `max_steps` with decode_n when no row has a forced token
        queued or filters its sampling, then drop the finished rows."""
        if any(not r.done for r in self.rows):
            e = self.e
            k = self._steps(max_steps)
            tokens = torch.tensor([r.last_token for r in self.rows], dtype=torch.long, device=e.device)
            positions = [r.pos for r in self.rows]
            temps, u = self._sampling_inputs(self.rows, k)
            if k == 1:
                logits, sampled = e.decode_one_token(tokens, self.cache, positions, temps, u[0])
                for r in self.rows:
                    r.pos += 1
                self._advance(self.rows, logits, temps, u[0], sampled)
            else:
                chunk = e.decode_n(tokens, self.cache, positions, temps, u).t().tolist()  # (n, k)
                for r, toks in zip(self.rows, chunk):
                    for t in toks:  # keep tokens up to the row's first event; its later cache entries are masked
                        r.pos += 1
                        self._row_token(r, t)
                        if r.done or r.forced:
                            break
        self._compact()

    def _steps(self, max_steps: int) -> int:
        """How many tokens this step may decode per row: 1 while a row has forced tokens to feed or samples with
        top-k/top-p (filtered sampling is not in the compiled graph), else up to max_steps within every row's token
        budget and the context."""
        if max_steps <= 1 or any(r.forced or r.request.params.filtered for r in self.rows):
            return 1
        room = min(min(r.request.params.max_tokens - r.produced, self.e.context - 1 - r.pos) for r in self.rows)
        return max(1, min(max_steps, room))

    def _sampling_inputs(self, rows: list[_Row], steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row temperature (n,) and uniforms (steps, n), each row's drawn from its request's generator, so a seed
        reproduces a request whatever else shares the batch (for a given chunk size: a row that stops mid-chunk has
        used its draws)."""
        n, dev = len(rows), self.e.device
        temps = torch.tensor([r.request.params.temperature for r in rows], dtype=torch.float32, device=dev)
        by_req: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r.request.generator is not None:
                by_req.setdefault(r.request.rid, []).append(i)
        if len(by_req) == 1 and len(next(iter(by_req.values()))) == n:  # one request owns every row (generate())
            return temps, torch.rand(steps, n, generator=rows[0].request.generator, device=dev)
        u = torch.zeros(steps, n, device=dev)
        for idx in by_req.values():
            u[:, idx] = torch.rand(steps, len(idx), generator=rows[idx[0]].request.generator, device=dev)
        return temps, u

    def _advance(self, rows: list[_Row], logits: torch.Tensor, temps: torch.Tensor, u: torch.Tensor,
                 sampled: torch.Tensor | None = None) -> None:
        """Pick each row's token (the compiled step's own sample unless a row filters with top-k/top-p), then run
        the per-row state machine."""
        params = [r.request.params for r in rows]
        if sampled is None or any(p.filtered for p in params):
            sampled = sample_rows(logits.float(), temps, [p.top_k for p in params], [p.top_p for p in params], u)
        for r, t in zip(rows, sampled.tolist()):
            self._row_token(r, t)

    def _row_token(self, r: _Row, sampled: int) -> None:
        if r.done:  # finished earlier in this step (or at its first token, while other rows kept the batch going)
            return
        e, req = self.e, r.request
        if req.cancelled:
            r.done = True
            req.on_event(Event(r.index, -1, False, r.segment, "", "cancelled"))
            return
        forced = bool(r.forced)
        t = r.forced.popleft() if forced else sampled
        r.last_token = t
        r.produced += 1
        segment = "output" if forced else ("python" if (r.segment == "python" or t == e.python_start) else "text")
        finish = None
        text = ""
        if t in (e.assistant_end, e.bos) and not forced:
            finish = "stop"
        else:
            if t == e.python_start:
                r.segment, r.code = "python", []
            elif t == e.python_end and r.segment == "python":
                r.segment = "text"
                r.forced.extend(self._tool_output(r.code))
            elif r.segment == "python":
                r.code.append(t)
            text, hit = r.text.push(e.token_bytes(t))
            if hit:
                finish = "stop"
            elif r.produced >= req.params.max_tokens or r.pos + 1 >= e.context:
                finish = "length"
        if finish:
            r.done = True
        req.on_event(Event(r.index, t, forced, segment, text, finish))

    def _tool_output(self, code_ids: list[int]) -> list[int]:
        e = self.e
        if e.tool is None:
            return []  # no tool configured: the model just continues after <|python_end|>
        try:
            result = e.tool(e.tok.decode(code_ids))
        except Exception as exc:  # a tool must never take the engine down; its error becomes the output text
            result = f"Error: {type(exc).__name__}: {exc}"
        return [e.output_start, *e.tok.encode(str(result)), e.output_end]

    def _compact(self) -> None:
        """Move the last live row into each finished row's slot so live rows stay in [0, n)."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].done:
                last = len(self.rows) - 1
                if i != last:
                    self.cache.copy_row(last, i, self.rows[last].pos)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1
