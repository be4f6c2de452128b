"""Attention kernels behind one API, the backend chosen once per process.

    attn(q, k, v, causal=True, window=0)                      training / full forward
    attn_with_cache(q, k, v, k_cache, v_cache, pos, kv_len, window=0)   prefill and decode with a KV cache

Layouts: q (B, T, H, D); k, v (B, T, Hkv, D) with H % Hkv == 0 (GQA); the output is (B, T, H, D).
Backends: FlashAttention-3 (`flash_attn_interface`) on Hopper GPUs when it is installed, otherwise PyTorch SDPA
(which itself dispatches to flash / memory-efficient / CPU-flash kernels). `PICOCHAT_ATTN=sdpa|fa3` overrides the
choice (the parity test uses it). The choice and its reason are logged once by `describe_backend()`.
`fa3_override(kernels)` is the test override: it runs the FA3 code path anywhere with a stand-in for the kernels
(the CPU tests use one that asserts FA3's input contract and computes with SDPA).

FA3's contract, which the FA3 branches meet by casting: q, k, v (and the cache) in ONE dtype, fp16 or bf16 (there is no
fp32 kernel), (B, T, H, D) with the last dimension contiguous; `flash_attn_func` is not autocast-aware. The model casts
its rotary tables to the compute dtype, so under bf16 autocast q, k and v arrive bf16, but other callers need not
(fp32 q and k with bf16 v), and evaluation may run without autocast.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def _backend() -> tuple[str, str]:
    """(name, reason). Cached: decided once per process."""
    forced = os.environ.get("PICOCHAT_ATTN", "").lower()
    if forced and forced not in ("sdpa", "fa3"):
        raise ValueError(f"PICOCHAT_ATTN={forced!r}: expected 'sdpa' or 'fa3'")
    if forced == "sdpa":
        return "sdpa", "forced by PICOCHAT_ATTN"
    fa3_reason = "no CUDA device"
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major != 9:
            fa3_reason = f"GPU is sm{major}x, FlashAttention-3 needs Hopper (sm90)"
        else:
            try:
                import flash_attn_interface  # noqa: F401

                return "fa3", "Hopper GPU with flash_attn_interface installed"
            except ImportError:
                fa3_reason = "flash_attn_interface not installed"
    if forced == "fa3":
        raise RuntimeError(f"PICOCHAT_ATTN=fa3 but FlashAttention-3 is unavailable: {fa3_reason}")
    return "sdpa", f"PyTorch SDPA ({fa3_reason})"


# the kernels `fa3_override` installed, if any (a context variable: scoped to the `with` block, no global to reset)
_FA3_OVERRIDE: ContextVar[object | None] = ContextVar("picochat_fa3_override", default=None)


@contextmanager
def fa3_override(kernels: object | None) -> Iterator[None]:
    """Test override: inside the block the backend is FA3 and `kernels` (anything with `flash_attn_func` and
    `flash_attn_with_kvcache`, called as flash_attn_interface's) stands in for flash_attn_interface, on any device.
    `None` restores the process's own backend inside an outer override (a test's reference run)."""
    token = _FA3_OVERRIDE.set(kernels)
    try:
        yield
    finally:
        _FA3_OVERRIDE.reset(token)


def _fa3():
    kernels = _FA3_OVERRIDE.get()
    if kernels is None:
        import flash_attn_interface as kernels
    return kernels


@torch.compiler.assume_constant_result
def backend_name() -> str:
    """The chosen backend's name; a constant to torch.compile (it does not trace into the lru_cache)."""
    return "fa3" if _FA3_OVERRIDE.get() is not None else _backend()[0]


_HALF = (torch.float16, torch.bfloat16)


def _fa3_dtypes(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype FA3 runs in, dtype to return). Under autocast: autocast's dtype for both, as SDPA would give. Without
    (evaluation of an fp32 model): v's dtype if it is half, else bf16 since FA3 has no fp32 kernel, and the result goes
    back to q's dtype so the fp32 output projection that follows accepts it."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in _HALF:
        dt = torch.get_autocast_dtype(dev)
        return dt, dt
    return (v.dtype if v.dtype in _HALF else torch.bfloat16), q.dtype


def _fa3_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()  # FA3 reads the head dim as one contiguous vector


def _fa3_window(window: int) -> tuple[int, int]:
    # FA3's (left, right) window counts the keys besides the query's own: `window` keys = (window - 1, 0); -1 = none
    return (window - 1 if window > 0 else -1, 0)


def describe_backend() -> str:
    name, reason = _backend()
    return f"attention backend: {name} ({reason})"


def _band_mask(Tq: int, Tk: int, offset: int, window: int, device) -> torch.Tensor:
    """(Tq, Tk) bool: query i (at absolute position offset+i) may see key j iff j <= offset+i and, with a window,
    offset+i - j < window."""
    qpos = torch.arange(Tq, device=device)[:, None] + offset
    kpos = torch.arange(Tk, device=device)[None, :]
    m = kpos <= qpos
    if window > 0:
        m = m & (qpos - kpos < window)
    return m


def _sdpa(q, k, v, mask=None, causal=False):
    # SDPA wants (B, H, T, D); GQA via enable_gqa, which broadcasts kv heads without materialising copies
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)
    return y.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)


def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0) -> torch.Tensor:
    """Self-attention over one sequence block (no cache). `window` > 0 limits each query to the last `window` keys."""
    name = backend_name()
    T = q.size(1)
    if name == "fa3":
        dt, out_dt = _fa3_dtypes(q, v)
        y = _fa3().flash_attn_func(_fa3_in(q, dt), _fa3_in(k, dt), _fa3_in(v, dt), causal=causal,
                                   window_size=_fa3_window(window))
        return y.to(out_dt)
    if window > 0 and window < T:
        return _sdpa(q, k, v, mask=_band_mask(T, T, 0, window, q.device))
    return _sdpa(q, k, v, causal=causal)


def attn_with_cache(q, k, v, k_cache, v_cache, pos, kv_len: int, window: int = 0) -> torch.Tensor:
    """Write this step's k, v into the cache at each row's position, then attend over the cache.

    k_cache, v_cache: (B, Tmax, Hkv, D) storage for one layer, written in place.
    pos: an int when every row starts at the same position (generation of N samples from one prompt), else a (B,)
         int64 tensor of per-row start positions (continuous batching: rows of different requests).
    kv_len: a Python int >= max(pos) + T, how much of the cache to attend over (passed in so no device sync is needed).
    The cache's own bookkeeping (advancing positions) belongs to the caller, after the forward pass.
    With FA3 (eager, a bf16/fp16 cache) one `flash_attn_with_kvcache` call writes and attends: the new entries land at
    each row's `pos` (its cache_seqlens) and query i sits at pos + i, our positions exactly. Inside torch.compile the
    SDPA / `_one_query` path stays: FA3's ops through dynamo are not verified here. An fp32 cache also takes SDPA (FA3
    would need a half copy of the whole cache at every step).
    """
    B, T = q.shape[:2]
    if backend_name() == "fa3" and k_cache.dtype in _HALF and not torch.compiler.is_compiling():
        dt, out_dt = k_cache.dtype, _fa3_dtypes(q, v)[1]
        seqlens = (torch.full((B,), pos, dtype=torch.int32, device=q.device) if isinstance(pos, int)
                   else pos.to(torch.int32))  # FA3 takes int32 lengths
        y = _fa3().flash_attn_with_kvcache(_fa3_in(q, dt), k_cache, v_cache, k=_fa3_in(k, dt), v=_fa3_in(v, dt),
                                           cache_seqlens=seqlens, causal=True, window_size=_fa3_window(window))
        return y.to(out_dt)
    if isinstance(pos, int):
        k_cache[:, pos : pos + T] = k
        v_cache[:, pos : pos + T] = v
        kk, vv = k_cache[:, :kv_len], v_cache[:, :kv_len]
        if T == 1 and (window <= 0 or kv_len <= window):
            return _sdpa(q, kk, vv)  # one query sees every cached key: no mask needed
        return _sdpa(q, kk, vv, mask=_band_mask(T, kv_len, pos, window, q.device))
    # per-row positions: scatter each row's T new entries to pos[b] .. pos[b]+T-1
    idx = pos[:, None] + torch.arange(T, device=q.device)  # (B, T)
    rows = torch.arange(B, device=q.device)[:, None].expand(B, T)
    k_cache[rows, idx] = k.to(k_cache.dtype)  # index_put does not cast (rotary in fp32 makes k fp32 under autocast)
    v_cache[rows, idx] = v.to(v_cache.dtype)
    kk, vv = k_cache[:, :kv_len], v_cache[:, :kv_len]
    kpos = torch.arange(kv_len, device=q.device)[None, None, :]  # (1, 1, S)
    qpos = idx[:, :, None]  # (B, T, 1)
    mask = kpos <= qpos
    if window > 0:
        mask = mask & (qpos - kpos < window)
    if T == 1 and torch.compiler.is_compiling():
        return _one_query(q, kk, vv, mask[:, 0])
    return _sdpa(q, kk, vv, mask=mask[:, None])  # mask (B, 1, T, S) broadcasts over heads


def _one_query(q, k, v, mask):
    """Attention of one query per row, as reductions that inductor fuses into one kernel of a few loops.
    Used inside the compiled decode step: SDPA's CPU kernel makes torch.compile specialise the batch size (a graph
    per batch size, ~15 s each), and a bmm over this (B, S, Hkv, D) layout would first copy the cache (a bmm over the
    copy-free (B, S*Hkv, D) view of k, 4x the work, took 39 us for the scores alone at batch 8).
    q (B, 1, H, D); k, v (B, S, Hkv, D); mask (B, S) bool -> (B, 1, H, D).

    Why this form (perf samples of the compiled decode step at batch 8, 108 keys, 4 heads of 64, bf16 cache, one
    thread: this kernel ~52 -> ~32 us per layer, now mostly the value sum's strided reads of v):
    - the scaled query is stored once (`realized`): inlined, the model's RMS norm of q (a sqrt and a division) was
      recomputed for every key, a third of the kernel;
    - the scores are computed in k's storage order, (B, S, Hkv, G), so k streams through memory once; laid out
      (B, Hkv, G, S) instead, inductor walked k head by head and stalled on the loads (46 us per layer);
    - they are then transposed to (B, Hkv, G, S) (a few KB): softmax over S runs on full vectors. On the (B, S, H)
      layout, max, exp and sum ran 4 lanes wide, with a scalar exp per score;
    - the softmax is normalised after the value sum, (sum_s e_s v_s) / sum_s e_s: one division per output element
      instead of one per key and output chunk."""
    B, _, H, D = q.shape
    Hkv = k.size(2)
    G = H // Hkv

    def realized(x):  # x's values; as_strided makes inductor store them in a (contiguous) buffer, not inline them
        x = x.contiguous()
        return x.as_strided(x.shape, x.stride())

    qg = realized(q.float() * D**-0.5).view(B, 1, Hkv, G, D)  # (B, 1, H, D) -> query heads grouped by kv head
    s = realized((qg * k[:, :, :, None].float()).sum(-1))  # (B, S, Hkv, G, D) products -> (B, S, Hkv, G)
    s = realized(s.permute(0, 2, 3, 1).contiguous())  # (B, S, Hkv, G) -> (B, Hkv, G, S), transposed
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))  # unnormalised probabilities, (B, Hkv, G, S)
    vt = v.permute(0, 2, 1, 3)[:, :, None]  # (B, S, Hkv, D) -> (B, Hkv, 1, S, D), a view
    y = (e[..., None] * vt.float()).sum(3) / e.sum(-1)[..., None]  # (B, Hkv, G, S, D) products -> (B, Hkv, G, D)
    return y.reshape(B, 1, H, D).to(q.dtype)  # (B, Hkv, G, D) -> (B, 1, H, D)
