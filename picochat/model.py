"""The GPT: token embedding -> pre-norm blocks (attention + ReLU² MLP) -> final norm -> untied lm_head.

Only the network lives here: no sampling loop (that is the engine/ package) and no optimizer algorithm (optim.py).
Choices, each for a reason:
- RMSNorm without parameters (fewer things to tune; what modern small GPTs use).
- Rotary position embeddings, precomputed cos/sin, offset by the KV-cache position; QK RMSNorm keeps attention
  logits bounded so Muon's larger updates stay stable.
- ReLU² MLP (4x wide), no biases anywhere, zero-initialised output projections (each block starts as identity).
- Logit soft cap 15·tanh(x/15) computed in fp32: bounds early-training logits; fp32 because bf16 tanh near the cap
  loses the small differences between tokens.
- The vocabulary is padded to a multiple of 64 for matmul efficiency and the logits are sliced back.

Run a tiny smoke check: `python -m picochat.model` prints the parameter breakdown and FLOPs/token of the CPU preset.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.attention import attn, attn_with_cache
from picochat.config import ModelConfig, derive_model_config


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(z / cap). Compiled, as cap - 2 cap / (exp(2 z / cap) + 1), the same function (tanh y = 1 - 2 / (e^2y
    + 1), exact at +-inf): inductor's vectorised exp is cheaper than its tanh (8 x 8k logits: 33 vs 85 us, at most 3e-6
    apart), the largest element-wise cost of a decode step. Eager keeps the single tanh kernel."""
    if torch.compiler.is_compiling():
        return cap - (2 * cap) / (torch.exp(z * (2 / cap)) + 1)
    return cap * torch.tanh(z / cap)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin broadcastable to (B, T, 1, D/2). Rotates the two halves of each head as pairs."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = cfg.layer_window(layer)
        C = cfg.n_embd
        self.c_q = nn.Linear(C, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(C, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_v = nn.Linear(C, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, C, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, ve=None):
        B, T, C = x.shape
        # cast once for the three projections: autocast casts an activation at every use (3 casts forward and 3
        # backward of (B, T, C) per layer; it caches only weights) - the same values, as one cast
        x = x.to(compute_dtype(x))
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, C) -> (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x)
        if ve is not None:  # value embedding: token identity injected straight into the values
            v = v + ve
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        if kv_cache is None:
            y = attn(q, k, v, causal=True, window=self.window)
        else:
            k_cache, v_cache = kv_cache.layer(self.layer)
            y = attn_with_cache(q, k, v, k_cache, v_cache, kv_cache.pos, kv_cache.kv_len(T), self.window)
        return self.c_proj(y.reshape(B, T, -1))  # (B, T, H, D) -> (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None, ve=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, ve)
        return x + self.mlp(norm(x))


# ---------------------------------------------------------------------------------------------------------------------
# the head and the training loss, fused and chunked


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in here: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _softcap_ce(zs: torch.Tensor, targets: torch.Tensor, cap: float, grads: bool) -> torch.Tensor:
    """Losses (m,) fp32 of one chunk of logits zs (m, V) in the compute dtype, a buffer of ours: with `grads` it is
    overwritten with d(sum of losses)/d(logits), else it may be clobbered. Targets -1 are ignored (loss 0, gradient 0).
    With th = tanh(z / cap) the logits are cap·th; the loss is logsumexp - logit[target] and, since it is a scalar,
    dloss/dz = (softmax - onehot(target))·(1 - th²). Written as 11 passes over the chunk, in place where possible (the
    textbook form, logsumexp then softmax again, took ~19)."""
    z = zs.float()  # (m, V) fp32: a copy, or zs itself when the compute dtype is fp32
    th = z.div_(cap).tanh_() if cap > 0 else z
    c = cap if cap > 0 else 1.0  # logits = c·th
    valid = targets >= 0
    tgt = targets.clamp(min=0)[:, None]  # (m, 1)
    top = th.amax(-1, keepdim=True) * c  # (m, 1) row max of the logits
    picked = th.gather(1, tgt) * c  # (m, 1) the target's logit, read before th may be overwritten
    e = torch.add(-top, th, alpha=c) if cap > 0 else th.sub_(top)  # logits - max (th is kept for d tanh)
    s = e.exp_().sum(-1, keepdim=True)  # (m, 1)
    losses = (top + s.log() - picked).squeeze(1) * valid
    if grads:
        e.mul_(valid[:, None] / s)  # softmax, ignored rows zeroed in the same pass
        e.scatter_add_(1, tgt, -valid[:, None].float())  # - onehot(target)
        if cap > 0:
            e.addcmul_(e, th.square_(), value=-1)  # d tanh: g·(1 - th²)
        zs.copy_(e)  # a no-op when e is zs (fp32, no cap)
    return losses


def head_losses(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, cap: float, group: int,
                chunk: int, grads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row cross-entropy of the softcapped logits x (N, C) @ w[:vocab]ᵀ, `group` rows at a time; with `grads` also
    d(sum)/dx (N, C) in x's dtype and d(sum)/dw (Vp, C) fp32. Returns (losses (N,) fp32, gx, gw).

    Per group: one matmul gives its logits (n, V) in the compute dtype (as the plain path rounds them), the
    element-wise work runs `chunk` rows at a time in fp32 (a chunk that stays in cache on CPU) and leaves the logits'
    gradient in the same buffer, then two matmuls give the group's dx and its share of dw. So dw is accumulated once
    per group, not per chunk, and the weight is cast once per call (inside an autograd.Function autocast's weight cache
    does not apply: the old per-chunk head cast it twice per chunk)."""
    cd = compute_dtype(x)
    N = x.size(0)
    losses = torch.empty(N, dtype=torch.float32, device=x.device)
    gx = torch.empty_like(x) if grads else None
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grads else None
    with torch.autocast(x.device.type, enabled=False):  # every dtype below is chosen here, not by autocast
        wc = w[:vocab].to(cd)  # (V, C)
        xc = x.to(cd)
        for g0 in range(0, N, group):
            xg = xc[g0 : g0 + group]
            zg = xg @ wc.t()  # (n, V) logits, then their gradient
            for s in range(0, zg.size(0), chunk):
                zs = zg[s : s + chunk]
                r = g0 + s
                losses[r : r + zs.size(0)] = _softcap_ce(zs, targets[r : r + zs.size(0)], cap, grads)
            if grads:
                gx[g0 : g0 + group] = zg @ wc
                gw[:vocab] += zg.t() @ xg
    return losses, gx, gw


# A group's logits (rows x vocab in the compute dtype) fill HEAD_GROUP_BYTES: 256 MB is 2,048 rows at vocab 65,536 in
# bf16 (32 groups for a 32 x 2,048 micro-batch, so dw's fp32 read-modify-write is ~32 x V x C, not the old 1,024 x, and
# rows enough for the matmuls to run at speed) and 16,384 at 8,192; the logits' memory stays a fixed budget however
# large the micro-batch. A chunk on CPU is HEAD_CHUNK_ELEMS fp32 logits: two 16 MB temporaries fit the 32 MB L3 of the
# 2-core Zen 5. benchmarks/head.py there (vocab 8k / 65k): 4M ran at 0.35-0.65x the plain path's time in every run; 1M
# was best on one thread (0.33x / 0.43x) but 1.11x at 8k on two threads of the loaded machine (every op is a parallel
# region that waits for both threads: 4x the regions), 16M 0.38-0.68x.
HEAD_GROUP_BYTES = 256 << 20
HEAD_CHUNK_ELEMS = 4 << 20
# Inside torch.compile a micro-batch whose logits (rows x vocab in the compute dtype) fit HEAD_PLAIN_BYTES takes the
# plain head (`plain_head_loss`) in the compiled graph instead: inductor fuses the softcap and cross-entropy, forward
# and backward, and the step needs no graph break. Its logits memory is then that of one group of the fused head (the
# same budget); a larger micro-batch (a large vocabulary, a GPU batch: 64k rows x 65k vocab is 8 GB) keeps the fused,
# chunked head, which never holds more than a group. Reference CPU setting (32 x 512 rows, vocab 8,192, bf16: 256 MB):
# plain and compiled.
HEAD_PLAIN_BYTES = 256 << 20


def head_rows(x: torch.Tensor, vocab: int, group_bytes: int, chunk_elems: int) -> tuple[int, int]:
    """(group, chunk): rows per group and per element-wise chunk of `head_losses` for x (N, C) (see HEAD_GROUP_BYTES).
    On a GPU a chunk is the whole group: element-wise kernels stream memory anyway, and 64-row chunks at vocab 65k
    would launch ~11 kernels per 64 rows."""
    group = max(1, group_bytes // (vocab * torch.finfo(compute_dtype(x)).bits // 8))
    chunk = group if x.is_cuda else max(1, chunk_elems // vocab)
    return group, min(chunk, group)


class ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of softcapped logits with the gradients taken in the forward pass (`head_losses`), so the
    (N, V) fp32 logits never exist whole (N·V·4 bytes: 512 MB for 16k tokens at vocab 8k on CPU, 17 GB per GPU for
    64k tokens at vocab 65k); backward() only scales the saved gradients by the incoming one.
    forward(x (N, C), w (Vp, C), targets (N,) with -1 = ignored, vocab V <= Vp, cap, group, chunk) -> scalar.
    """

    @staticmethod
    def forward(ctx, x, w, targets, vocab: int, cap: float, group: int, chunk: int):
        losses, gx, gw = head_losses(x, w, targets, vocab, cap, group, chunk, grads=True)
        ctx.save_for_backward(gx, gw.to(w.dtype))
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        gx, gw = ctx.saved_tensors
        return gx * grad_out, gw * grad_out, None, None, None, None, None


def plain_head_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, cap: float,
                    grads: bool) -> torch.Tensor:
    """`head_loss`'s result the textbook way: logits (N, V) in the compute dtype -> fp32 -> softcap ->
    cross_entropy. Inside torch.compile inductor fuses the softcap, the log-softmax and their backward into a few
    passes over the logits (see `GPT.plain_head`); eager would make each of them a full (N, V) fp32 tensor."""
    logits = F.linear(x, w)[:, :vocab].float()  # (N, V)
    if cap > 0:
        logits = softcap(logits, cap)
    losses = F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")  # (N,), 0 where ignored
    return losses.sum() if grads else losses


@torch.compiler.disable
def head_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, cap: float, group: int,
              chunk: int, grads: bool) -> torch.Tensor:
    """Training's summed loss (`grads`, through ChunkedHeadLoss) or evaluation's per-row losses (N,), outside
    torch.compile: traced, the chunk loop is unrolled (128 chunks at the reference CPU setting took minutes to
    compile), and run eagerly its chunks already stay in cache, which is the point."""
    with torch.profiler.record_function("picochat::head"):  # benchmarks/train.py --profile reports its share
        if grads:
            return ChunkedHeadLoss.apply(x, w, targets, vocab, cap, group, chunk)
        return head_losses(x, w, targets, vocab, cap, group, chunk, grads=False)[0]


class GPT(nn.Module):
    """forward(idx (B, T) int64, targets (B, T) int64 or None, kv_cache=None, loss_reduction='mean').

    Without targets it returns logits (B, T, vocab_size) in fp32; with targets the loss (mean over targets != -1, or
    per-token (B, T) with loss_reduction='none', 0 at ignored positions). `kv_cache` (see engine.KVCache) must give
    `.pos` (int or (B,) tensor of start positions), `.kv_len(T)` and `.layer(i) -> (k, v)`; the caller advances it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = derive_model_config(config)
        self.config = cfg
        self.padded_vocab = math.ceil(cfg.vocab_size / 64) * 64
        self.wte = nn.Embedding(self.padded_vocab, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.lm_head = nn.Linear(cfg.n_embd, self.padded_vocab, bias=False)
        kv_dim = cfg.n_kv_head * cfg.head_dim
        # optional extras (off by default; README has their measured effect at equal wall clock)
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(self.padded_vocab, kv_dim) for i in range(cfg.depth) if self.has_ve(i)})
        if cfg.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(cfg.depth))  # scales the residual stream entering block i
            self.x0_lambdas = nn.Parameter(torch.zeros(cfg.depth))  # mixes the first embedding back in
        # the fused head + loss (see head_rows): logits bytes per group, and fp32 logits per element-wise chunk on CPU
        self.head_group_bytes = HEAD_GROUP_BYTES
        self.head_chunk_elems = HEAD_CHUNK_ELEMS
        self.head_plain_bytes = HEAD_PLAIN_BYTES  # 0: always the fused head
        cos, sin = self._rotary(cfg.sequence_len)
        self.register_buffer("cos", cos, persistent=False)  # (T, D/2)
        self.register_buffer("sin", sin, persistent=False)

    def head_rows(self, x: torch.Tensor) -> tuple[int, int]:
        """(group, chunk) rows of the fused head for x (N, C) under this model's budgets (see `head_rows`)."""
        return head_rows(x, self.config.vocab_size, self.head_group_bytes, self.head_chunk_elems)

    def plain_head(self, x: torch.Tensor) -> bool:
        """Whether the loss of x (N, C) takes the plain head inside the compiled graph (see HEAD_PLAIN_BYTES). Eager
        always takes the fused one: there the plain path's element-wise ops each write (N, V) fp32 tensors (the fused
        head took 0.49-0.59x its time at vocab 8k, benchmarks/head.py)."""
        logit_bytes = x.size(0) * self.config.vocab_size * torch.finfo(compute_dtype(x)).bits // 8
        return torch.compiler.is_compiling() and logit_bytes <= self.head_plain_bytes

    def has_ve(self, layer: int) -> bool:
        """Value embeddings on every other layer, always including the last (as in recent speedrun records)."""
        return self.config.value_embeds and layer % 2 == (self.config.depth - 1) % 2

    def _rotary(self, T: int, device=None):
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Embedding ~ N(0, 1); lm_head ~ N(0, 0.001) so the initial loss is ln(vocab); input projections uniform with
        std 1/sqrt(C); output projections zero so each block starts as the identity."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)

        def fill(p, fn):
            tmp = torch.empty(p.shape, dtype=torch.float32)
            fn(tmp)
            p.copy_(tmp)

        fill(self.wte.weight, lambda t: t.normal_(0.0, 1.0, generator=gen))
        fill(self.lm_head.weight, lambda t: t.normal_(0.0, 0.001, generator=gen))
        bound = math.sqrt(3.0) / math.sqrt(self.config.n_embd)  # uniform(-b, b) has std 1/sqrt(C)
        for blk in self.blocks:
            for lin in (blk.attn.c_q, blk.attn.c_k, blk.attn.c_v, blk.mlp.c_fc):
                fill(lin.weight, lambda t: t.uniform_(-bound, bound, generator=gen))
            blk.attn.c_proj.weight.zero_()
            blk.mlp.c_proj.weight.zero_()
        for emb in self.value_embeds.values():
            fill(emb.weight, lambda t: t.uniform_(-bound, bound, generator=gen))
        if self.config.resid_scalars:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.0)
        cos, sin = self._rotary(self.config.sequence_len, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def param_kinds(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups for the optimizer: Muon for block matrices, AdamW (own LRs) for the rest."""
        return {
            "matrix": [p for p in self.blocks.parameters()],
            "embedding": [self.wte.weight, *(e.weight for e in self.value_embeds.values())],
            "unembedding": [self.lm_head.weight],
            "scalar": [self.resid_lambdas, self.x0_lambdas] if self.config.resid_scalars else [],
        }

    def num_params(self) -> dict[str, int]:
        """Parameter counts by part (the embedding and lm_head counted at their padded size)."""
        counts = {
            "wte": self.wte.weight.numel(),
            "blocks_attn": sum(p.numel() for b in self.blocks for p in b.attn.parameters()),
            "blocks_mlp": sum(p.numel() for b in self.blocks for p in b.mlp.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "value_embeds": sum(e.weight.numel() for e in self.value_embeds.values()),
        }
        counts["total"] = sum(counts.values())
        return counts

    def estimate_flops(self, seq_len: int | None = None) -> dict[str, float]:
        """Training matmul FLOPs per token (forward + backward = 3x forward).

        linear: 6 x (parameters of all linear layers incl. lm_head at the real vocab, the rows the fused training head
        multiplies by; the embedding lookup is not a matmul).
        attention: per layer QK^T and AV cost 2·2·H·D FLOPs per (query, key) pair forward; a causal query at position t
        sees t+1 keys (at most `window`), so we count the *average* number of keys actually attended, x3 for training.
        This is stricter than the usual 12·L·H·D·T convention, which counts the masked half too.
        """
        cfg = self.config
        T = seq_len or cfg.sequence_len
        n_linear = sum(p.numel() for p in self.blocks.parameters()) + cfg.vocab_size * cfg.n_embd
        attn_flops = 0.0
        for layer in range(cfg.depth):
            w = cfg.layer_window(layer) or T
            avg_keys = sum(min(t + 1, w) for t in range(T)) / T
            attn_flops += 3 * 4 * cfg.n_head * cfg.head_dim * avg_keys
        return {"linear": 6.0 * n_linear, "attention": attn_flops, "total": 6.0 * n_linear + attn_flops,
                "palm_convention": 6.0 * n_linear + 12 * cfg.depth * cfg.n_head * cfg.head_dim * T}

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction: str = "mean", last: bool = False):
        """idx (B, T) -> logits (B, T, V), or (B, 1, V) with `last` (a prefill needs only the next token's: the head
        and softcap over every prompt position were ~40% of a 25-token prefill's work at depth 4, vocab 8k), or a loss
        with `targets`."""
        B, T = idx.shape
        if kv_cache is None:
            if T > self.cos.size(0):
                raise ValueError(f"sequence of {T} tokens exceeds the model's context {self.cos.size(0)}")
            cos, sin = self.cos[None, :T, None], self.sin[None, :T, None]  # (1, T, 1, D/2)
        elif isinstance(kv_cache.pos, int):
            p = kv_cache.pos
            cos, sin = self.cos[None, p : p + T, None], self.sin[None, p : p + T, None]
        else:
            positions = kv_cache.pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, D/2)
        # rotary tables in the compute dtype (they are (T, D/2), a cast costs nothing): fp32 tables promote bf16 q and k
        # to fp32, and then every rotary product, the QK norm and their backward run in fp32 with casts in and out
        # (an eager bf16 step at the reference shape: 120 of its ~800 copies, on q and k's halves)
        cd = compute_dtype(cos)
        cos, sin = cos.to(cd), sin.to(cd)
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            if self.config.resid_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, kv_cache, ve)
        if last and targets is None:
            x = x[:, -1:]  # (B, T, C) -> (B, 1, C)
        x = norm(x)
        cap = self.config.logit_softcap
        w = self.lm_head.weight
        grads = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if targets is not None and (loss_reduction in ("sum", "mean") or not grads):
            # the fused head + loss, for training (gradients taken in the same pass) and for evaluation (losses
            # without gradients): the (B, T, V) fp32 logits never exist whole; compiled, a micro-batch whose logits
            # fit HEAD_PLAIN_BYTES takes the plain head inside the graph instead
            x2 = x.reshape(B * T, -1)  # (B, T, C) -> (B*T, C)
            t2 = targets.reshape(B * T)
            if self.plain_head(x2):
                loss = plain_head_loss(x2, w, t2, self.config.vocab_size, cap, grads)
            else:
                loss = head_loss(x2, w, t2, self.config.vocab_size, cap, *self.head_rows(x2), grads)
            if loss_reduction == "none":
                return loss.view(B, T)  # (B*T,) -> (B, T)
            loss = loss if grads else loss.sum()
            return loss if loss_reduction == "sum" else loss / (t2 >= 0).sum().clamp(min=1)
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()  # (B, T, V) in fp32 for the softcap
        if cap > 0:
            logits = softcap(logits, cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss


def main(argv=None) -> None:
    cfg = derive_model_config(ModelConfig(depth=6, head_dim=64, vocab_size=8192, sequence_len=512))
    model = GPT(cfg)
    print(model.num_params())
    print(model.estimate_flops())


if __name__ == "__main__":
    main()
