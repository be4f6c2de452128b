"""The README's benchmarks table from the benchmarks' JSON lines: one row per figure, with the machine, the date and
the command that measured it.

    python benchmarks/decode.py --compile >> figures.jsonl     # each benchmark prints ONE JSON line
    python benchmarks/serve.py --random >> figures.jsonl
    python benchmarks/table.py figures.jsonl                    # or: ... | python benchmarks/table.py

Reads JSON lines from the files given (or stdin); other lines (a benchmark's progress, if stderr went there too) are
skipped. Each line names its benchmark, machine, load and date (benchmarks/_env.py's stamp); a line from before the
stamp is recognised by a key only its benchmark writes and gets "-" for what it does not say. Prints a markdown
table: what, figure, machine (with the 1-minute load average when the figures were taken), date, command.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: make the picochat package importable
    sys.path.insert(0, str(REPO))

from picochat.common import UserError, run_main  # noqa: E402


def _engine(d: dict, batch1: bool) -> str:
    """decode.py's engine: dtype, and eager / compiled / built ahead of time (the batch-1 step only); CUDA graphs."""
    how = "AOT" if batch1 and d.get("aot_batch1") else "compiled" if d.get("compile") else "eager"
    return f"{d.get('dtype', '?')} {how}" + (", CUDA graphs" if d.get("cuda_graphs") else "")


def train_rows(d: dict) -> list[tuple[str, str]]:
    shape = (f"d{d['depth']} hd{d['head_dim']} T {d['seq_len']:,}, batch {d['device_batch']} x {d['total_batch']:,} "
             f"tokens" + (", compiled" if d.get("compile") else ""))
    return [(f"training tok/s and MFU, {shape}, {r['dtype']}",
             f"{r['tok_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%} ({r['ms_per_step']:,.0f} ms/step)")
            for r in (d.get(dt) for dt in ("fp32", "bf16")) if isinstance(r, dict)]


def decode_rows(d: dict) -> list[tuple[str, str]]:
    what = f"d{d['depth']} vocab {d['vocab']:,}, {_engine(d, batch1=False)}"
    rows = [(f"decode batch 1, d{d['depth']} vocab {d['vocab']:,}, {_engine(d, batch1=True)}",
             f"{d['decode_tok_per_s_batch1']:,.0f} tok/s ({d['batch1_fraction_of_bound']:.0%} of the bandwidth bound)")]
    for k, v in d.items():  # decode_tok_per_s_16_samples: the sample count is --samples
        if m := re.fullmatch(r"decode_tok_per_s_(\d+)_samples", k):
            rows.append((f"decode {m[1]} samples, {what}", f"{v:,.0f} tok/s"))
    rows.append((f"prefill, {what}", f"{d['prefill_tok_per_s']:,.0f} tok/s"))
    return rows


def serve_rows(d: dict) -> list[tuple[str, str]]:
    s = d.get("settings", {})
    model = f"random d{s['depth']}" if s.get("random") else (d.get("server") or {}).get("model") or "checkpoint"
    return [(f"serving, {lv['concurrency']} client{'s' if lv['concurrency'] > 1 else ''}, {model}, "
             f"{s.get('max_tokens', '?')} tokens per request",
             f"{lv['tokens_per_s']:,.0f} tok/s, TTFT p50 {lv['ttft_p50_ms']:,.0f} / p95 {lv['ttft_p95_ms']:,.0f} ms")
            for lv in d["levels"]]


def peak_rows(d: dict) -> list[tuple[str, str]]:
    return [(f"matmul peak probe, {name}", f"{min(r['gflops']):,.0f}-{max(r['gflops']):,.0f} GFLOP/s")
            for name, r in d.items() if isinstance(r, dict) and "gflops" in r]


def sandbox_rows(d: dict) -> list[tuple[str, str]]:
    return [(f"sandboxed python call, {mode}", f"{r['median_ms']:,.0f} ms median, {r['best_ms']:,.0f} best")
            for mode, r in (("bwrap", d.get("bwrap")), ("fallback", d.get("fallback"))) if r]


def deterministic_rows(d: dict) -> list[tuple[str, str]]:
    return [(f"--deterministic cost, d{d['depth']} {d['dtype']}" + (", compiled" if d.get("compile") else ""),
             f"{d['on_over_off']:.3f}x the tok/s ({d['cpu_on_over_off']:.3f}x the CPU seconds)")]


def loader_rows(d: dict) -> list[tuple[str, str]]:
    us = d["us_per_row_T256"]
    return [("packing loader per 257-token row (real tokenizer)",
             ", ".join(f"{p} {v:,.0f} us" for p, v in us.items()))]


def conversations_rows(d: dict) -> list[tuple[str, str]]:
    return [(f"conversation rows, {stage} mixture, T {T}", f"{r['pad_frac']:.1%} padding (pad), "
                                                          f"{r['render_ms']:,.1f} ms rendering per batch")
            for stage in ("mid", "sft") for T, r in (d.get(stage) or {}).items() if isinstance(r, dict)]


ROWS = {"train": train_rows, "decode": decode_rows, "serve": serve_rows, "peak": peak_rows,
        "sandbox": sandbox_rows, "deterministic": deterministic_rows, "loader": loader_rows,
        "conversations": conversations_rows}
# lines written before benchmarks/_env.py's stamp: a key only that benchmark writes
SIGNATURE = {"flops_per_token": "train", "decode_tok_per_s_batch1": "decode", "levels": "serve",
             "fallback": "sandbox", "on_over_off": "deterministic", "us_per_row_T256": "loader", "float32": "peak",
             "sft": "conversations"}


def benchmark_of(d: dict) -> str | None:
    return d.get("benchmark") or next((name for key, name in SIGNATURE.items() if key in d), None)


def rows(lines) -> list[tuple[str, str, str, str, str]]:
    """(what, figure, machine, date, command) for every figure of every benchmark JSON line in `lines`."""
    out = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        name = benchmark_of(d)
        if name not in ROWS:
            print(f"table: skipped a line of benchmark {name!r} (no rows for it)", file=sys.stderr)
            continue
        try:
            figures = ROWS[name](d)
        except (KeyError, TypeError, ValueError) as e:  # a line cut short, or from another version of the script
            print(f"table: skipped a {name} line that lacks {e}", file=sys.stderr)
            continue
        machine = d.get("machine", "-") + (f", load {d['load']:g}" if d.get("load") is not None else "")
        command = f"`{d['command']}`" if d.get("command") else "-"
        out += [(what, figure, machine, d.get("date", "-"), command) for what, figure in figures]
    return out


def markdown(table: list[tuple[str, ...]]) -> str:
    head = ("what", "figure", "machine", "date", "command")
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
                     for cells in [head, ("---",) * len(head), *table])


def _run(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="JSON-lines files (default: stdin)")
    args = p.parse_args(argv)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise UserError(f"benchmarks/table.py: no file {missing[0]}; give files of benchmark JSON lines, or pipe "
                        f"them in")
    lines = [ln for f in args.files for ln in Path(f).read_text().splitlines()] if args.files else sys.stdin
    table = rows(lines)
    if not table:
        raise UserError("benchmarks/table.py: no benchmark JSON lines in the input (each benchmarks/*.py prints one)")
    print(markdown(table))


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
