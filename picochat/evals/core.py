"""CORE, the in-context-learning metric of DCLM (arXiv 2406.11794) that nanochat reports, over an eval bundle.

A bundle is a folder holding `core.yaml` (`icl_tasks`: label, dataset_uri, num_fewshot, icl_task_type,
continuation_delimiter), `eval_meta_data.csv` (columns "Eval Task" and "Random baseline", in percent) and
`eval_data/<dataset_uri>`, one JSONL per task in one of three row schemas:

    multiple_choice    {"query", "choices": [...], "gold": i}     context + each choice
    schema             {"context_options": [...], "continuation", "gold": i}   each context + the shared continuation
    language_modeling  {"context", "continuation"}                 exact greedy match of the continuation

Multiple choice and schema pick the option with the lowest mean loss over its scored tokens (the tokens after the
options' common token prefix, or before their common suffix); language modelling is correct when the argmax at every
continuation position is the continuation's token. Accuracy is centred on the task's random baseline b (the CSV's
percent / 100): (acc - b) / (1 - b); CORE is the mean of the centred accuracies. The full bundle has 22 tasks
(`picochat.evals.core_data`); the offline conversion has 20 of them and is named CORE-20, never CORE.

Few-shot examples: rows are shuffled once (Random(1337)); the example at shuffled position p draws its k shots with
Random(1234 + p) from the other rows (nanochat's scheme, so a full run samples the same shots). `--max-per-task N`
scores the first N shuffled rows; their shots still come from the whole task.

    from picochat.evals.core import core_eval
    result = core_eval(model, tokenizer, device, max_per_task=100)   # every rank calls it under torchrun
"""

from __future__ import annotations

import csv
import json
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from picochat.common import UserError, is_fsdp, print0

ROW_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
              "language_modeling": ("context", "continuation")}
TASK_TYPES = tuple(ROW_FIELDS)
SHUFFLE_SEED = 1337  # nanochat's base_eval: the task's rows are shuffled once, --max-per-task takes a prefix
FEWSHOT_SEED = 1234  # nanochat's core_eval: Random(1234 + position) draws that example's shots
SHOT_SEPARATOR = "\n\n"
# padded tokens per forward pass. On a CPU 32k took half the CPU time of 8k (4.4 vs 8.9 s, 10 language
# identification examples, depth 4). On a GPU the scored positions' fp32 logits bound it: at most 16k rows x 65,536
# x 4 B = 4 GiB (prompts are mostly context, so typically a tenth of that)
BATCH_TOKENS = {"cuda": 1 << 14, "cpu": 1 << 15}


@dataclass(frozen=True)
class IclTask:
    """One task of a bundle. `baseline` is the random-guess accuracy as a fraction."""

    label: str
    kind: str
    num_fewshot: int
    delimiter: str
    dataset_uri: str
    baseline: float


@dataclass(frozen=True)
class Seq:
    """One sequence to score: token ids (BOS first) whose targets ids[start:end] are scored."""

    ids: list[int]
    start: int
    end: int


def load_bundle(root: str | Path) -> list[IclTask]:
    """The tasks of the bundle at `root`, in core.yaml's order, with their baselines from eval_meta_data.csv."""
    root = Path(root)
    try:
        import yaml
    except ImportError:
        raise UserError("reading a CORE bundle's core.yaml needs PyYAML: pip install pyyaml") from None
    try:
        config = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))
        with open(root / "eval_meta_data.csv", encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"].strip(): float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (OSError, yaml.YAMLError, KeyError, ValueError) as e:
        raise UserError(f"CORE bundle {root}: cannot read core.yaml / eval_meta_data.csv ({type(e).__name__}: {e}); "
                        f"delete the folder to fetch or build it again") from None
    tasks = []
    for t in config.get("icl_tasks", []):
        label, kind = t["label"], t["icl_task_type"]
        if kind not in TASK_TYPES:
            raise UserError(f"CORE bundle {root}: task {label} has icl_task_type {kind!r}; expected one of "
                            f"{', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise UserError(f"CORE bundle {root}: task {label} has no row in eval_meta_data.csv")
        shots = t.get("num_fewshot", [0])
        tasks.append(IclTask(label, kind, int(shots[0] if isinstance(shots, list) else shots),
                             t.get("continuation_delimiter", " "), t["dataset_uri"], baselines[label] / 100))
    return tasks


def load_rows(root: str | Path, task: IclTask) -> list[dict]:
    """The task's rows, each checked for the fields of its type (one error line naming the first bad line)."""
    path = Path(root) / "eval_data" / task.dataset_uri
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"CORE task {task.label}: cannot read {path} ({type(e).__name__}: {e}); delete the bundle "
                        f"folder to fetch or build it again") from None
    for i, row in enumerate(rows):
        missing = [k for k in ROW_FIELDS[task.kind] if k not in row]
        if missing:
            raise UserError(f"CORE task {task.label}: row {i + 1} of {path} has no {', '.join(missing)} (a "
                            f"{task.kind} row holds {', '.join(ROW_FIELDS[task.kind])})")
    if not rows:
        raise UserError(f"CORE task {task.label}: {path} has no rows")
    return rows


def fewshot_indices(n: int, position: int, k: int) -> list[int]:
    """k distinct row positions other than `position`, the same for the same (n, position, k). Equal to
    Random(1234 + position).sample([i for i in range(n) if i != position], k) without building that list: sample()
    picks list positions from the length alone, and list position j holds row j, or j + 1 from `position` on."""
    if k <= 0:
        return []
    picked = random.Random(FEWSHOT_SEED + position).sample(range(n - 1), min(k, n - 1))
    return [j if j < position else j + 1 for j in picked]


def render(task: IclTask, row: dict, shots: list[dict]) -> list[str]:
    """The prompts of one example: one per choice (multiple choice), one per context option (schema), or
    [prompt without the continuation, prompt with it] (language modelling). Shots are joined by a blank line."""
    d = task.delimiter
    if task.kind == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}{SHOT_SEPARATOR}" for s in shots)
        return [f"{head}{row['query']}{d}{c}" for c in row["choices"]]
    if task.kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}{SHOT_SEPARATOR}" for s in shots)
        return [f"{head}{c}{d}{row['continuation']}" for c in row["context_options"]]
    # contexts are trimmed and the prompt without the continuation stripped (some rows end in spaces, which would
    # merge into the continuation's first token and leave no clean token prefix)
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}{SHOT_SEPARATOR}" for s in shots)
    prompt = f"{head}{row['context'].strip()}{d}"
    return [prompt.strip(), prompt + row["continuation"]]


def _common(seqs: list[list[int]], from_end: bool) -> int:
    """Length of the token prefix (or suffix) all of `seqs` share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def spans(kind: str, tokens: list[list[int]]) -> list[Seq]:
    """The scored span of each tokenized prompt (BOS first). At least one target is scored per sequence."""
    if kind == "multiple_choice":  # the choices follow one context: score after the common prefix
        start = _common(tokens, from_end=False)
        return [Seq(t, max(1, min(start, len(t) - 1)), len(t)) for t in tokens]
    if kind == "schema":  # the contexts differ, the continuation is shared: score the common suffix
        suffix = _common(tokens, from_end=True)
        return [Seq(t, max(1, min(len(t) - suffix, len(t) - 1)), len(t)) for t in tokens]
    without, with_ = tokens
    start = len(without) if with_[:len(without)] == without else _common(tokens, from_end=False)
    return [Seq(with_, max(1, min(start, len(with_) - 1)), len(with_))]


def crop(seq: Seq, max_len: int | None) -> Seq:
    """Keep the last max_len tokens (the model's context), as nanochat does for long few-shot prompts."""
    if not max_len or len(seq.ids) <= max_len:
        return seq
    cut = len(seq.ids) - max_len
    return Seq(seq.ids[cut:], max(1, seq.start - cut), seq.end - cut)


@contextmanager
def scored_rows_only(model, b_t: torch.Tensor, p_t: torch.Tensor):
    """While active, a GPT computes logits at the scored positions only: a pre-hook on its lm_head replaces the
    head's input, the final norm's output (B, T, C), by the rows to score (1, N, C), so the head matmul and the fp32
    soft cap run on N rows instead of B*T, and the model returns (1, N, V). On a CPU the full-vocabulary head and
    soft cap over every position took ~60% of a 10-shot task's time (profile of bigbench_language_identification,
    depth 4, vocab 8,192, 256-token prompts). Yields whether the hook is in place (a model without an nn.Linear
    `lm_head` returns all its logits)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear):
        yield False
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][b_t, p_t][None],))  # (B, T, C) -> (1, N, C)
    try:
        yield True
    finally:
        handle.remove()


@torch.no_grad()
def score_sequences(model, seqs: list[Seq], device, pad_id: int, vocab: int, autocast: Callable | None = None,
                    max_tokens: int | None = None) -> list[tuple[float, int, bool]]:
    """(sum of the losses in nats, number of scored targets, every argmax equal to its target) per sequence.

    Sequences are sorted by length and right-padded into batches of at most `max_tokens` padded tokens (causal
    attention: the padding after a sequence cannot change its positions); logits are computed at the scored
    positions only (`scored_rows_only`)."""
    out: list[tuple[float, int, bool]] = [(0.0, 0, True)] * len(seqs)
    max_tokens = max_tokens or BATCH_TOKENS.get(torch.device(device).type, BATCH_TOKENS["cpu"])
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    a = 0
    while a < len(order):
        T = len(seqs[order[a]].ids)
        batch = order[a:a + max(1, max_tokens // T)]
        a += len(batch)
        x = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
        b_idx, p_idx = [], []
        for r, i in enumerate(batch):
            s = seqs[i]
            x[r, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            b_idx += [r] * (s.end - s.start)
            p_idx += list(range(s.start - 1, s.end - 1))  # position t predicts token t + 1
        x = x.to(device)
        b_t, p_t = torch.tensor(b_idx, device=device), torch.tensor(p_idx, device=device)
        with scored_rows_only(model, b_t, p_t) as hooked, autocast() if autocast is not None else nullcontext():
            logits = model(x)  # (1, N, V) hooked, else (B, T, V)
        picked = (logits[0] if hooked else logits[b_t, p_t]).float()  # (N, V): the scored positions
        target = x[b_t, p_t + 1]  # (N,)
        loss = torch.logsumexp(picked, -1) - picked.gather(1, target[:, None])[:, 0]  # (N,) nats
        hit = (picked.argmax(-1) == target).float()
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, b_t, loss.double())
        hits = torch.zeros(len(batch), device=device).index_add_(0, b_t, hit)
        for r, i in enumerate(batch):
            n = seqs[i].end - seqs[i].start
            out[i] = (float(sums[r]), n, bool(hits[r] == n))
    return out


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_records(local: list[dict]) -> list[dict]:
    """Every rank's records, merged and sorted by "index" (all ranks get the list)."""
    rank, world = rank_world()
    if world == 1:
        return sorted(local, key=lambda r: r["index"])
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return sorted((r for p in parts for r in p), key=lambda r: r["index"])


def evaluate_task(model, tokenizer, task: IclTask, rows: list[dict], device, max_per_task: int = -1,
                  autocast: Callable | None = None, chunk: int = 64) -> list[dict]:
    """Per-example records of one task, on every rank (examples dealt round-robin to ranks, then gathered):
    {"index": shuffled position, "row": line in the task file, "correct", and "pred"/"gold"/"mean_loss" per option
    for multiple choice and schema}."""
    order = list(range(len(rows)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    shuffled = [rows[i] for i in order]
    n_rows = len(shuffled)
    n = n_rows if max_per_task is None or max_per_task < 0 else min(max_per_task, n_rows)
    rank, world = rank_world()
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    mine = list(range(rank, n, world))
    records = []
    for a in range(0, len(mine), chunk):  # a chunk's prompts are tokenized in one call and scored together
        group = mine[a:a + chunk]
        prompts = [render(task, shuffled[p], [shuffled[j] for j in fewshot_indices(n_rows, p, task.num_fewshot)])
                   for p in group]
        flat = tokenizer.encode([s for ps in prompts for s in ps], prepend=tokenizer.bos_id)
        seqs, owners, k = [], [], 0
        for p, ps in zip(group, prompts):
            seqs += [crop(s, max_len) for s in spans(task.kind, flat[k:k + len(ps)])]
            owners += [p] * (1 if task.kind == "language_modeling" else len(ps))
            k += len(ps)
        scores = score_sequences(model, seqs, device, tokenizer.bos_id, tokenizer.vocab_size, autocast)
        by_owner: dict[int, list] = {}
        for p, sc in zip(owners, scores):
            by_owner.setdefault(p, []).append(sc)
        for p in group:
            rec = {"index": p, "row": order[p]}
            sc = by_owner[p]
            if task.kind == "language_modeling":
                rec.update(correct=sc[0][2], n_tokens=sc[0][1])
            else:
                means = [s / max(c, 1) for s, c, _ in sc]
                pred, gold = means.index(min(means)), int(shuffled[p]["gold"])
                rec.update(correct=pred == gold, pred=pred, gold=gold, mean_loss=[round(m, 6) for m in means])
            records.append(rec)
    return gather_records(records)


def centered(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so the random baseline b is 0 and a perfect score 1: (acc - b) / (1 - b)."""
    return (accuracy - baseline) / (1.0 - baseline)


def run_bundle(model, tokenizer, device, root: str | Path, *, max_per_task: int = -1, tasks: list[str] | None = None,
               autocast: Callable | None = None, log: Callable[[str], None] = print0) -> tuple[dict, dict[str, list]]:
    """Evaluate the bundle at `root`: ({"metrics": {...}, "tasks": {label: {...}}, ...}, {label: records}).
    The summary metric is "core" when all 22 tasks of the full bundle ran, "core20" for the 20 of the offline
    conversion, else "core_subset" (the mean over the tasks that ran, listed in the result)."""
    from picochat.evals.core_data import CORE_TASKS, OFFLINE_MISSING

    all_tasks = load_bundle(root)
    chosen = all_tasks if not tasks else [t for t in all_tasks if t.label in tasks]
    unknown = sorted(set(tasks or []) - {t.label for t in all_tasks})
    if unknown:
        raise UserError(f"--core-tasks: {', '.join(unknown)} not in the bundle {root}; its tasks: "
                        f"{', '.join(t.label for t in all_tasks)}")
    if is_fsdp(model):  # ranks score different numbers of batches, and every FSDP forward is a collective
        raise UserError("CORE cannot run on an FSDP-sharded model (each rank scores its own examples); evaluate the "
                        "saved checkpoint with `picochat eval base` instead")
    was_training = model.training
    model.eval()
    per_task, records = {}, {}
    try:
        for task in chosen:
            t0, c0 = time.perf_counter(), time.process_time()
            recs = evaluate_task(model, tokenizer, task, load_rows(root, task), device, max_per_task, autocast)
            acc = sum(r["correct"] for r in recs) / max(len(recs), 1)
            per_task[task.label] = {"accuracy": acc, "centered": centered(acc, task.baseline), "n": len(recs),
                                    "baseline": task.baseline, "type": task.kind, "shots": task.num_fewshot,
                                    "elapsed_s": round(time.perf_counter() - t0, 3),
                                    "cpu_s": round(time.process_time() - c0, 3)}
            records[task.label] = recs
            log(f"  {task.label:<34} {task.kind:<17} {task.num_fewshot:>2}-shot  n={len(recs):<5} "
                f"acc {acc:.4f}  centered {per_task[task.label]['centered']:+.4f}  "
                f"{per_task[task.label]['elapsed_s']:6.1f} s  (cpu {per_task[task.label]['cpu_s']:.1f} s)")
    finally:
        model.train(was_training)
    labels = set(per_task)
    name = "core" if labels == set(CORE_TASKS) else "core20" if labels == set(CORE_TASKS) - set(OFFLINE_MISSING) \
        else "core_subset"
    mean = sum(v["centered"] for v in per_task.values()) / max(len(per_task), 1)
    result = {"metrics": {name: mean}, "tasks": per_task, "core_name": {"core": "CORE", "core20": "CORE-20"}.get(
        name, f"CORE subset ({len(per_task)} tasks)"), "missing": sorted(set(CORE_TASKS) - labels),
              "max_per_task": max_per_task, "bundle": str(root)}
    return result, records


def core_eval(model, tokenizer, device, max_per_task: int = 500, tasks: list[str] | None = None,
              bundle: str = "auto", autocast: Callable | None = None) -> dict:
    """CORE for periodic evaluation in training (every rank calls it): the full bundle when it is in the base dir
    (or can be downloaded), else the offline CORE-20. Returns {"metrics": {"core" | "core20" | ...: value},
    "tasks": {label: {"accuracy", "centered", "n", ...}}, "missing": [...], ...}."""
    from picochat.evals.core_data import resolve_bundle

    root = resolve_bundle(bundle)
    result, _ = run_bundle(model, tokenizer, device, root, max_per_task=max_per_task, tasks=tasks, autocast=autocast,
                           log=lambda s: None)
    return result
