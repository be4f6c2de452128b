"""The optimizer: Muon for the 2-D matrices inside the transformer blocks, AdamW for everything else, in one object.

The training loop builds it once and calls one `step()` per optimizer step:

    opt = build_optimizer(model.param_kinds(), n_embd=cfg.n_embd, distributed=runtime.ddp)
    ...loss.backward()...
    grad_norm = opt.step()          # averages (if distributed), clips, updates; returns the pre-clip norm
    model.zero_grad(set_to_none=True)

Single process and `torchrun` use the same class. With `distributed=True` the loop must NOT wrap the model in DDP
and must NOT all-reduce gradients itself: `step()` averages them with a reduce-scatter, so each rank holds the
averaged gradient only for what it owns, updates only that, keeps optimizer state only for that (ZeRO-1 style), and
all-gathers the new parameters. Muon needs whole matrices (the orthogonalisation is not separable by rows), so a
rank owns whole matrices; AdamW is element-wise, so a rank owns a dim-0 slice of each parameter.

With `fsdp=True` (the `--fsdp` opt-in) the model is wrapped with FSDP2 `fully_shard`: parameters are DTensors sharded
on dim 0 and their gradients arrive already reduce-scattered and averaged, so the optimizer does no collective on
gradients or parameters. AdamW and Muon's momentum update each rank's rows in place; Muon all-gathers the Nesterov
update to whole matrices, orthogonalises them on every rank and keeps its own rows. The math is the same as above.

Tests: `OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_optim.py` (includes a 2-process gloo run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from picochat.common import UserError

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


def newton_schulz(G: Tensor, steps: int = NS_STEPS) -> Tensor:
    """Approximately orthogonalise G: map G = U S V^T to ~U V^T, for a matrix (R, C) or a stack (..., R, C).

    Runs in bf16 on CUDA (the iteration is self-correcting, so bf16 rounding does not accumulate; it doubles the
    matmul speed) and in fp32 elsewhere (CPUs without native bf16 run it ~100x slower). Returns that dtype.
    """
    X = G.bfloat16() if G.is_cuda else G.float()
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


@dataclass
class _MuonBucket:
    """Same-shape matrices of one Muon group, stacked so one reduce-scatter/all-gather and one batched
    Newton–Schulz serve them all. Rank r owns the contiguous block [r*per_rank, (r+1)*per_rank) of the
    list padded to a multiple of world_size (the block a reduce-scatter over the stacked dim 0 hands it)."""

    group: int  # index into param_groups (not the dict: load_state_dict replaces the dicts)
    params: list[Tensor]
    per_rank: int

    def owned(self, rank: int) -> list[Tensor]:
        return self.params[rank * self.per_rank : (rank + 1) * self.per_rank]


@dataclass
class _AdamSlot:
    """One AdamW parameter and the part of it this rank owns: rows [start, end) when dim 0 divides by world_size
    (every rank owns a slice), else the whole parameter on rank `owner` only."""

    group: int
    param: Tensor
    sharded: bool
    start: int = 0
    end: int = 0
    owner: int = 0


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer. Each param group has group["kind"] in {"muon", "adamw"}.

    Group keys: "lr" (set by the schedule each step), "initial_lr" (the schedule's base, defaults to lr),
    "weight_decay" (decoupled, p *= 1 - lr*wd, applied to 2-D parameters only); Muon groups: "momentum"
    (Nesterov, warmed up by the loop); AdamW groups: "betas", "eps". Muon groups may hold only 2-D parameters.

    A parameter whose .grad is None is stepped as if its gradient were zero: under `distributed=True` every rank must
    take part in the same collectives, and single-process must give the same result.

    `step()` returns the global L2 norm of the averaged gradient before clipping (0-dim tensor, no host sync) and,
    when max_grad_norm > 0, scales the gradient by min(1, max_grad_norm / norm) before the update.

    With `fsdp=True` every parameter must be an FSDP2 DTensor sharded on dim 0 of a 1-D mesh (see the module
    docstring); each rank keeps optimizer state for its rows only.

    `state_dict()` is per rank: it holds only this rank's shard (plus its rank, world size and FSDP mode, checked on
    load).
    `use_reduce_scatter` chooses reduce-scatter/all-gather collectives (True) or all-reduce + slice (False); it is
    probed at construction, because some backends/torch versions (gloo) lack reduce-scatter.
    """

    def __init__(self, param_groups: list[dict], *, max_grad_norm: float = 1.0, distributed: bool = False,
                 fsdp: bool = False):
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {max_grad_norm}")
        if distributed and fsdp:
            raise ValueError("distributed=True and fsdp=True exclude each other: FSDP already reduces the gradients")
        if (distributed or fsdp) and not (dist.is_available() and dist.is_initialized()):
            raise UserError("the distributed optimizer needs a torch.distributed process group: launch with torchrun")
        self.max_grad_norm = float(max_grad_norm)
        self.distributed = distributed
        self.fsdp = fsdp
        self.rank = dist.get_rank() if distributed or fsdp else 0
        self.world_size = dist.get_world_size() if distributed or fsdp else 1
        self._plan: tuple[list[_MuonBucket], list[_AdamSlot]] | None = None
        self.fallback_reason: str | None = None  # why use_reduce_scatter is False, for the run log
        super().__init__(param_groups, defaults={})
        # FSDP mode runs no reduce-scatter of its own, so there is nothing to probe
        self.use_reduce_scatter = self._probe_reduce_scatter() if self.world_size > 1 and not fsdp else True

    # ------------------------------------------------------------------------------------------------- groups

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
        else:
            # eps 1e-8: the Adam paper's default (Kingma & Ba 2015)
            group.setdefault("betas", (0.8, 0.95))
            group.setdefault("eps", 1e-8)
        super().add_param_group(group)
        if kind == "muon":
            for p in self.param_groups[-1]["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon handles 2-D matrices only, got a parameter of shape {tuple(p.shape)}: "
                                     "put it in an adamw group")
        if self.fsdp:  # set before super().__init__ calls this
            for p in self.param_groups[-1]["params"]:
                if not _is_dim0_sharded(p):
                    raise ValueError(f"fsdp=True needs parameters sharded by FSDP2 fully_shard on dim 0 of a 1-D "
                                     f"mesh, got {type(p).__name__} {getattr(p, 'placements', '')} of shape "
                                     f"{tuple(p.shape)}")
        self._plan = None

    def _get_plan(self) -> tuple[list[_MuonBucket], list[_AdamSlot]]:
        """Who owns what. Deterministic from the param order, so every rank computes the same plan."""
        if self._plan is not None:
            return self._plan
        ws = self.world_size
        buckets: list[_MuonBucket] = []
        slots: list[_AdamSlot] = []
        n_whole = 0  # round-robin counter for the AdamW params that cannot be split evenly
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "muon":
                by_shape: dict[tuple, list[Tensor]] = {}
                for p in group["params"]:
                    by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
                for params in by_shape.values():
                    buckets.append(_MuonBucket(gi, params, per_rank=math.ceil(len(params) / ws)))
            else:
                for p in group["params"]:
                    if p.ndim >= 1 and p.shape[0] % ws == 0:
                        rows = p.shape[0] // ws
                        slots.append(_AdamSlot(gi, p, True, self.rank * rows, (self.rank + 1) * rows))
                    else:
                        slots.append(_AdamSlot(gi, p, False, owner=n_whole % ws))
                        n_whole += 1
        self._plan = (buckets, slots)
        return self._plan

    def _probe_reduce_scatter(self) -> bool:
        """True when the backend runs reduce-scatter. Unsupported collectives fail on every rank alike before any
        data moves, so catching that failure cannot leave the ranks out of step."""
        if dist.get_backend() == "nccl":
            return True
        x = torch.zeros(self.world_size)
        try:
            _reduce_scatter(x[:1].clone(), x, async_op=False)
        except (RuntimeError, NotImplementedError, ValueError) as e:  # the backend says it lacks the collective
            self.fallback_reason = f"{dist.get_backend()}: {e}"
            return False
        return True

    # ------------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self) -> Tensor:
        if self.fsdp:
            return self._step_fsdp()
        buckets, slots = self._get_plan()
        ws = self.world_size

        # 1) average gradients; launch every collective first so they run back to back, then wait.
        muon_jobs = [self._reduce_muon(b) for b in buckets]
        adam_jobs = [self._reduce_adam(s) for s in slots]
        for job in muon_jobs + adam_jobs:
            if job[0] is not None:
                job[0].wait()
        muon_grads = [job[1]() for job in muon_jobs]  # (per_rank, R, C) each, averaged
        adam_grads = [job[1]() for job in adam_jobs]  # owned slice/param each, None where not owned

        # 2) global norm over what this rank owns (disjoint across ranks, padding is zero), summed over ranks.
        owned = muon_grads + [g for g in adam_grads if g is not None]
        norms = torch._foreach_norm(owned) if owned else [torch.zeros(())]
        sumsq = torch.stack([n.float() for n in norms]).square().sum()
        if ws > 1:
            dist.all_reduce(sumsq)
        norm = sumsq.sqrt()
        if self.max_grad_norm > 0:
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # a tensor: no host sync on GPU
            muon_grads = [g * coef.to(g.dtype) for g in muon_grads]
            adam_grads = [None if g is None else g * coef.to(g.dtype) for g in adam_grads]

        # 3) update what this rank owns and start gathering each result at once, so the all-gather of one bucket
        # overlaps the Newton–Schulz of the next.
        gathers = []
        for bucket, g in zip(buckets, muon_grads):
            self._muon_update(bucket, g)
            gathers.append(self._gather_muon(bucket))
        for slot, g in zip(slots, adam_grads):
            if g is not None:
                self._adam_update(slot, g)
            gathers.append(self._gather_adam(slot))
        for handle, finish in gathers:
            if handle is not None:
                handle.wait()
            finish()
        return norm

    # ------------------------------------------------------------------------------------------------- Muon

    def _reduce_muon(self, b: _MuonBucket):
        """Start averaging the bucket's gradients; returns (handle, get) where get() gives (per_rank, R, C)."""
        ws, k = self.world_size, b.per_rank
        grads = [_grad_or_zero(p) for p in b.params]
        grads += [torch.zeros_like(grads[0])] * (k * ws - len(grads))  # pad so every rank gets k matrices
        stacked = torch.stack(grads)  # (k*ws, R, C)
        if ws == 1:
            return None, lambda: stacked
        if self.use_reduce_scatter:
            out = torch.empty_like(stacked[:k])  # (k, R, C)
            return _reduce_scatter(out, stacked, async_op=True), lambda: out.div_(ws)
        handle = dist.all_reduce(stacked, async_op=True)
        return handle, lambda: stacked[self.rank * k : (self.rank + 1) * k].div_(ws)

    def _muon_update(self, b: _MuonBucket, G: Tensor) -> None:
        """SGD-momentum with Nesterov, orthogonalised. G: (per_rank, R, C), rows past the real params are padding."""
        group = self.param_groups[b.group]
        params = b.owned(self.rank)
        if not params:
            return
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = list(G[: len(params)].unbind(0))
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(st["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - mom)  # buf = mom*buf + (1-mom)*g
        nesterov = torch._foreach_lerp(grads, bufs, mom)  # look ahead: (1-mom)*g + mom*buf
        O = newton_schulz(torch.stack(nesterov))  # (n_owned, R, C)
        scale = _muon_scale(params[0].shape)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, list(O.to(params[0].dtype).unbind(0)), alpha=-lr * scale)

    def _gather_muon(self, b: _MuonBucket):
        ws, k = self.world_size, b.per_rank
        if ws == 1:
            return None, lambda: None
        mine = b.owned(self.rank)
        chunk = torch.zeros((k, *b.params[0].shape), dtype=b.params[0].dtype, device=b.params[0].device)
        if mine:
            chunk[: len(mine)] = torch.stack(mine)
        full = torch.empty((k * ws, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)  # (k*ws, R, C)
        if self.use_reduce_scatter:
            handle = _all_gather(full, chunk, async_op=True)
        else:
            handle = dist.all_gather(list(full.chunk(ws)), chunk, async_op=True)

        def finish():
            torch._foreach_copy_(b.params, list(full[: len(b.params)].unbind(0)))

        return handle, finish

    # ------------------------------------------------------------------------------------------------- AdamW

    def _reduce_adam(self, s: _AdamSlot):
        """Start averaging one AdamW gradient; get() gives this rank's slice, the whole grad, or None (not owned)."""
        ws = self.world_size
        g = _grad_or_zero(s.param)
        if ws == 1:
            return None, lambda: g
        if s.sharded:
            if self.use_reduce_scatter:
                out = torch.empty_like(g[s.start : s.end])
                return _reduce_scatter(out, g.contiguous(), async_op=True), lambda: out.div_(ws)
            full = g.clone()
            return dist.all_reduce(full, async_op=True), lambda: full[s.start : s.end].div_(ws)
        full = g.clone()
        handle = dist.reduce(full, dst=s.owner, async_op=True)
        return handle, lambda: full.div_(ws) if self.rank == s.owner else None

    def _adam_update(self, s: _AdamSlot, g: Tensor) -> None:
        p = s.param[s.start : s.end] if s.sharded else s.param  # a view: updates land in the parameter
        self._adamw(s.param, p, g, self.param_groups[s.group])

    def _adamw(self, param: Tensor, p: Tensor, g: Tensor, group: dict) -> None:
        """Textbook AdamW with bias correction on p, the part of `param` this rank updates (a view of it, so the
        update lands in the parameter), with g of p's shape; the state, keyed by `param`, has p's shape."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st = self.state[param]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        if wd and param.ndim == 2:  # never decay 1-D scalars (gains, per-layer mixing weights)
            p.mul_(1 - lr * wd)
        st["exp_avg"].lerp_(g, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (st["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
        p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1**t))

    def _gather_adam(self, s: _AdamSlot):
        ws = self.world_size
        if ws == 1:
            return None, lambda: None
        p = s.param
        if not s.sharded:
            return dist.broadcast(p.data, src=s.owner, async_op=True), lambda: None
        mine = p.data[s.start : s.end].clone()  # the collective's input must not alias its output
        if self.use_reduce_scatter:
            return _all_gather(p.data, mine, async_op=True), lambda: None
        return dist.all_gather(list(p.data.chunk(ws)), mine, async_op=True), lambda: None

    # ------------------------------------------------------------------------------------------------- FSDP

    def _step_fsdp(self) -> Tensor:
        """step() under FSDP2: gradients are already averaged and sharded like their parameters (dim 0), so every
        update below works on local rows (`.to_local()` views) and the only collectives are the norm's all-reduce
        and Muon's all-gather of its update."""
        muon: dict[tuple, list[Tensor]] = {}  # (group, shape) -> params, so one all-gather serves a whole bucket
        adam: list[tuple[int, Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if group["kind"] == "muon":
                    muon.setdefault((gi, tuple(p.shape)), []).append(p)
                else:
                    adam.append((gi, p))
        params = [p for ps in muon.values() for p in ps] + [p for _, p in adam]
        # a missing gradient steps as zero, as in the other paths
        grads = {p: p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local()) for p in params}

        # global norm: shards are disjoint across ranks, so the squared local norms sum to the squared global norm
        local = list(grads.values())
        norms = torch._foreach_norm(local) if local else [torch.zeros(())]
        sumsq = torch.stack([n.float() for n in norms]).square().sum()
        dist.all_reduce(sumsq)
        norm = sumsq.sqrt()
        if self.max_grad_norm > 0:
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = {p: g * coef.to(g.dtype) for p, g in grads.items()}

        for (gi, _), ps in muon.items():
            self._muon_update_fsdp(self.param_groups[gi], ps, [grads[p] for p in ps])
        for gi, p in adam:
            self._adamw(p, p.to_local(), grads[p], self.param_groups[gi])
        return norm

    def _muon_update_fsdp(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """Muon on same-shape (R, C) matrices sharded by rows; grads are this rank's (r, C) rows of each.

        Momentum is element-wise, so the buffer is kept for the local rows only. Newton–Schulz needs whole matrices:
        the Nesterov update is all-gathered and every rank orthogonalises ALL of them, redundantly. That costs
        world_size times the Muon FLOPs of the default path (where each rank orthogonalises only the matrices it
        owns); acceptable for an opt-in mode whose point is memory, and it keeps this path free of a second
        ownership scheme."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        mine = [p.to_local() for p in params]  # (r, C) views: in-place updates land in the sharded parameters
        bufs = []
        for p, m in zip(params, mine):
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(m)
            bufs.append(st["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - mom)  # buf = mom*buf + (1-mom)*g
        nesterov = torch.stack(torch._foreach_lerp(grads, bufs, mom))  # (k, r, C): look ahead, local rows
        k, (R, C) = len(params), params[0].shape
        mesh = params[0].device_mesh
        # the stack is sharded like each parameter, on its row dim (1); the global shape and stride are given
        # because the row split may be uneven (torch.chunk rule: the last ranks may hold fewer rows)
        full = DTensor.from_local(nesterov, mesh, [Shard(1)], run_check=False, shape=(k, R, C),
                                  stride=(R * C, C, 1)).full_tensor()  # (k, R, C) on every rank
        O = newton_schulz(full)  # (k, R, C), identical on every rank
        # Replicate -> Shard(1) is a local slice, no communication: this rank's rows, split exactly as FSDP splits
        O = DTensor.from_local(O, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
        if wd:
            torch._foreach_mul_(mine, 1 - lr * wd)
        torch._foreach_add_(mine, list(O.to(mine[0].dtype).unbind(0)), alpha=-lr * _muon_scale((R, C)))

    # ------------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["shard"] = {"rank": self.rank, "world_size": self.world_size, "fsdp": self.fsdp}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
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
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "shard"})
        self._plan = None  # the group dicts were replaced


def _grad_or_zero(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _muon_scale(shape) -> float:
    """An orthogonal (R, C) matrix has RMS entry 1/sqrt(max(R, C)); the sqrt(R/C) factor for tall matrices gives
    their updates the same per-input-dimension size as square ones (Keller Jordan's Muon uses this scale)."""
    rows, cols = shape
    return max(1.0, rows / cols) ** 0.5


def _is_dim0_sharded(p: Tensor) -> bool:
    """True for a DTensor sharded on dim 0 of a 1-D mesh: the layout FSDP2 `fully_shard` gives a parameter."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(p, DTensor) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


# torch 2.13 renamed reduce_scatter_tensor/all_gather_into_tensor to *_single and deprecates the old names; older
# torch (the pyproject allows >= 2.9) has only the old ones.
def _reduce_scatter(out: Tensor, inp: Tensor, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, op=dist.ReduceOp.SUM, async_op=async_op)


def _all_gather(out: Tensor, inp: Tensor, async_op: bool):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, async_op=async_op)


def build_optimizer(param_kinds: dict[str, list], *, n_embd: int, matrix_lr: float = 0.02,
                    embedding_lr: float = 0.2, unembedding_lr: float = 0.004, scalar_lr: float = 0.5,
                    weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95),
                    muon_momentum: float = 0.95, max_grad_norm: float = 1.0,
                    distributed: bool = False, fsdp: bool = False) -> MuonAdamW:
    """One MuonAdamW from `model.param_kinds()`: Muon for "matrix", AdamW for "embedding", "unembedding", "scalar".

    The AdamW rates are given for a 768-wide model and scaled by (n_embd / 768) ** -0.5. Why: Adam moves every
    coordinate by about lr regardless of width, and a d-wide row of the embedding or lm_head feeds a sum over d
    coordinates, so with roughly independent per-coordinate updates the change a step makes to a residual activation
    or a logit grows like sqrt(d); the 1/sqrt(d) factor keeps that change the same when the model gets wider or
    narrower. Muon's rate is not scaled: its update is orthogonal with a shape-aware scale, already width-aware.

    `distributed=True`: plain model under torchrun, the optimizer averages gradients (ZeRO-1 style state);
    `fsdp=True`: a model wrapped with FSDP2 `fully_shard` (see MuonAdamW). At most one of them.
    """
    unknown = set(param_kinds) - set(PARAM_KINDS)
    if unknown:
        raise ValueError(f"unknown parameter kinds {sorted(unknown)}; expected some of {PARAM_KINDS}")
    if n_embd <= 0:
        raise ValueError(f"n_embd must be positive, got {n_embd}")
    width_scale = (n_embd / REFERENCE_WIDTH) ** -0.5
    specs = [
        ("matrix", "muon", matrix_lr),
        ("embedding", "adamw", embedding_lr * width_scale),
        ("unembedding", "adamw", unembedding_lr * width_scale),
        ("scalar", "adamw", scalar_lr * width_scale),
    ]
    groups = []
    for name, kind, lr in specs:
        params = list(param_kinds.get(name, []))
        if not params:
            continue
        group = {"name": name, "kind": kind, "params": params, "lr": lr, "initial_lr": lr,
                 "weight_decay": weight_decay}
        if kind == "muon":
            group["momentum"] = muon_momentum
        else:
            group["betas"] = tuple(adam_betas)
        groups.append(group)
    if not groups:
        raise ValueError("build_optimizer got no parameters")
    return MuonAdamW(groups, max_grad_norm=max_grad_norm, distributed=distributed, fsdp=fsdp)
