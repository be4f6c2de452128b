"""Tests for picochat/optim.py and sharding.py: MuonAdamW against a plain-loop reference (also with clipping, a
changing schedule and missing gradients), overfitting one batch of a tiny GPT, clipping, weight decay, width-scaled
learning rates, every parameter in exactly one group, the 2-process gloo runs (ZeRO-1 and FSDP) against a single
process, state_dict round trips, and a resume that applies (and reports) changed hyperparameters.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_optim.py
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.distributed as dist

from conftest import make_tiny_model, spawn_gloo
from picochat.common import UserError, teardown_runtime
from picochat.model import GPT
from picochat.optim import MuonAdamW, build_optimizer, check_param_kinds, newton_schulz

N_EMBD = 64
VOCAB = 50
# A model-like set: 3 wide and 2 tall block matrices (so with 2 ranks one shape needs padding), an embedding whose
# rows divide by 2, an lm_head whose rows do not (owned whole by one rank), one even and one odd 1-D scalar vector.
SHAPES = {
    "matrix": [(64, 128), (128, 64), (64, 128), (64, 128), (128, 64)],
    "embedding": [(VOCAB, N_EMBD)],
    "unembedding": [(VOCAB + 1, N_EMBD)],
    "scalar": [(4,), (3,)],
}
LRS = {"matrix": 0.02, "embedding": 0.2, "unembedding": 0.004, "scalar": 0.5}  # build_optimizer's defaults


def make_params(seed: int = 0) -> dict[str, list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return {kind: [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            for kind, shapes in SHAPES.items()}


def flat(kinds: dict[str, list]) -> list[torch.Tensor]:
    return [p for kind in SHAPES for p in kinds[kind]]


def make_grads(step: int, rank: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank + 1)
    return [scale * torch.randn(s, generator=gen) for kind in SHAPES for s in SHAPES[kind]]


def set_grads(kinds: dict[str, list], grads: list[torch.Tensor]) -> None:
    for p, g in zip(flat(kinds), grads):
        p.grad = g.clone()


def clone_kinds(kinds: dict[str, list]) -> dict[str, list[torch.nn.Parameter]]:
    return {k: [torch.nn.Parameter(p.detach().clone()) for p in ps] for k, ps in kinds.items()}


# ---------------------------------------------------------------------------------------------------------------------
# the reference: plain loops, one tensor at a time, written from the textbook formulas


def ref_newton_schulz(G: torch.Tensor) -> torch.Tensor:
    X = G.clone()
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X - 4.7750 * A @ X + 2.0315 * A @ A @ X
    return X.T if transposed else X


class RefOptimizer:
    """Muon = SGD momentum + Nesterov + Newton–Schulz; AdamW with bias correction; decoupled decay on 2-D only."""

    def __init__(self, kinds, n_embd, wd, betas=(0.8, 0.95), momentum=0.95, eps=1e-8):
        width = (n_embd / 768) ** -0.5
        self.items = [(kind, p, LRS[kind] * (1 if kind == "matrix" else width)) for kind in SHAPES for p in kinds[kind]]
        self.wd, self.betas, self.momentum, self.eps = wd, betas, momentum, eps
        self.state = {id(p): {"buf": torch.zeros_like(p), "m": torch.zeros_like(p), "v": torch.zeros_like(p), "t": 0}
                      for _, p, _ in self.items}

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0, momentum: float | None = None, max_norm: float = 0.0) -> float:
        """One step with every LR times lr_factor, Muon momentum `momentum` (as the loop's schedule sets them), the
        gradient clipped to global norm max_norm (0: off); a missing .grad counts as zero. Returns the norm."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p, _ in self.items]
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
        for (kind, p, lr), g in zip(self.items, grads):
            s, g, lr = self.state[id(p)], g * coef, lr * lr_factor
            if p.ndim == 2:
                p.mul_(1 - lr * self.wd)
            if kind == "matrix":
                mu = self.momentum if momentum is None else momentum
                s["buf"] = mu * s["buf"] + (1 - mu) * g
                update = (1 - mu) * g + mu * s["buf"]
                rows, cols = p.shape
                p.sub_(lr * max(1.0, rows / cols) ** 0.5 * ref_newton_schulz(update))
            else:
                b1, b2 = self.betas
                s["t"] += 1
                s["m"] = b1 * s["m"] + (1 - b1) * g
                s["v"] = b2 * s["v"] + (1 - b2) * g * g
                m_hat = s["m"] / (1 - b1 ** s["t"])
                v_hat = s["v"] / (1 - b2 ** s["t"])
                p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))
        return norm


# ---------------------------------------------------------------------------------------------------------------------
# 1. against the reference


def test_matches_reference_for_three_steps():
    kinds, ref_kinds = make_params(), make_params()
    opt = build_optimizer(kinds, n_embd=N_EMBD, weight_decay=0.1, max_grad_norm=0.0)
    ref = RefOptimizer(ref_kinds, N_EMBD, wd=0.1)
    start = [p.detach().clone() for p in flat(kinds)]
    for step in range(3):
        grads = make_grads(step, 0)
        set_grads(kinds, grads)
        set_grads(ref_kinds, grads)
        opt.step()
        ref.step()
    for p, q, p0 in zip(flat(kinds), flat(ref_kinds), start):
        assert (p - p0).abs().max() > 1e-3  # every parameter moved...
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)  # ...exactly as the reference moved it


def test_step_matches_reference_with_clipping_schedule_and_missing_grads():
    """The whole step (reduce, clip, update what is owned) against the plain-loop reference over 4 steps, with
    clipping active, the LR and Muon momentum changed every step as the loop changes them, and one parameter of each
    kind without a gradient on one step (stepped as a zero gradient)."""
    kinds, ref_kinds = make_params(), make_params()
    opt = build_optimizer(kinds, n_embd=N_EMBD, weight_decay=0.1, max_grad_norm=1.0)
    ref = RefOptimizer(ref_kinds, N_EMBD, wd=0.1)
    start = [p.detach().clone() for p in flat(kinds)]
    for step in range(4):
        lrf, mom = 1.0 - 0.2 * step, 0.85 + 0.03 * step
        for ks in (kinds, ref_kinds):
            set_grads(ks, make_grads(step, 0))
            if step == 1:
                for kind in SHAPES:
                    ks[kind][0].grad = None
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrf
            if g["kind"] == "muon":
                g["momentum"] = mom
        norm = float(opt.step())
        want = ref.step(lr_factor=lrf, momentum=mom, max_norm=1.0)
        assert want > 10  # the gradients' norm is ~100: clipping is in play on every step
        assert norm == pytest.approx(want, rel=1e-6)
    for i, (p, q, p0) in enumerate(zip(flat(kinds), flat(ref_kinds), start)):
        assert (p - p0).abs().max() > 1e-4, i
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"param {i}")


def test_overfits_one_batch_with_our_optimizer():
    """MuonAdamW at build_optimizer's defaults (the LRs `picochat pretrain` uses) learns one repeated batch of
    random tokens by heart: the loss falls from ~ln(64) = 4.2 to under 0.1. (tests/test_model.py's overfit test
    uses torch.optim.AdamW, so it says nothing about this optimizer.)"""
    torch.manual_seed(0)
    model = make_tiny_model(vocab_size=64, depth=2, n_embd=64, head_dim=16, sequence_len=32)
    x, y = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    opt = build_optimizer(model.param_kinds(), n_embd=64, named_params=model.named_parameters())
    losses = []
    for _ in range(100):  # it takes ~20 steps: the cap leaves room for another CPU's rounding
        loss = model(x, targets=y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if losses[-1] < 0.1:
            break
    assert losses[0] > 3.5 and losses[-1] < 0.1, (len(losses), losses[0], losses[-1])


class GatedGPT(GPT):
    """A model that gained a parameter its param_kinds() does not list: it would silently never train."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = torch.nn.Parameter(torch.ones(config.n_embd))


def test_param_kinds_covers_every_parameter_exactly_once():
    for kw in ({}, {"value_embeds": True, "resid_scalars": True}):
        model = make_tiny_model(64, depth=3, **kw)
        kinds = model.param_kinds()
        check_param_kinds(kinds, model.named_parameters())  # passes...
        listed = [id(p) for ps in kinds.values() for p in ps]
        assert sorted(listed) == sorted(id(p) for p in model.parameters()), kw  # ...because each is there once
        assert len(listed) == len(list(model.parameters())) > 10

    gated = GatedGPT(make_tiny_model(64).config)
    with pytest.raises(ValueError, match=r"'gate' .*in no optimizer group.*param_kinds\(\)"):
        build_optimizer(gated.param_kinds(), n_embd=64, named_params=gated.named_parameters())

    model = make_tiny_model(64)
    kinds = model.param_kinds()
    kinds["scalar"] = [model.lm_head.weight]  # listed as "unembedding" already
    with pytest.raises(ValueError, match=r"'lm_head.weight' .*both 'unembedding' and 'scalar'"):
        build_optimizer(kinds, n_embd=64, named_params=model.named_parameters())
    kinds = model.param_kinds()
    kinds["matrix"].append(kinds["matrix"][0])  # twice in one kind is caught without names too
    with pytest.raises(ValueError, match=r"parameter of shape \(\d+, \d+\) .*both 'matrix' and 'matrix'"):
        build_optimizer(kinds, n_embd=64)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 64, 128)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == torch.float32
    sv = torch.linalg.svdvals(O)
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())


def test_newton_schulz_in_bf16_and_the_optimizer_that_asks_for_it():
    """ns_dtype=bf16 (a bf16 run on a CPU with native bf16) runs Newton–Schulz in bf16: the result is bf16, still
    nearly orthogonal, and a Muon step lands within a few % of the fp32 one (bf16 rounding), but not on it."""
    G = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(0))
    O = newton_schulz(G, dtype=torch.bfloat16)
    assert O.dtype == torch.bfloat16
    sv = torch.linalg.svdvals(O.float())
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())
    start = make_params()
    moved = {}
    for ns_dtype in (None, torch.bfloat16):
        kinds = clone_kinds(start)
        set_grads(kinds, make_grads(0, 0))
        opt = build_optimizer(kinds, n_embd=N_EMBD, ns_dtype=ns_dtype)
        assert opt.ns_dtype == ns_dtype
        opt.step()
        moved[ns_dtype] = [p.detach() - q.detach() for p, q in zip(kinds["matrix"], start["matrix"])]
    for a, b in zip(moved[None], moved[torch.bfloat16]):
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel < 6e-2, rel  # 3% here: bf16 keeps 8 bits, NS five rounds of products


def test_newton_schulz_flattens_an_ill_conditioned_spectrum():
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(128, 64, generator=gen))
    s = torch.logspace(-1.5, 1.0, 64)  # condition number ~300, scaled well above 1
    G = U @ torch.diag(s) @ V.T
    O = newton_schulz(G)
    sv = torch.linalg.svdvals(O)
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())
    # same singular vectors: O is close to the polar factor U V^T (cosine similarity of the flattened matrices)
    polar = U @ V.T
    cos = (O * polar).sum() / (O.norm() * polar.norm())
    assert cos > 0.97


# ---------------------------------------------------------------------------------------------------------------------
# 2. clipping


def test_clipping_reports_true_norm_and_applies_scaled_gradient():
    max_norm = 0.5
    big, small = make_grads(0, 0, scale=10.0), make_grads(1, 0, scale=1e-3)
    true_norms = [math.sqrt(sum(float(g.square().sum()) for g in gs)) for gs in (big, small)]
    assert true_norms[0] > max_norm > true_norms[1]

    clipped = make_params()
    opt = build_optimizer(clipped, n_embd=N_EMBD, max_grad_norm=max_norm)
    norms = []
    for gs in (big, small):
        set_grads(clipped, gs)
        norms.append(opt.step())
    assert norms[0].ndim == 0
    for got, want in zip(norms, true_norms):
        assert float(got) == pytest.approx(want, rel=1e-5)

    # the same run with clipping off but the first gradient scaled by hand lands on the same parameters
    by_hand = make_params()
    opt2 = build_optimizer(by_hand, n_embd=N_EMBD, max_grad_norm=0.0)
    coef = max_norm / (true_norms[0] + 1e-6)
    for gs in ([g * coef for g in big], small):
        set_grads(by_hand, gs)
        opt2.step()
    for p, q in zip(flat(clipped), flat(by_hand)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)

    # and clipping mattered: without it the parameters end up elsewhere
    unclipped = make_params()
    opt3 = build_optimizer(unclipped, n_embd=N_EMBD, max_grad_norm=0.0)
    for gs in (big, small):
        set_grads(unclipped, gs)
        opt3.step()
    assert max(float((p - q).detach().abs().max()) for p, q in zip(flat(clipped), flat(unclipped))) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# 3. weight decay and learning rates


def test_weight_decay_only_touches_2d_params():
    kinds = make_params()
    start = {id(p): p.detach().clone() for p in flat(kinds)}
    wd = 0.1
    opt = build_optimizer(kinds, n_embd=N_EMBD, weight_decay=wd)
    set_grads(kinds, [torch.zeros_like(p) for p in flat(kinds)])  # zero gradient: only decay can move anything
    opt.step()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for p in flat(kinds):
        if p.ndim == 1:
            assert torch.equal(p, start[id(p)])
        else:
            torch.testing.assert_close(p, start[id(p)] * (1 - lr_of[id(p)] * wd), atol=1e-7, rtol=0)
            assert not torch.equal(p, start[id(p)])


def test_adamw_learning_rates_scale_with_width():
    for n_embd, factor in [(768, 1.0), (192, 2.0), (3072, 0.5)]:
        opt = build_optimizer(make_params(), n_embd=n_embd)
        groups = {g["name"]: g for g in opt.param_groups}
        assert groups["matrix"]["kind"] == "muon" and groups["matrix"]["lr"] == pytest.approx(0.02)
        assert groups["matrix"]["momentum"] == 0.95
        assert groups["embedding"]["lr"] == pytest.approx(0.2 * factor)
        assert groups["unembedding"]["lr"] == pytest.approx(0.004 * factor)
        assert groups["scalar"]["lr"] == pytest.approx(0.5 * factor)
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"kind": "muon", "lr": 0.02, "params": [torch.nn.Parameter(torch.zeros(4))]}])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([{"kind": "sgd", "lr": 0.02, "params": [torch.nn.Parameter(torch.zeros(4))]}])
    with pytest.raises(ValueError, match="unknown parameter kinds"):
        build_optimizer({"matrices": [torch.nn.Parameter(torch.zeros(2, 2))]}, n_embd=64)
    if not dist.is_initialized():
        with pytest.raises(UserError, match="torchrun"):
            build_optimizer(make_params(), n_embd=64, distributed=True)


# ---------------------------------------------------------------------------------------------------------------------
# 5. state_dict round trip (single process; the distributed test below repeats it per rank)


def test_state_dict_round_trip_equals_uninterrupted_run():
    straight = make_params()
    opt = build_optimizer(straight, n_embd=N_EMBD, weight_decay=0.05)
    for step in range(3):
        set_grads(straight, make_grads(step, 0))
        opt.step()

    first = make_params()
    opt_a = build_optimizer(first, n_embd=N_EMBD, weight_decay=0.05)
    for step in range(2):
        set_grads(first, make_grads(step, 0))
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)

    resumed = clone_kinds(first)
    opt_b = build_optimizer(resumed, n_embd=N_EMBD, weight_decay=0.05)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    set_grads(resumed, make_grads(2, 0))
    opt_b.step()
    for p, q in zip(flat(straight), flat(resumed)):
        assert torch.equal(p, q)

    # the schedule still steers the loaded optimizer: lr 0 (and so no decay) leaves every parameter where it is
    for g in opt_b.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in flat(resumed)]
    set_grads(resumed, make_grads(3, 0))
    opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(flat(resumed), before))


def _saved_state(**kw) -> tuple[dict, dict]:
    """(params after one step, the optimizer's state_dict after a save/load round trip through bytes)."""
    kinds = make_params()
    opt = build_optimizer(kinds, n_embd=N_EMBD, **kw)
    set_grads(kinds, make_grads(0, 0))
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return clone_kinds(kinds), torch.load(buf, weights_only=True)


def test_resume_applies_changed_hyperparameters_and_says_what_changed(capsys):
    kinds, sd = _saved_state(matrix_lr=0.02, embedding_lr=0.2, weight_decay=0.0)
    capsys.readouterr()
    opt = build_optimizer(kinds, n_embd=N_EMBD, matrix_lr=0.01, embedding_lr=0.3, weight_decay=0.1,
                          adam_betas=(0.9, 0.99))
    changes = opt.load_state_dict(sd)
    out = capsys.readouterr().out
    got = {name: (old, new) for name, old, new in changes}
    assert got.keys() == {"matrix_lr", "embedding_lr", "weight_decay", "adam_betas"}, changes
    assert got["matrix_lr"] == pytest.approx((0.02, 0.01)) and got["embedding_lr"] == pytest.approx((0.2, 0.3))
    assert got["weight_decay"] == (0.0, 0.1) and got["adam_betas"] == ((0.8, 0.95), (0.9, 0.99))
    for line in ("resume: matrix_lr 0.02 -> 0.01 (this run's value applies)",
                 "resume: embedding_lr 0.2 -> 0.3 (this run's value applies)",
                 "resume: weight_decay 0 -> 0.1 (this run's value applies)",
                 "resume: adam_betas (0.8, 0.95) -> (0.9, 0.99) (this run's value applies)"):
        assert line in out.splitlines(), out
    assert out.count("resume:") == 4  # one line per changed flag, not one per group

    # the new values are the ones in force...
    groups = {g["name"]: g for g in opt.param_groups}
    width = (N_EMBD / 768) ** -0.5
    assert groups["matrix"]["initial_lr"] == 0.01
    assert groups["embedding"]["initial_lr"] == pytest.approx(0.3 * width)
    assert groups["unembedding"]["initial_lr"] == pytest.approx(0.004 * width)  # unchanged flag, unchanged value
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in opt.param_groups if g["kind"] == "adamw")
    # ...while the checkpoint's moments and step counts are kept
    assert len(opt.state) == len(sd["state"]) == len(flat(kinds))
    for i, p in enumerate(flat(kinds)):  # the state dict numbers parameters in group order, which flat() follows
        st, want = opt.state[p], sd["state"][i]
        assert st.keys() == want.keys() and all(torch.equal(st[k], want[k]) if torch.is_tensor(want[k])
                                                else st[k] == want[k] for k in want), i
    # and they act: with a zero gradient a Muon matrix moves only by the new decay, p *= 1 - lr * 0.1
    matrix = kinds["matrix"][0]
    before = matrix.detach().clone()
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"]
        if g["kind"] == "muon":
            g["momentum"] = 0.0  # so the old momentum buffer adds nothing either
            opt.state[matrix]["momentum_buffer"].zero_()
    set_grads(kinds, [torch.zeros_like(p) for p in flat(kinds)])
    opt.step()
    torch.testing.assert_close(matrix, before * (1 - 0.01 * 0.1), atol=1e-7, rtol=0)


def test_resume_with_the_same_flags_reports_nothing(capsys):
    kinds, sd = _saved_state(weight_decay=0.05)
    capsys.readouterr()
    opt = build_optimizer(kinds, n_embd=N_EMBD, weight_decay=0.05)
    assert opt.load_state_dict(sd) == []
    assert "resume:" not in capsys.readouterr().out


def test_loading_another_ranks_shard_is_refused():
    kinds = make_params()
    opt = build_optimizer(kinds, n_embd=N_EMBD)
    set_grads(kinds, make_grads(0, 0))
    opt.step()
    sd = opt.state_dict()
    sd["shard"] = {"rank": 1, "world_size": 2}
    with pytest.raises(UserError, match="same number of processes"):
        build_optimizer(make_params(), n_embd=N_EMBD).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------------------------------
# 4. distributed: 2 gloo processes, each with its own gradient, vs one process on the mean gradient

WORLD = 2
DIST_STEPS = 3
DIST_KW = dict(n_embd=N_EMBD, weight_decay=0.1, max_grad_norm=1.0)  # grads have norm ~200: clipping is active


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for use_rs in (True, False):  # native reduce-scatter/all-gather, then the all-reduce fallback
            kinds = make_params()
            opt = build_optimizer(kinds, distributed=True, **DIST_KW)
            opt.use_reduce_scatter = use_rs
            norms = []
            for step in range(DIST_STEPS):
                set_grads(kinds, make_grads(step, rank))
                norms.append(float(opt.step()))
                if use_rs and step == DIST_STEPS - 2:
                    buf = io.BytesIO()
                    torch.save(opt.state_dict(), buf)
                    saved = (buf.getvalue(), clone_kinds(kinds))
            names = {id(p): i for i, p in enumerate(flat(kinds))}
            state = {names[id(p)]: {k: tuple(v.shape) for k, v in st.items() if torch.is_tensor(v)}
                     for p, st in opt.state.items()}
            result[use_rs] = {"params": [p.detach().clone() for p in flat(kinds)], "norms": norms, "state": state}

        # resume this rank's shard into a fresh optimizer and take the last step
        blob, kinds = saved
        opt = build_optimizer(kinds, distributed=True, **DIST_KW)
        opt.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
        set_grads(kinds, make_grads(DIST_STEPS - 1, rank))
        opt.step()
        result["resumed"] = [p.detach().clone() for p in flat(kinds)]
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        teardown_runtime()  # barrier, then destroy: a lone gloo teardown can abort the peer


def _spawn_workers(worker, tmp_path, prefix: str = "") -> list[dict]:
    """Run `worker(rank, init_file, out_dir)` on WORLD gloo processes; return each rank's saved results."""
    spawn_gloo(worker, (str(tmp_path / "init"), str(tmp_path)), WORLD)
    return [torch.load(tmp_path / f"{prefix}rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process_reference() -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    """One process stepping on the ranks' mean gradient: (grad norms, final params, initial params)."""
    kinds = make_params()
    start = [p.detach().clone() for p in flat(kinds)]
    opt = build_optimizer(kinds, **DIST_KW)
    norms = []
    for step in range(DIST_STEPS):
        per_rank = [make_grads(step, r) for r in range(WORLD)]
        set_grads(kinds, [sum(gs) / WORLD for gs in zip(*per_rank)])
        norms.append(float(opt.step()))
    assert norms[0] > DIST_KW["max_grad_norm"] * 10  # clipping was in play
    return norms, [p.detach() for p in flat(kinds)], start


def test_distributed_equals_single_process_on_mean_gradient(tmp_path):
    results = _spawn_workers(_dist_worker, tmp_path)
    norms, single, _ = _single_process_reference()

    for r, res in enumerate(results):
        for use_rs in (True, False):
            assert res[use_rs]["norms"] == pytest.approx(norms, rel=1e-6)
            for i, (p, q) in enumerate(zip(res[use_rs]["params"], single)):
                torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"rank {r} rs={use_rs} param {i}")
        for p, q in zip(res["resumed"], res[True]["params"]):
            assert torch.equal(p, q)

    # each rank keeps state only for its shard
    flat_shapes = [s for kind in SHAPES for s in SHAPES[kind]]
    n_matrix = len(SHAPES["matrix"])
    for use_rs in (True, False):
        states = [res[use_rs]["state"] for res in results]
        for i, shape in enumerate(flat_shapes):
            holders = [r for r in range(WORLD) if i in states[r]]
            if i < n_matrix:  # Muon: a whole matrix on exactly one rank
                assert len(holders) == 1, (i, holders)
                assert states[holders[0]][i] == {"momentum_buffer": shape}
            elif shape[0] % WORLD == 0:  # AdamW, split by rows: every rank holds its slice only
                assert holders == list(range(WORLD))
                shard = (shape[0] // WORLD, *shape[1:])
                assert all(states[r][i] == {"exp_avg": shard, "exp_avg_sq": shard} for r in holders)
            else:  # AdamW, indivisible: whole on one rank
                assert len(holders) == 1 and states[holders[0]][i] == {"exp_avg": shape, "exp_avg_sq": shape}
        # Muon work is balanced: 3 wide + 2 tall matrices -> 2 + 1 on one rank, 1 + 1 on the other, never 5 + 0
        for r in range(WORLD):
            assert sum(i < n_matrix for i in states[r]) in (2, 3)


# ---------------------------------------------------------------------------------------------------------------------
# 6. FSDP mode: parameters and gradients are DTensors sharded on dim 0 (as FSDP2 fully_shard leaves them), gradients
# already averaged; the optimizer must land on the same parameters as one process on the mean gradient. SHAPES has
# uneven shards for 2 ranks: lm_head rows 51 -> 26 + 25, the (3,) scalar -> 2 + 1.


def _shard_params(kinds: dict[str, list], mesh) -> dict[str, list[torch.nn.Parameter]]:
    from torch.distributed.tensor import Shard, distribute_tensor

    return {k: [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in ps]
            for k, ps in kinds.items()}


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))

        def set_mean_grads(kinds, step):
            per_rank = [make_grads(step, r) for r in range(WORLD)]  # every rank builds all, then keeps its rows
            for p, g in zip(flat(kinds), [sum(gs) / WORLD for gs in zip(*per_rank)]):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])

        kinds = _shard_params(make_params(), mesh)
        opt = build_optimizer(kinds, fsdp=True, **DIST_KW)
        norms = []
        for step in range(DIST_STEPS):
            set_mean_grads(kinds, step)
            norms.append(float(opt.step()))
            if step == DIST_STEPS - 2:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                saved = (buf.getvalue(), [p.detach().full_tensor() for p in flat(kinds)])
        names = {id(p): i for i, p in enumerate(flat(kinds))}
        state = {names[id(p)]: {k: tuple(v.shape) for k, v in st.items() if torch.is_tensor(v)}
                 for p, st in opt.state.items()}
        local_rows = [p.to_local().shape[0] if p.ndim else 0 for p in flat(kinds)]
        result = {"params": [p.detach().full_tensor() for p in flat(kinds)], "norms": norms, "state": state,
                  "local_rows": local_rows}

        # resume: fresh sharded params from the saved full tensors, this rank's optimizer shard, the last step
        blob, full = saved
        resumed = {}
        it = iter(full)
        for k in SHAPES:
            resumed[k] = [torch.nn.Parameter(distribute_tensor(next(it), mesh, [Shard(0)])) for _ in SHAPES[k]]
        opt2 = build_optimizer(resumed, fsdp=True, **DIST_KW)
        opt2.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
        set_mean_grads(resumed, DIST_STEPS - 1)
        opt2.step()
        result["resumed"] = [p.detach().full_tensor() for p in flat(resumed)]

        # the two modes split optimizer state differently: loading one into the other must be refused
        plain = build_optimizer(make_params(), distributed=True, **DIST_KW)
        try:
            plain.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
            result["mismatch"] = None
        except UserError as e:
            result["mismatch"] = str(e)
        # and plain tensors are refused in fsdp mode with a clear message
        try:
            build_optimizer(make_params(), fsdp=True, **DIST_KW)
            result["plain_refused"] = None
        except ValueError as e:
            result["plain_refused"] = str(e)
        torch.save(result, os.path.join(out_dir, f"fsdp_rank{rank}.pt"))
    finally:
        teardown_runtime()


def test_fsdp_mode_equals_single_process_on_mean_gradient(tmp_path):
    results = _spawn_workers(_fsdp_worker, tmp_path, prefix="fsdp_")

    norms, single, start = _single_process_reference()
    assert DIST_KW["weight_decay"] > 0  # weight decay is in play too

    flat_shapes = [s for kind in SHAPES for s in SHAPES[kind]]
    # the shards really are uneven where dim 0 does not divide by 2 (torch.chunk rule: the first rank gets more)
    assert [res["local_rows"][flat_shapes.index((VOCAB + 1, N_EMBD))] for res in results] == [26, 25]
    assert [res["local_rows"][flat_shapes.index((3,))] for res in results] == [2, 1]
    for r, res in enumerate(results):
        assert res["norms"] == pytest.approx(norms, rel=1e-6)
        for i, (p, q, p0) in enumerate(zip(res["params"], single, start)):
            assert (p - p0).abs().max() > 1e-3
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"rank {r} param {i}")
        for p, q in zip(res["resumed"], res["params"]):
            assert torch.equal(p, q)
        # optimizer state covers this rank's rows only, for every parameter
        for i, shape in enumerate(flat_shapes):
            rows = (res["local_rows"][i], *shape[1:])
            want = {"momentum_buffer": rows} if i < len(SHAPES["matrix"]) else {"exp_avg": rows, "exp_avg_sq": rows}
            assert res["state"][i] == want, (r, i)
        assert "with --fsdp" in res["mismatch"] and "same --fsdp setting" in res["mismatch"]
        assert "fully_shard" in res["plain_refused"]
