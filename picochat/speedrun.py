"""`picochat speedrun`: the whole pipeline in one resumable command.

    picochat speedrun --preset cpu            # the README's CPU demo: ends in a chat model and a report card
    picochat speedrun --preset d20 --nproc 8  # the GPU tier: training and evaluation stages under torchrun
    picochat speedrun --preset cpu --dry-run  # the stage commands, and which are already done
    picochat speedrun --corpus-source DIR     # your own .txt/.jsonl/.parquet folder instead of the preset's corpus

report reset -> data -> tok-train -> pretrain -> eval base -> midtrain -> sft -> eval chat -> [rl -> eval chat] ->
report. Each stage is the `picochat` command a user would type, run as a child process (so a stage's memory, threads
and compile state end with it, and a GPU stage can run under torchrun). Re-running after an interruption (Ctrl-C, a
kill, a crash) skips what is done and resumes what is not:
  - data and tokenizer: done when the corpus manifest / a tokenizer of the preset's vocabulary size exists;
  - a training stage: done when its run's newest checkpoint is `finished` (the loop records that when its schedule,
    not --stop-at or an interruption, ended the run); a run with checkpoints but not finished continues with --resume;
  - an evaluation: done when its result files for that checkpoint's step exist;
  - `report reset` runs only when no training stage of the run has a checkpoint yet (a reset restarts the card's wall
    clock), and the report is rebuilt at every end (it only reads files).
The child processes die with this one (PR_SET_PDEATHSIG on Linux), so a killed speedrun leaves no stage running.
"""

from __future__ import annotations

import json
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

CKPT_STAGE = {"pretrain": "base", "midtrain": "mid", "sft": "sft", "rl": "rl"}


@dataclass(frozen=True)
class Preset:
    """One pipeline size: the extra flags of each stage's command (data: `picochat data ...`'s arguments)."""

    data: list[str]
    corpus: str  # the corpus `data` builds; tok-train and pretrain read it
    vocab_size: int  # tok-train's --vocab-size
    pretrain: list[str]
    midtrain: list[str]
    sft: list[str]
    rl: list[str]
    eval_base: list[str]  # --tasks names the suites, whose result files say the stage is done
    eval_chat: list[str]


def _gpu_tier(pretrain: str, shards: int, vocab: int) -> Preset:
    # the chat stages and RL read their hub datasets (SmolTalk, MMLU auxiliary_train, GSM8K train): a GPU tier
    # downloads FineWeb-Edu anyway, so it has the network; the offline packages are the CPU demo's stand-ins
    return Preset(data=["download", "--num-shards", str(shards)], corpus="fineweb-edu", vocab_size=vocab,
                  pretrain=["--preset", pretrain], midtrain=["--source", "hub"], sft=["--source", "hub"],
                  rl=["--task", "gsm8k"], eval_base=["--tasks", "core,hellaswag,bpb,copy"], eval_chat=[])


DEMO_SOURCES = ("austen", "chitchat", "chatterbot", "topical-chat")


def demo_sources() -> str:
    """The demo corpus's sources that this machine has (topical-chat downloads its sdist when named), with a note
    for each other one: without Debian's janeaustenr (macOS, no root) the demo still runs, on the chat text alone."""
    from picochat.data.prepare import SOURCES

    names = []
    for name in DEMO_SOURCES:
        why = None if name == "topical-chat" else SOURCES[name].missing()
        if why:
            print(f"note: the demo corpus goes without {name}: {why}", file=sys.stderr)
        else:
            names.append(name)
    return ",".join(names)
# shard counts and vocabularies as nanochat's speedrun tiers (d20: 240 shards, d26: 450, a 65,536-token vocabulary)
PRESETS: dict[str, Preset] = {
    # the CPU demo pretrains on modern English that talks: Austen's novels and the chat sources' train rows as A:/B:
    # dialogues (not Shakespeare + KJV, which made the chat model speak King James; README: Speedrun)
    "cpu": Preset(data=["prepare", "--sources", "@demo", "--name", "demo"], corpus="demo", vocab_size=8192,
                  pretrain=["--preset", "cpu"], midtrain=["--preset", "cpu"], sft=["--preset", "cpu"],
                  rl=["--task", "spellingbee", "--num-steps", "30", "--max-minutes", "4", "--eval-size", "32"],
                  eval_base=["--tasks", "core,hellaswag,bpb,copy", "--max-per-task", "100"],
                  eval_chat=["--max-problems", "50"]),
    "d12": _gpu_tier("d12", 60, 8192),
    "d20": _gpu_tier("d20", 240, 65536),
    "d26": _gpu_tier("d26", 450, 65536),
    # the test suite's: seconds per stage on 2 cores (a depth-1 model, a few steps, a checkpoint every step)
    "tiny": Preset(data=["prepare"], corpus="default", vocab_size=300,
                   pretrain=["--depth", "1", "--n-embd", "32", "--head-dim", "16", "--max-seq-len", "64",
                             "--num-steps", "4", "--device-batch-size", "2", "--total-batch-size", "128",
                             "--eval-tokens", "256", "--eval-every", "0", "--warmup-steps", "1", "--save-every", "2",
                             "--sample-every", "-1"],
                   midtrain=["--tasks", "identity:40,spellingbee:20", "--num-steps", "10", "--val-conversations",
                             "4", "--mc-eval", "", "--eval-every", "0", "--sample-every", "-1", "--save-every", "1"],
                   sft=["--tasks", "identity:40,spellingbee:20", "--num-steps", "10", "--val-conversations", "4",
                        "--mc-eval", "", "--eval-every", "0", "--sample-every", "-1", "--save-every", "1"],
                   rl=["--task", "spellingbee", "--num-steps", "2", "--prompts-per-step", "2",
                       "--group-size", "2", "--max-new-tokens", "8", "--eval-size", "2", "--eval-samples", "1",
                       "--eval-every", "0", "--device-batch-size", "2"],
                   eval_base=["--tasks", "bpb"], eval_chat=["--tasks", "spellingbee", "--max-problems", "2",
                                                           "--max-tokens", "16"]),
}
SAMPLE_QUESTIONS = ["Hi! Who are you?", "How many r are in strawberry?", "What is 12 times 7?",
                    "What should I cook for dinner tonight?", "Do you like music?"]


@dataclass
class SpeedrunConfig:
    # --preset (parse_config's own flag): cpu (the 2-core demo, the default), d12, d20, d26 (GPU tiers), tiny (tests)
    run: str = f("", "run name used by every stage (default: the preset's name)")
    nproc: int = f(0, "processes for the training and evaluation stages (torchrun); 0 = one per GPU, 1 without")
    rl: bool = f(False, "also run the RL stage (GRPO) after SFT, and evaluate its model")
    corpus_source: str = f("", "a folder of your own .txt/.jsonl/.parquet files to pretrain on instead of the "
                               "preset's corpus (the corpus is named after the folder)")
    dry_run: bool = f(False, "print each stage's command and whether it is done; run nothing")


@dataclass
class Stage:
    name: str
    argv: list[str]  # a picochat command line
    done: Callable[[], bool]
    distributed: bool = False  # under torchrun when nproc > 1
    checkpoint: str = ""  # for a training stage: its checkpoint stage (base/mid/sft/rl), which decides --resume
    in_process: bool = False  # the report only reads files: no child (a child's start-up costs ~3 CPU-seconds)


def _summary_step(stage: str, run: str, meta: dict) -> int | None:
    """The step of the last summary record the run's metrics log holds (the loop writes one when it ends)."""
    from picochat.train.loop import metrics_path

    path = Path((meta.get("run_config") or {}).get("metrics") or metrics_path(stage, run))
    if not path.is_file():
        return None
    with open(path, "rb") as fh:  # the tail only: a long run logs a line per step
        fh.seek(max(0, path.stat().st_size - 65536))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the seek, or by a kill mid-write
        if rec.get("kind") == "summary" and rec.get("run", run) == run:
            return rec.get("steps")
    return None


def finished_step(stage: str, run: str) -> int | None:
    """The step of the run's finished checkpoint, or None (no checkpoint, or the run stopped before its end).
    Finished: the newest checkpoint's meta says `finished`; where meta has no such key (a stage that does not record
    it yet), the run's metrics log ending in a summary at that step (written only when the loop ends by itself or
    by --stop-at, which the speedrun never passes)."""
    from picochat.checkpoint import list_steps, run_dir

    d = run_dir(stage, run)
    steps = list_steps(d)
    if not steps:
        return None
    meta = json.loads((d / f"step_{steps[-1]:06d}" / "meta.json").read_text())
    if "finished" in meta:
        return steps[-1] if meta["finished"] else None
    return steps[-1] if _summary_step(stage, run, meta) == steps[-1] else None


def eval_done(stage: str, run: str, suites: list[str]) -> bool:
    """Every suite's result file exists for the run's finished step (step_<N>, or zero-padded step_<NNNNNN>)."""
    step = finished_step(stage, run)
    if step is None:
        return False
    root = get_base_dir() / "eval" / stage / run
    return any(all((root / folder / f"{s}.json").is_file() for s in suites)
               for folder in (f"step_{step}", f"step_{step:06d}"))


def tokenizer_done(vocab_size: int) -> bool:
    """A tokenizer exists; one of another vocabulary size belongs to another pipeline and is not replaced."""
    path = get_base_dir() / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        return False
    from picochat.tokenizer import get_tokenizer

    have = get_tokenizer().vocab_size
    if have != vocab_size:
        raise UserError(f"the tokenizer at {path} has {have:,} tokens, this preset trains {vocab_size:,}: run the "
                        f"speedrun in another PICOCHAT_BASE_DIR, or delete {path} (models trained with it then no "
                        f"longer load)")
    return True


def _suites(argv: list[str]) -> list[str]:
    return argv[argv.index("--tasks") + 1].split(",") if "--tasks" in argv else ["chat"]


def plan(preset: str, cfg: SpeedrunConfig) -> list[Stage]:
    from picochat.data.corpus import MANIFEST, corpus_dir

    p, run = PRESETS[preset], cfg.run or preset
    data, corpus = p.data, p.corpus
    if cfg.corpus_source:
        source = Path(cfg.corpus_source).expanduser().resolve()
        corpus = source.name
        data = ["prepare", "--source", str(source), "--name", corpus]
    data = [demo_sources() if a == "@demo" else a for a in data]
    on_corpus = ["--corpus", corpus] if corpus != "default" else []

    def train(cmd: str, extra: list[str], parent: bool) -> Stage:
        argv = [cmd, *extra, "--run", run] + (["--parent-run", run] if parent else [])
        return Stage(cmd, argv, lambda: finished_step(CKPT_STAGE[cmd], run) is not None, True, CKPT_STAGE[cmd])

    def evaluate(kind: str, source: str, extra: list[str]) -> Stage:
        argv = ["eval", kind, "--source", source, "--run", run, *extra]
        suites = _suites(extra) if kind == "base" else ["chat"]
        return Stage(f"eval {kind} ({source})", argv, lambda: eval_done(source, run, suites), True)

    stages = [
        Stage("data", ["data", *data], lambda: (corpus_dir(corpus) / MANIFEST).is_file()),
        Stage("tok-train", ["tok-train", "--vocab-size", str(p.vocab_size), *on_corpus],
              lambda: tokenizer_done(p.vocab_size)),
        train("pretrain", p.pretrain + on_corpus, False), evaluate("base", "base", p.eval_base),
        train("midtrain", p.midtrain, True), train("sft", p.sft, True), evaluate("chat", "sft", p.eval_chat),
    ]
    if cfg.rl:
        stages += [train("rl", p.rl, True), evaluate("chat", "rl", p.eval_chat)]
    return stages + [Stage("report", ["report", "--run", run], lambda: False, in_process=True)]


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


def shown(cmd: list[str]) -> str:
    """A child's command line as a user would type it."""
    if cmd[1:3] == ["-m", "picochat"]:
        return "picochat " + shlex.join(cmd[3:])
    return "torchrun " + shlex.join(cmd[3:])


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL it when the speedrun dies (Linux prctl PR_SET_PDEATHSIG = 1)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant: torchrun's workers too
    return r.ru_utime + r.ru_stime


def run_in_process(argv: list[str]) -> int:
    import importlib

    from picochat.__main__ import COMMANDS

    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


def run_stage(argv: list[str]) -> int:
    """Run one child to its end. Ctrl-C in a terminal reaches the child too (same process group); a SIGINT sent to
    this process alone is passed on. Either way the child gets 60 s to leave, then this re-raises KeyboardInterrupt."""
    child = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            child.send_signal(signal.SIGINT)
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def print_samples(source: str, run: str) -> None:
    """The final model's replies to a few questions, greedy with a frequency penalty and sampled (`picochat chat`'s
    default temperature and top-k), with the calculator tool on (as `picochat chat`)."""
    from picochat.checkpoint import load_model
    from picochat.engine import Engine, SamplingParams
    from picochat.serve.chat_cli import stream_reply
    from picochat.tools import make_tool

    model, tok, _ = load_model(source, None, "auto", run=run)
    engine = Engine(model, tok, tool=make_tool("calculator"))
    # the penalty: greedy, the CPU demo's model loops ("I do. I do. I do. ..." to "Do you like music?"); at 0.5 it
    # ends its turn ("I do! I like to watch the piano and watch TV shows. I have a lot of favorite movies.")
    for title, params in (("greedy, frequency penalty 0.5",
                           SamplingParams(temperature=0.0, max_tokens=96, seed=0, frequency_penalty=0.5)),
                          ("sampled, temperature 0.6, top-k 50",
                           SamplingParams(temperature=0.6, top_k=50, max_tokens=96, seed=0))):
        print(f"\nsample replies ({title}):")
        for q in SAMPLE_QUESTIONS:
            print(f"  you> {q}\n  picochat> ", end="", flush=True)
            stream_reply(engine, {"messages": [{"role": "user", "content": q}]}, params, sys.stdout, color=False)


def _run(argv: list[str] | None) -> None:
    cfg, _, ns = parse_config(SpeedrunConfig, argv, prog="picochat speedrun",
                              description=__doc__.splitlines()[0] + " --preset: cpu (the default: the 2-core demo), "
                              "d12, d20, d26 (GPU tiers), tiny (the tests').", presets={name: dict for name in PRESETS})
    preset = ns.preset or "cpu"
    if cfg.corpus_source and not Path(cfg.corpus_source).expanduser().is_dir():
        raise UserError(f"--corpus-source {cfg.corpus_source} is not a folder; point it at a folder of .txt, .jsonl "
                        f"or .parquet files")
    nproc = cfg.nproc or _gpus() or 1
    run = cfg.run or preset
    stages = plan(preset, cfg)
    # fresh: no training stage of this run has a checkpoint, so the card's wall clock starts now
    fresh = not any(st.checkpoint and "--resume" in command(st, 1) for st in stages)
    if fresh:
        stages.insert(0, Stage("report reset", ["report", "reset"], lambda: False, in_process=True))
    t0, times = time.perf_counter(), []
    current = ""
    try:
        for st in stages:
            done = st.done()
            cmd = command(st, nproc)
            if cfg.dry_run:
                print(f"{'done ' if done else 'to do'}  {st.name:16s} {shown(cmd)}")
                continue
            if done:
                print(f"== {st.name}: done, skipped", flush=True)
                continue
            print(f"== {st.name}: {shown(cmd)}", flush=True)
            current, ts, cpu = st.name, time.perf_counter(), _children_cpu_s()
            rc = run_in_process(st.argv) if st.in_process else run_stage(cmd)
            if rc != 0:
                raise UserError(f"stage {st.name} failed (exit {rc}); fix what it printed and run the same speedrun "
                                f"command again: finished stages are skipped, this one resumes")
            times.append((st.name, time.perf_counter() - ts))
            print(f"== {st.name}: {times[-1][1]:.0f} s" + ("" if st.in_process else
                                                           f" ({_children_cpu_s() - cpu:.0f} CPU-seconds)"), flush=True)
    except KeyboardInterrupt:
        print(f"\nspeedrun interrupted during {current or 'start-up'}; run the same command again: finished stages "
              f"are skipped and an interrupted training stage resumes from its last checkpoint", file=sys.stderr,
              flush=True)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it
    if cfg.dry_run:
        return
    final = "rl" if cfg.rl else "sft"
    print(f"\nspeedrun done in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{name} {s:.0f} s" for name, s in times))
    print(f"report: {get_base_dir() / 'report' / 'report.md'} (and report.html beside it)")
    print_samples(final, run)
    print(f"\nchat with it:  picochat chat --source {final} --run {run}\n"
          f"serve it:      picochat serve --source {final} --run {run}   (web UI and OpenAI API on port 8000)")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
