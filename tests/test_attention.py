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
    attention._backend.cache_clear()
