"""Sampling as pure functions of logits and uniforms: per-row temperature, top-k and top-p in one pass over the batch,
and the formulation the compiled decode step runs inside its graph. The uniforms come from each row's own generator
(engine/rows.py), so a seed reproduces a row whatever else shares the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: keep the smallest set with cumulative probability >= top_p
    max_tokens: int = 256  # completion tokens per row, forced tool tokens included
    seed: int | None = None  # per-call generator: the same seed reproduces the same tokens
    stop: tuple[str, ...] = ()  # generation ends when the text contains one of these; it is never emitted
    # OpenAI's penalties on the text tokens this row already sampled, in its text only (not in tool calls, whose
    # code repeats tokens by nature, nor from tool output, which the model did not choose): logit -
    # frequency_penalty x times sampled - presence_penalty if sampled at all; greedy rows are penalized too
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def eager(self) -> bool:
        """top-k, top-p or a penalty is on: such rows are sampled by `sample_rows` outside the compiled graph."""
        return bool(self.top_k) or (self.top_p is not None and 0 < self.top_p < 1) or self.penalized


def penalize(logits: torch.Tensor, sampled: list[dict[int, int]], params: list[SamplingParams]) -> torch.Tensor:
    """logits (n, V) fp32 -> a new (n, V) with each row's penalties subtracted; sampled[i]: token -> how many times
    row i sampled it. One scatter over the few (row, token) pairs that carry a penalty, not a pass per row."""
    rows, toks, amounts = [], [], []
    for i, (seen, p) in enumerate(zip(sampled, params)):
        for t, c in seen.items() if p.penalized else ():
            rows.append(i)
            toks.append(t)
            amounts.append(p.frequency_penalty * c + p.presence_penalty)
    out = logits.clone()
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(toks, device=logits.device))
        out.index_put_(index, -torch.tensor(amounts, dtype=logits.dtype, device=logits.device), accumulate=True)
    return out


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 0) -> torch.Tensor:
    """probs (n, V) >= 0 (unnormalised is fine; every row with some mass), u (n,) in [0, 1) -> (n,) int64: the first
    token whose cumulative mass exceeds u * total. One uniform number per row, where torch.multinomial draws an
    exponential per vocabulary entry on one thread (figures: README, "Compiled decode step").

    block = 0: one cumsum over the vocabulary (eager: the fewest ops). block > 0, for the compiled step: inductor has
    no CPU cumsum, so the flat one would run as a scalar aten call; instead sum blocks of `block` tokens (one
    vectorised pass), pick the block by the cumsum of the block sums, then the token by the cumsum within that block
    (two short cumsums per row). Where rounding would step past the row's mass (t at the total, or past the block's
    own sum), it stops at the last token with mass."""
    # measured at 8 rows x 8k vocab, compiled: the flat aten cumsum 55 us, the two short ones ~3-4 us together
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

    Compiled, the same draw in fewer passes over the vocabulary (figures: README, "Compiled decode step"):
    - the probabilities stay unnormalised, exp(z - max z): the inverse CDF scales u by the total, so no sum and
      divide passes. z - max z is taken as logits/T - (max logits)/T (equal: 1/T > 0): written as
      `z - amax(z)`, inductor adds passes that check every entry for inf/nan;
    - a greedy row draws u = 0 from the indicator of its maxima, i.e. its first maximum, which is what argmax returns:
      no argmax pass;
    - the two-level inverse CDF (`_inverse_cdf` with block > 0).
    Eager keeps softmax + argmax + the flat cumsum: there the cost is the number of ops."""
    # measured at 8 rows x 8k vocab: compiled 114 -> ~50 us (the argmax pass alone was 13 us); run eagerly, this
    # formulation took a batch-1 draw from 33 to 84 us
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
    different requests; sampling them request by request cost a few small ops per request per step: README).

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
