"""`picochat speedrun` as users run it: real child processes on the tiny preset (a 300-token vocabulary, a depth-1
model, a few steps per stage), interrupted with SIGINT and SIGKILL and run again; every preset's stage commands
parse with the stages' own flag parsers; the auto micro-batch and the time/cost estimate of train/autobatch.py."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from picochat import speedrun
from picochat.checkpoint import list_steps, run_dir
from test_train import base  # noqa: F401 (a fixture: a private base dir with a tiny corpus and tokenizer)

WORDS = ("the king said unto him and she went to the house of her father where they sat by the fire and spoke of "
         "many things that were good or bad in the land").split()
STEPS = {"base": 4, "mid": 10, "sft": 10, "rl": 2}  # the tiny preset's (asserted below, so a change shows here)
# what finished stages wrote, which a later run must not rewrite (checkpoints/mid: finished in run 2)
KEPT = ("corpus", "tokenizer", "checkpoints/base", "eval/base", "report/header.json", "checkpoints/mid")


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = random.Random(0)
    with open(folder / "docs.jsonl", "w") as fh:
        for _ in range(300):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "."}) + "\n")
    return folder


def _args(src: Path) -> list[str]:
    return ["--preset", "tiny", "--rl", "--corpus-source", str(src)]


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """A failed assertion must not leave a speedrun running (its stages die with it: PR_SET_PDEATHSIG)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(base: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PICOCHAT_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1"}
    # SIGINT back to its default in the child: a test run started in the background (`cmd &` in a script) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the Ctrl-C under test would do nothing
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "speedrun", *args], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _STARTED.append(proc)
    return proc


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "Z" not in state.split()[1]  # a zombie has died; only its exit status waits to be collected


def _freeze_stage(proc: subprocess.Popen, ckpt_dir: Path, timeout: float = 240) -> int:
    """Wait for the stage's first checkpoint, then SIGSTOP the stage's process (the speedrun's one child), so the
    signal under test lands while the stage is mid-run, not after its last step. Returns the child's pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the speedrun ended before the stage under test started"
        if list_steps(ckpt_dir):
            kids = _children(proc.pid)
            assert len(kids) == 1
            os.kill(kids[0], signal.SIGSTOP)
            return kids[0]
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint in {ckpt_dir} after {timeout} s")


def _wait_dead(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"stage process {pid} outlived the speedrun"
        time.sleep(0.05)


def _sigint_pending(pid: int) -> bool:
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return bool((int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & (1 << (signal.SIGINT - 1)))


def _dry_run(out: str) -> list[tuple[str, str, str]]:
    """(state, stage, command) per line of `--dry-run`."""
    return [(line[:5].strip(), line[7:23].strip(), line[24:]) for line in out.splitlines()]


def _mtimes(base: Path, *rel: str) -> dict[str, float]:
    out = {}
    for r in rel:
        for p in sorted((base / r).rglob("*")) if (base / r).is_dir() else [base / r]:
            out[str(p.relative_to(base))] = p.stat().st_mtime_ns
    return out


def test_speedrun_every_stage_survives_sigint_and_sigkill(tmp_path, monkeypatch, capsys):
    """Run 1 is interrupted with SIGINT (sent to the speedrun process alone, which passes it on) while midtraining;
    run 2 skips the four finished stages, resumes midtraining with --resume, and is SIGKILLed while in SFT (its
    child dies with it); run 3 skips everything finished (checkpoint and result files untouched), resumes SFT and
    runs to the end: every stage's checkpoint is finished at its planned step, and the report has the summary."""
    base = tmp_path / "base"
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(base))
    args = _args(_corpus(tmp_path / "tinytext"))

    # run 1: SIGINT during midtraining
    proc = _start(base, args, tmp_path / "run1.log")
    child = _freeze_stage(proc, run_dir("mid", "tiny"))
    os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while not _sigint_pending(child):  # the speedrun has passed the SIGINT on; let the stage see it
        assert time.monotonic() < deadline, "the speedrun did not pass SIGINT to its stage"
        time.sleep(0.01)
    os.kill(child, signal.SIGCONT)
    assert proc.wait(timeout=120) == 130
    _wait_dead(child)
    log1 = (tmp_path / "run1.log").read_text()
    assert log1.index("== report reset:") < log1.index("== data:")  # a fresh run starts a new report card
    assert "speedrun interrupted during midtrain; run the same command again" in log1
    assert speedrun.finished_step("base", "tiny") == STEPS["base"]
    assert list_steps(run_dir("mid", "tiny")) and speedrun.finished_step("mid", "tiny") is None
    kept = _mtimes(base, *KEPT[:-1])

    # --dry-run says what is done and what a run would do next
    capsys.readouterr()
    assert speedrun.main(args + ["--dry-run"]) == 0
    rows = _dry_run(capsys.readouterr().out)
    assert [(state, name) for state, name, _ in rows] == [  # no "report reset": the run has checkpoints, a resume
        ("done", "data"), ("done", "tok-train"), ("done", "pretrain"), ("done", "eval base (base)"),
        ("to do", "midtrain"), ("to do", "sft"), ("to do", "eval chat (sft)"), ("to do", "rl"),
        ("to do", "eval chat (rl)"), ("to do", "report")]
    assert rows[4][2].startswith("picochat midtrain ") and rows[4][2].endswith("--resume")
    assert "--resume" not in rows[5][2]  # sft has no checkpoint yet: a fresh start

    # run 2: finished stages skipped, midtraining resumed; SIGKILL during SFT
    proc = _start(base, args, tmp_path / "run2.log")
    child = _freeze_stage(proc, run_dir("sft", "tiny"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_dead(child)  # PR_SET_PDEATHSIG: the stage dies with the speedrun
    log2 = (tmp_path / "run2.log").read_text()
    for name in ("data", "tok-train", "pretrain", "eval base (base)"):
        assert f"== {name}: done, skipped" in log2
    assert "== report reset" not in log2
    mid_cmd = next(line for line in log2.splitlines() if line.startswith("== midtrain: picochat midtrain"))
    assert mid_cmd.endswith("--resume")
    assert speedrun.finished_step("mid", "tiny") == STEPS["mid"]
    assert speedrun.finished_step("sft", "tiny") is None
    kept |= _mtimes(base, KEPT[-1])

    # run 3: to the end
    proc = _start(base, args, tmp_path / "run3.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    log3 = (tmp_path / "run3.log").read_text()
    for name in ("data", "tok-train", "pretrain", "eval base (base)", "midtrain"):
        assert f"== {name}: done, skipped" in log3
    assert "== report reset" not in log3
    sft_cmd = next(line for line in log3.splitlines() if line.startswith("== sft: picochat sft"))
    assert sft_cmd.endswith("--resume")
    assert _mtimes(base, *KEPT) == kept  # finished stages were not redone (nor their files touched)

    for stage, steps in STEPS.items():  # each stage's checkpoint: its stage, finished at the planned step
        assert speedrun.finished_step(stage, "tiny") == steps, stage
        meta = json.loads((run_dir(stage, "tiny") / f"step_{steps:06d}" / "meta.json").read_text())
        assert meta["stage"] == stage and meta.get("finished", stage == "rl") is True  # rl: see finished_step
    assert meta["parent"]["stage"] == "sft"  # rl started from sft
    sft_steps = [json.loads(line)["step"] for line in (base / "logs" / "sft" / "tiny.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
    assert sft_steps.count(1) == 1 and max(sft_steps) == STEPS["sft"]  # resumed, not restarted from step 1
    for stage, suite in (("base", "bpb"), ("sft", "chat"), ("rl", "chat")):
        assert speedrun.eval_done(stage, "tiny", [suite]), (stage, suite)
    card = (base / "report" / "report.md").read_text()
    summary = card[card.index("## Summary"):]
    assert "| metric | base | mid | sft | rl |" in summary
    bpb = float(next(line for line in summary.splitlines() if line.startswith("| bpb |")).split("|")[2])
    assert bpb == pytest.approx(json.loads((base / "eval/base/tiny" / f"step_{STEPS['base']}" / "bpb.json")
                                           .read_text())["metrics"]["bpb"], abs=1e-4)
    assert f"report: {base / 'report' / 'report.md'}" in log3
    assert log3.count("  picochat> ") == 2 * len(speedrun.SAMPLE_QUESTIONS)  # greedy, then sampled
    assert "sample replies (greedy, frequency penalty 0.5):" in log3
    assert "sample replies (sampled, temperature 0.6, top-k 50):" in log3
    assert "chat with it:  picochat chat --source rl --run tiny" in log3
    assert "serve it:      picochat serve --source rl --run tiny" in log3


def test_every_preset_stage_command_parses():
    """Each stage command of every preset (cpu, d12, d20, d26, tiny) is accepted by that stage's own parser, with
    the values the speedrun means (a typo in a flag or a preset name fails here, not hours into a GPU run)."""
    from picochat.config import MIDTRAIN_PRESETS, PRETRAIN_PRESETS, SFT_PRESETS, MidtrainConfig, PretrainConfig, \
        SFTConfig, parse_config
    from picochat.data.prepare import DownloadConfig, PrepareConfig
    from picochat.evals.chat import ChatEvalConfig
    from picochat.evals.run import EvalBaseConfig
    from picochat.report import ReportConfig
    from picochat.tok_train import TokTrainConfig
    from picochat.train.rl import RLConfig

    parsers = {"tok-train": (TokTrainConfig, None), "pretrain": (PretrainConfig, PRETRAIN_PRESETS),
               "midtrain": (MidtrainConfig, MIDTRAIN_PRESETS), "sft": (SFTConfig, SFT_PRESETS), "rl": (RLConfig, None),
               "eval base": (EvalBaseConfig, None), "eval chat": (ChatEvalConfig, None), "report": (ReportConfig, None),
               "data prepare": (PrepareConfig, None), "data download": (DownloadConfig, None)}
    for preset in speedrun.PRESETS:
        cfg = speedrun.SpeedrunConfig(rl=True)
        stages = speedrun.plan(preset, cfg)
        assert [s.name for s in stages] == ["data", "tok-train", "pretrain", "eval base (base)", "midtrain", "sft",
                                            "eval chat (sft)", "rl", "eval chat (rl)", "report"]
        for st in stages:
            argv = st.argv
            key = " ".join(argv[:2]) if argv[0] in ("data", "eval") else argv[0]
            cls, presets = parsers[key]
            rest = argv[2:] if argv[0] in ("data", "eval") else argv[1:]
            parsed, _, _ = parse_config(cls, rest, prog=key, presets=presets)  # argparse exits on a bad flag
            if hasattr(parsed, "run"):
                assert parsed.run == preset, (preset, st.name)
            if st.checkpoint and st.name != "pretrain":
                assert parsed.parent_run == preset, (preset, st.name)
        tok = parse_config(TokTrainConfig, stages[1].argv[1:], prog="tok-train")[0]
        pre = parse_config(PretrainConfig, stages[2].argv[1:], prog="pretrain", presets=PRETRAIN_PRESETS)[0]
        assert tok.vocab_size == speedrun.PRESETS[preset].vocab_size
        assert tok.corpus == pre.corpus == speedrun.PRESETS[preset].corpus


def test_dry_run_of_a_fresh_base_dir_lists_every_stage_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    assert speedrun.main(["--preset", "d20", "--nproc", "8", "--dry-run"]) == 0
    rows = _dry_run(capsys.readouterr().out)
    assert [name for _, name, _ in rows] == ["report reset", "data", "tok-train", "pretrain", "eval base (base)",
                                             "midtrain", "sft", "eval chat (sft)", "report"]
    assert {state for state, _, _ in rows} == {"to do"}
    cmds = dict((name, cmd) for _, name, cmd in rows)
    assert cmds["data"] == "picochat data download --num-shards 240"
    assert cmds["tok-train"] == "picochat tok-train --vocab-size 65536 --corpus fineweb-edu"
    assert cmds["pretrain"] == ("torchrun --nproc_per_node=8 -m picochat.train.pretrain --preset d20 --corpus "
                                "fineweb-edu --run d20")
    assert cmds["eval chat (sft)"] == "torchrun --nproc_per_node=8 -m picochat.evals.run chat --source sft --run d20"
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "report").exists()  # a dry run writes nothing


def test_cpu_preset_pretrains_on_the_modern_demo_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    assert speedrun.main(["--preset", "cpu", "--dry-run"]) == 0
    cmds = {name: cmd for _, name, cmd in _dry_run(capsys.readouterr().out)}
    assert cmds["data"] == "picochat data prepare --sources austen,chitchat,chatterbot,topical-chat --name demo"
    assert "shakespeare" not in cmds["data"] and "kjv" not in cmds["data"]
    assert cmds["tok-train"] == "picochat tok-train --vocab-size 8192 --corpus demo"
    assert cmds["pretrain"] == "picochat pretrain --preset cpu --corpus demo --run cpu"
    # a machine without Debian's janeaustenr (macOS, no root) runs the demo on the chat text, and says so
    from picochat.data import prepare

    monkeypatch.setitem(prepare.SOURCES, "austen", prepare.Source(list, lambda: "not installed (`apt-get x`)"))
    assert speedrun.main(["--preset", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr()
    cmds = {name: cmd for _, name, cmd in _dry_run(out.out)}
    assert cmds["data"] == "picochat data prepare --sources chitchat,chatterbot,topical-chat --name demo"
    assert "the demo corpus goes without austen: not installed (`apt-get x`)" in out.err


def test_bad_corpus_source_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    assert speedrun.main(["--preset", "tiny", "--corpus-source", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"picochat: error: --corpus-source {tmp_path / 'nope'} is not a folder; point it at a folder of "
                   f".txt, .jsonl or .parquet files"]


# -- the loop's `finished` flag (what the speedrun's skip decision reads) -------------------------------------------


def test_checkpoint_meta_says_finished_only_when_the_schedule_ended(base, tmp_path, capsys):
    """--stop-at 2 of 4 steps leaves an unfinished checkpoint; --resume to the end marks step 4 finished, and step 4
    (a --save-every multiple) is still written once."""
    from test_train import pretrain

    def meta(step: int) -> dict:
        return json.loads((run_dir("base", "fin") / f"step_{step:06d}" / "meta.json").read_text())

    flags = ["--run", "fin", "--num-steps", "4", "--save-every", "2", "--eval-every", "0", "--sample-every", "-1"]
    pretrain(flags + ["--stop-at", "2"], tmp_path / "a.jsonl")
    assert meta(2)["finished"] is False
    capsys.readouterr()
    pretrain(flags + ["--resume"], tmp_path / "b.jsonl")
    assert meta(4)["finished"] is True
    assert capsys.readouterr().out.count(f"saved {run_dir('base', 'fin') / 'step_000004'} in") == 1
