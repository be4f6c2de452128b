"""What midtraining and SFT share: a chat stage is the one loop over conversation batches, started from a parent
checkpoint. `midtrain.py` and `sft.py` are this module with another `ChatStage` (checkpoint stage, config class,
presets, default mixture).

    start: find_parent (mid <- base, sft <- mid else base; --parent-run / --parent-step)
           -> the model shape from the parent's meta, hyperparameters inherited through config.inherit (printed)
           -> a fresh run: the LRs x --init-lr-frac; a --resume: everything from the run's own checkpoint
    data:  the stage's default mixture (or --tasks), plus --data; ConversationLoader rows with targets only on
           assistant tokens, one pass by default (progress = loader.epochs_done())
    eval:  validation loss and bpb on held-out conversations, accuracy on a few multiple-choice questions (--mc-eval)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from picochat.common import UserError, autocast_ctx, print0, runtime
from picochat.config import CHAT_INHERITABLE, ChatStageConfig, ModelConfig, inherit, log_config, parse_config
from picochat.checkpoint import list_steps, run_dir
from picochat.data.conversations import ConversationLoader, ConversationValidation
from picochat.evals.bpb import evaluate_bpb
from picochat.evals.chat import evaluate_categorical
from picochat.tasks import Task, TaskMixture, get_task
from picochat.tokenizer import get_tokenizer
from picochat.train.loop import Parent, Stage, chat_samples, find_parent, micro_batches, prepare, train

LR_FIELDS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")


@dataclass(frozen=True)
class ChatStage:
    """What one chat stage is: its checkpoint stage, command, config class, presets and default mixture."""

    name: str  # checkpoint stage: mid | sft
    prog: str  # "picochat midtrain"
    description: str
    config_cls: type
    presets: dict[str, Callable[[], dict]]
    mixture: str  # the picochat.tasks.mixtures function: "midtrain_mixture" | "sft_mixture"


# ---------------------------------------------------------------------------------------------------------------------
# the config: inherited from the parent (fresh) or from the run itself (resume)


def resolve_config(stage: ChatStage, cfg: ChatStageConfig, given: dict) -> tuple[ChatStageConfig, ModelConfig, str,
                                                                                   Parent | None]:
    """(config, model config, run name, parent or None for a resume). `given`: the flags and preset values the user
    set, which win over inherited ones. A fresh run inherits from its parent and scales the inherited LRs by
    --init-lr-frac; a resumed run inherits from its own latest checkpoint, whose LRs are already scaled, so
    N steps + --resume trains exactly as 2N steps."""
    def parent_checkpoint():
        return find_parent(stage.name, cfg.parent_run or None, cfg.parent_step)

    # a resume of a named run needs no parent (the parent may have been deleted since); the default run name is the
    # parent's
    parent = None if cfg.resume and cfg.run else parent_checkpoint()
    run = cfg.run or parent.run
    steps = list_steps(run_dir(stage.name, run))
    if cfg.resume and steps:
        ck_dir = run_dir(stage.name, run) / f"step_{steps[-1]:06d}"
        source, meta, parent = str(ck_dir), json.loads((ck_dir / "meta.json").read_text()), None
    else:  # a --resume with nothing to resume fails in prepare() with its own message
        parent = parent or parent_checkpoint()
        source, meta = parent.describe(), parent.meta
    resolved = inherit(cfg, meta.get("run_config", {}), given, CHAT_INHERITABLE, source=source, title=stage.name)
    if parent is not None and cfg.init_lr_frac != 1.0:
        scaled = {k: getattr(resolved, k) * cfg.init_lr_frac for k in LR_FIELDS if k not in given}
        resolved = dataclasses.replace(resolved, **scaled)
        print0(f"  {stage.name}: --init-lr-frac {cfg.init_lr_frac:g} x the parent's LRs: "
               + ", ".join(f"{k} {v:.4g}" for k, v in scaled.items()))
    mcfg = ModelConfig(**meta["model_config"])  # the shape is the parent's, never a flag
    if resolved.max_seq_len > mcfg.sequence_len:
        print0(f"  {stage.name}: --max-seq-len {resolved.max_seq_len} is above the model's context; using "
               f"{mcfg.sequence_len}")
    if not 0 < resolved.max_seq_len <= mcfg.sequence_len:
        resolved = dataclasses.replace(resolved, max_seq_len=mcfg.sequence_len)
    return resolved, mcfg, run, parent


# ---------------------------------------------------------------------------------------------------------------------
# data


def parse_tasks(spec: str, split: str, source: str) -> list[Task]:
    """--tasks "identity,spellingbee:2000,chatterbot": task names of picochat.tasks, each with an optional size
    (generated tasks take it as size=N, datasets as their first N rows)."""
    tasks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        if n and not n.isdigit():
            raise UserError(f"--tasks item {item!r}: the size after ':' must be a whole number")
        kw = {"source": source} if name in ("smoltalk", "mmlu", "arc-easy", "arc-challenge", "gsm8k") else {}
        try:
            tasks.append(get_task(name, split, **kw, **({"size": int(n)} if n else {})))
        except TypeError:  # the family has no size= (a dataset, not a generator): take its first N rows
            tasks.append(get_task(name, split, **kw, stop=int(n)))
    if not tasks:
        raise UserError(f"--tasks {spec!r} names no task")
    return tasks


def build_data(stage: ChatStage, cfg: ChatStageConfig) -> tuple[Task, Task]:
    """(train, validation) tasks: the stage's default mixture, or --tasks (whose first --val-conversations of the
    shuffled mixture are held out), each with --data added."""
    if not cfg.tasks:
        from picochat.tasks import mixtures

        make = getattr(mixtures, stage.mixture)
        kw = dict(source=cfg.source, scale=cfg.scale, data=cfg.data or None, seed=cfg.seed)
        train_task, val_task = make("train", **kw), make("val", **kw)
        print0(mixtures.describe_mixture(train_task))
        return train_task, val_task
    tasks = parse_tasks(cfg.tasks, "train", cfg.source)
    if cfg.data:
        tasks.append(get_task("custom", path=cfg.data))
    n_val = min(cfg.val_conversations, sum(len(t) for t in tasks) // 10)  # never more than a tenth of the data
    if n_val < 1:
        raise UserError(f"--tasks {cfg.tasks!r} has too few conversations to hold out validation ones from")
    return TaskMixture(tasks, seed=cfg.seed, start=n_val), TaskMixture(tasks, seed=cfg.seed, stop=n_val)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


class _Tally:
    """The model as `evaluate_bpb` calls it, also summing the per-token losses it returns, so one pass over the
    validation rows gives bpb and the mean loss per supervised token (which counts <|assistant_end|>: bpb leaves it
    out, as a special token has no bytes)."""

    def __init__(self, model):
        self.model, self.nats, self.n = model, 0.0, 0

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        return self.model.train(mode)

    def eval(self):
        return self.model.eval()

    def __call__(self, x, targets, loss_reduction):
        loss = self.model(x, targets=targets, loss_reduction=loss_reduction)  # (B, T) nats, 0 where targets == -1
        self.nats += loss.double().sum()
        self.n += (targets >= 0).sum()
        return loss


@torch.no_grad()
def mc_questions(cfg: ChatStageConfig):
    """(metric name, the first --mc-eval-n questions of --mc-eval as a Task), or ("", None) with a line saying why.
    Scored by evals.chat.evaluate_categorical: the letters' logits after <|assistant_start|>, no sampling."""
    if not cfg.mc_eval or cfg.mc_eval_n <= 0:
        return "", None
    name, _, split = cfg.mc_eval.partition(":")
    try:
        task = get_task(name, split or "test", stop=cfg.mc_eval_n)
    except UserError as e:
        print0(f"warning: no categorical accuracy during training ({e})")
        return "", None
    if task.eval_type != "categorical":
        raise UserError(f"--mc-eval {cfg.mc_eval!r} is not a multiple-choice task")
    return f"{name}_acc", task


# ---------------------------------------------------------------------------------------------------------------------
# the stage


def run_stage(stage: ChatStage, argv: list[str] | None) -> dict:
    cfg, explicit, ns = parse_config(stage.config_cls, argv, prog=stage.prog, description=stage.description,
                                     presets=stage.presets)
    given = {**(stage.presets[ns.preset]() if ns.preset else {}), **explicit}  # a preset's values count as given
    tok = get_tokenizer()
    cfg, mcfg, run, parent = resolve_config(stage, cfg, given)
    with runtime(cfg.device, cfg.dtype, cfg.seed, deterministic=cfg.deterministic) as rt:
        prep = prepare(stage.name, run, cfg, rt, mcfg, tok, parent=parent)
        log_config(cfg, f"{stage.name} config")
        B, T = cfg.device_batch_size, cfg.max_seq_len
        accum = micro_batches(cfg, T, rt.world_size)
        train_task, val_task = build_data(stage, cfg)
        ck = prep.checkpoint
        loader = ConversationLoader(tok, train_task, B, T, rank=rt.rank, world_size=rt.world_size, device=rt.device,
                                    seed=cfg.seed, state=ck["loader"] if ck else None, packing=cfg.packing)
        val = ConversationValidation(tok, val_task, B, T, max_conversations=cfg.val_conversations, rank=rt.rank,
                                     world_size=rt.world_size)
        print0(f"training data: {len(train_task):,} conversations; {val.describe()}")
        mc_name, questions = mc_questions(cfg)
        token_bytes = tok.token_bytes().to(rt.device)

        def evaluate(step: int) -> dict:
            tally, batches = _Tally(prep.model), val.batches(rt.device)
            bpb = evaluate_bpb(tally, lambda: next(batches), val.steps, token_bytes,
                               autocast=lambda: autocast_ctx(rt.device, rt.dtype))
            both = torch.stack([torch.as_tensor(tally.nats, dtype=torch.float64, device=rt.device),
                                torch.as_tensor(tally.n, dtype=torch.float64, device=rt.device)])
            if rt.ddp:
                dist.all_reduce(both)
            out = {"val_loss": float(both[0] / both[1].clamp(min=1)), "val_bpb": bpb}
            if questions is not None:
                out[mc_name] = evaluate_categorical(prep.model, tok, questions, device=rt.device, dtype=rt.dtype,
                                                    rank=rt.rank, world_size=rt.world_size)["accuracy"]
            return {**out, **loader.stats()}

        num_steps = cfg.num_steps if cfg.num_steps > 0 else None  # None: until --num-epochs passes are read
        data_progress = (lambda step: loader.epochs_done() / cfg.num_epochs) if num_steps is None else None
        meta = {"parent": parent.provenance() if parent else (ck["meta"].get("parent") if ck else None)}
        loop_stage = Stage(name=stage.name, run=run, cfg=cfg, next_batch=lambda: next(loader), num_steps=num_steps,
                           grad_accum=accum, loader_state=loader.state_dict, evaluate=evaluate,
                           progress=data_progress, samples=chat_samples(), meta=meta)
        try:
            return train(loop_stage, prep, rt)
        finally:
            loader.close()

