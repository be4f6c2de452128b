"""The ONE supervised training loop, shared by pretraining, midtraining and SFT.

Stages differ only in what they pass in a `Stage`: the batch source, the schedule unit (steps, or progress through
the data), the periodic evaluations, the sample prompts and the checkpoint folder/meta. Their setup is written once
too, in `prepare()`: resume (or refuse a fresh run into a run folder with checkpoints) -> build the GPT -> load its
weights (this run's checkpoint, or for a fresh later stage its parent's: `find_parent`) -> sync ranks -> shard
(--fsdp) -> optimizer -> load its state. The step itself reads top to bottom:

    for each step:  evaluate? -> set LR and Muon momentum -> fetch micro-batches -> count supervised targets
                    -> forward/backward each micro-batch -> optimizer step (reduce, clip, update) -> log -> save?

Loss scaling: each micro-batch's loss is summed over its supervised targets and divided by the number of supervised
targets in the WHOLE step (all micro-batches, all ranks). With masked SFT data the per-micro-batch counts differ, and
averaging per-micro-batch means (the easy way) silently over-weights short answers; this way every supervised token
weighs the same, and pretraining (where every target counts) gets the plain mean. A micro-batch (or a rank) with no
supervised target adds a zero sum, so zero gradient, never a 0/0. A step with none at all anywhere skips the
optimizer (momentum and weight decay would still move the weights on a zero gradient) and is logged with
"supervised": 0 and "loss": null; the summary counts such steps ("steps_without_targets").

Metrics: one JSONL per run, <base>/logs/<stage>/<run>.jsonl (or --metrics), every record tagged with its stage and
run: {"kind": "train"|"eval"|"summary", "stage", "run", "step", ...}.

Distributed: the model is not wrapped in DDP. Each rank accumulates local gradients; the optimizer (optim.MuonAdamW,
distributed=True) reduce-scatters them once, updates its shard and all-gathers the parameters. With --fsdp the stage
wraps the model with FSDP2 first (`shard_model`); the loop is the same, FSDP reduce-scatters the gradients during
backward and the optimizer (fsdp=True) updates the local shards.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from picochat.attention import describe_backend
from picochat.checkpoint import OLD_LAYOUT, barrier, build_meta, check_compatible, checkpoint_dir, \
    clean_leftovers, clear_run, list_runs, list_steps, load_checkpoint, model_state_for_save, pick_run, run_dir, \
    save_checkpoint
from picochat.common import MetricsLogger, Runtime, UserError, autocast_ctx, get_base_dir, is_fsdp, \
    measure_matmul_flops, print0
from picochat.config import ModelConfig, TrainConfig
from picochat.model import GPT
from picochat.optim import build_optimizer
from picochat.train.schedules import set_rates

TEXT_PROMPTS = ["The capital of France is", "Once upon a time", "To be, or not to be,", "In the beginning"]
CHAT_PROMPTS = ["Hi! Who are you?", "How many r are in strawberry?", "What is 12*7?"]

# a later stage starts from the first of these stages that has a checkpoint (sft from mid, else base)
PARENTS = {"mid": ("base",), "sft": ("mid", "base"), "rl": ("sft", "mid", "base")}


@dataclass
class Stage:
    """Everything that makes pretrain, midtrain and SFT different (the model and optimizer come from `prepare`)."""

    name: str  # checkpoint stage: base | mid | sft
    cfg: TrainConfig  # the stage's resolved config, stored in each checkpoint's meta
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # this rank's next micro-batch (x, y), y == -1 ignored
    num_steps: int | None  # planned optimizer steps; None = until `progress` reaches 1 (one pass of the data)
    grad_accum: int  # micro-batches per step on each rank
    loader_state: Callable[[], dict] | None = None  # saved with each checkpoint for exact resume
    progress: Callable[[int], float] | None = None  # extra schedule unit (e.g. fraction of the data consumed)
    evaluate: Callable[[int], dict] | None = None  # periodic evals -> metrics (all ranks call it)
    samples: Callable[[torch.nn.Module, object], list[str]] | None = None  # (model, tokenizer) -> lines to print
    meta: dict = field(default_factory=dict)  # extra provenance for checkpoints
    checkpoints: bool = True  # benchmarks run the same loop without writing checkpoints or samples
    run: str = ""  # run name: checkpoints go to checkpoints/<name>/<run>/ (needed when checkpoints is True)


def resume_state(stage_name: str, run: str, cfg: TrainConfig, rt: Runtime, model_config, tokenizer) -> dict | None:
    """Latest checkpoint of this run for --resume (model/optim/loader states, step, meta), or None for a fresh run.
    A fresh run into a run folder that holds checkpoints is refused unless --overwrite, which deletes them first: a
    run's keep-last-K would otherwise delete the new run's checkpoints in favour of the old run's later steps."""
    d = run_dir(stage_name, run)
    if rt.is_master:
        clean_leftovers(d)
    barrier()  # every rank lists the folder after rank 0 has put back or removed a crash's leftovers
    steps = list_steps(d)
    if not cfg.resume:
        if steps and not cfg.overwrite:
            raise UserError(f"{d} already holds checkpoints (steps {', '.join(map(str, steps))}); pass --resume to "
                            f"continue that run, --overwrite to delete them and start over, or --run NAME for a new "
                            f"run beside it")
        if steps:
            if rt.is_master:
                clear_run(d)
            barrier()
            print0(f"--overwrite: deleted {len(steps)} checkpoint(s) of {d}")
        return None
    if not steps:
        old, others = checkpoint_dir(stage_name), [r for r in list_runs(stage_name) if r != OLD_LAYOUT]
        if list_steps(old):
            hint = (f"{old} holds checkpoints of the old layout (step folders directly under it): move them into "
                    f"{d}/ to resume them")
        elif others:
            hint = f"runs of this stage: {', '.join(sorted(others))} (pick one with --run)"
        else:
            hint = "start without --resume"
        raise UserError(f"--resume: no checkpoint in {d}; {hint}")
    ck = load_checkpoint(d, rank=rt.rank, device=rt.device)
    check_compatible(ck["meta"], model_config, tokenizer.hash(), ck["dir"])
    if ck["meta"].get("world_size", 1) != rt.world_size:
        raise UserError(f"--resume: {ck['dir']} was saved with {ck['meta'].get('world_size')} ranks, this run has "
                        f"{rt.world_size}; optimizer shards and loader positions are per rank, so use the same count")
    print0(f"resuming from {ck['dir']} (step {ck['step']})")
    return ck


@dataclass
class Prepared:
    """What `prepare` hands a stage: the model and optimizer ready to train, and the checkpoint resumed from."""

    model: GPT
    optimizer: torch.optim.Optimizer
    checkpoint: dict | None  # load_checkpoint's dict ("step", "meta", "loader" for the stage's loader), or None
    tokenizer: object = None  # saved checkpoints record its hash; samples decode with it

    @property
    def start_step(self) -> int:
        return self.checkpoint["step"] if self.checkpoint else 0

    @property
    def elapsed_s(self) -> float:
        return self.checkpoint["meta"].get("elapsed_s", 0.0) if self.checkpoint else 0.0


def prepare(stage_name: str, run: str, cfg: TrainConfig, rt: Runtime, model_config: ModelConfig,
            tokenizer, parent: Parent | None = None) -> Prepared:
    """Every stage's setup, in the one order that works under torchrun and --fsdp: resume state -> build the GPT on
    this rank's device -> init -> the checkpoint's weights (a full state dict, also from --fsdp runs, loaded on every
    rank before sharding) -> rank 0's weights on every rank -> shard -> optimizer (it must see the sharded
    parameters) -> the optimizer's state (this rank's shard). A fresh run with a `parent` (`find_parent`) starts from
    the parent's weights and a new optimizer; a resumed one from its own checkpoint."""
    ck = resume_state(stage_name, run, cfg, rt, model_config, tokenizer)
    model = GPT(model_config).to(rt.device)
    model.init_weights(cfg.seed)
    if ck is not None:
        model.load_state_dict(ck["model"])
    elif parent is not None:
        check_compatible(parent.meta, model_config, tokenizer.hash(), parent.dir)
        model.load_state_dict(load_checkpoint(parent.dir.parent, parent.step, device=rt.device,
                                              load_optim=False)["model"])
        print0(f"starting from {parent.describe()}")
    sync_params(model)
    shard_model(model, cfg, rt)
    opt = make_optimizer(model, cfg, rt)
    if ck is not None:
        opt.load_state_dict(ck["optim"])
    return Prepared(model, opt, ck, tokenizer)


@dataclass
class Parent:
    """The checkpoint a later stage starts from: where it is and its meta (model shape, resolved run config)."""

    stage: str
    run: str
    step: int
    dir: Path  # the step folder
    meta: dict

    def describe(self) -> str:
        return f"{self.stage} run '{self.run}' step {self.step} ({self.dir})"

    def provenance(self) -> dict:
        return {"stage": self.stage, "run": self.run, "step": self.step}


def find_parent(stage_name: str, run: str | None = None, step: int | None = None) -> Parent:
    """The checkpoint a fresh `stage_name` run starts from: the first stage of PARENTS[stage_name] that has a
    checkpoint (of run `run` when given, else its most recently written run), at `step` or its latest."""
    candidates = PARENTS[stage_name]
    for parent_stage in candidates:
        runs = list_runs(parent_stage)
        if (run is None and not runs) or (run is not None and run not in runs):
            continue
        name, d = pick_run(parent_stage, run)
        steps = list_steps(d)
        if step is not None and step not in steps:
            raise UserError(f"--parent-step {step}: no such checkpoint in {d}; its steps are "
                            f"{', '.join(map(str, steps))}")
        step_dir = d / f"step_{(step if step is not None else steps[-1]):06d}"
        try:
            meta = json.loads((step_dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"checkpoint file {step_dir / 'meta.json'} cannot be read ({e}); delete its folder or "
                            f"pick another --parent-step") from None
        return Parent(parent_stage, name, int(meta["step"]), step_dir, meta)
    where = " or ".join(f"checkpoints/{p}/" + (run or "") for p in candidates)
    train_first = {"base": "picochat pretrain", "mid": "picochat midtrain", "sft": "picochat sft"}[candidates[0]]
    raise UserError(f"{stage_name} starts from a parent checkpoint and there is none in {where} under "
                    f"{get_base_dir()}: run `{train_first}` first" + (" or pick another --parent-run" if run else ""))


def make_optimizer(model: GPT, cfg: TrainConfig, rt: Runtime) -> torch.optim.Optimizer:
    """MuonAdamW with the run's rates. After `shard_model`: an FSDP model's gradients are already averaged, so the
    optimizer must not average them."""
    fsdp = is_fsdp(model)
    return build_optimizer(model.param_kinds(), n_embd=model.config.n_embd, matrix_lr=cfg.matrix_lr,
                           embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr,
                           weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
                           distributed=rt.ddp and not fsdp, fsdp=fsdp, named_params=model.named_parameters(),
                           ns_dtype=torch.bfloat16 if rt.dtype == torch.bfloat16 else None)


def sync_params(model: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights (the sharded optimizer keeps them identical from then on). Call it
    before `shard_model`; on an FSDP model it leaves the shards alone (each rank holds different rows, so rank 0's
    would be wrong on the others)."""
    if dist.is_available() and dist.is_initialized() and not is_fsdp(model):
        for p in model.parameters():
            dist.broadcast(p.data, 0)


def shard_model(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> bool:
    """--fsdp: wrap each transformer block, then the whole GPT, with FSDP2 `fully_shard`, in place. Returns whether
    it did. Parameters become DTensors sharded on dim 0 (each rank keeps 1/world_size of every tensor); a block's
    weights are all-gathered just before its forward and backward and freed after, and gradients are reduce-scattered
    and averaged during backward. Per block, not only the root, so only a block or two (FSDP prefetches the next)
    is whole at a time.
    Build the optimizer after this (it must see the sharded parameters), with fsdp=True."""
    if not cfg.fsdp:
        return False
    if rt.world_size == 1:
        print0("warning: --fsdp shards across torchrun processes and this run has one; training unsharded")
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, lm_head, scalars
    return True


def greedy(model, tokenizer, prompts: list[list[int]], max_tokens: int, tool=None) -> list[str]:
    """The decoded greedy completion of each prompt (through the engine: the only sampling code). A chat reply ends
    at <|assistant_end|>; a python call runs through `tool` and its output is part of the text."""
    from picochat.engine import Engine, SamplingParams

    was_training = model.training
    engine = Engine(model, tokenizer, tool=tool)
    outs = []
    for ids in prompts:
        seqs, _ = engine.generate_batch(ids, 1, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        outs.append(tokenizer.decode(seqs[0]))
    model.train(was_training)
    return outs


def text_samples(prompts: list[str] = TEXT_PROMPTS, max_tokens: int = 24) -> Callable[[torch.nn.Module, object],
                                                                                       list[str]]:
    """A base model's samples: each prompt continued."""
    def samples(model, tok) -> list[str]:
        ids = [tok.encode(p, prepend=tok.bos_id) for p in prompts]
        return [p + out for p, out in zip(prompts, greedy(model, tok, ids, max_tokens))]
    return samples


def chat_samples(questions: list[str] = CHAT_PROMPTS, max_tokens: int = 64) -> Callable[[torch.nn.Module, object],
                                                                                        list[str]]:
    """A chat model's samples: each question as a one-turn conversation, the reply up to <|assistant_end|>, python
    calls answered by the calculator (cheap, no sandbox process: these run during training)."""
    from picochat.tools import make_tool

    def samples(model, tok) -> list[str]:
        ids = [tok.render_for_completion({"messages": [{"role": "user", "content": q}]}) for q in questions]
        return [f"{q} -> {out}" for q, out in zip(questions, greedy(model, tok, ids, max_tokens,
                                                                     make_tool("calculator")))]
    return samples


def metrics_path(stage: str, run: str) -> Path:
    """The default metrics file of a run (the report reads this layout)."""
    return get_base_dir() / "logs" / stage / f"{run or 'default'}.jsonl"


def train(stage: Stage, prep: Prepared, rt: Runtime) -> dict:
    """Runs the loop to the end of the schedule; returns the summary (also printed as the final JSON line)."""
    cfg, model, opt = stage.cfg, prep.model, prep.optimizer
    fwd = torch.compile(model) if cfg.compile else model
    if stage.checkpoints and not stage.run:  # run "" is the old layout's stage folder: never write there
        raise ValueError("Stage.run must name the run when the stage writes checkpoints")
    ckpt_dir = run_dir(stage.name, stage.run) if stage.checkpoints else None
    tags = {"stage": stage.name, "run": stage.run}
    logger = MetricsLogger(cfg.metrics or metrics_path(stage.name, stage.run),
                           enabled=rt.is_master and (stage.checkpoints or bool(cfg.metrics)))
    wandb_run = _wandb(cfg, stage, rt)
    flops_per_token = model.estimate_flops()["total"]
    peak = measure_matmul_flops("bfloat16" if rt.dtype == torch.bfloat16 else "float32", rt.device.type)
    tokens_per_step = None
    budget_s = cfg.max_minutes * 60
    print0(describe_backend())
    planned = f"{stage.num_steps} steps" if stage.num_steps is not None else "steps until the data is read"
    print0(f"stage {stage.name}: {planned} x {stage.grad_accum} micro-batches x {rt.world_size} ranks; "
           f"dtype {str(rt.dtype).removeprefix('torch.')}, compile {cfg.compile}, peak {peak / 1e9:.0f} GFLOP/s"
           + (f", budget {cfg.max_minutes:g} min" if budget_s else ""))

    pbar = _progress_bar(rt)
    say = pbar.write if pbar is not None else print0  # keeps messages on their own lines under the bar

    def progress(step: int, elapsed: float) -> float:
        p = step / max(stage.num_steps, 1) if stage.num_steps is not None else 0.0
        if stage.progress is not None:
            p = max(p, stage.progress(step))
        if budget_s > 0:
            p = max(p, elapsed / budget_s)
        return p

    def save(step: int, elapsed: float, finished: bool = False) -> None:
        meta = build_meta(model.config, cfg, prep.tokenizer.hash(), step, rt.world_size, stage=stage.name,
                          elapsed_s=elapsed, finished=finished, **stage.meta)
        t0 = time.perf_counter()
        d = save_checkpoint(ckpt_dir, step, model_state_for_save(model, rt.is_master), opt.state_dict(), meta,
                            stage.loader_state() if stage.loader_state else None, rank=rt.rank,
                            keep_last=cfg.keep_last)
        nonlocal last_saved, saved_finished
        last_saved, saved_finished = step, finished
        say(f"saved {d} in {time.perf_counter() - t0:.1f}s")

    step, elapsed, last_eval = prep.start_step, prep.elapsed_s, {}
    # the step of the newest checkpoint on disk: a run that ends on a --save-every multiple saves it once
    last_saved = step if stage.checkpoints and step in list_steps(ckpt_dir) else None
    saved_finished = False
    t_start = time.perf_counter() - elapsed
    train_time, train_tokens, loss_ema, empty_steps = 0.0, 0, None, 0
    while True:
        elapsed = time.perf_counter() - t_start
        prog = progress(step, elapsed)
        if rt.ddp:  # ranks' clocks and data positions differ slightly: they must agree on when to stop
            t = torch.tensor(prog, dtype=torch.float64, device=rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            prog = float(t)
        done = prog >= 1.0 or (stage.num_steps is not None and step >= stage.num_steps) or \
            (cfg.stop_at > 0 and step >= cfg.stop_at)
        if stage.evaluate and (done or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            last_eval = {"step": step, **stage.evaluate(step)}
            logger.log({"kind": "eval", **tags, **last_eval})
            if wandb_run:
                wandb_run.log(last_eval, step=step)
            say(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in last_eval.items()))
        sample_now = (done and cfg.sample_every >= 0) or (cfg.sample_every > 0 and step > 0 and
                                                           step % cfg.sample_every == 0)
        # under FSDP every forward all-gathers weights, so all ranks sample (the same greedy text); rank 0 prints
        if stage.samples and stage.checkpoints and (rt.is_master or is_fsdp(model)) and sample_now:
            for s in stage.samples(model, prep.tokenizer):
                say(f"  sample: {s!r}")
        if done:
            break

        # -- one optimizer step ------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        lrf = set_rates(opt, step, prog, cfg)
        micro = [stage.next_batch() for _ in range(stage.grad_accum)]
        n_targets = torch.tensor(float(sum(int((y >= 0).sum()) for _, y in micro)), device=rt.device)
        if rt.ddp:
            dist.all_reduce(n_targets)
        # the optimizer averages gradients over ranks, so scale by world_size to get sum / global targets
        scale = rt.world_size / n_targets.clamp(min=1)
        loss_sum = torch.zeros((), device=rt.device)
        for x, y in micro:
            with autocast_ctx(rt.device, rt.dtype):
                loss = fwd(x, targets=y, loss_reduction="sum")  # 0 (and zero gradient) without targets
            (loss * scale).backward()
            loss_sum += loss.detach()
        supervised = int(n_targets.item())  # the same on every rank (all-reduced): they all skip, or none does
        grad_norm = opt.step() if supervised else 0.0
        model.zero_grad(set_to_none=True)
        if rt.ddp:
            dist.all_reduce(loss_sum)
        step_loss = (loss_sum / n_targets.clamp(min=1)).item() if supervised else None  # .item() syncs: honest dt
        empty_steps += not supervised
        dt = time.perf_counter() - t0
        step += 1

        tokens = sum(x.numel() for x, _ in micro) * rt.world_size
        tokens_per_step = tokens
        if step > prep.start_step + 1 or (stage.num_steps or 3) < 3:  # the first step includes compile/warm-up
            train_time += dt
            train_tokens += tokens
        tok_s = tokens / dt
        mfu = tok_s * flops_per_token / (peak * rt.world_size)
        if step_loss is not None:
            loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
        rec = {"kind": "train", **tags, "step": step, "loss": step_loss, "supervised": supervised, "lr_factor": lrf,
               "grad_norm": float(grad_norm), "tok_per_s": tok_s, "mfu": mfu, "dt_ms": dt * 1000,
               "elapsed_s": time.perf_counter() - t_start}
        logger.log(rec)
        if wandb_run:
            wandb_run.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
        if pbar is not None:  # the bar counts progress in 0.1% units: steps or wall-clock, whichever is ahead
            pbar.set_postfix_str(f"step {step} | loss {loss_ema or float('nan'):.3f} | {tok_s:,.0f} tok/s | "
                                 f"MFU {mfu * 100:.1f}%")
            pbar.update(max(0, min(1000, int(progress(step, time.perf_counter() - t_start) * 1000)) - pbar.n))
        if stage.checkpoints and cfg.save_every > 0 and step % cfg.save_every == 0:
            save(step, time.perf_counter() - t_start, stage.num_steps is not None and step >= stage.num_steps)

    if pbar is not None:
        pbar.close()
    elapsed = time.perf_counter() - t_start
    # the schedule (steps, wall clock or data), not --stop-at, ended the run: the meta says so, and `picochat
    # speedrun` skips the stage (a last step saved unfinished by --save-every, e.g. before the clock ran out, is
    # saved again with the flag)
    finished = prog >= 1.0 or (stage.num_steps is not None and step >= stage.num_steps)
    if stage.checkpoints and (last_saved != step or (finished and not saved_finished)):
        save(step, elapsed, finished)
    avg_tok_s = train_tokens / train_time if train_time > 0 else 0.0
    summary = {**tags, "steps": step, "final_loss": loss_ema, **{k: v for k, v in last_eval.items() if k != "step"},
               "tok_per_s": avg_tok_s, "mfu": avg_tok_s * flops_per_token / (peak * rt.world_size),
               "tokens_per_step": tokens_per_step, "steps_without_targets": empty_steps, "elapsed_s": elapsed,
               **({"checkpoint": str(ckpt_dir)} if stage.checkpoints else {})}
    logger.log({"kind": "summary", **summary})
    logger.close()
    if wandb_run:
        wandb_run.finish()
    print0(json.dumps(summary))
    return summary


def _progress_bar(rt: Runtime):
    if not rt.is_master:
        return None
    from tqdm import tqdm

    return tqdm(total=1000, unit="‰", dynamic_ncols=True, mininterval=1.0, bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}")


def _wandb(cfg: TrainConfig, stage: Stage, rt: Runtime):
    if not (cfg.wandb and rt.is_master):
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="picochat", name=stage.run or None, config=asdict(cfg))


def micro_batches(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    """Gradient accumulation steps: total_batch_size tokens = device_batch * seq_len * world_size * accum."""
    per = cfg.device_batch_size * seq_len * world_size
    if cfg.total_batch_size % per != 0:
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of device_batch_size x "
                        f"seq_len x ranks = {cfg.device_batch_size} x {seq_len} x {world_size} = {per}")
    return cfg.total_batch_size // per
