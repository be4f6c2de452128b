"""The optimizer: Muon for the 2-D matrices inside the transformer blocks, AdamW for everything else, in one object.

The training loop builds it once and calls one `step()` per optimizer step:

    opt = build_optimizer(model.param_kinds(), n_embd=cfg.n_embd, distributed=runtime.ddp,
                          named_params=model.named_parameters())  # checks every parameter is in one group
    ...loss.backward()...
    grad_norm = opt.step()          # averages (if distributed), clips, updates; returns the pre-clip norm
    model.zero_grad(set_to_none=True)

The step reads the same in every mode: reduce the gradients, clip by the global norm, update what this rank owns,
gather. The math (Newton–Schulz, the Muon and AdamW updates, the norm and clipping) is plain functions on tensors;
where the tensors live is one small interface in `sharding.py` (Local, Zero1, Fsdp: plan, reduce, sum_over_ranks,
whole_matrices, gather), chosen once at construction.

Single process and `torchrun` use the same class. With `distributed=True` the loop must NOT wrap the model in DDP
and must NOT all-reduce gradients itself: `step()` averages them with a reduce-scatter, so each rank holds the
averaged gradient only for what it owns, updates only that, keeps optimizer state only for that (ZeRO-1 style), and
all-gathers the new parameters. Muon needs whole matrices (the orthogonalisation is not separable by rows), so a
rank owns whole matrices; AdamW is element-wise, so a rank owns a dim-0 slice of each parameter.

With `fsdp=True` (the `--fsdp` opt-in) the model is wrapped with FSDP2 `fully_shard`: parameters are DTensors sharded
on dim 0 and their gradients arrive already reduce-scattered and averaged, so the optimizer does no collective on
gradients or parameters. AdamW and Muon's momentum update each rank's rows in place; Muon all-gathers the Nesterov
update to whole matrices, orthogonalises them on every rank and keeps its own rows. The math is the same as above.

On `--resume`, `load_state_dict` restores the moments and momentum buffers but keeps this run's learning rates,
weight decay, betas and momentum, printing each one that changed.

Tests: `OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_optim.py` (includes a 2-process gloo run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from picochat.common import UserError, print0
from picochat.sharding import Unit, is_dim0_sharded, make_layout

# The quintic Newton–Schulz coefficients (a, b, c) from Keller Jordan's Muon write-up (2024, "Muon: An optimizer for
# hidden layers in neural networks"). They are chosen for the steepest slope at 0 (a = 3.4445), so small singular
# values grow fast, at the price of not converging exactly to 1: after 5 steps singular values sit in roughly
# [0.7, 1.2], which is what Muon wants (an approximately orthogonal update), not an exact polar factor. The Polar
# Express per-step coefficients (Amsel et al. 2025, arXiv:2505.16932) tighten that band; we keep the classic ones
# because we could not re-derive and verify the Polar Express table here.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5

# The width the AdamW learning-rate defaults were tuned at (a depth-12, 768-wide model).
REFERENCE_WIDTH = 768

PARAM_KINDS = ("matrix", "embedding", "unembedding", "scalar")


def newton_schulz(G: Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> Tensor:
    """Approximately orthogonalise G: map G = U S V^T to ~U V^T, for a matrix (R, C) or a stack (..., R, C).

    Runs in `dtype`; by default bf16 on CUDA (the iteration is self-correcting, so bf16 rounding does not accumulate;
    it doubles the matmul speed) and fp32 elsewhere (CPUs without native bf16 run it ~100x slower). A bf16 run on a
    CPU with native bf16 passes bf16 (MuonAdamW's ns_dtype): 2-3.5x faster there on the reference shapes, 7-10% of
    the step in fp32. Returns that dtype.
    """
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide orientation so X @ X^T is the small (min(R, C))^2 Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1], where the iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        A = X @ X.mT  # (..., R, R) with R <= C
        B = b * A + c * (A @ A)
        X = a * X + B @ X  # each singular value s -> a s + b s^3 + c s^5
    return X.mT if tall else X


# ------------------------------------------------------------------------------------------------- the math
# Plain functions on this rank's tensors: they neither know nor care which rank owns what (sharding.py does).


def global_norm(grads: list[Tensor], sum_over_ranks: Callable[[Tensor], Tensor]) -> Tensor:
    """L2 norm of all gradients together, as a 0-dim fp32 tensor (no host sync). Each rank passes the disjoint part
    it owns, so the squared norms summed over ranks are the squared global norm."""
    norms = torch._foreach_norm(grads) if grads else [torch.zeros(())]
    return sum_over_ranks(torch.stack([n.float() for n in norms]).square().sum()).sqrt()


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / norm), a tensor so the GPU need not sync; 1e-6 keeps a zero gradient finite."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def nesterov_momentum(bufs: list[Tensor], grads: list[Tensor], momentum: float) -> list[Tensor]:
    """buf = momentum*buf + (1-momentum)*g in place; returns the Nesterov look-ahead (1-momentum)*g + momentum*buf."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    return torch._foreach_lerp(grads, bufs, momentum)


def muon_scale(shape: tuple[int, int]) -> float:
    """An orthogonal (R, C) matrix has RMS entry 1/sqrt(max(R, C)); the sqrt(R/C) factor for tall matrices gives
    their updates the same per-input-dimension size as square ones (Keller Jordan's Muon uses this scale)."""
    rows, cols = shape
    return max(1.0, rows / cols) ** 0.5


def orthogonal_step(params: list[Tensor], O: Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """p *= 1 - lr*wd, then p -= lr*scale*O, in place; O: (len(params), ...) stacked like the params."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, list(O.to(params[0].dtype).unbind(0)), alpha=-lr * scale)


def adamw_step(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Textbook AdamW (decoupled decay, bias correction) on p in place; `step` counts from 1."""
    beta1, beta2 = betas
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


# ------------------------------------------------------------------------------------------------- the optimizer

# What a resumed run takes from its own flags, not from the checkpoint's param groups ("lr" and "momentum" are the
# schedule's per-step outputs from these), and the flag of `picochat pretrain` / build_optimizer each one is set by.
_FROM_FLAGS = {"initial_lr": "lr", "weight_decay": "weight_decay", "betas": "adam_betas", "eps": "adam_eps",
               "initial_momentum": "muon_momentum"}


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer. Each param group has group["kind"] in {"muon", "adamw"}.

    Group keys: "lr" (set by the schedule each step), "initial_lr" (the schedule's base, defaults to lr),
    "weight_decay" (decoupled, p *= 1 - lr*wd, applied to 2-D parameters only); Muon groups: "momentum"
    (Nesterov, set by the loop's warm-up) and "initial_momentum" (its base); AdamW groups: "betas", "eps". Muon
    groups may hold only 2-D parameters.

    A parameter whose .grad is None is stepped as if its gradient were zero: under `distributed=True` every rank must
    take part in the same collectives, and single-process must give the same result.

    `step()` returns the global L2 norm of the averaged gradient before clipping (0-dim tensor, no host sync) and,
    when max_grad_norm > 0, scales the gradient by min(1, max_grad_norm / norm) before the update.

    With `fsdp=True` every parameter must be an FSDP2 DTensor sharded on dim 0 of a 1-D mesh (see the module
    docstring); each rank keeps optimizer state for its rows only.

    `state_dict()` is per rank: it holds only this rank's shard (plus its rank, world size and FSDP mode, checked on
    load). `load_state_dict()` keeps this run's hyperparameters (see `_FROM_FLAGS`) and returns what differed.
    """

    def __init__(self, param_groups: list[dict], *, max_grad_norm: float = 1.0, distributed: bool = False,
                 fsdp: bool = False, ns_dtype: torch.dtype | None = None):
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {max_grad_norm}")
        if distributed and fsdp:
            raise ValueError("distributed=True and fsdp=True exclude each other: FSDP already reduces the gradients")
        if (distributed or fsdp) and not (dist.is_available() and dist.is_initialized()):
            raise UserError("the distributed optimizer needs a torch.distributed process group: launch with torchrun")
        self.max_grad_norm = float(max_grad_norm)
        self.distributed = distributed
        self.fsdp = fsdp
        self.ns_dtype = ns_dtype  # Newton–Schulz's dtype (None: newton_schulz's default for the device)
        self._layout = make_layout(distributed, fsdp)
        self.rank, self.world_size = self._layout.rank, self._layout.world_size
        self.fallback_reason: str | None = getattr(self._layout, "fallback_reason", None)
        super().__init__(param_groups, defaults={})

    @property
    def use_reduce_scatter(self) -> bool:
        """ZeRO-1's collectives: reduce-scatter/all-gather (True) or all-reduce + slice (False); probed."""
        return self._layout.use_reduce_scatter

    @use_reduce_scatter.setter
    def use_reduce_scatter(self, value: bool) -> None:
        self._layout.use_reduce_scatter = value

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind not in ("muon", "adamw"):
            raise ValueError(f"param group kind must be 'muon' or 'adamw', got {kind!r}")
        if "lr" not in param_group:
            raise ValueError(f"{kind} param group needs an 'lr'")
        group = dict(param_group)
        group.setdefault("initial_lr", group["lr"])
        group.setdefault("weight_decay", 0.0)
        if kind == "muon":
            group.setdefault("momentum", 0.95)
            group.setdefault("initial_momentum", group["momentum"])
        else:
            # eps 1e-8: the Adam paper's default (Kingma & Ba 2015)
            group.setdefault("betas", (0.8, 0.95))
            group.setdefault("eps", 1e-8)
        super().add_param_group(group)
        for p in self.param_groups[-1]["params"]:
            if kind == "muon" and p.ndim != 2:
                raise ValueError(f"Muon handles 2-D matrices only, got a parameter of shape {tuple(p.shape)}: "
                                 "put it in an adamw group")
            if self.fsdp and not is_dim0_sharded(p):
                raise ValueError(f"fsdp=True needs parameters sharded by FSDP2 fully_shard on dim 0 of a 1-D "
                                 f"mesh, got {type(p).__name__} {getattr(p, 'placements', '')} of shape "
                                 f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self) -> Tensor:
        layout = self._layout
        units = layout.plan(self.param_groups)
        layout.reduce(units)  # 1) average the gradients: each unit now holds those of what this rank owns
        norm = global_norm([g for u in units for g in u.grads], layout.sum_over_ranks)  # 2) clip
        if self.max_grad_norm > 0:
            coef = clip_coefficient(norm, self.max_grad_norm)
            for u in units:
                u.grads = [g * coef.to(g.dtype) for g in u.grads]
        # 3) update what this rank owns and start gathering each result at once, so the all-gather of one bucket
        # overlaps the Newton–Schulz of the next; 4) wait for them all
        gathers = []
        for u in units:
            if u.params:
                (self._muon if u.muon else self._adamw)(u, self.param_groups[u.group])
            gathers.append(layout.gather(u))
        for finish in gathers:
            finish()
        return norm

    def _muon(self, u: Unit, group: dict) -> None:
        """SGD-momentum with Nesterov, orthogonalised. The momentum buffer has the view's shape."""
        for p, v in zip(u.params, u.views):
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(v)
        bufs = [self.state[p]["momentum_buffer"] for p in u.params]
        update = torch.stack(nesterov_momentum(bufs, u.grads, group["momentum"]))  # (k, r, C)
        orthogonalise = lambda X: newton_schulz(X, dtype=self.ns_dtype)  # noqa: E731
        O = self._layout.whole_matrices(u, update, orthogonalise)  # (k, r, C): this rank's part
        orthogonal_step(u.views, O, group["lr"], group["weight_decay"], muon_scale(u.params[0].shape))

    def _adamw(self, u: Unit, group: dict) -> None:
        (p,), (view,), (g,) = u.params, u.views, u.grads
        st = self.state[p]
        if not st:
            st.update(step=0, exp_avg=torch.zeros_like(view), exp_avg_sq=torch.zeros_like(view))
        st["step"] += 1
        adamw_step(view, g, st["exp_avg"], st["exp_avg_sq"], st["step"], lr=group["lr"], betas=group["betas"],
                   eps=group["eps"],
                   weight_decay=group["weight_decay"] if p.ndim == 2 else 0.0)  # never decay 1-D gains

    # ------------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["shard"] = {"rank": self.rank, "world_size": self.world_size, "fsdp": self.fsdp}
        return sd

    def load_state_dict(self, state_dict: dict) -> list[tuple[str, object, object]]:
        """Restore this rank's shard of the state (moments, step counts, momentum buffers), but keep this run's
        hyperparameters: a resumed run whose flags changed trains with the new values. Prints one line per changed
        flag and returns them as (flag, checkpoint's value, this run's value)."""
        shard = state_dict.get("shard", {"rank": 0, "world_size": 1})
        if shard.get("fsdp", False) != self.fsdp:  # the two modes split the state differently across ranks
            raise UserError(
                f"optimizer state was saved {'with' if shard.get('fsdp') else 'without'} --fsdp but is being loaded "
                f"{'with' if self.fsdp else 'without'} it: resume with the same --fsdp setting")
        if (shard["rank"], shard["world_size"]) != (self.rank, self.world_size):
            raise UserError(
                f"optimizer state was saved by rank {shard['rank']} of {shard['world_size']} but is being loaded by "
                f"rank {self.rank} of {self.world_size}: resume with the same number of processes "
                f"(or start the optimizer fresh)")
        # this run's settings win over the saved ones, except the schedule's per-step outputs
        ours = [{k: v for k, v in g.items() if k not in ("params", "lr", "momentum")} for g in self.param_groups]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "shard"})
        changes: list[tuple[str, object, object]] = []
        for group, values in zip(self.param_groups, ours):
            if group.get("initial_lr"):  # the same point of the schedule, on the new base rate
                group["lr"] *= values["initial_lr"] / group["initial_lr"]
            if "initial_momentum" in values:  # the loop's warm-up sets it again each step
                group["momentum"] = values["initial_momentum"]
            for key in [k for k in _FROM_FLAGS if k in values]:
                change = _change(values, key, group.get(key))
                if change is not None and change not in changes:
                    changes.append(change)
            group.update(values)
        for flag, old, new in changes:
            print0(f"resume: {flag} {_fmt(old)} -> {_fmt(new)} (this run's value applies)")
        return changes


def _change(ours: dict, key: str, old) -> tuple[str, object, object] | None:
    """(flag, saved value, this run's) in the flag's own terms, from this run's group `ours`; None when equal or not
    saved (older checkpoints)."""
    new = ours[key]
    if old is None:
        return None
    if key == "betas":
        old, new = tuple(old), tuple(new)
    if old == new:
        return None
    if key == "initial_lr":  # the AdamW rates are stored width-scaled: report the flag's value
        scale = ours.get("lr_scale", 1.0)
        name = f"{ours['name']}_lr" if "name" in ours else f"{ours['kind']} group initial_lr"
        return name, old / scale, new / scale
    return _FROM_FLAGS[key], old, new


def _fmt(v) -> str:
    return f"({', '.join(f'{x:g}' for x in v)})" if isinstance(v, tuple) else f"{v:g}"


def check_param_kinds(param_kinds: dict[str, list], named_params: Iterable[tuple[str, Tensor]] | None = None) -> None:
    """Every parameter in exactly one kind: one listed twice would be stepped twice, one listed nowhere would never
    train and nothing would say so. `named_params` (e.g. model.named_parameters()) is what must be covered (frozen
    parameters excepted) and names the culprit in the error; without it only duplicates can be caught."""
    names = {id(p): n for n, p in named_params if p.requires_grad} if named_params is not None else {}
    seen: dict[int, str] = {}
    for kind, params in param_kinds.items():
        for p in params:
            if id(p) in seen:
                what = repr(names[id(p)]) if id(p) in names else f"a parameter of shape {tuple(p.shape)}"
                raise ValueError(f"{what} is in both {seen[id(p)]!r} and {kind!r} of param_kinds(): list it once")
            seen[id(p)] = kind
    missing = [repr(n) for i, n in names.items() if i not in seen]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} in no optimizer group: list "
                         f"{'it' if len(missing) == 1 else 'them'} in the model's param_kinds() (one of "
                         f"{', '.join(PARAM_KINDS)}), or {'it' if len(missing) == 1 else 'they'} will never train")


def build_optimizer(param_kinds: dict[str, list], *, n_embd: int, matrix_lr: float = 0.02,
                    embedding_lr: float = 0.2, unembedding_lr: float = 0.004, scalar_lr: float = 0.5,
                    weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95),
                    muon_momentum: float = 0.95, max_grad_norm: float = 1.0,
                    distributed: bool = False, fsdp: bool = False, ns_dtype: torch.dtype | None = None,
                    named_params: Iterable[tuple[str, Tensor]] | None = None) -> MuonAdamW:
    """One MuonAdamW from `model.param_kinds()`: Muon for "matrix", AdamW for "embedding", "unembedding", "scalar".

    The AdamW rates are given for a 768-wide model and scaled by (n_embd / 768) ** -0.5. Why: Adam moves every
    coordinate by about lr regardless of width, and a d-wide row of the embedding or lm_head feeds a sum over d
    coordinates, so with roughly independent per-coordinate updates the change a step makes to a residual activation
    or a logit grows like sqrt(d); the 1/sqrt(d) factor keeps that change the same when the model gets wider or
    narrower. Muon's rate is not scaled: its update is orthogonal with a shape-aware scale, already width-aware.

    `distributed=True`: plain model under torchrun, the optimizer averages gradients (ZeRO-1 style state);
    `fsdp=True`: a model wrapped with FSDP2 `fully_shard` (see MuonAdamW). At most one of them.
    `named_params` (model.named_parameters()): every one of them must be in exactly one kind (`check_param_kinds`).
    `ns_dtype`: the dtype Muon's Newton–Schulz runs in (None: bf16 on CUDA, fp32 elsewhere; the loop passes bf16 for a
    bf16 run).
    """
    unknown = set(param_kinds) - set(PARAM_KINDS)
    if unknown:
        raise ValueError(f"unknown parameter kinds {sorted(unknown)}; expected some of {PARAM_KINDS}")
    if n_embd <= 0:
        raise ValueError(f"n_embd must be positive, got {n_embd}")
    check_param_kinds(param_kinds, named_params)
    width_scale = (n_embd / REFERENCE_WIDTH) ** -0.5
    specs = [
        ("matrix", "muon", matrix_lr, 1.0),
        ("embedding", "adamw", embedding_lr, width_scale),
        ("unembedding", "adamw", unembedding_lr, width_scale),
        ("scalar", "adamw", scalar_lr, width_scale),
    ]
    groups = []
    for name, kind, lr, scale in specs:
        params = list(param_kinds.get(name, []))
        if not params:
            continue
        # lr_scale: so a resume can report a changed rate as the flag's value (see MuonAdamW.load_state_dict)
        group = {"name": name, "kind": kind, "params": params, "lr": lr * scale, "initial_lr": lr * scale,
                 "lr_scale": scale, "weight_decay": weight_decay}
        if kind == "muon":
            group["momentum"] = muon_momentum
        else:
            group["betas"] = tuple(adam_betas)
        groups.append(group)
    if not groups:
        raise ValueError("build_optimizer got no parameters")
    return MuonAdamW(groups, max_grad_norm=max_grad_norm, distributed=distributed, fsdp=fsdp, ns_dtype=ns_dtype)
