"""Training tokens/s of picochat and nanochat side by side, alternated in one run: the ratio is what it measures.

    python benchmarks/nanochat_ab.py --nanochat /tmp/nanochat            # set up (once) and run 3 rounds
    python benchmarks/nanochat_ab.py --nanochat /tmp/nanochat --rounds 1 --steps 4 --configs ours-bf16,nano-fp32

--nanochat is a nanochat source tree (e.g. `git archive HEAD | tar -x -C /tmp/nanochat` of karpathy/nanochat). Set-up,
each part skipped when already done: a venv of its own in <tree>/.venv with this process's torch version (CPU wheels,
as runs/setup.sh installs ours) and nanochat's runtime dependencies; its data from OUR corpus (the parquet shards of
`picochat data prepare`, same "text" column, the last shard is validation in both projects) copied into
$NANOCHAT_BASE_DIR/base_data_climbmix/; its tokenizer trained on them at --vocab-size.

Each round runs every config once, in a fresh process, in the same order: ours (benchmarks/train.py) in fp32 and
bf16, nanochat's scripts/base_train.py in fp32 and bf16 (NANOCHAT_DTYPE), both compiled, at the reference setting
(depth 6, head dim 64, sequence 512, 32 x 512 = 16,384 tokens per step, full attention in every layer). tokens/s of
a run = tokens / time over the steps after the first (which compiles), as both loops count it. Prints ONE JSON line:
each config's per-round tok/s, the median, and every config's median over nanochat fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("ours-fp32", "ours-bf16", "nano-fp32", "nano-bf16")


def sh(cmd: list[str], env: dict, cwd: Path, timeout: float) -> str:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout + r.stderr


def setup(tree: Path, base: Path, vocab: int, env: dict) -> Path:
    """nanochat's venv, data and tokenizer (each only if missing); returns its python."""
    py = tree / ".venv" / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(tree / ".venv")], env, tree, 600)
        # the same torch as ours; the pip config decides the index (runs/setup.sh installs the CPU wheel the same way)
        sh([str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", "filelock", "numpy",
            "psutil", "pyarrow", "rustbpe", "tiktoken", "requests", "wandb", "setuptools"], env, tree, 1800)
    data = base / "base_data_climbmix"
    if not list(data.glob("shard_*.parquet")):
        corpus = Path(env.get("PICOCHAT_BASE_DIR", Path.home() / ".cache" / "picochat")) / "corpus" / "default"
        shards = sorted(corpus.glob("shard_*.parquet"))
        if not shards:
            sys.exit(f"no corpus shards in {corpus}: run `picochat data prepare` first (same PICOCHAT_BASE_DIR)")
        data.mkdir(parents=True, exist_ok=True)
        for s in shards:  # same schema (one "text" string column) and naming (shard_NNNNN, last = val)
            shutil.copy(s, data / s.name)
    if not (base / "tokenizer" / "tokenizer.pkl").exists():
        sh([str(py), "-m", "scripts.tok_train", "--vocab-size", str(vocab)], env, tree, 1800)
    return py


def run_ours(dtype: str, args, env: dict) -> float:
    out = sh([sys.executable, str(ROOT / "benchmarks" / "train.py"), "--compile", "--dtype", dtype, "--steps",
              str(args.steps), "--vocab-size", str(args.vocab_size)], env, ROOT, args.timeout)
    return json.loads(out.strip().splitlines()[-1] if out.strip().startswith("{") else
                      [ln for ln in out.splitlines() if ln.startswith("{")][-1])[dtype]["tok_per_s"]


def run_nano(dtype: str, py: Path, tree: Path, args, env: dict) -> float:
    env = {**env, "NANOCHAT_DTYPE": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}
    out = sh([str(py), "-m", "scripts.base_train", "--device-type", "cpu", "--depth", "6", "--head-dim", "64",
              "--max-seq-len", "512", "--device-batch-size", "32", "--total-batch-size", "16384",
              "--window-pattern", "L", "--num-iterations", str(args.steps), "--warmup-steps", "0",
              "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1",
              "--model-tag", f"ab_{dtype}"], env, tree, args.timeout)
    dts = [float(m) for m in re.findall(r"^step \d+/\d+ .*?\| dt: ([\d.]+)ms", out, re.M)]
    if len(dts) != args.steps:
        sys.exit(f"nanochat printed {len(dts)} step times, expected {args.steps}:\n{out[-2000:]}")
    return 16384 * (len(dts) - 1) / (sum(dts[1:]) / 1000)  # steps after the first, as ours counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanochat", required=True, type=Path, help="nanochat source tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    if set(configs) - set(CONFIGS):
        sys.exit(f"--configs: unknown {sorted(set(configs) - set(CONFIGS))}; choose from {', '.join(CONFIGS)}")
    tree = args.nanochat.resolve()
    env = dict(os.environ)
    base = Path(env.setdefault("NANOCHAT_BASE_DIR", str(tree / ".base")))
    py = setup(tree, base, args.vocab_size, env)
    runs = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            side, dtype = c.split("-")
            tok_s = run_ours(dtype, args, env) if side == "ours" else run_nano(dtype, py, tree, args, env)
            runs[c].append(round(tok_s, 1))
            print(f"round {r + 1} {c}: {tok_s:,.0f} tok/s", file=sys.stderr, flush=True)
    med = {c: statistics.median(v) for c, v in runs.items()}
    ref = med.get("nano-fp32")
    out = {"setting": "d6 hd64 seq512 batch16384 vocab%d compiled" % args.vocab_size, "steps": args.steps,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "tok_per_s": runs, "median": med,
           "ratio_to_nano_fp32": {c: round(m / ref, 3) for c, m in med.items()} if ref else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
