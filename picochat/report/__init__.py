"""`picochat report`: the run's report card, rebuilt from files (metrics JSONL, checkpoint meta, evaluation results,
the tokenizer); `picochat report reset` starts a new card at the start of a run.

    picochat report reset                  # move report/ aside to report/old-<time>/, write the header
    picochat report                        # (re)build report/report.md, report.html and report/plots/*.png
    picochat report --run d4               # that run in every stage (default: each stage's newest run)
    picochat report --run base=d4,sft=d4b --gpu-hourly-usd 2.5

The card: environment (git commit and dirty flag, CPU, GPUs, torch, dtype, date), tokenizer, one section of key
figures per stage present (base, mid, sft, rl), a summary table of the evaluations per stage ("-" where missing),
wall time and estimated cost, and the plots. Building is idempotent: the same files give the same card. Everything
is written under <base dir>/report/ (collect.py says what is read, plots.py what is drawn).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from picochat.common import get_base_dir, print0, run_main
from picochat.config import f, parse_config

HEADER = "header.json"  # written by `report reset`: {"started", "started_unix", "environment"}


@dataclass
class ReportConfig:
    run: str = f("", "runs to report: NAME for every stage, or stage=NAME,... (empty = each stage's newest run)")
    gpu_hourly_usd: float = f(-1.0, "USD per GPU-hour for the cost estimate; -1 = the built-in price of this "
                                    "machine's GPU kind (0 on CPU)")


def report_dir(base: Path | None = None) -> Path:
    return Path(base or get_base_dir()) / "report"


def _write(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees half a card."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _write_card(out: Path, blocks) -> Path:
    from picochat.report.render import to_html, to_markdown

    _write(out / "report.md", to_markdown(blocks))
    _write(out / "report.html", to_html(blocks, out))
    return out / "report.md"


def reset_report(base: Path | None = None) -> Path | None:
    """Move the current card (every entry of report/ but older old-* folders) into report/old-<UTC time>/ and write
    a header with the start time and the environment. Returns the folder the old card went to, or None."""
    from picochat.report.collect import environment
    from picochat.report.render import header_blocks

    out = report_dir(base)
    out.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out.iterdir() if not p.name.startswith("old-")]
    moved = None
    if entries:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        moved = out / f"old-{stamp}"
        n = 1
        while moved.exists():  # two resets within a second
            moved, n = out / f"old-{stamp}-{n}", n + 1
        moved.mkdir()
        for p in entries:
            p.rename(moved / p.name)
    now = time.time()
    header = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)), "started_unix": now,
              "environment": environment()}
    _write(out / HEADER, json.dumps(header, indent=2) + "\n")
    _write_card(out, header_blocks(header))
    return moved


def build_report(base: Path | None = None, runs: str = "", gpu_hourly_usd: float | None = None) -> Path:
    """Rebuild the whole card from the files under `base`; returns the path of report.md."""
    from picochat.report.collect import (collect_stages, environment, last_activity, parse_runs, read_json,
                                         summary_rows, tokenizer_stats)
    from picochat.report.plots import draw_all
    from picochat.report.render import card_blocks

    base = Path(base or get_base_dir())
    out = report_dir(base)
    out.mkdir(parents=True, exist_ok=True)
    header = read_json(out / HEADER) if (out / HEADER).is_file() else None
    stages = collect_stages(base, parse_runs(runs))
    picked = ", ".join(f"{s.stage} '{s.run}'" for s in stages if s.present)
    print0(f"report: {picked or 'no stage found'}" + (" (pick others with --run)" if picked and not runs else ""))
    last = last_activity(stages)
    env = header["environment"] if header else environment(when=last)  # the files' date keeps a rebuild identical
    rows = summary_rows(stages)
    corpus = next((s.meta["run_config"].get("corpus") for s in stages
                   if s.meta and (s.meta.get("run_config") or {}).get("corpus")), "default")
    plots = draw_all(stages, rows, out / "plots")
    blocks = card_blocks(stages, rows, env, tokenizer_stats(base, corpus), plots, base, out, header,
                         gpu_hourly_usd, last)
    return _write_card(out, blocks)


def _main(argv: list[str] | None) -> None:
    def extra(parser):
        parser.add_argument("action", nargs="?", choices=["build", "reset"], default="build",
                            help="build (default): (re)build the card; reset: move it aside and start a new one")

    cfg, _, ns = parse_config(ReportConfig, argv, prog="picochat report", description=__doc__.splitlines()[0],
                              extra=extra)
    if ns.action == "reset":
        moved = reset_report()
        print0(f"report reset: {report_dir() / 'report.md'}" + (f" (previous card moved to {moved})" if moved else ""))
        return
    path = build_report(runs=cfg.run, gpu_hourly_usd=cfg.gpu_hourly_usd if cfg.gpu_hourly_usd >= 0 else None)
    print0(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
