import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_tiny_model, randomize_outputs
from picochat.config import ModelConfig, derive_model_config
from picochat.common import UserError
from picochat.engine import KVCache


def test_derived_config():
    c = derive_model_config(ModelConfig(depth=6, head_dim=64))
    assert (c.n_embd, c.n_head, c.n_kv_head) == (384, 6, 6)
    c = derive_model_config(ModelConfig(depth=5, head_dim=128))
    assert c.n_embd == 384 and c.n_head == 3  # 320 rounded up to a multiple of 128
    with pytest.raises(UserError, match="n_kv_head"):
        derive_model_config(ModelConfig(depth=4, head_dim=64, n_kv_head=3))


def test_initial_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = make_tiny_model(vocab_size=500)
    x = torch.randint(0, 500, (4, 32))
    loss = model(x, targets=torch.roll(x, -1, 1)).item()
    assert abs(loss - math.log(500)) < 0.2
    assert model.lm_head.weight.shape[0] == 512  # padded to a multiple of 64, sliced back in the logits
    assert model(x).shape == (4, 32, 500)


@pytest.mark.parametrize("cap", [15.0, 0.0])
def test_fused_chunked_head_loss_matches_plain_cross_entropy(cap):
    """Training's fused head+loss (chunks of rows, gradients taken in the forward pass) equals the textbook path:
    full logits -> softcap -> F.cross_entropy, in value and in every parameter's gradient, with ignored targets and
    a chunk size that does not divide the row count."""
    model = randomize_outputs(make_tiny_model(vocab_size=300, logit_softcap=cap), seed=1)
    model.head_group_bytes = 13 * 300 * 4  # 13 fp32 rows per group: 3*40 rows -> a ragged last group
    model.head_chunk_elems = 5 * 300  # 5 rows per element-wise chunk: 5, 5, 3 in a group
    x, y = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    y[0, :5] = -1
    y[2, :] = -1  # a whole row of prompt tokens
    for red in ("sum", "mean"):
        model.zero_grad()
        fused = model(x, targets=y, loss_reduction=red)
        (fused * 0.5).backward()  # a non-unit upstream gradient, as the loop's loss scaling gives
        g_fused = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = F.cross_entropy(model(x).reshape(-1, 300), y.reshape(-1), ignore_index=-1, reduction=red)
        (ref * 0.5).backward()
        g_ref = [p.grad.clone() for p in model.parameters()]
        assert torch.allclose(fused, ref, rtol=1e-6, atol=1e-4), (red, fused.item(), ref.item())
        for a, b in zip(g_fused, g_ref):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cap", [15.0, 0.0])
def test_compiled_plain_head_matches_fused_head_and_follows_the_budget(cap, monkeypatch):
    """Compiled, a micro-batch whose logits fit head_plain_bytes takes the plain head inside the graph (the fused
    head, a graph break, is not called); one byte less and it takes the fused head. Both give the eager fused head's
    loss and gradients, sum and mean, with ignored targets. (aot_eager: dynamo and autograd as with inductor, without
    its minutes of code generation; inductor's softcap form is test_softcap_compiled_form_equals_tanh.)"""
    import picochat.model as model_mod

    V, B, T = 300, 2, 16
    model = randomize_outputs(make_tiny_model(vocab_size=V, depth=1, n_embd=32, sequence_len=T, logit_softcap=cap),
                              seed=1)
    calls = []
    fused = model_mod.head_loss
    monkeypatch.setattr(model_mod, "head_loss", lambda *a: calls.append(1) or fused(*a))
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    y[0, :3] = -1

    def loss_and_grads(f, red):
        model.zero_grad()
        loss = f(x, targets=y, loss_reduction=red)
        (loss * 0.5).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    for red in ("sum", "mean"):
        ref, g_ref = loss_and_grads(model, red)  # eager: always the fused head
        for budget, fused_calls in ((B * T * V * 4, 0), (B * T * V * 4 - 1, 1)):  # fp32 logits: 4 bytes each
            model.head_plain_bytes = budget
            torch._dynamo.reset()
            calls.clear()
            loss, g = loss_and_grads(torch.compile(model, backend="aot_eager"), red)
            assert len(calls) == fused_calls, (red, budget)
            assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-4), (red, loss.item(), ref.item())
            for a, b in zip(g, g_ref):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


class OpLog(TorchDispatchMode):
    """Every aten op run inside the block: (name, [(shape, dtype) of tensor inputs], [(shape, dtype) of outputs],
    whether the outputs are new memory (not views))."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sig = lambda ts: [(tuple(t.shape), t.dtype) for t in ts if isinstance(t, torch.Tensor)]  # noqa: E731
        outs = out if isinstance(out, (tuple, list)) else [out]
        base = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
        new = not any(t.untyped_storage().data_ptr() in base for t in outs if isinstance(t, torch.Tensor))
        self.ops.append((func.__name__, sig(args), sig(outs), new))
        return out

    def count(self, name, pred=lambda ins, outs: True):
        return sum(1 for n, ins, outs, _ in self.ops if n == name and pred(ins, outs))

    def largest(self, dtype=None):
        """The most elements of any tensor an op allocated (of `dtype` if given)."""
        return max((math.prod(s) for _, _, outs, new in self.ops if new for s, d in outs if dtype in (None, d)),
                   default=0)


def _vocab_65k_model():
    # the vocabulary of d20 (65,536) at a tiny width: 256 rows of fp32 logits are 64 MB
    return randomize_outputs(make_tiny_model(vocab_size=65536, depth=1, n_embd=64, head_dim=16, sequence_len=64))


def test_fused_head_at_65k_vocab_casts_the_weight_once_and_accumulates_dw_once():
    """Issue 12 item 6: at vocab 65,536 the old head took 64-row chunks, each casting the weight twice and adding a
    V x C fp32 partial into dw. Under bf16 autocast a 4 x 64-row micro-batch is now one group: the weight is cast
    to bf16 once and dw comes from one matmul; loss and gradients still match the plain path."""
    model = _vocab_65k_model()
    V, C = 65536, 64
    x, y = torch.randint(0, V, (4, 64)), torch.randint(0, V, (4, 64))
    y[1, :7] = -1
    log = OpLog()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with log:
            model(x, targets=y, loss_reduction="sum").backward()
        g = model.lm_head.weight.grad.clone()
        model.zero_grad()
        F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1), ignore_index=-1, reduction="sum").backward()
    weight_casts = log.count("_to_copy.default", lambda ins, outs: ins[0] == ((V, C), torch.float32))
    dw_matmuls = log.count("mm.default", lambda ins, outs: outs[0][0] == (V, C))
    assert (weight_casts, dw_matmuls) == (1, 1)
    assert (g - model.lm_head.weight.grad).norm() < 1e-2 * g.norm()


def test_eval_losses_go_through_the_chunked_head():
    """Issue 12 item 6: evaluation (`loss_reduction='none'`, no grad) built the full (N, V) fp32 logits (17 GB at d20
    shapes). Now no tensor exceeds a group's logits and, under bf16 autocast, no fp32 one exceeds an element-wise
    chunk (64 rows at this vocab), the losses unchanged."""
    model = _vocab_65k_model()
    V = 65536
    model.head_group_bytes = 64 * V * 4  # 64 fp32 or 128 bf16 rows per group: 4 or 2 groups for 256 rows
    x, y = torch.randint(0, V, (4, 64)), torch.randint(0, V, (4, 64))
    y[2, 10:] = -1
    for dtype, group, fp32_rows in ((torch.float32, 64, 64), (torch.bfloat16, 128, 64)):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            ref = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1), ignore_index=-1, reduction="none")
            with OpLog() as log:
                per_tok = model(x, targets=y, loss_reduction="none")
            mean = model(x, targets=y)
        assert log.largest(torch.float32) <= fp32_rows * V and log.largest() <= group * V
        assert (per_tok.reshape(-1) - ref).abs().max() < 1e-4
        assert torch.allclose(mean, ref.sum() / (y >= 0).sum(), rtol=1e-5)


def test_loss_reduction_and_ignore_index():
    model = randomize_outputs(make_tiny_model(vocab_size=100))
    x = torch.randint(0, 100, (2, 16))
    y = torch.randint(0, 100, (2, 16))
    y[0, :5] = -1
    per_tok = model(x, targets=y, loss_reduction="none")
    assert per_tok.shape == (2, 16) and torch.all(per_tok[0, :5] == 0)
    mean = model(x, targets=y)
    assert torch.allclose(mean, per_tok.sum() / (y != -1).sum(), atol=1e-6)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = make_tiny_model(vocab_size=64, depth=2, n_embd=64, head_dim=16, sequence_len=32)
    x = torch.randint(0, 64, (4, 32))
    y = torch.randint(0, 64, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"


@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_kv_cache_matches_full_forward(n_kv_head):
    torch.manual_seed(0)
    model = randomize_outputs(make_tiny_model(vocab_size=200, n_embd=64, head_dim=16, n_kv_head=n_kv_head))
    model.eval()
    x = torch.randint(0, 200, (3, 24))
    with torch.no_grad():
        full = model(x)
        cfg = model.config
        cache = KVCache(cfg.depth, 3, cfg.sequence_len, cfg.n_kv_head, cfg.head_dim, "cpu", torch.float32)
        parts = [model(x[:, :10], kv_cache=cache.view(slice(0, 3), [0, 0, 0]))]
        for t in range(10, 24):
            parts.append(model(x[:, t : t + 1], kv_cache=cache.view(slice(0, 3), [t, t, t])))
        cached = torch.cat(parts, dim=1)
        # last=True (the engine's prefill): only the last position's logits, the same values
        cache2 = KVCache(cfg.depth, 3, cfg.sequence_len, cfg.n_kv_head, cfg.head_dim, "cpu", torch.float32)
        last = model(x[:, :10], kv_cache=cache2.view(slice(0, 3), [0, 0, 0]), last=True)
    assert (full - cached).abs().max().item() < 1e-4
    assert last.shape == (3, 1, 200) and (last - full[:, 9:10]).abs().max().item() < 1e-4
    assert torch.equal(cache2.k[:, :, :10], cache.k[:, :, :10])  # the cache is filled all the same


def test_kv_cache_rows_at_different_positions():
    """Continuous batching: rows whose prompts differ in length decode together with per-row positions."""
    torch.manual_seed(1)
    model = randomize_outputs(make_tiny_model(vocab_size=200, n_kv_head=2), seed=3)
    model.eval()
    a, b = torch.randint(0, 200, (1, 12)), torch.randint(0, 200, (1, 7))
    cfg = model.config
    with torch.no_grad():
        cache = KVCache(cfg.depth, 2, cfg.sequence_len, cfg.n_kv_head, cfg.head_dim, "cpu", torch.float32)
        model(a, kv_cache=cache.view(slice(0, 1), [0]))
        model(b, kv_cache=cache.view(slice(1, 2), [0]))
        nxt = torch.tensor([[5], [9]])
        step = model(nxt, kv_cache=cache.view(slice(0, 2), [12, 7]))[:, -1]
        ref_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    assert (step[0] - ref_a[0]).abs().max() < 1e-4 and (step[1] - ref_b[0]).abs().max() < 1e-4


def test_sliding_window_limits_context():
    torch.manual_seed(0)
    model = randomize_outputs(make_tiny_model(vocab_size=100, depth=2, window_pattern="S", short_window=4), seed=2)
    model.eval()
    assert model.config.layer_window(0) == 4 and model.config.layer_window(1) == 0  # last layer always full
    x = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        full = model(x)
        cfg = model.config
        cache = KVCache(cfg.depth, 1, cfg.sequence_len, cfg.n_kv_head, cfg.head_dim, "cpu", torch.float32)
        parts = [model(x[:, :1], kv_cache=cache.view(slice(0, 1), [0]))]
        for t in range(1, 16):
            parts.append(model(x[:, t : t + 1], kv_cache=cache.view(slice(0, 1), [t])))
    assert (full - torch.cat(parts, 1)).abs().max() < 1e-4


def test_flops_and_params():
    model = make_tiny_model(vocab_size=8192, depth=6, n_embd=384, head_dim=64, sequence_len=512)
    n = model.num_params()
    C = 384
    assert n["blocks_attn"] == 6 * 4 * C * C and n["blocks_mlp"] == 6 * 8 * C * C
    assert n["lm_head"] == 8192 * C and n["total"] == n["wte"] + n["blocks_attn"] + n["blocks_mlp"] + n["lm_head"]


def test_estimate_flops_against_counted_flops():
    """estimate_flops against an independent count: torch's FlopCounterMode over one real training forward + backward
    (every matmul of the linear layers and of the fused head, backward included: the '6 x parameters' is counted,
    not assumed), and the attention term from the (query, key) pairs the attention masks actually allow (4·H·D
    FLOPs per pair forward: QKᵀ and AV, x3 for training), with sliding-window layers, a padded vocab and GQA."""
    from torch.utils.flop_counter import FlopCounterMode

    from picochat.attention import _band_mask

    T = 48
    model = randomize_outputs(make_tiny_model(vocab_size=1000, depth=3, n_embd=64, head_dim=16, n_kv_head=2,
                                              sequence_len=T, window_pattern="SL", short_window=12))
    x, y = torch.randint(0, 1000, (2, T)), torch.randint(0, 1000, (2, T))
    with FlopCounterMode(display=False) as fc:
        model(x, targets=y).backward()
    counted = fc.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counted.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    cfg = model.config
    pairs = [int(_band_mask(T, T, 0, cfg.layer_window(i), "cpu").sum()) for i in range(cfg.depth)]
    assert pairs[0] < pairs[-1] == T * (T + 1) // 2  # the window layer attends fewer keys than the full causal one
    fl = model.estimate_flops()
    assert fl["linear"] == matmul / x.numel()
    assert fl["attention"] == pytest.approx(3 * 4 * cfg.n_head * cfg.head_dim * sum(pairs) / T, rel=1e-12)
    assert fl["total"] == fl["linear"] + fl["attention"]


def test_softcap_compiled_form_equals_tanh():
    """The compiled softcap (exp form, cheaper for inductor) is cap * tanh(z / cap): near 0, at the cap, at +-inf."""
    from picochat.model import softcap

    z = torch.cat([torch.linspace(-300, 300, 4001), torch.tensor([0.0, 1e-6, -1e-6, float("inf"), float("-inf")])])
    compiled = torch.compile(softcap, fullgraph=True)(z, 15.0)
    ref = 15.0 * torch.tanh(z.double() / 15.0)
    assert (compiled.double() - ref).abs().max() < 1e-5
    assert compiled[-2].item() == 15.0 and compiled[-1].item() == -15.0
    assert torch.equal(softcap(z, 15.0), 15.0 * torch.tanh(z / 15.0))  # eager: the tanh itself
