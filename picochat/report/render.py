"""The report card as a list of blocks (heading, paragraph, table, image) and its two renderings: markdown and a
self-contained HTML page (plots inlined as data URIs, no external assets). The card's content is built once, in
`card_blocks`; the renderers only format."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from picochat.report.collect import StageData, eval_wall_s, stage_wall_s, tokens_per_step

Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", alt, relative path)

# per-GPU-hour on-demand list prices for the cost estimate (Lambda, 2025: H100 SXM $2.99, A100 80 GB $1.79, A100
# 40 GB $1.29; nanochat's README quotes ~$24/h for an 8xH100 node, the same $3 a GPU-hour). First match wins.
GPU_PRICES = [(re.compile(r"H100"), 2.99), (re.compile(r"A100.*80"), 1.79), (re.compile(r"A100"), 1.29)]


def gpu_price(gpu: str | None) -> float | None:
    """USD per GPU-hour for a device name (torch.cuda.get_device_name), 0 without a GPU, None when unknown."""
    if not gpu:
        return 0.0
    return next((price for pattern, price in GPU_PRICES if pattern.search(gpu)), None)


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or (abs(v) >= 1000 and float(v).is_integer()):
        return f"{int(v):,}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def environment_blocks(env: dict) -> list[Block]:
    git = env.get("git") or {}
    dirty = {True: " (dirty: uncommitted changes)", False: " (clean)"}.get(git.get("dirty"), "")
    gpu = f"{env['gpus']} x {env['gpu']}" if env.get("gpus") else "none"
    rows = [("git commit", f"`{git.get('commit', 'unknown')}`{dirty}"), ("date", env.get("date")),
            ("CPU", f"{env.get('cpu')} ({env.get('cores')} cores)"), ("GPUs", gpu),
            ("torch", env.get("torch")), ("python", env.get("python")), ("platform", env.get("platform")),
            ("dtype", f"{env.get('dtype')} (the automatic choice on {env.get('device')})")]
    return [("h", 2, "Environment"), ("table", ["", "value"], rows)]


def tokenizer_blocks(tok: dict) -> list[Block]:
    if not tok:
        return [("h", 2, "Tokenizer"), ("p", "No tokenizer in the base dir (run `picochat tok-train`).")]
    rows = [("vocabulary", fmt(tok["vocab_size"])), ("special tokens", fmt(tok["special_tokens"])),
            ("hash", f"`{tok['hash']}`")]
    if "bytes_per_token" in tok:
        rows.append((f"bytes/token (corpus '{tok['corpus']}', first {tok['val_docs']:,} val docs, "
                     f"{tok['val_bytes']:,} bytes)", f"{tok['bytes_per_token']:.3f}"))
    blocks = [("h", 2, "Tokenizer"), ("table", ["", "value"], rows)]
    if "bytes_per_token" not in tok:
        blocks.append(("p", f"bytes/token left out: corpus '{tok['corpus']}' has no validation split here."))
    return blocks


def _figures(s: StageData, base: Path) -> list[tuple[str, str]]:
    summ, meta = s.summary or {}, s.meta or {}
    rows: list[tuple[str, str]] = [("run", s.run or "(old layout)")]
    if s.checkpoint is not None:
        rows.append(("checkpoint", f"`{s.checkpoint.relative_to(base)}`"))
    mc = meta.get("model_config")
    if mc:
        rows.append(("model", f"depth {mc.get('depth')}, width {mc.get('n_embd')}, {mc.get('n_head')} heads, "
                              f"vocab {fmt(mc.get('vocab_size'))}, context {fmt(mc.get('sequence_len'))}"))
    steps = summ.get("steps", meta.get("step", s.train[-1]["step"] if s.train else None))
    rows.append(("steps", fmt(steps)))
    tokens = s.train[-1].get("tokens_seen") if s.train else None
    tps = tokens_per_step(s)
    if tokens is None and tps and steps:
        tokens = tps * steps
    rows.append(("tokens", fmt(tokens) + (f" ({fmt(tps)} per step)" if tps else "")))
    last = s.train[-1]["loss"] if s.train and "loss" in s.train[-1] else None
    ema = summ.get("final_loss")
    rows.append(("final train loss", f"{fmt(ema)} (smoothed; last step {fmt(last)})" if ema is not None else fmt(last)))
    for key in ("val_bpb", "val_loss"):
        if val := s.last_eval(key):
            step = next(r["step"] for r in reversed(s.evals) if key in r)
            rows.append((key.replace("_", " "), f"{fmt(val[1])} (step {step})"))
    tok_s = summ.get("tok_per_s")
    rows.append(("tokens/s", f"{tok_s:,.0f}" if isinstance(tok_s, (int, float)) else "-"))
    rows.append(("MFU", f"{summ['mfu'] * 100:.2f}%" if isinstance(summ.get("mfu"), (int, float)) else "-"))
    rows.append(("wall time", fmt_time(stage_wall_s(s))))
    if "world_size" in meta:
        rows.append(("ranks", fmt(meta["world_size"])))
    git = meta.get("git") or {}
    if git:
        rows.append(("git commit", f"`{str(git.get('commit'))[:12]}`" + (" (dirty)" if git.get("dirty") else "")))
    shown = {"stage", "run", "steps", "final_loss", "tok_per_s", "mfu", "tokens_per_step", "elapsed_s", "time",
             "checkpoint", "kind", "val_bpb", "val_loss"}
    rows += [(k, fmt(v)) for k, v in summ.items() if k not in shown and isinstance(v, (int, float))]
    return rows


def _result_blocks(s: StageData) -> list[Block]:
    blocks: list[Block] = []
    for suite, res in s.results.items():
        metrics = ", ".join(f"{k} {fmt(v)}" for k, v in (res.get("metrics") or {}).items())
        blocks.append(("p", f"**{suite}** (step {s.results_step}, {fmt_time(res.get('elapsed_s'))}): {metrics}"))
        tasks = {t: v for t, v in (res.get("tasks") or {}).items() if isinstance(v, dict)}
        cols = list(dict.fromkeys(k for v in tasks.values() for k, x in v.items() if isinstance(x, (int, float, str))))
        if tasks:
            blocks.append(("table", ["task", *cols], [(t, *(fmt(v.get(c)) for c in cols)) for t, v in tasks.items()]))
        for key, missing in res.items():  # core.json: "missing"; chat.json: "chatcore_missing"
            if key.endswith("missing") and isinstance(missing, list) and missing:
                blocks.append(("p", f"not evaluated ({key}): {', '.join(map(str, missing))}"))
    return blocks


def summary_blocks(stages: list[StageData], rows) -> list[Block]:
    table = [(name, *(fmt(vals[s.stage]) + (" †" if s.stage in notes else "") for s in stages))
             for name, vals, notes in rows]
    blocks: list[Block] = [("h", 2, "Summary"), ("table", ["metric", *(s.stage for s in stages)], table)]
    if any(notes for _, _, notes in rows):
        blocks.append(("p", "† the training log's last validation bpb (no `picochat eval` result for that stage)"))
    return blocks


def cost_blocks(stages: list[StageData], env: dict, started: float | None, last: float | None,
                hourly_usd: float | None) -> list[Block]:
    rows = [(s.stage, fmt_time(stage_wall_s(s)), fmt_time(eval_wall_s(s) or None)) for s in stages if s.present]
    total = sum((stage_wall_s(s) or 0.0) + eval_wall_s(s) for s in stages)
    rows.append(("total", fmt_time(total), ""))
    blocks: list[Block] = [("h", 2, "Wall time and cost"), ("table", ["stage", "training", "evaluation"], rows)]
    since = last - started if started is not None and last is not None else None
    hours = (since if since is not None else total) / 3600
    # a multi-node run has more GPUs than the machine the card is built on: count the most ranks a stage ran with
    ranks = max([int((s.meta or {}).get("world_size") or 0) for s in stages], default=0)
    gpus = max(env.get("gpus") or 0, ranks) if env.get("gpus") else 0
    rate = hourly_usd if hourly_usd is not None else gpu_price(env.get("gpu"))
    basis = (f"the wall clock from `picochat report reset` to the newest record read ({fmt_time(since)}): a rented "
             f"node is paid while it waits too" if since is not None else "the sum of the stage and evaluation times "
             "above (run `picochat report reset` at the start of a run to count the wall clock instead)")
    if not gpus:
        text = f"Estimated cost: $0 (CPU only; {basis})."
    elif rate is None:
        text = (f"Estimated cost: unknown, no built-in price for {env.get('gpu')}; pass --gpu-hourly-usd "
                f"({basis} x {gpus} GPUs).")
    else:
        text = (f"Estimated cost: ${hours * gpus * rate:,.2f} = {hours:.2f} h x {gpus} GPUs x ${rate:.2f} per "
                f"GPU-hour; the hours are {basis}.")
    return blocks + [("p", text)]


def card_blocks(stages: list[StageData], rows, env: dict, tok: dict, plots: list[tuple[str, Path]], base: Path,
                report_dir: Path, header: dict | None, hourly_usd: float | None, last: float | None) -> list[Block]:
    started = header.get("started_unix") if header else None
    intro = f"Run started {header['started']} (`picochat report reset`)." if header else \
        "No `picochat report reset` header: the environment is the one this card was built on, dated by the newest " \
        "file it read."
    blocks: list[Block] = [("h", 1, "picochat report card"), ("p", intro), *environment_blocks(env),
                           *tokenizer_blocks(tok)]
    for s in stages:
        if s.present:
            blocks += [("h", 2, f"Stage {s.stage}"), ("table", ["", "value"], _figures(s, base)), *_result_blocks(s)]
    if not any(s.present for s in stages):
        blocks.append(("p", "No stage has metrics, checkpoints or evaluation results yet (run `picochat pretrain`)."))
    blocks += summary_blocks(stages, rows)
    blocks += cost_blocks(stages, env, started, last, hourly_usd)
    if plots:
        blocks.append(("h", 2, "Plots"))
        blocks += [("img", title, path.relative_to(report_dir).as_posix()) for title, path in plots]
    return blocks


def header_blocks(header: dict) -> list[Block]:
    return [("h", 1, "picochat report card"), ("p", f"Run started {header['started']} (`picochat report reset`)."),
            *environment_blocks(header["environment"])]


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            cells = [[str(c).replace("|", "\\|") for c in row] for row in [b[1], *b[2]]]
            out.append("\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0]),
                                  *("| " + " | ".join(r) + " |" for r in cells[1:])]))
        elif b[0] == "img":
            out.append(f"![{b[1]}]({b[2]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with the two inline marks the card uses: `code` and **bold**."""
    s = html.escape(str(text))
    s = re.sub(r"`([^`]*)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", s)


def to_html(blocks: list[Block], report_dir: Path) -> str:
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif b[0] == "img":
            data = base64.b64encode((report_dir / b[2]).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(b[1])}" src="data:image/png;base64,{data}"></p>')
    style = ("body{font-family:sans-serif;max-width:1700px;margin:2em auto;padding:0 1em}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>picochat report card</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
