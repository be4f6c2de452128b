"""Backend parity: every attention path equals a plain softmax(QK^T)V reference (causal, sliding window, GQA,
per-row cache positions). On a Hopper GPU with FlashAttention-3 the same checks run against FA3."""

import math

import pytest
import torch

from picochat import attention


def reference(q, k, v, window=0, offset=0):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D); query i sits at absolute position offset + i."""
    B, Tq, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    qpos = torch.arange(Tq)[:, None] + offset
    kpos = torch.arange(k.size(1))[None, :]
    ok = (kpos <= qpos) & ((qpos - kpos < window) if window > 0 else True)
    s = s.masked_fill(~ok, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("hkv,window", [(4, 0), (2, 0), (1, 5), (4, 7)])
def test_attn_matches_reference(hkv, window):
    torch.manual_seed(0)
    q = torch.randn(2, 20, 4, 16)
    k, v = torch.randn(2, 20, hkv, 16), torch.randn(2, 20, hkv, 16)
    out = attention.attn(q, k, v, causal=True, window=window)
    assert (out - reference(q, k, v, window)).abs().max() < 1e-5


@pytest.mark.parametrize("window", [0, 6])
def test_attn_with_cache_per_row_positions(window):
    torch.manual_seed(1)
    B, Tmax, H, Hkv, D = 2, 32, 4, 2, 16
    kc, vc = torch.zeros(B, Tmax, Hkv, D), torch.zeros(B, Tmax, Hkv, D)
    ks, vs = torch.randn(B, Tmax, Hkv, D), torch.randn(B, Tmax, Hkv, D)
    lens = [9, 14]
    for b, n in enumerate(lens):  # rows already hold different amounts of history
        kc[b, :n], vc[b, :n] = ks[b, :n], vs[b, :n]
    q = torch.randn(B, 2, H, D)
    knew, vnew = torch.randn(B, 2, Hkv, D), torch.randn(B, 2, Hkv, D)
    out = attention.attn_with_cache(q, knew, vnew, kc, vc, torch.tensor(lens), max(lens) + 2, window)
    for b, n in enumerate(lens):
        kfull = torch.cat([ks[b : b + 1, :n], knew[b : b + 1]], 1)
        vfull = torch.cat([vs[b : b + 1, :n], vnew[b : b + 1]], 1)
        ref = reference(q[b : b + 1], kfull, vfull, window, offset=n)
        assert (out[b : b + 1] - ref).abs().max() < 1e-5
        assert torch.equal(kc[b, n : n + 2], knew[b])  # written in place at the row's own position


@pytest.mark.parametrize("hkv,window", [(4, 0), (2, 5)])
def test_compiled_one_query_matches_reference(hkv, window):
    """The compiled decode step's one-query attention (`_one_query`: realized scaled query, scores transposed for the
    softmax, normalisation after the value sum) against the reference: per-row positions, GQA, a sliding window, a
    bf16 cache as on CPU, and one graph for every batch >= 2 and kv length."""
    from torch._dynamo.utils import counters

    torch.manual_seed(2)
    H, D, Tmax = 4, 16, 40
    kc_all = torch.randn(8, Tmax, hkv, D).to(torch.bfloat16)
    vc_all = torch.randn(8, Tmax, hkv, D).to(torch.bfloat16)

    def step(q, k, v, kc, vc, pos):
        return attention.attn_with_cache(q, k, v, kc, vc, pos, kc.size(1), window)

    compiled = torch.compile(step, fullgraph=True)
    graphs = counters["stats"]["unique_graphs"]
    for B, lens in ((2, [9, 14]), (5, [3, 20, 7, 31, 12])):
        S = max(lens) + 1
        kc, vc = kc_all[:B, :S].clone(), vc_all[:B, :S].clone()
        q = torch.randn(B, 1, H, D)
        knew, vnew = torch.randn(B, 1, hkv, D), torch.randn(B, 1, hkv, D)
        pos = torch.tensor(lens)
        for t in (kc, vc):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 1)
        for t in (q, knew, vnew, pos):
            torch._dynamo.mark_dynamic(t, 0)
        out = compiled(q, knew, vnew, kc, vc, pos)
        for b, n in enumerate(lens):
            assert torch.equal(kc[b, n], knew[b, 0].to(torch.bfloat16))  # written in place at the row's position
            ref = reference(q[b : b + 1], kc[b : b + 1, : n + 1].float(), vc[b : b + 1, : n + 1].float(), window,
                            offset=n)
            assert (out[b : b + 1] - ref).abs().max() < 1e-5
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_backend_choice_is_logged_and_overridable(monkeypatch):
    attention._backend.cache_clear()
    monkeypatch.setenv("PICOCHAT_ATTN", "sdpa")
    assert attention.describe_backend() == "attention backend: sdpa (forced by PICOCHAT_ATTN)"
    attention._backend.cache_clear()
    monkeypatch.setenv("PICOCHAT_ATTN", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        attention._backend()
    attention._backend.cache_clear()
    monkeypatch.delenv("PICOCHAT_ATTN")
    if not torch.cuda.is_available():
        assert "sdpa" in attention.describe_backend()
    attention._backend.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fa3_matches_sdpa_on_gpu(monkeypatch):
    attention._backend.cache_clear()
    if attention._backend()[0] != "fa3":
        pytest.skip("FlashAttention-3 not available on this GPU")
    torch.manual_seed(0)
    q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    fa3 = attention.attn(q, k, v, window=16)
    ref = reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), 16)
    assert (fa3.float().cpu() - ref).abs().max() < 2e-2
    # the real kernel through the whole model: a bf16-autocast training step, then evaluation without autocast
    from conftest import make_tiny_model

    model = make_tiny_model(vocab_size=300, depth=2, n_embd=128, head_dim=64).cuda()
    x = torch.randint(0, 300, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, targets=x).backward()
    with torch.no_grad():
        assert torch.isfinite(model(x, targets=x, loss_reduction="none")).all()
    # flash_attn_with_kvcache: rows at different positions in a bf16 cache, against the reference
    B, S, Hkv = 2, 40, 2
    kc, vc = torch.randn(B, S, Hkv, 64, device="cuda").bfloat16(), torch.randn(B, S, Hkv, 64, device="cuda").bfloat16()
    q1, k1, v1 = (torch.randn(B, 1, n, 64, device="cuda").bfloat16() for n in (4, Hkv, Hkv))
    lens = [9, 30]
    out = attention.attn_with_cache(q1, k1, v1, kc, vc, torch.tensor(lens, device="cuda"), S)
    for b, n in enumerate(lens):
        assert torch.equal(kc[b, n], k1[b, 0])
        ref = reference(q1[b : b + 1].float().cpu(), kc[b : b + 1, : n + 1].float().cpu(),
                        vc[b : b + 1, : n + 1].float().cpu(), offset=n)
        assert (out[b : b + 1].float().cpu() - ref).abs().max() < 2e-2
    attention._backend.cache_clear()


# ---------------------------------------------------------------------------------------------------------------------
# FlashAttention-3's input contract, checked on CPU through the whole model with a stand-in kernel


class Fa3StandIn:
    """In place of flash_attn_interface: asserts what FA3's kernels require of their inputs (flash_attn_func and
    flash_attn_with_kvcache in flash-attention's hopper/flash_attn_interface.py: q, k, v (and the cache) of one dtype,
    fp16 or bf16; (B, T, H, D) with H a multiple of the kv heads; last dimension contiguous; head dim a multiple of 8
    up to 256; cache_seqlens an int32 (B,) tensor), then computes what FA3 computes with SDPA. `calls` counts both."""

    HALF = (torch.float16, torch.bfloat16)

    def __init__(self):
        self.calls = {"func": 0, "kvcache": 0}

    def _check(self, q, *kv):
        assert q.dtype in self.HALF, f"FA3 takes fp16/bf16, got q {q.dtype}"
        for t in kv:
            assert t.dtype == q.dtype, f"FA3 needs one dtype: q {q.dtype}, k/v {t.dtype}"
        for t in (q, *kv):
            assert t.dim() == 4 and t.stride(-1) == 1, f"FA3 needs (B, T, H, D), last dim contiguous: {t.stride()}"
        B, _, H, D = q.shape
        assert D % 8 == 0 and D <= 256, f"head dim {D}"
        for t in kv:
            assert t.size(0) == B and t.size(3) == D and H % t.size(2) == 0, (q.shape, t.shape)

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
        self._check(q, k, v)
        assert k.shape == v.shape and k.size(1) == q.size(1) and softmax_scale is None and not kw
        self.calls["func"] += 1
        T, left = q.size(1), window_size[0]
        mask = attention._band_mask(T, T, 0, left + 1 if left >= 0 else 0, q.device) if causal else None
        return attention._sdpa(q, k, v, mask=mask)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                                window_size=(-1, -1), **kw):
        self._check(q, k_cache, v_cache, k, v)
        B, Tq = q.shape[:2]
        assert isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dtype == torch.int32, cache_seqlens
        assert cache_seqlens.shape == (B,) and causal and k.size(1) == Tq and not kw
        self.calls["kvcache"] += 1
        out = []
        for b, n in enumerate(cache_seqlens.tolist()):  # FA3: new keys appended at row b's length, in place
            k_cache[b, n : n + Tq], v_cache[b, n : n + Tq] = k[b], v[b]
            left = window_size[0]
            mask = attention._band_mask(Tq, n + Tq, n, left + 1 if left >= 0 else 0, q.device)
            out.append(attention._sdpa(q[b : b + 1], k_cache[b : b + 1, : n + Tq], v_cache[b : b + 1, : n + Tq],
                                       mask=mask))
        return torch.cat(out)


@pytest.fixture
def fa3_stand_in():
    stand_in = Fa3StandIn()
    with attention.fa3_override(stand_in):
        yield stand_in


def _fa3_model(**kw):
    from conftest import make_tiny_model, randomize_outputs

    # head dim 16 (FA3 needs a multiple of 8), GQA, a sliding-window layer and value embeddings (v gets an fp32 add)
    return randomize_outputs(make_tiny_model(vocab_size=300, depth=3, n_embd=64, head_dim=16, n_kv_head=2,
                                             window_pattern="SL", short_window=8, value_embeds=True, **kw), seed=4)


def test_fa3_contract_through_the_model_training_and_eval(fa3_stand_in):
    """A bf16-autocast training step and an evaluation without autocast (as evaluate_bpb runs it) give FA3 inputs it
    accepts, and the same loss and gradients as the SDPA backend (to bf16 precision)."""
    model = _fa3_model()
    x, y = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))

    def train_step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, targets=y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def evaluate():
        with torch.no_grad():
            return model(x, targets=y, loss_reduction="none")

    loss, grads = train_step()
    per_tok = evaluate()
    assert fa3_stand_in.calls["func"] == 2 * model.config.depth
    fa3_stand_in.calls["func"] = 0
    with attention.fa3_override(None):  # the reference: this process's own backend, SDPA on CPU
        ref_loss, ref_grads = train_step()
        ref_per_tok = evaluate()
    assert fa3_stand_in.calls["func"] == 0
    assert abs(loss.item() - ref_loss.item()) < 1e-3  # SDPA under autocast also runs in bf16
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 0.01 * r.norm() + 1e-6
    assert (per_tok - ref_per_tok).abs().max() < 2e-2  # fp32 model: FA3's attention alone runs in bf16


def test_fa3_contract_with_kv_cache(fa3_stand_in):
    """Prefill and decode with a bf16 cache under autocast (the engine on a GPU), aligned and per-row positions: each
    attention call goes to flash_attn_with_kvcache with inputs it accepts, and the logits match a full forward."""
    from picochat.engine import KVCache

    model = _fa3_model()
    model.eval()
    cfg = model.config
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
        cache = KVCache(cfg.depth, 2, cfg.sequence_len, cfg.n_kv_head, cfg.head_dim, "cpu", torch.bfloat16)
        parts = [model(x[:, :12], kv_cache=cache.view(slice(0, 2), [0, 0]))]
        for t in range(12, 20):
            parts.append(model(x[:, t : t + 1], kv_cache=cache.view(slice(0, 2), [t, t])))
        # a row one token behind the other: per-row positions
        model(x[1:, :12], kv_cache=cache.view(slice(1, 2), [0]))
        step = model(torch.stack([x[0, 19:20], x[1, 12:13]]), kv_cache=cache.view(slice(0, 2), [19, 12]))
    assert fa3_stand_in.calls["kvcache"] == cfg.depth * (1 + 8 + 1 + 1)
    assert (torch.cat(parts, 1) - full).abs().max() < 0.1
    assert (step[0, -1] - full[0, 19]).abs().max() < 0.1 and (step[1, -1] - full[1, 12]).abs().max() < 0.1
