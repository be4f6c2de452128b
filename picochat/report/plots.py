"""The report card's PNG plots, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

One function, `metric_panels`, draws any per-step metric: one panel per stage that logged it, because the stages'
step counts differ by orders of magnitude (a shared axis would squeeze mid and sft into its first pixels).
`PLOTS` lists which metrics are drawn; `summary_bars` draws the evaluation summary per stage.
"""

from __future__ import annotations

from fnmatch import fnmatchcase as fnmatch
from pathlib import Path

# (file stem, title, record kind, y keys (the first one a stage has; fnmatch patterns), x key, y label)
PLOTS = [
    ("train_loss_steps", "train loss vs steps", "train", ("loss",), "step", "loss (nats/token)"),
    ("train_loss_tokens", "train loss vs tokens", "train", ("loss",), "tokens_seen", "loss (nats/token)"),
    ("val", "validation vs steps", "eval", ("val_bpb", "val_loss"), "step", "val bpb / loss"),
    ("lr", "learning-rate factor", "train", ("lr_factor",), "step", "x initial LR"),
    ("tok_per_s", "training throughput", "train", ("tok_per_s",), "step", "tokens/s"),
    ("mfu", "model FLOPs utilisation", "train", ("mfu",), "step", "MFU"),
    ("reward", "RL reward", "train", ("reward_mean",), "step", "mean reward"),
    ("pass1", "held-out pass@1 during RL", "eval", ("pass@1",), "step", "pass@1"),
    ("train_acc", "quick accuracy during training", "eval", ("*_acc",), "step", "accuracy"),
]

PANEL_IN = (4.0, 3.0)  # inches per panel; at 100 dpi a 4-stage figure is 1600 x 300 px
DPI = 100


def _figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_IN[0] * n_panels, PANEL_IN[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def metric_panels(series: dict[str, tuple[list[float], list[float], str]], title: str, xlabel: str, ylabel: str,
                  path: Path) -> Path:
    """series: {panel title (stage/run): (xs, ys, y key)}; one line per panel, saved as a PNG at `path`."""
    fig = _figure(len(series))
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (name, (xs, ys, key)) in zip(axes, series.items()):
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, linewidth=1.2)
        ax.set_title(f"{name}" + (f" ({key})" if key not in ylabel.split() else ""), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.savefig(path)
    return path


def stage_series(stages, kind: str, ykeys: tuple[str, ...], xkey: str) -> dict[str, tuple[list, list, str]]:
    """{"stage/run": (xs, ys, key)} for the stages whose records of `kind` have x and one of `ykeys`."""
    out = {}
    for s in stages:
        records = s.train if kind == "train" else s.evals
        present = list(dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, (int, float))))
        key = next((k for pattern in ykeys for k in present if fnmatch(k, pattern)), None)
        if key is None:
            continue
        pts = [(r[xkey], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r.get(xkey) is not None]
        if pts:
            out[f"{s.stage}/{s.run}" if s.run else s.stage] = ([x for x, _ in pts], [y for _, y in pts], key)
    return out


def summary_bars(rows: list[tuple[str, dict[str, float | None]]], path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per stage that has it (scores in [0, 1]; bpb is plotted in val)."""
    fig = _figure(max(1, min(4, len(rows) // 2)))
    ax = fig.subplots()
    stages = [s for s in {s: None for _, vals in rows for s, v in vals.items() if v is not None}]
    width = 0.8 / max(len(stages), 1)
    for i, stage in enumerate(stages):
        xs = [j + i * width for j, (_, vals) in enumerate(rows) if vals.get(stage) is not None]
        ys = [vals[stage] for _, vals in rows if vals.get(stage) is not None]
        ax.bar(xs, ys, width=width, label=stage)
    ax.set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(rows))], [name for name, _ in rows])
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("evaluation per stage")
    fig.savefig(path)
    return path


def draw_all(stages, rows, out_dir: Path) -> list[tuple[str, Path]]:
    """Every plot that has data, as (title, path); files of plots without data are removed (a rebuilt card must not
    link to a stale picture)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for stem, title, kind, ykeys, xkey, ylabel in PLOTS:
        path = out_dir / f"{stem}.png"
        series = stage_series(stages, kind, ykeys, xkey)
        if series:
            xlabel = "tokens" if xkey == "tokens_seen" else "step"
            made.append((title, metric_panels(series, title, xlabel, ylabel, path)))
        else:
            path.unlink(missing_ok=True)
    bars = [(name, vals) for name, vals, _ in rows if name != "bpb" and any(v is not None for v in vals.values())]
    path = out_dir / "evals.png"
    if bars:
        made.append(("evaluation per stage", summary_bars(bars, path)))
    else:
        path.unlink(missing_ok=True)
    return made
