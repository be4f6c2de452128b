"""`picochat rl`: reinforcement learning with GRPO on a task with a reward, rollouts through the engine, tools on.

    picochat rl                                   # from the newest sft checkpoint (else mid, else base), SpellingBee
    picochat rl --task arithmetic --group-size 8 --prompts-per-step 8 --kl-coef 0.02
    picochat rl --no-std --loss-norm token        # Dr. GRPO's advantages, DAPO's token-level mean
    picochat rl --resume --run d4                 # continue checkpoints/rl/d4/
    torchrun --nproc_per_node=8 -m picochat.train.rl --task gsm8k   # GSM8K train needs the hub (online)

A step, top to bottom (the math is in train/grpo.py):

    prompts of the step (from (seed, step))  -> this rank's share (slot j on rank j mod world)
    -> rollouts: each prompt prefilled once and copied into G rows, every row of every prompt decoded together,
       the tool's output forced in -> rewards by task.reward -> group advantages; zero-variance groups skipped
    -> old log-probs (when a batch serves several updates) and the reference's (with --kl-coef), no gradient
    -> for each of --updates-per-batch: clipped-ratio loss over the SAMPLED tokens of every micro-batch, backward,
       optimizer step (it reduces the gradients over ranks) -> metrics -> checkpoint?

The optimizer, LR schedule, checkpoints, metrics logger and the setup order are the supervised stages' (loop.prepare,
make_optimizer via prepare, schedules.set_rates, checkpoint.save_checkpoint with stage "rl", MetricsLogger to
<base>/logs/rl/<run>.jsonl); the supervised loop itself has no RL branch. Exact resume: the prompts of a step and
every sampling seed derive from (seed, step, slot), so a resumed run draws the same rollouts as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from picochat.checkpoint import build_meta, list_steps, load_checkpoint, model_state_for_save, run_dir, \
    save_checkpoint
from picochat.common import MetricsLogger, Runtime, UserError, autocast_ctx, print0, run_main, runtime
from picochat.config import ModelConfig, TrainConfig, f, inherit, log_config, parse_config
from picochat.engine import Batch, Engine, Request, SamplingParams
from picochat.evals.passk import pass_at_k
from picochat.tasks import Task, TaskSequence, get_task
from picochat.tokenizer import get_tokenizer
from picochat.tools import make_tool
from picochat.train import grpo
from picochat.train.loop import Parent, find_parent, metrics_path, prepare
from picochat.train.schedules import set_rates

# inherited from the parent unless given (its LRs x --init-lr-frac: RL nudges a trained model, it does not retrain it)
RATES = ["matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "grad_clip"]


@dataclass
class RLConfig(TrainConfig):
    """`picochat rl`: GRPO. The batch is prompts_per_step x group_size completions; total_batch_size, eval_tokens and
    corpus are the supervised loop's and unused here, fsdp, compile and wandb are refused."""

    task: str = f("spellingbee", "task with a reward: spellingbee, arithmetic, gsm8k (train split from the hub), ...")
    train_size: int = f(0, "use only the first N training problems (0 = the task's whole train split)")
    eval_size: int = f(64, "held-out problems (the task's test split) for pass@1 / pass@k")
    eval_samples: int = f(4, "samples per held-out problem: pass@1 and pass@k with k = this")
    parent_run: str = f("", "run of the parent stage to start from (the newest sft, else mid, else base; empty = its "
                            "most recently written run)")
    parent_step: int | None = f(None, "step of the parent checkpoint (default: the latest of that run)")
    init_lr_frac: float = f(0.05, "the LRs inherited from the parent are multiplied by this (nanochat's RL value; an "
                                  "explicit --matrix-lr etc. is used as given)")
    prompts_per_step: int = f(8, "prompts per step (groups), split across ranks")
    group_size: int = f(8, "completions sampled per prompt (G)")
    max_new_tokens: int = f(128, "tokens per completion, tool output included")
    temperature: float = f(1.0, "sampling temperature of rollouts and of the pass@k evaluation")
    top_k: int = f(0, "sample from the k most likely tokens (0 = all)")
    tool: str = f("calculator", "tool the completions may call: calculator, python (sandboxed) or none",
                  choices=["calculator", "python", "none"])
    no_std: bool = f(False, "advantages r - mean without dividing by the group's std (Dr. GRPO)")
    loss_norm: str = f("token", "token: mean over every sampled token of the step (DAPO); sequence: mean per "
                                "completion, then over completions (GRPO's paper)", choices=["token", "sequence"])
    clip_eps: float = f(0.2, "PPO clip range below 1 of the ratio pi/pi_old (PPO's value)")
    clip_eps_high: float = f(0.0, "clip range above 1 (0 = clip_eps; DAPO's clip-higher uses 0.28)")
    updates_per_batch: int = f(1, "optimizer updates per batch of rollouts (>1: ratios against the kept old "
                                  "log-probs, and the clip matters)")
    kl_coef: float = f(0.0, "weight of the k3 KL estimate to the frozen parent (0 = no reference model)")
    # the supervised loop's defaults that differ for RL
    device_batch_size: int = f(8, "sequences per forward/backward micro-batch")
    num_steps: int = f(-1, "steps (batches of rollouts); -1 = one pass over the training problems")
    warmup_steps: int = f(0, "linear LR warmup steps")
    warmdown_ratio: float = f(1.0, "fraction of the run over which the LR decays to final_lr_frac (1 = linear "
                                   "from the start, as nanochat's RL)")
    eval_every: int = f(20, "evaluate pass@1 / pass@k on held-out problems every N steps (and at the start and end)")
    sample_every: int = f(0, "unused by rl (rollouts are its samples)")


@dataclass
class Group:
    """One prompt's G completions: token ids (the terminal token kept, so the model learns to stop), masks
    (1 = sampled, 0 = forced by the tool), rewards."""

    prompt: list[int]
    seqs: list[list[int]]
    masks: list[list[int]]
    rewards: list[float] = field(default_factory=list)


def slot_seed(seed: int, *keys) -> int:
    """A sampling seed from (seed, keys...) by SHA-256: the same on every machine, rank and resume."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()[:8], "little") >> 1


def step_prompts(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """Problem indices of `step`: slot k = step * per_step + j walks a fresh permutation of range(n) per epoch
    (epoch = k // n), so the order depends on (seed, step) alone."""
    perms: dict[int, list[int]] = {}
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        if k // n not in perms:
            perms[k // n] = random.Random(f"{seed}:{k // n}").sample(range(n), n)
        out.append(perms[k // n][k % n])
    return out


def sample_groups(engine: Engine, prompts: list[list[int]], n: int, params: list[SamplingParams]) -> list[Group]:
    """n completions of each prompt, every row of every prompt decoded in one Batch (each prompt prefilled once and
    copied into its n rows), so one decode step serves every row of the step. Unlike generate_batch the terminal
    token is kept: a sampled <|assistant_end|> is an action the reward should reinforce or discourage."""
    groups = [Group(p, [[] for _ in range(n)], [[] for _ in range(n)]) for p in prompts]
    terminal = (engine.specials.assistant_end, engine.specials.bos)

    def collect(g: Group):
        def on_event(ev):
            if ev.token >= 0:
                g.seqs[ev.row].append(ev.token)
                g.masks[ev.row].append(0 if ev.forced else 1)
            if ev.drop and not (ev.drop == 1 and ev.token in terminal):  # no stop strings: only terminals drop
                del g.seqs[ev.row][-ev.drop:], g.masks[ev.row][-ev.drop:]
        return on_event

    # a prompt that fills the context has no room for a reply: its completions stay empty (scored as empty replies)
    reqs = [Request(i, list(p), n, sp, collect(g)) for i, (p, sp, g) in enumerate(zip(prompts, params, groups))
            if len(p) < engine.context]
    if reqs:
        batch = Batch(engine, max_rows=len(reqs) * n, cache=engine.new_cache(len(reqs) * n))
        batch.add(reqs)
        while batch.rows:
            batch.step(max_steps=engine.chunk)
    return groups


def completion_text(tok, seq: list[int], terminal: tuple[int, ...]) -> str:
    return tok.decode(seq[:-1] if seq and seq[-1] in terminal else seq)


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """log pi(y_t | x_<=t) (B, T) fp32; 0 where y is -1. The model's per-token cross-entropy, negated."""
    with autocast_ctx(rt.device, rt.dtype):
        return -model(x, targets=y, loss_reduction="none").float()


def micro_batches(rows: list[tuple[list[int], list[int], float]], size: int, device) -> list[dict]:
    """rows (ids = prompt + completion, mask over ids, advantage) -> right-padded micro-batches of `size` rows:
    x = ids[:-1], y = ids[1:] (-1 on padding), mask on y (1 where y was sampled), adv (B,)."""
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        T = max(len(ids) for ids, _, _ in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        m = torch.zeros(len(chunk), T)
        for b, (ids, mask, _) in enumerate(chunk):
            L = len(ids) - 1
            x[b, :L] = torch.tensor(ids[:-1])
            y[b, :L] = torch.tensor(ids[1:])
            m[b, :L] = torch.tensor(mask[1:], dtype=torch.float32)
        out.append({"x": x.to(device), "y": y.to(device), "mask": m.to(device),
                    "adv": torch.tensor([a for _, _, a in chunk], dtype=torch.float32, device=device)})
    return out


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.ddp:
        dist.all_reduce(t)
    return t.tolist()


def evaluate(engine: Engine, task, cfg: RLConfig, rt: Runtime, max_rows: int) -> dict:
    """pass@1 and pass@k (k = eval_samples, unbiased estimator) on the first eval_size held-out problems, split
    across ranks; the seeds depend on the problem only, so every evaluation of a run samples alike."""
    n, k = cfg.eval_samples, cfg.eval_samples
    mine = list(range(rt.rank, min(cfg.eval_size, len(task)), rt.world_size))
    per = max(1, max_rows // n)
    terminal = (engine.specials.assistant_end, engine.specials.bos)
    sums = [0.0, 0.0, 0.0]  # pass@1, pass@k, problems
    for i in range(0, len(mine), per):
        idx = mine[i : i + per]
        convs = [task[j] for j in idx]
        params = [SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k or None, max_tokens=cfg.max_new_tokens,
                                 seed=slot_seed(cfg.seed, "eval", j)) for j in idx]
        groups = sample_groups(engine, [engine.tok.render_for_completion(c) for c in convs], n, params)
        for conv, g in zip(convs, groups):
            c = sum(bool(task.evaluate(conv, completion_text(engine.tok, s, terminal))) for s in g.seqs)
            sums = [sums[0] + pass_at_k(n, c, 1), sums[1] + pass_at_k(n, c, k), sums[2] + 1]
    p1, pk, count = all_sum(sums, rt)
    return {"pass@1": p1 / max(count, 1), f"pass@{k}": pk / max(count, 1), "eval_problems": int(count)}


# ---------------------------------------------------------------------------------------------------------------------
# setup


def resolve_config(cfg: RLConfig, given: dict) -> tuple[RLConfig, ModelConfig, str, Parent | None, dict]:
    """(config, model config, run name, parent for a fresh run else None, the parent's provenance). As the chat
    stages: a fresh run inherits RATES from its parent (the newest sft, else mid, else base) and scales the inherited
    LRs by --init-lr-frac; a resumed run inherits from its own latest checkpoint, whose LRs are already scaled."""
    parent = None if cfg.resume and cfg.run else find_parent("rl", cfg.parent_run or None, cfg.parent_step)
    run = cfg.run or parent.run
    steps = list_steps(run_dir("rl", run))
    if cfg.resume and steps:
        ck_dir = run_dir("rl", run) / f"step_{steps[-1]:06d}"
        source, meta, parent = str(ck_dir), json.loads((ck_dir / "meta.json").read_text()), None
        provenance = meta["parent"]
    else:  # a --resume with nothing to resume fails in prepare() with its own message
        parent = parent or find_parent("rl", cfg.parent_run or None, cfg.parent_step)
        source, meta, provenance = parent.describe(), parent.meta, parent.provenance()
        if parent.stage != "sft":
            print0(f"rl: no sft checkpoint{f' of run {cfg.parent_run!r}' if cfg.parent_run else ''}; starting from "
                   f"{parent.describe()}")
    resolved = inherit(cfg, meta.get("run_config", {}), given, RATES, source=source, title="rl")
    if parent is not None and cfg.init_lr_frac != 1.0:
        scaled = {k: getattr(resolved, k) * cfg.init_lr_frac for k in RATES if k.endswith("_lr") and k not in given}
        resolved = replace(resolved, **scaled)
        print0(f"  rl: --init-lr-frac {cfg.init_lr_frac:g} x the parent's LRs: "
               + ", ".join(f"{k} {v:.4g}" for k, v in scaled.items()))
    return resolved, ModelConfig(**meta["model_config"]), run, parent, provenance


@dataclass
class RLRun:
    cfg: RLConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ref: torch.nn.Module | None  # frozen parent for the KL term, or None
    engine: Engine
    train_task: Task
    eval_task: Task
    run: str
    num_steps: int
    parent: dict
    start_step: int = 0
    elapsed_s: float = 0.0


def setup(cfg: RLConfig, given: dict, rt: Runtime, tasks: tuple[Task, Task] | None = None) -> RLRun:
    """Config and model shape from the parent (or the run's own checkpoint) -> loop.prepare (resume, or the parent's
    weights; optimizer) -> the frozen reference (--kl-coef) -> tasks (`tasks` = (train, held-out) instead of --task)
    -> engine."""
    unsupported = {"fsdp": "ranks run different numbers of micro-batches", "compile": "every batch has other shapes",
                   "wandb": "its metrics go to the JSONL file"}
    for flag, why in unsupported.items():
        if getattr(cfg, flag):
            raise UserError(f"rl does not support --{flag} yet ({why}); drop it")
    if cfg.group_size < 2:
        raise UserError(f"--group-size {cfg.group_size}: GRPO needs >= 2 completions per prompt (the group is "
                        f"the baseline)")
    if cfg.prompts_per_step < rt.world_size:
        raise UserError(f"--prompts-per-step {cfg.prompts_per_step} is less than the {rt.world_size} ranks; give "
                        f"each rank at least one prompt")
    cfg, mcfg, run, parent, provenance = resolve_config(cfg, given)
    tok = get_tokenizer()
    prep = prepare("rl", run, cfg, rt, mcfg, tok, parent=parent)
    ref = None
    if cfg.kl_coef > 0:  # the parent's weights, also when resuming (the run's own weights have moved)
        ref = copy.deepcopy(prep.model).eval().requires_grad_(False)
        pdir = run_dir(provenance["stage"], provenance["run"])
        ref.load_state_dict(load_checkpoint(pdir, provenance["step"], device=rt.device, load_optim=False)["model"])
    train_task, eval_task = tasks or (get_task(cfg.task, "train"), get_task(cfg.task, "test"))
    if type(train_task).evaluate is Task.evaluate and type(train_task).reward is Task.reward:
        raise UserError(f"task {cfg.task!r} has no reward; pick a task with one (spellingbee, arithmetic, gsm8k)")
    if cfg.train_size > 0:
        train_task = TaskSequence([train_task], stop=cfg.train_size)
    num_steps = cfg.num_steps if cfg.num_steps > 0 else max(1, len(train_task) // cfg.prompts_per_step)
    engine = Engine(prep.model, tok, tool=None if cfg.tool == "none" else make_tool(cfg.tool))
    log_config(cfg, "rl config")
    print0(f"rl: task {cfg.task} ({len(train_task):,} training problems, {len(eval_task):,} held out), {num_steps} "
           f"steps of {cfg.prompts_per_step} prompts x {cfg.group_size} completions, tool {cfg.tool}")
    return RLRun(cfg, prep.model, prep.optimizer, ref, engine, train_task, eval_task, run, num_steps, provenance,
                 prep.start_step, prep.elapsed_s)


# ---------------------------------------------------------------------------------------------------------------------
# the loop


def rollout(r: RLRun, step: int, rt: Runtime) -> tuple[list[Group], float]:
    """This rank's groups of `step` (prompt slot j on rank j mod world), rewarded; and the seconds it took."""
    t0 = time.perf_counter()
    cfg, tok = r.cfg, r.engine.tok
    slots = [(j, i) for j, i in enumerate(step_prompts(len(r.train_task), cfg.seed, step, cfg.prompts_per_step))
             if j % rt.world_size == rt.rank]
    convs = [r.train_task[i] for _, i in slots]
    params = [SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k or None, max_tokens=cfg.max_new_tokens,
                             seed=slot_seed(cfg.seed, step, j)) for j, _ in slots]
    groups = sample_groups(r.engine, [tok.render_for_completion(c) for c in convs], cfg.group_size, params)
    terminal = (r.engine.specials.assistant_end, r.engine.specials.bos)
    for conv, g in zip(convs, groups):
        g.rewards = [float(r.train_task.reward(conv, completion_text(tok, s, terminal))) for s in g.seqs]
    return groups, time.perf_counter() - t0


def build_batch(groups: list[Group], cfg: RLConfig, rt: Runtime):
    """Advantages per group; the completions of groups with reward variance as micro-batches. Returns (micro,
    advantages (groups, G), keep (groups,), sampled tokens and sequences in the whole step (all ranks), rows)."""
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32).view(len(groups), cfg.group_size)
    adv, keep = grpo.group_advantages(rewards, scale=not cfg.no_std)
    rows = [(g.prompt + s, [0] * len(g.prompt) + m, a) for g, k, ad in zip(groups, keep.tolist(), adv.tolist())
            if k for s, m, a in zip(g.seqs, g.masks, ad)]
    micro = micro_batches(rows, cfg.device_batch_size, rt.device)
    n_tokens, n_seqs = all_sum([float(sum(float(mb["mask"].sum()) for mb in micro)), float(len(rows))], rt)
    return micro, adv, keep, n_tokens, n_seqs, rows


def update(model, opt, ref, micro: list[dict], cfg: RLConfig, rt: Runtime, n_tokens: float,
           n_seqs: float) -> tuple[float, float, float, float]:
    """--updates-per-batch optimizer steps on one batch of rollouts (none when no rank has a sampled token to learn
    from). The old log-probs are taken once before the first update (with one update the ratio is exactly 1, so the
    current ones, detached, are the same numbers) and the reference's once. Returns sums over the updates of this
    rank: (loss, sampled tokens, clipped tokens, k3 KL)."""
    model.train()
    with torch.no_grad():
        for mb in micro:
            if cfg.updates_per_batch > 1:
                mb["old"] = token_logprobs(model, mb["x"], mb["y"], rt)
            if ref is not None:
                mb["ref"] = token_logprobs(ref, mb["x"], mb["y"], rt)
    loss_sum, tokens, clipped, kl_sum = 0.0, 0.0, 0.0, 0.0
    for _ in range(cfg.updates_per_batch if n_tokens > 0 else 0):
        for mb in micro:
            logp = token_logprobs(model, mb["x"], mb["y"], rt)
            loss, st = grpo.policy_loss(logp, mb.get("old", logp.detach()), mb["adv"], mb["mask"],
                                        clip_low=cfg.clip_eps, clip_high=cfg.clip_eps_high or cfg.clip_eps,
                                        ref_logp=mb.get("ref"), kl_coef=cfg.kl_coef, norm=cfg.loss_norm,
                                        total_tokens=n_tokens, total_seqs=n_seqs)
            (loss * rt.world_size).backward()  # the optimizer averages over ranks; this loss is already global
            loss_sum, tokens = loss_sum + float(loss.detach()), tokens + st.tokens
            clipped, kl_sum = clipped + st.clipped, kl_sum + st.kl
        opt.step()
        model.zero_grad(set_to_none=True)
    return loss_sum, tokens, clipped, kl_sum


def step_metrics(groups: list[Group], adv: torch.Tensor, keep: torch.Tensor, rows: list, upd: tuple, cfg: RLConfig,
                 rt: Runtime, gen_s: float, train_s: float) -> dict:
    """The step's JSONL figures over every rank: rewards, advantages of the kept groups, skipped share, KL, clip
    share, throughput and the share of the step spent generating."""
    rewards = torch.tensor([x for g in groups for x in g.rewards], dtype=torch.float64)
    kept = adv[keep].flatten().double()
    loss, tokens, clipped, kl = upd
    gen_tokens = sum(len(s) for g in groups for s in g.seqs)
    train_tokens = sum(len(ids) - 1 for ids, _, _ in rows) * cfg.updates_per_batch
    (r_sum, r_sq, n_r, a_sum, a_sq, n_a, skipped, n_groups, loss, tokens, clipped, kl, gen_tokens, train_tokens,
     gen_s, train_s) = all_sum([float(rewards.sum()), float((rewards ** 2).sum()), rewards.numel(), float(kept.sum()),
                                float((kept ** 2).sum()), kept.numel(), float((~keep).sum()), keep.numel(), loss,
                                tokens, clipped, kl, gen_tokens, train_tokens, gen_s, train_s], rt)

    def mean(total: float, n: float) -> float:
        return total / n if n else 0.0

    def std(total: float, sq: float, n: float) -> float:
        return max(mean(sq, n) - mean(total, n) ** 2, 0.0) ** 0.5

    # the ranks generate and train at the same time: throughput is all ranks' tokens over one rank's mean time
    per_rank = rt.world_size
    return {"loss": mean(loss, cfg.updates_per_batch), "reward_mean": mean(r_sum, n_r),
            "reward_std": std(r_sum, r_sq, n_r), "adv_mean": mean(a_sum, n_a), "adv_std": std(a_sum, a_sq, n_a),
            "skipped_groups_frac": mean(skipped, n_groups), "kl": mean(kl, tokens) if cfg.kl_coef > 0 else None,
            "clip_frac": mean(clipped, tokens), "completion_len": mean(gen_tokens, n_r),
            "rollout_tok_per_s": mean(gen_tokens, gen_s / per_rank),
            "train_tok_per_s": mean(train_tokens, train_s / per_rank), "gen_frac": mean(gen_s, gen_s + train_s)}


def train_rl(r: RLRun, rt: Runtime) -> dict:
    cfg, model, opt, engine, tok = r.cfg, r.model, r.optimizer, r.engine, r.engine.tok
    ckpt_dir = run_dir("rl", r.run)
    logger = MetricsLogger(cfg.metrics or metrics_path("rl", r.run), enabled=rt.is_master)
    tags = {"stage": "rl", "run": r.run}
    rows_max = cfg.group_size * -(-cfg.prompts_per_step // rt.world_size)  # this rank's rollout rows
    budget_s = cfg.max_minutes * 60
    step, last_eval, last_saved, saved_finished = r.start_step, {}, None, False
    t_start = time.perf_counter() - r.elapsed_s

    def save(step: int, finished: bool = False) -> None:
        nonlocal last_saved, saved_finished
        # finished: the schedule (not --stop-at) ended the run, so `picochat speedrun` skips the stage
        meta = build_meta(model.config, cfg, tok.hash(), step, rt.world_size, stage="rl",
                          elapsed_s=time.perf_counter() - t_start, parent=r.parent, finished=finished)
        d = save_checkpoint(ckpt_dir, step, model_state_for_save(model, rt.is_master), opt.state_dict(), meta, None,
                            rank=rt.rank, keep_last=cfg.keep_last)
        last_saved, saved_finished = step, finished
        print0(f"saved {d}")

    while True:
        prog = max(step / r.num_steps, (time.perf_counter() - t_start) / budget_s if budget_s > 0 else 0.0)
        if rt.ddp:  # the ranks' clocks differ slightly: they must agree on when to stop
            t = torch.tensor(prog, dtype=torch.float64, device=rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            prog = float(t)
        done = prog >= 1.0 or (cfg.stop_at > 0 and step >= cfg.stop_at)
        if done or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            last_eval = {"step": step, **evaluate(engine, r.eval_task, cfg, rt, rows_max)}
            logger.log({"kind": "eval", **tags, **last_eval})
            print0(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in last_eval.items()))
        if done:
            break

        t0 = time.perf_counter()
        groups, gen_s = rollout(r, step, rt)
        micro, adv, keep, n_tokens, n_seqs, rows = build_batch(groups, cfg, rt)
        lrf = set_rates(opt, step, prog, cfg)
        upd = update(model, opt, r.ref, micro, cfg, rt, n_tokens, n_seqs)
        dt = time.perf_counter() - t0
        step += 1

        rec = {"kind": "train", **tags, "step": step, "lr_factor": lrf,
               **step_metrics(groups, adv, keep, rows, upd, cfg, rt, gen_s, dt - gen_s),
               "dt_ms": dt * 1000, "elapsed_s": time.perf_counter() - t_start}
        logger.log(rec)
        print0(f"step {step}/{r.num_steps} | reward {rec['reward_mean']:.3f} | skipped {rec['skipped_groups_frac']:.2f}"
               f" | loss {rec['loss']:+.4f} | clip {rec['clip_frac']:.3f} | gen {rec['gen_frac']:.0%} | {dt:.1f}s")
        if cfg.save_every > 0 and step % cfg.save_every == 0:
            save(step)

    finished = step >= r.num_steps or (budget_s > 0 and time.perf_counter() - t_start >= budget_s)
    if (last_saved != step or (finished and not saved_finished)) and \
            not (step == r.start_step and list_steps(ckpt_dir) and not finished):
        save(step, finished)
    summary = {**tags, "steps": step, **{k: v for k, v in last_eval.items() if k != "step"},
               "elapsed_s": time.perf_counter() - t_start, "checkpoint": str(ckpt_dir)}
    logger.log({"kind": "summary", **summary})
    logger.close()
    print0(json.dumps(summary))
    return summary


def run(argv=None, tasks: tuple[Task, Task] | None = None) -> dict:
    """`picochat rl` with argv; `tasks` = (train, held-out) Task objects of your own instead of --task."""
    cfg, explicit, _ = parse_config(RLConfig, argv, prog="picochat rl", description=__doc__.split("\n")[0])
    with runtime(cfg.device, cfg.dtype, cfg.seed, deterministic=cfg.deterministic) as rt:
        return train_rl(setup(cfg, explicit, rt, tasks), rt)


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
