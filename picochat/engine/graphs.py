"""The decode step as replays of CUDA graphs (Engine(cuda_graphs=True); the default for a compiled engine on CUDA):
at batch 1 a decode step is a few hundred small kernels, and launching them one by one from Python costs more than
running them; a replay launches all of them in one call (figures: README, "CUDA graphs")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from picochat.engine.cache import KVCache
from picochat.engine.steps import DecodeStep, StepOut, step_slices


def bucket(n: int, limit: int) -> int:
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
    """`inner` (an EagerStep or a CompiledStep) replayed as CUDA graphs.

    A graph has fixed shapes and addresses, so there is one per (batch bucket, kv-length bucket) of one cache, captured
    on first use: the live rows are padded to a power of two (padding rows feed token 0 at position 0 into free rows
    of the cache, which a prefill overwrites before they are used), and the attended cache length is rounded up to a
    multiple of `kv_step` (the padding positions are masked: every row attends only up to its own position). Fewer
    graphs than one per length, and at most `kv_step` - 1 masked positions read per row and layer.
    `capture(fn, pool)` is `cuda_graph`; a test passes one that re-runs fn eagerly to check the padding on CPU."""

    def __init__(self, inner: DecodeStep, device: torch.device, context: int, capture=cuda_graph, kv_step: int = 256):
        self.inner, self.device, self.context = inner, device, context
        self.capture = capture
        self.kv_step = kv_step
        self.cache: KVCache | None = None
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None

    def __call__(self, tokens, cache, positions, temperature, u) -> StepOut:
        if cache is not self.cache:  # graphs read one cache's memory: a new cache (generate() grew it) recaptures
            self.cache, self.graphs = cache, {}
            # the graphs of one cache share one memory pool; a new pool with the new cache (the allocator frees a
            # pool when its last graph goes, and a capture into a freed pool's handle fails an internal assert)
            self.pool = torch.cuda.graph_pool_handle() if self.capture is cuda_graph else None
        n = tokens.size(0)
        nb = bucket(n, cache.k.size(1))
        S = min(-(-(max(positions) + 1) // self.kv_step) * self.kv_step, self.context)
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

    def run(self, tokens, pos, ks, vs, temperature, u, batched):
        return self.inner.run(tokens, pos, ks, vs, temperature, u, batched)

    def warmup(self, cache: KVCache, max_batch: int) -> None:
        self.inner.warmup(cache, max_batch)  # not through graphs: they are captured on the cache they serve

    def _capture(self, cache: KVCache, nb: int, S: int) -> _Graph:
        dev = self.device
        with torch.inference_mode():
            tokens = torch.zeros(nb, 1, dtype=torch.long, device=dev)
            # the capture's warm-up runs write their k, v at position S - 1 of rows 0..nb-1: no live row has an entry
            # there yet (S > every row's position), so nothing is lost
            pos = torch.full((nb,), S - 1, dtype=torch.long, device=dev)
            temperature, u = torch.zeros(nb, device=dev), torch.zeros(nb, device=dev)
            ks, vs = step_slices(cache, nb, S)  # per layer (nb, S, Hkv, D)
            replay, (logits, sampled) = self.capture(
                lambda: self.inner.run(tokens, pos, ks, vs, temperature, u, nb > 1), self.pool)
        return _Graph(tokens, pos, temperature, u, replay, logits, sampled)
