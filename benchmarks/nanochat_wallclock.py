"""picochat vs nanochat's CPU recipe (runs/runcpu.sh) at equal wall clock on the same corpus and machine: ONE JSON line.

    # our side from a finished run (its checkpoints and metrics logs), nanochat's side fresh:
    python benchmarks/nanochat_wallclock.py --nanochat /tmp/nanochat --ours-base-dir ~/.cache/picochat --run cpu
    # or run our stages first (pretrain/midtrain/sft --preset cpu, capped at --minutes / --chat-minutes):
    python benchmarks/nanochat_wallclock.py --nanochat /tmp/nanochat --run-ours --run wallclock --minutes 2

NANOCHAT_BASE_DIR (default <tree>/.base) holds nanochat's data, tokenizer and checkpoints; set-up as in
benchmarks/nanochat_ab.py (its venv with our torch, our corpus's shards copied, its tokenizer trained on them at our
vocabulary size).

(a) pretraining. Our wall clock W = the `elapsed_s` of our pretrain run's summary (its training loop: steps, periodic
evaluations, checkpoint saves; process start-up excluded). nanochat runs scripts/base_train.py with runcpu.sh's
settings (depth 6, head dim 64, window L, seq 512, device batch 32, total batch 16,384) and its iteration count cut
to fit W: a calibration run of a few steps, in the same conditions just before, gives the first step (compile) and
the step time, N = 1 + (W - first) // step (a calibration whose first step is a cold compile, over 3 steps' time, is
run again: the inductor cache it filled makes the real run's first step shorter). Its LR schedule is its own (warmdown 65% of N, ends at N); the warmup is
runcpu.sh's share (40 of 5,000 steps) of N. Its periodic evaluations and samples are off (runcpu.sh's every-100
would not come round in N steps anyway, and its 524k-token evaluation alone is minutes here). Both final base models
are then scored on the SAME text, outside the budget: the validation documents our ValidationSlice takes (the first
ones of our corpus's val split, in order, up to --val-tokens of our tokens), ours by picochat.evals.bpb at our
context, nanochat's by benchmarks/nanochat/nano_side.py inside its venv (its model, tokenizer and evaluate_bpb; the
same documents packed by picochat's packer at its context of 512).

(b) chat. W_chat = our midtrain + sft `elapsed_s`. nanochat's scripts/chat_sft.py, patched in a copy (the diff is in
the output) to train on OUR offline midtrain + SFT mixtures exported as JSONL (the conversations our two stages saw)
instead of SmolTalk/MMLU/GSM8K from the hub, runs N_chat = 1 + (W_chat - first) // step iterations (step times from
its base run just before: same model and batch geometry). ChatCORE is off (hub data); its end-of-run val bpb is cut
to one batch. Then both chat models answer the same prompts greedily (calculator on, as each one's chat CLI): a reply
follows the format when it ends with <|assistant_end|> within --max-new-tokens and its fraction of repeated word
4-grams is at most --max-rep4.

The machine is shared: `uptime` is recorded at every phase; our side's conditions are whatever its run had.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RUNCPU_ITERS, RUNCPU_WARMUP = 5000, 40  # runcpu.sh's --num-iterations; base_train's default --warmup-steps
# runcpu.sh's base_train flags, evaluations and samples off (see the docstring)
BASE_FLAGS = ["--device-type", "cpu", "--depth", "6", "--head-dim", "64", "--window-pattern", "L", "--max-seq-len",
              "512", "--device-batch-size", "32", "--total-batch-size", "16384", "--eval-every", "-1",
              "--core-metric-every", "-1", "--sample-every", "-1"]
EXTRA_PROMPTS = ["What is the capital of France?", "What color is the sky?", "Tell me a joke."]

# the patch to nanochat's chat_sft: its hub task mixture -> our exported conversations (JSONL)
SFT_OLD_START, SFT_OLD_END = "train_tasks = [", "]) # total: 24K + 5.2K + 0.42K ~= 29.6K rows\n"
SFT_NEW = """from jsonl_task import JSONLConversations  # picochat benchmark: offline conversations instead of hub tasks
train_tasks = [JSONLConversations(os.environ["PICOCHAT_SFT_TRAIN"])]
train_dataset = TaskMixture(train_tasks)
print0(f"Training mixture: {len(train_dataset):,} rows (picochat's offline midtrain + SFT mixtures)")
val_dataset = TaskMixture([JSONLConversations(os.environ["PICOCHAT_SFT_VAL"])])
"""


def fail(msg: str):
    from picochat.common import UserError
    raise UserError(msg)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def ours_summary(base: Path, stage: str, run: str) -> dict:
    """The summary record of our stage's metrics log (its wall clock is `elapsed_s`)."""
    path = base / "logs" / stage / f"{run}.jsonl"
    if not path.exists():
        fail(f"no metrics log {path}: finish `picochat {stage}` for run {run!r} there, or pass --run-ours")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    done = [r for r in recs if r.get("kind") == "summary"]
    if not done:
        fail(f"{path} has no summary record: the {stage} run {run!r} did not finish")
    last = done[-1]
    evals = [r for r in recs if r.get("kind") == "eval" and r.get("step") == last["steps"]]
    return {"elapsed_s": last["elapsed_s"], "steps": last["steps"], "tok_per_s": last.get("tok_per_s"),
            "logged_val_bpb": (evals[-1] if evals else last).get("val_bpb"), "log": str(path)}


def run_ours(args, env: dict) -> None:
    """Our three stages, --preset cpu, capped at --minutes (pretrain) and --chat-minutes (split over the two)."""
    half = f"{args.chat_minutes / 2:g}"
    stages = [["pretrain", "--max-minutes", f"{args.minutes:g}"],
              ["midtrain", "--parent-run", args.run, "--max-minutes", half],
              ["sft", "--parent-run", args.run, "--max-minutes", half]]
    for st in stages:
        print(f"ours: picochat {' '.join(st)}", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "picochat", st[0], "--preset", "cpu", "--run", args.run, *st[1:]],
                           env=env, cwd=ROOT)
        if r.returncode != 0:
            sys.exit(f"picochat {st[0]} failed ({r.returncode})")


def sync_corpus(ours_base: Path, corpus: str, nano_base: Path) -> int:
    """Our corpus's shards into nanochat's data folder (same names: sorted, the last is val in both projects);
    refuses a folder that holds other shards."""
    src = ours_base / "corpus" / corpus
    manifest = json.loads((src / "manifest.json").read_text())
    names = sorted(s["file"] for s in manifest["shards"])
    if names[-1] != manifest["val_file"]:
        fail(f"{src}: the val shard {manifest['val_file']} is not the last by name, so nanochat would not read it "
             f"as val; rebuild the corpus with `picochat data prepare`")
    dst = nano_base / "base_data_climbmix"
    dst.mkdir(parents=True, exist_ok=True)
    have = sorted(p.name for p in dst.glob("*.parquet"))
    if have and (have != names or any((dst / n).read_bytes() != (src / n).read_bytes() for n in names)):
        fail(f"{dst} holds other shards than {src}: use a fresh NANOCHAT_BASE_DIR for this corpus")
    for n in names:
        if not (dst / n).exists():
            shutil.copy(src / n, dst / n)
    return len(names)


def nano(py: Path, tree: Path, env: dict, argv: list[str], timeout: float) -> tuple[str, float]:
    """Run a nanochat module/script; (output, wall seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run([str(py), *argv], env=env, cwd=tree, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"nanochat {' '.join(argv[:3])} ... failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout + r.stderr, wall


def last_json(out: str) -> dict:
    """The JSON line a helper printed (nanochat logs to stderr, which follows stdout in `out`)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def step_times(out: str, want: int) -> list[float]:
    """Seconds of each optimizer step as base_train / chat_sft print them."""
    dts = [float(m) / 1000 for m in re.findall(r"^step \d+(?:/\d+)? .*?\| dt: ([\d.]+)ms", out, re.M)]
    if len(dts) != want:
        sys.exit(f"nanochat printed {len(dts)} step times, expected {want}:\n{out[-2000:]}")
    return dts


def iterations(budget_s: float, first_s: float, step_s: float) -> int:
    """Steps whose time (the first, compiling, then `step_s` each) fits the budget; at least 1."""
    return max(1, 1 + int((budget_s - first_s) // step_s))


def base_train(py, tree, env, iters: int, tag: str, timeout: float) -> dict:
    warmup = round(RUNCPU_WARMUP * iters / RUNCPU_ITERS)
    out, wall = nano(py, tree, env, ["-m", "scripts.base_train", *BASE_FLAGS, "--num-iterations", str(iters),
                                     "--warmup-steps", str(warmup), "--model-tag", tag], timeout)
    dts = step_times(out, iters)
    return {"iterations": iters, "warmup_steps": warmup, "first_step_s": round(dts[0], 2),
            "median_step_s": round(statistics.median(dts[1:]) if len(dts) > 1 else dts[0], 3),
            "steps_s": round(sum(dts), 1), "process_s": round(wall, 1), "tokens": 16384 * iters}


def patched_sft(tree: Path, out_dir: Path) -> tuple[Path, str]:
    """A copy of nanochat's chat_sft.py with its task mixture replaced (SFT_NEW); (path, unified diff)."""
    src = (tree / "scripts" / "chat_sft.py").read_text()
    a, b = src.find(SFT_OLD_START), src.find(SFT_OLD_END)
    if a < 0 or b < a:
        fail(f"{tree}/scripts/chat_sft.py: its task mixture block (from {SFT_OLD_START!r}) is not where this "
             f"benchmark patches it; this nanochat version differs from the one it was written for (92d63d4)")
    new = src[:a] + SFT_NEW + src[b + len(SFT_OLD_END):]
    path = out_dir / "chat_sft_offline.py"
    path.write_text(new)
    diff = "".join(difflib.unified_diff(src.splitlines(True), new.splitlines(True), "scripts/chat_sft.py",
                                        "chat_sft_offline.py"))
    return path, diff


def export_mixtures(base: Path, run: str, out_dir: Path) -> dict:
    """Our midtrain + SFT conversations (train and val splits, as the two runs built them) as JSONL."""
    from picochat.checkpoint import load_checkpoint, pick_run
    from picochat.tasks import mixtures

    counts = {}
    for split in ("train", "val"):
        rows = []
        for stage, make in (("mid", mixtures.midtrain_mixture), ("sft", mixtures.sft_mixture)):
            rc = load_checkpoint(pick_run(stage, run, base)[1], load_optim=False)["meta"]["run_config"]
            if rc.get("tasks"):
                fail(f"our {stage} run {run!r} trained on --tasks {rc['tasks']!r}, not the default mixture: this "
                     f"benchmark exports only the default mixtures")
            mix = make(split, source=rc["source"], scale=rc["scale"], data=rc.get("data") or None, seed=rc["seed"])
            rows += [{"messages": mix[i]["messages"]} for i in range(len(mix))]
        (out_dir / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[split] = len(rows)
    return counts


def rep4(text: str) -> float:
    """Fraction of the reply's word 4-grams that repeat an earlier one (0 = none; a loop tends to 1)."""
    w = text.split()
    grams = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    return 0.0 if not grams else round(1 - len(set(grams)) / len(grams), 3)


def judge(replies: list[dict], max_rep4: float) -> dict:
    for r in replies:
        r["rep4"] = rep4(r["reply"])
        r["follows_format"] = r["ended"] and bool(r["reply"].strip()) and r["rep4"] <= max_rep4
    # one reply to every prompt follows the format but answers nothing: the distinct count shows it
    return {"follows": sum(r["follows_format"] for r in replies), "of": len(replies),
            "distinct_replies": len({r["reply"] for r in replies}), "replies": replies}


def ours_bpb(base: Path, run: str, val_tokens: int) -> dict:
    from picochat.checkpoint import load_model
    from picochat.data.loader import ValidationSlice
    from picochat.evals.bpb import evaluate_bpb

    model, tok, meta = load_model("base", None, "cpu", base_dir=base, run=run)
    corpus = meta["run_config"].get("corpus", "default")
    val = ValidationSlice(tok, 16, model.config.sequence_len, val_tokens, corpus=corpus)
    batches = val.batches("cpu")
    bpb = evaluate_bpb(model, lambda: next(batches), val.steps, tok.token_bytes())
    return {"bpb": bpb, "docs": val.docs, "tokens": val.tokens, "T": model.config.sequence_len, "step": meta["step"],
            "corpus": corpus, "vocab_size": model.config.vocab_size, "slice": val.describe()}


def ours_replies(base: Path, run: str, prompts: list[str], max_tokens: int) -> list[dict]:
    from picochat.checkpoint import load_model
    from picochat.engine import Engine, SamplingParams
    from picochat.tools import make_tool

    model, tok, _ = load_model("sft", None, "cpu", base_dir=base, run=run)
    engine = Engine(model, tok, tool=make_tool("calculator"))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    out = []
    for q in prompts:
        toks, finish = [], None
        for events in engine.generate(tok.render_for_completion({"messages": [{"role": "user", "content": q}]}), 1,
                                      params):
            for ev in events:
                toks += [ev.token] if ev.token >= 0 else []
                finish = ev.finish_reason or finish
        ended = finish == "stop" and bool(toks) and toks[-1] == engine.assistant_end
        body = toks[:-1] if finish == "stop" and toks and toks[-1] in (engine.assistant_end, engine.bos) else toks
        out.append({"prompt": q, "reply": tok.decode(body), "tokens": len(toks), "ended": ended})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanochat", required=True, type=Path, help="nanochat source tree (karpathy/nanochat)")
    p.add_argument("--ours-base-dir", type=Path, default=None, help="our finished run's base dir (default: "
                   "$PICOCHAT_BASE_DIR or ~/.cache/picochat)")
    p.add_argument("--run", default="cpu", help="our run name (all three stages)")
    p.add_argument("--run-ours", action="store_true", help="run our pretrain/midtrain/sft --preset cpu first")
    p.add_argument("--minutes", type=float, default=10.0, help="--run-ours: pretrain cap (the preset's 10)")
    p.add_argument("--chat-minutes", type=float, default=12.0, help="--run-ours: midtrain + sft cap, split in half "
                   "(the presets' 6 + 6)")
    p.add_argument("--calib-steps", type=int, default=3, help="nanochat calibration steps (the first compiles)")
    p.add_argument("--val-tokens", type=int, default=65536, help="validation text: our slice of this many tokens")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-rep4", type=float, default=0.3, help="most repeated word 4-grams a formatted reply has")
    p.add_argument("--nano-dtype", default="", help="NANOCHAT_DTYPE (default: its own, float32 on CPU)")
    p.add_argument("--skip-chat", action="store_true", help="only part (a)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per nanochat process")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from nanochat_ab import setup
    from picochat.common import get_base_dir
    from picochat.speedrun import SAMPLE_QUESTIONS

    tree = args.nanochat.resolve()
    if not (tree / "scripts" / "base_train.py").exists():
        fail(f"--nanochat {tree} is not a nanochat source tree (no scripts/base_train.py)")
    base = (args.ours_base_dir or get_base_dir()).expanduser().resolve()
    env = {**os.environ, "PICOCHAT_BASE_DIR": str(base)}
    os.environ["PICOCHAT_BASE_DIR"] = str(base)  # our loaders in this process read the same corpus
    if args.run_ours:
        run_ours(args, env)
    ours = {"pretrain": ours_summary(base, "base", args.run)}
    if not args.skip_chat:
        ours["midtrain"], ours["sft"] = ours_summary(base, "mid", args.run), ours_summary(base, "sft", args.run)
    t_eval = time.perf_counter()
    ours["base_eval"] = ours_bpb(base, args.run, args.val_tokens)
    ours["base_eval"]["eval_s"] = round(time.perf_counter() - t_eval, 1)

    nano_base = Path(env.setdefault("NANOCHAT_BASE_DIR", str(tree / ".base"))).resolve()
    shards = sync_corpus(base, ours["base_eval"]["corpus"], nano_base)
    py = setup(tree, nano_base, ours["base_eval"]["vocab_size"], env)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ROOT), str(HERE / "nanochat")])
    if args.nano_dtype:
        env["NANOCHAT_DTYPE"] = args.nano_dtype
    work = nano_base / "picochat_wallclock"
    work.mkdir(exist_ok=True)
    loads = {"start": uptime()}

    # (a) calibrate, then nanochat's base_train for our pretraining wall clock
    W = ours["pretrain"]["elapsed_s"]
    calib = [base_train(py, tree, env, args.calib_steps, "wallclock_calib", args.timeout)]
    if calib[0]["first_step_s"] > 3 * calib[0]["median_step_s"]:
        # a cold compile (its inductor cache is now warm, so the real run's first step is shorter): measure again
        calib.append(base_train(py, tree, env, args.calib_steps, "wallclock_calib", args.timeout))
    loads["after_calibration"] = uptime()
    n = iterations(W, calib[-1]["first_step_s"], calib[-1]["median_step_s"])
    print(f"nanochat: {n} iterations for {W:.0f} s (calibration: first {calib[-1]['first_step_s']} s, then "
          f"{calib[-1]['median_step_s']} s/step)", file=sys.stderr, flush=True)
    nb = base_train(py, tree, env, n, "wallclock", args.timeout)
    loads["after_base_train"] = uptime()
    out, _ = nano(py, tree, env, [str(HERE / "nanochat" / "nano_side.py"), "bpb", "--model-tag", "wallclock",
                                  "--docs", str(ours["base_eval"]["docs"]), "--corpus", ours["base_eval"]["corpus"]],
                  args.timeout)
    nb["eval"] = last_json(out)
    if nb["eval"]["docs"] != ours["base_eval"]["docs"]:
        fail(f"nanochat's eval read {nb['eval']['docs']} validation documents, ours {ours['base_eval']['docs']}")
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "nanochat_dtype": args.nano_dtype or "its default (float32 on CPU)",
        "corpus": ours["base_eval"]["corpus"], "shards": shards,
        "pretrain": {"wall_clock_s": round(W, 1), "ours": {**ours["pretrain"], **ours["base_eval"]},
                     "nanochat": {**nb, "calibration": calib},
                     "val_text": f"our corpus's val split, first {ours['base_eval']['docs']} documents in order",
                     "bpb_ours_over_nanochat": round(ours["base_eval"]["bpb"] / nb["eval"]["bpb"], 4)},
    }

    # (b) nanochat's chat_sft on our conversations for our midtrain + sft wall clock, then the same prompts
    if not args.skip_chat:
        Wc = ours["midtrain"]["elapsed_s"] + ours["sft"]["elapsed_s"]
        counts = export_mixtures(base, args.run, work)
        script, diff = patched_sft(tree, work)
        (work / "chat_sft_offline.diff").write_text(diff)
        nc = iterations(Wc, nb["first_step_s"], nb["median_step_s"])
        senv = {**env, "PICOCHAT_SFT_TRAIN": str(work / "sft_train.jsonl"),
                "PICOCHAT_SFT_VAL": str(work / "sft_val.jsonl")}
        # chat_sft's loader flags the last step when it hands out batch N, and the first batch is fetched before
        # step 1: --num-iterations N trains N - 1 steps
        out, wall = nano(py, tree, senv, [str(script), "--device-type", "cpu", "--model-tag", "wallclock",
                                          "--num-iterations", str(nc + 1), "--eval-every", "-1", "--eval-tokens",
                                          "16384", "--chatcore-every", "-1"], args.timeout)
        dts = step_times(out, nc)
        loads["after_chat_sft"] = uptime()
        prompts = SAMPLE_QUESTIONS + EXTRA_PROMPTS
        (work / "prompts.json").write_text(json.dumps(prompts))
        out, _ = nano(py, tree, env, [str(HERE / "nanochat" / "nano_side.py"), "chat", "--model-tag", "wallclock",
                                      "--prompts", str(work / "prompts.json"), "--max-tokens",
                                      str(args.max_new_tokens)], args.timeout)
        result["chat"] = {
            "wall_clock_s": round(Wc, 1), "conversations": counts, "patch": str(work / "chat_sft_offline.diff"),
            "max_new_tokens": args.max_new_tokens, "max_rep4": args.max_rep4,
            "ours": {"midtrain": ours["midtrain"], "sft": ours["sft"],
                     **judge(ours_replies(base, args.run, prompts, args.max_new_tokens), args.max_rep4)},
            "nanochat": {"iterations": nc, "steps_s": round(sum(dts), 1), "process_s": round(wall, 1),
                         **judge(last_json(out)["replies"], args.max_rep4)},
        }
    result["uptime"] = loads
    print(json.dumps(result))


if __name__ == "__main__":
    main()
