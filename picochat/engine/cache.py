"""The KV cache the engine owns, and the two views of it the model reads (see `attention.attn_with_cache`)."""

from __future__ import annotations

import torch


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
    compiled graph, so one graph serves every step (a graph per kv length would recompile at every token).
    Per-layer inputs rather than one (L, B, S, ..) slice: writing into `k[i]` of a single input made the compiled
    graph copy the whole input back (an index_put into a view of an input); into an input itself it is done in place.
    """

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor], pos: torch.Tensor):
        self.ks, self.vs, self.pos = ks, vs, pos

    def layer(self, i: int):
        return self.ks[i], self.vs[i]

    def kv_len(self, T: int) -> int:
        return self.ks[0].size(1)
