"""`picochat speedrun`: the whole pipeline in one resumable command.

    picochat speedrun --preset cpu            # the README's CPU demo: ends in a chat model and a report card
    picochat speedrun --preset d20 --nproc 8  # the GPU tier: training stages under torchrun
    picochat speedrun --preset cpu --dry-run  # the stage commands, and which are already done

data -> tok-train -> pretrain -> eval base -> midtrain -> sft -> eval chat -> [rl -> eval chat] -> report. Each
stage is the `picochat` command a user would type, run as a child process (so a stage's memory, threads and compile
state end with it, and a GPU stage can run under torchrun). Re-running after an interruption (Ctrl-C, a kill, a
crash) skips what is done and resumes what is not:
  - data and tokenizer: done when the corpus manifest / tokenizer file exists;
  - a training stage: done when its run has a checkpoint whose meta says `finished` (the loop writes that when the
    schedule, not --stop-at, ended the run); a run with checkpoints but not finished is continued with --resume;
  - an evaluation: done when its result file for that checkpoint's step exists;
  - the report is rebuilt every time (it only reads files).
The child processes die with this one (PR_SET_PDEATHSIG on Linux), so a killed speedrun leaves no stage running.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from picochat.common import UserError, get_base_dir, run_main
from picochat.config import f, parse_config

TRAIN_STAGES = ("pretrain", "midtrain", "sft", "rl")
CKPT_STAGE = {"pretrain": "base", "midtrain": "mid", "sft": "sft", "rl": "rl"}

# Per preset: the extra flags of each stage's command. "tiny" is the test suite's (seconds per stage).
PRESETS: dict[str, dict[str, list[str]]] = {
    "cpu": {
        "data": ["prepare"], "tok-train": [],
        "pretrain": ["--preset", "cpu"], "midtrain": ["--preset", "cpu"], "sft": ["--preset", "cpu"],
        "rl": ["--preset", "cpu"],
        "eval-base": ["--tasks", "core,hellaswag,bpb", "--max-per-task", "100"],
        "eval-chat": ["--max-problems", "50"],
    },
    "d12": {
        "data": ["download", "--num-shards", "60"], "tok-train": [],
        "pretrain": ["--preset", "d12"], "midtrain": [], "sft": [], "rl": [],
        "eval-base": [], "eval-chat": [],
    },
    "d20": {
        "data": ["download", "--num-shards", "240"], "tok-train": ["--vocab-size", "65536"],
        "pretrain": ["--preset", "d20"], "midtrain": [], "sft": [], "rl": [],
        "eval-base": [], "eval-chat": [],
    },
    "d26": {
        "data": ["download", "--num-shards", "450"], "tok-train": ["--vocab-size", "65536"],
        "pretrain": ["--preset", "d26"], "midtrain": [], "sft": [], "rl": [],
        "eval-base": [], "eval-chat": [],
    },
    "tiny": {
        "data": ["prepare"], "tok-train": ["--vocab-size", "300", "--max-chars", "200000"],
        "pretrain": ["--depth", "1", "--n-embd", "32", "--head-dim", "16", "--max-seq-len", "64", "--num-steps", "4",
                     "--device-batch-size", "2", "--total-batch-size", "128", "--eval-tokens", "256",
                     "--warmup-steps", "1", "--save-every", "2"],
        "midtrain": ["--num-steps", "2", "--device-batch-size", "2", "--total-batch-size", "128", "--scale", "0.01"],
        "sft": ["--num-steps", "2", "--device-batch-size", "2", "--total-batch-size", "128", "--scale", "0.01"],
        "rl": ["--num-steps", "1"],
        "eval-base": ["--tasks", "bpb"], "eval-chat": ["--tasks", "spellingbee", "--max-problems", "2"],
    },
}
SAMPLE_QUESTIONS = ["Hi! Who are you?", "How many r are in strawberry?", "What is 12 times 7?"]


@dataclass
class SpeedrunConfig:
    preset: str = f("cpu", "pipeline size: cpu (the 2-core demo), d12, d20, d26 (GPU tiers)", choices=sorted(PRESETS))
    run: str = f("", "run name used by every stage (default: the preset's name)")
    nproc: int = f(0, "processes for the training and evaluation stages (torchrun); 0 = one per GPU, 1 without")
    rl: bool = f(False, "also run the RL stage (GRPO) after SFT, and evaluate its model")
    dry_run: bool = f(False, "print each stage's command and whether it is done; run nothing")


@dataclass
class Stage:
    name: str
    argv: list[str]  # a picochat command line
    done: Callable[[], bool]
    distributed: bool = False  # under torchrun when nproc > 1
    checkpoint: str = ""  # for a training stage: its checkpoint stage (base/mid/sft/rl), which decides --resume


def finished_step(stage: str, run: str) -> int | None:
    """The step of the run's finished checkpoint, or None (no checkpoint, or the run stopped before its end)."""
    from picochat.checkpoint import list_steps, run_dir

    d = run_dir(stage, run)
    steps = list_steps(d)
    if not steps:
        return None
    meta = json.loads((d / f"step_{steps[-1]:06d}" / "meta.json").read_text())
    return steps[-1] if meta.get("finished") else None


def eval_done(stage: str, run: str, suite: str) -> bool:
    step = finished_step(stage, run)
    return step is not None and (get_base_dir() / "eval" / stage / run / f"step_{step}" / f"{suite}.json").is_file()


def plan(cfg: SpeedrunConfig) -> list[Stage]:
    from picochat.data.corpus import corpus_dir, MANIFEST

    p, run = PRESETS[cfg.preset], cfg.run or cfg.preset
    base = get_base_dir()

    def train(cmd: str, parent: str | None) -> Stage:
        argv = [cmd, *p[cmd], "--run", run] + (["--parent-run", run] if parent else [])
        return Stage(cmd, argv, lambda: finished_step(CKPT_STAGE[cmd], run) is not None, True, CKPT_STAGE[cmd])

    def evaluate(kind: str, source: str, suite: str) -> Stage:
        argv = ["eval", kind, "--source", source, "--run", run, *p[f"eval-{kind}"]]
        return Stage(f"eval {kind} ({source})", argv, lambda: eval_done(source, run, suite), True)

    stages = [
        Stage("data", ["data", *p["data"]], lambda: (corpus_dir("default") / MANIFEST).is_file()),
        Stage("tok-train", ["tok-train", *p["tok-train"]], lambda: (base / "tokenizer").is_dir()),
        train("pretrain", None), evaluate("base", "base", "bpb"),
        train("midtrain", "base"), train("sft", "mid"), evaluate("chat", "sft", "chat"),
    ]
    if cfg.rl:
        stages += [train("rl", "sft"), evaluate("chat", "rl", "chat")]
    return stages + [Stage("report", ["report"], lambda: False)]


def command(stage: Stage, nproc: int) -> list[str]:
    """The child's argv: `python -m picochat ...`, or torchrun for a distributed stage with nproc > 1; a training
    stage whose run has checkpoints (an interrupted run) continues with --resume."""
    argv = list(stage.argv)
    if stage.checkpoint:
        from picochat.checkpoint import list_steps, run_dir

        run = argv[argv.index("--run") + 1]
        if list_steps(run_dir(stage.checkpoint, run)):
            argv.append("--resume")
    if stage.distributed and nproc > 1:
        from picochat.__main__ import COMMANDS

        module = COMMANDS[argv[0]][0]
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", module, *argv[1:]]
    return [sys.executable, "-m", "picochat", *argv]


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL it when the speedrun dies (Linux prctl PR_SET_PDEATHSIG = 1)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def run_stage(argv: list[str]) -> int:
    child = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the child too (same process group); give it time to save and exit
        try:
            child.send_signal(signal.SIGINT)
            return child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()


def _run(argv: list[str] | None) -> None:
    cfg, _, _ = parse_config(SpeedrunConfig, argv, prog="picochat speedrun", description=__doc__.splitlines()[0])
    nproc = cfg.nproc or _gpus() or 1
    stages = plan(cfg)
    t0 = time.perf_counter()
    for st in stages:
        done = st.done()
        cmd = command(st, nproc)
        shown = "picochat " + shlex.join(cmd[3:]) if cmd[1:3] == ["-m", "picochat"] else shlex.join(cmd)
        if cfg.dry_run:
            print(f"{'done ' if done else 'to do'}  {st.name:20s} {shown}")
            continue
        if done:
            print(f"== {st.name}: done, skipped", flush=True)
            continue
        print(f"== {st.name}: {shown}", flush=True)
        ts = time.perf_counter()
        rc = run_stage(cmd)
        if rc != 0:
            raise UserError(f"stage {st.name} failed (exit {rc}); fix what it printed and run the same speedrun "
                            f"command again: finished stages are skipped, this one resumes")
        print(f"== {st.name}: {time.perf_counter() - ts:.0f} s", flush=True)
    if cfg.dry_run:
        return
    final = "rl" if cfg.rl else "sft"
    run = cfg.run or cfg.preset
    print(f"\nspeedrun done in {time.perf_counter() - t0:.0f} s; report: {get_base_dir() / 'report' / 'report.md'}")
    for q in SAMPLE_QUESTIONS:
        subprocess.run([sys.executable, "-m", "picochat", "chat", "--source", final, "--run", run, "--temperature",
                        "0", "--max-tokens", "64", "-p", q], check=False)
    print(f"chat with it:  picochat chat --source {final} --run {run}\nserve it:      picochat serve --source {final} "
          f"--run {run}")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
