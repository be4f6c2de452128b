"""picochat's GPT for `transformers` (`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`), copied
next to the weights by `picochat export --format hf`. Self-contained (torch + transformers only): a re-implementation
of picochat/model.py's forward, with the same parameter names, checked against it by tests/test_export.py (max abs
logit difference <= 1e-4 in fp32).

The network: token embedding -> RMS norm -> blocks of [x += attn(norm(x)); x += mlp(norm(x))] -> norm -> lm_head ->
15·tanh(logits/15) in fp32. Attention: rotary embeddings on q and k, then RMS norm of each head (QK-norm), grouped
kv heads, sliding windows on the S layers of window_pattern, value embeddings added to v on every other layer and
per-layer residual / x0 scalars when the config has them. ReLU² MLP, no biases, parameter-free RMS norms.

Generation: `forward` takes the cache `generate` passes (a transformers Cache: `update(k, v, layer)` returns every
key and value so far) and attends over it, with sliding windows applied by the mask, so `model.generate` decodes
one token per forward instead of recomputing the prefix. `attention_mask` (left padding) and `position_ids` are
honoured: rotary positions come from position_ids (else from the mask, else from the cache length).
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_picochat import PicochatConfig

# transformers 5 renamed the output's and forward's cache from past_key_values to cache
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # eps None = torch.finfo(x.dtype).eps, as picochat's


def apply_rotary(x, cos, sin):
    """x (B, T, H, D); cos/sin (B, T, 1, D/2): the two halves of each head rotated as pairs."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PicochatConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.layer_window(layer)
        C = config.n_embd
        self.c_q = nn.Linear(C, config.n_head * config.head_dim, bias=False)
        self.c_k = nn.Linear(C, config.n_kv_head * config.head_dim, bias=False)
        self.c_v = nn.Linear(C, config.n_kv_head * config.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, C, bias=False)

    def forward(self, x, cos, sin, allowed, cache=None, ve=None):
        """allowed (B, 1, T, S) bool: query i may see key j, S = keys in the cache after this step (or T)."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, C) -> (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x)
        if ve is not None:
            v = v + ve
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # every key and value so far, (B, Hkv, S, D)
        mask = allowed
        if self.window > 0:
            S = k.size(2)
            qpos = torch.arange(S - T, S, device=x.device)[:, None]  # (T, 1) cache index of each query
            mask = mask & (qpos - torch.arange(S, device=x.device)[None, :] < self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, D) -> (B, T, H*D)


class MLP(nn.Module):
    def __init__(self, config: PicochatConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: PicochatConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, allowed, cache=None, ve=None):
        x = x + self.attn(norm(x), cos, sin, allowed, cache, ve)
        return x + self.mlp(norm(x))


class PicochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PicochatConfig
    base_model_prefix = "picochat"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: let generate() pass a Cache (5.x always does)

    def __init__(self, config: PicochatConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.depth)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kv_dim = config.n_kv_head * config.head_dim
        # value embeddings on every other layer, the last one included (picochat GPT.has_ve)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(config.depth)
                                           if config.value_embeds and i % 2 == (config.depth - 1) % 2})
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.depth))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.depth))
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the exported file; there is no training recipe here

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _rotary(self, positions):
        """cos, sin (B, T, 1, D/2) fp32 for integer positions (B, T), computed as picochat's tables are."""
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                                 device=positions.device) / d))
        freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
        return freqs.cos()[:, :, None], freqs.sin()[:, :, None]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        """input_ids (B, T) -> CausalLMOutputWithPast: logits (B, T, vocab) fp32, loss (mean next-token cross-entropy,
        labels -100 ignored, shifted here as transformers does) when labels are given, and the cache."""
        if inputs_embeds is not None:
            raise ValueError("picochat models take input_ids only (value embeddings need the token ids)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("picochat models take a 2-D attention_mask (batch, keys), as generate() gives with its "
                             "default dynamic cache; static caches and 4-D masks are not supported")
        cache = kwargs.pop("cache", None)
        cache = past_key_values if cache is None else cache  # not `or`: an empty Cache is falsy (len 0)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        if position_ids is None:
            if attention_mask is not None:  # left padding: a row's first real token is at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, S, device=input_ids.device)[None].expand(B, T)
        # the tables in the weights' dtype, as picochat casts them to its compute dtype: bf16 q and k stay bf16
        cos, sin = (t.to(self.wte.weight.dtype) for t in self._rotary(position_ids))
        qidx = torch.arange(past, S, device=input_ids.device)[:, None]  # (T, 1) cache index of each query
        kidx = torch.arange(S, device=input_ids.device)[None, :]  # (1, S)
        allowed = (kidx <= qidx)[None, None]  # (1, 1, T, S) causal
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -S:].bool()  # (B, 1, T, S): padding keys hidden
            allowed = allowed | (kidx == qidx)  # a padding query sees itself: no all-masked row, no NaN to spread
        x = x0 = norm(self.wte(input_ids))
        for i, block in enumerate(self.blocks):
            if self.config.resid_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, allowed, cache, ve)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # generate needs only the last position's logits
        logits = self.lm_head(norm(x)).float()  # (B, T, V) fp32 for the soft cap
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
