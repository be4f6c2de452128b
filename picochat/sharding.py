"""Who owns what in an optimizer step: the layouts MuonAdamW (optim.py) runs its one step body over.

A step is split into units (a bucket of same-shape Muon matrices, or one AdamW parameter); a layout says which part
of each unit this rank updates and moves the tensors: `plan` the units, `reduce` their gradients (averaged over
ranks where the layout must do it), `sum_over_ranks` a norm, `whole_matrices` (apply a function that needs whole
matrices, Newton–Schulz, to this rank's part), `gather` the updated values back to every rank.

    Local   one process: everything is owned, nothing moves
    Zero1   torchrun without FSDP: reduce-scatter the gradients, update a shard, all-gather (ZeRO-1 state)
    Fsdp    FSDP2 DTensors: gradients arrive averaged and sharded; update local rows, gather only for Muon

Tests: tests/test_optim.py (a 2-process gloo run of Zero1 and Fsdp against Local).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Unit:
    """One piece of a step: a Muon bucket (same-shape matrices of one group, averaged, orthogonalised and gathered as
    one stack) or one AdamW parameter. `members` is all of it; `params` the members this rank updates (they key the
    optimizer state); `views` what of each it updates (the tensor, a slice of rows, or an FSDP shard's local rows:
    views, so updates land in the parameters); `grads`, set by reduce(), the averaged gradients of the views."""

    group: int  # index into param_groups (not the dict: load_state_dict replaces the dicts)
    muon: bool
    members: list[Tensor]
    params: list[Tensor]
    views: list[Tensor]
    grads: list[Tensor] = field(default_factory=list)
    per_rank: int = 0  # ZeRO-1 Muon: matrices per rank (the bucket padded to a multiple of world_size)
    rows: tuple[int, int] | None = None  # ZeRO-1 AdamW split by rows: this rank's [start, end)
    owner: int = 0  # ZeRO-1 AdamW not split: the rank that holds it whole


def _grad_or_zero(p: Tensor) -> Tensor:
    # a parameter without a gradient steps as zero: every rank must join the same collectives
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _done() -> None:
    pass


class Local:
    """One process owns everything: no collectives. The interface of every layout: plan() the units of a step,
    reduce() their gradients, sum_over_ranks() the norm, apply a function of whole_matrices() to a Muon stack, and
    gather() the new values (it starts the collective and returns the call that finishes it)."""

    rank, world_size, use_reduce_scatter = 0, 1, True

    def plan(self, groups: list[dict]) -> list[Unit]:
        """Deterministic from the parameter order, so every rank computes the same plan."""
        units: list[Unit] = []
        for gi, group in enumerate(groups):
            if group["kind"] == "muon":
                by_shape: dict[tuple, list[Tensor]] = {}
                for p in group["params"]:
                    by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
                units += [self._muon_unit(gi, ps) for ps in by_shape.values()]
            else:
                units += [self._adam_unit(gi, p) for p in group["params"]]
        return units

    def _muon_unit(self, gi: int, ps: list[Tensor]) -> Unit:
        return Unit(gi, True, ps, ps, ps)

    def _adam_unit(self, gi: int, p: Tensor) -> Unit:
        return Unit(gi, False, [p], [p], [p])

    def reduce(self, units: list[Unit]) -> None:
        for u in units:
            u.grads = [_grad_or_zero(p) for p in u.params]

    def sum_over_ranks(self, x: Tensor) -> Tensor:
        return x

    def whole_matrices(self, u: Unit, X: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(X)

    def gather(self, u: Unit) -> Callable[[], None]:
        return _done


class Zero1(Local):
    """torchrun without FSDP: the optimizer averages gradients with a reduce-scatter, each rank updates and keeps
    state for its share, then all-gathers. Muon needs whole matrices, so rank r owns the contiguous block
    [r*per_rank, (r+1)*per_rank) of a bucket padded to a multiple of world_size (the block a reduce-scatter over the
    stacked dim 0 hands it); AdamW is element-wise, so a rank owns a dim-0 slice of each parameter whose rows divide
    by world_size, and the others go whole to one rank each, round robin.

    use_reduce_scatter chooses reduce-scatter/all-gather (True) or all-reduce + slice (False); it is probed here,
    because some backends/torch versions (gloo) lack reduce-scatter."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.fallback_reason: str | None = None  # why use_reduce_scatter is False, for the run log
        self.use_reduce_scatter = self._probe_reduce_scatter()

    def _probe_reduce_scatter(self) -> bool:
        """Unsupported collectives fail on every rank alike before any data moves, so catching that failure cannot
        leave the ranks out of step."""
        if dist.get_backend() == "nccl":
            return True
        x = torch.zeros(self.world_size)
        try:
            _reduce_scatter(x[:1].clone(), x, async_op=False)
        except (RuntimeError, NotImplementedError, ValueError) as e:  # the backend says it lacks the collective
            self.fallback_reason = f"{dist.get_backend()}: {e}"
            return False
        return True

    def plan(self, groups: list[dict]) -> list[Unit]:
        self._n_whole = 0  # round robin over the AdamW parameters that cannot be split by rows
        return super().plan(groups)

    def _muon_unit(self, gi: int, ps: list[Tensor]) -> Unit:
        k = math.ceil(len(ps) / self.world_size)
        mine = ps[self.rank * k : (self.rank + 1) * k]
        return Unit(gi, True, ps, mine, mine, per_rank=k)

    def _adam_unit(self, gi: int, p: Tensor) -> Unit:
        if p.ndim >= 1 and p.shape[0] % self.world_size == 0:
            n = p.shape[0] // self.world_size
            start = self.rank * n
            return Unit(gi, False, [p], [p], [p[start : start + n]], rows=(start, start + n))
        owner, self._n_whole = self._n_whole % self.world_size, self._n_whole + 1
        mine = [p] if owner == self.rank else []
        return Unit(gi, False, [p], mine, mine, owner=owner)

    def reduce(self, units: list[Unit]) -> None:
        # launch every collective first so they run back to back, then wait
        for finish in [self._start_reduce(u) for u in units]:
            finish()

    def _start_reduce(self, u: Unit) -> Callable[[], None]:
        ws, rank = self.world_size, self.rank
        if u.muon:
            k = u.per_rank
            grads = [_grad_or_zero(p) for p in u.members]
            grads += [torch.zeros_like(grads[0])] * (k * ws - len(grads))  # pad so every rank gets k matrices
            full = torch.stack(grads)  # (k*ws, R, C)
            if self.use_reduce_scatter:
                mine = torch.empty_like(full[:k])  # (k, R, C)
                handle = _reduce_scatter(mine, full, async_op=True)
            else:
                mine, handle = full[rank * k : (rank + 1) * k], dist.all_reduce(full, async_op=True)
        else:
            g = _grad_or_zero(u.members[0])
            if u.rows is None:  # whole, to its owner
                mine = g.clone()
                handle = dist.reduce(mine, dst=u.owner, async_op=True)
            elif self.use_reduce_scatter:
                mine = torch.empty_like(g[u.rows[0] : u.rows[1]])
                handle = _reduce_scatter(mine, g.contiguous(), async_op=True)
            else:
                full = g.clone()
                mine, handle = full[u.rows[0] : u.rows[1]], dist.all_reduce(full, async_op=True)

        def finish() -> None:
            handle.wait()
            # sums -> means; a Muon block's rows past its real matrices are padding, an unowned AdamW param has none
            if u.muon:
                u.grads = list(mine[: len(u.params)].div_(ws).unbind(0))
            else:
                u.grads = [mine.div_(ws)] if u.params else []

        return finish

    def sum_over_ranks(self, x: Tensor) -> Tensor:
        dist.all_reduce(x)
        return x

    def gather(self, u: Unit) -> Callable[[], None]:
        ws, like = self.world_size, u.members[0]
        if u.muon:
            chunk = torch.zeros((u.per_rank, *like.shape), dtype=like.dtype, device=like.device)  # (k, R, C)
            if u.params:
                chunk[: len(u.params)] = torch.stack(u.params)
            full = torch.empty((u.per_rank * ws, *like.shape), dtype=like.dtype, device=like.device)  # (k*ws, R, C)
            handle = (_all_gather(full, chunk, async_op=True) if self.use_reduce_scatter
                      else dist.all_gather(list(full.chunk(ws)), chunk, async_op=True))

            def finish() -> None:
                handle.wait()
                torch._foreach_copy_(u.members, list(full[: len(u.members)].unbind(0)))

            return finish
        if u.rows is None:
            return dist.broadcast(like.data, src=u.owner, async_op=True).wait
        mine = like.data[u.rows[0] : u.rows[1]].clone()  # the collective's input must not alias its output
        if self.use_reduce_scatter:
            return _all_gather(like.data, mine, async_op=True).wait
        return dist.all_gather(list(like.data.chunk(ws)), mine, async_op=True).wait


class Fsdp(Local):
    """FSDP2 `fully_shard`: parameters are DTensors sharded on dim 0 and their gradients arrive averaged and sharded
    alike, so every rank updates the local rows of every parameter and the only collectives are the norm's
    all-reduce and the all-gather in whole_matrices(). Newton–Schulz needs whole matrices: the Nesterov update is
    all-gathered and every rank orthogonalises ALL of them, redundantly. That costs world_size times the Muon FLOPs
    of ZeRO-1 (where each rank orthogonalises only the matrices it owns); acceptable for an opt-in mode whose point
    is memory."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _muon_unit(self, gi: int, ps: list[Tensor]) -> Unit:
        return Unit(gi, True, ps, ps, [p.to_local() for p in ps])  # (r, C) views of each matrix's rows

    def _adam_unit(self, gi: int, p: Tensor) -> Unit:
        return Unit(gi, False, [p], [p], [p.to_local()])

    def reduce(self, units: list[Unit]) -> None:
        for u in units:
            u.grads = [p.grad.to_local() if p.grad is not None else torch.zeros_like(v)
                       for p, v in zip(u.params, u.views)]

    def sum_over_ranks(self, x: Tensor) -> Tensor:
        dist.all_reduce(x)
        return x

    def whole_matrices(self, u: Unit, X: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """X: (k, r, C), this rank's rows of the bucket's k matrices -> the same rows of fn(the whole matrices)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        k, (R, C), mesh = len(u.params), u.params[0].shape, u.params[0].device_mesh
        # the stack is sharded like each parameter, on its row dim (1); the global shape and stride are given
        # because the row split may be uneven (torch.chunk rule: the last ranks may hold fewer rows)
        full = DTensor.from_local(X, mesh, [Shard(1)], run_check=False, shape=(k, R, C),
                                  stride=(R * C, C, 1)).full_tensor()  # (k, R, C) on every rank
        O = fn(full)  # (k, R, C), identical on every rank
        # Replicate -> Shard(1) is a local slice, no communication: this rank's rows, split exactly as FSDP splits
        return DTensor.from_local(O, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()


def make_layout(distributed: bool, fsdp: bool) -> Local:
    """The layout for a run: FSDP2 parameters, ZeRO-1 over the process group, or a single process."""
    if fsdp:
        return Fsdp()
    if distributed and dist.get_world_size() > 1:
        return Zero1()
    return Local()


def is_dim0_sharded(p: Tensor) -> bool:
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
