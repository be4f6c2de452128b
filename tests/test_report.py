"""The report card (picochat/report/): built from synthetic metrics JSONL, checkpoint meta and evaluation result files
of the four stages, in the layouts the stages write; the summary table must hold exactly the numbers in the files."""

import json
import re

import pytest

from picochat.report import build_report, main, report_dir
from picochat.report.collect import StageData, read_log
from picochat.report.render import cost_blocks

# (stage, run, steps, tokens per step, {suite: metrics}) of the synthetic pipeline
PIPELINE = [
    ("base", "d2", 12, 256, {"bpb": {"bpb": 1.2345}, "core": {"core20": 0.1375},
                             "hellaswag": {"hellaswag": 0.2875}, "copy": {"copy_acc": 0.0312}}),
    ("mid", "d2", 6, 128, {"chat": {"arc_easy": 0.3125, "mmlu": 0.2625, "chatcore": 0.0417}}),
    ("sft", "d2", 4, 128, {"chat": {"arc_easy": 0.375, "arc_challenge": 0.25, "mmlu": 0.275, "gsm8k": 0.0625,
                                    "humaneval": 0.0, "spellingbee": 0.5, "chatcore": 0.1208}}),
    ("rl", "d2", 3, 64, {"chat": {"gsm8k": 0.125, "spellingbee": 0.625}}),
]


@pytest.fixture(autouse=True)
def base(tmp_path, monkeypatch, tiny_tokenizer):
    from picochat.data.corpus import write_corpus

    base = tmp_path / "base"
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(base))
    tiny_tokenizer.save(base / "tokenizer")
    write_corpus("default", [f"document {i}: the quick brown fox jumps over the lazy dog." for i in range(20)],
                 val_docs=4)
    return base


def write_stage(base, stage, run, steps, tps, suites, time0=1000.0, extra=None):
    """A stage's run as the loop and the evaluators write it: logs/<stage>/<run>.jsonl, the last checkpoint's
    meta.json, eval/<stage>/<run>/step_<N>/<suite>.json."""
    log = base / "logs" / stage / f"{run}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    recs = []
    for s in range(1, steps + 1):
        recs.append({"time": time0 + s, "kind": "train", "step": s, "loss": 5.0 - 0.25 * s, "lr_factor": 1.0 / s,
                     "grad_norm": 0.5, "tok_per_s": 1000.0 + s, "mfu": 0.01 * s, "dt_ms": 10.0, "elapsed_s": float(s),
                     **({"reward_mean": 0.1 * s} if stage == "rl" else {})})
        if s % 4 == 0 or s == steps:
            recs.append({"time": time0 + s, "kind": "eval", "step": s, "val_bpb": 2.0 - 0.01 * s,
                         **({"pass@1": 0.05 * s} if stage == "rl" else {})})
    recs.append({"time": time0 + steps + 1, "kind": "summary", "stage": stage, "run": run, "steps": steps,
                 "final_loss": 4.5, "tok_per_s": 1100.0, "mfu": 0.05, "tokens_per_step": tps,
                 "elapsed_s": steps + 0.5})
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ck = base / "checkpoints" / stage / run / f"step_{steps:06d}"
    ck.mkdir(parents=True)
    meta = {"model_config": {"depth": 2, "n_embd": 64, "n_head": 4, "vocab_size": 320, "sequence_len": 64},
            "run_config": {"total_batch_size": tps, "corpus": "default"}, "step": steps, "world_size": 1,
            "git": {"commit": "0123456789abcdef", "dirty": False}, "saved_at": time0 + steps, "stage": stage}
    (ck / "meta.json").write_text(json.dumps(meta))
    for i, (suite, metrics) in enumerate(suites.items()):  # the evaluators name step folders step_6 or step_000006
        d = base / "eval" / stage / run / (f"step_{steps}" if i % 2 else f"step_{steps:06d}")
        d.mkdir(parents=True, exist_ok=True)
        res = {"suite": suite, "stage": stage, "run": run, "step": steps, "elapsed_s": 2.0, "metrics": metrics,
               "tasks": {k: {"accuracy": v, "n": 16} for k, v in metrics.items()}, **(extra or {})}
        (d / f"{suite}.json").write_text(json.dumps(res))


def summary_table(md: str) -> dict[str, dict[str, str]]:
    """{row label: {stage: cell}} of the card's summary table."""
    lines = md.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(header[1:], r[1:])) for r in rows}


def expected_table(pipeline) -> dict[str, dict[str, str]]:
    labels = {"bpb": "bpb", "core20": "CORE-20", "hellaswag": "HellaSwag", "copy_acc": "copying", "arc_easy": "ARC-E",
              "arc_challenge": "ARC-C", "mmlu": "MMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval",
              "spellingbee": "SpellingBee", "chatcore": "ChatCORE"}
    table = {label: {s: "-" for s in ("base", "mid", "sft", "rl")} for label in labels.values()}
    for stage, _, _, _, suites in pipeline:
        for metrics in suites.values():
            for k, v in metrics.items():
                table[labels[k]][stage] = f"{v:.4f}"
    return table


def png_size(path) -> tuple[int, int]:
    import matplotlib.image

    img = matplotlib.image.imread(path)  # raises on a file that is not a valid PNG
    return img.shape[1], img.shape[0]


def test_card_of_all_four_stages_holds_their_numbers_and_plots(base):
    for i, (stage, run, steps, tps, suites) in enumerate(PIPELINE):
        write_stage(base, stage, run, steps, tps, suites, time0=1000.0 * (i + 1))
    assert main([]) == 0
    md = (report_dir(base) / "report.md").read_text()
    assert summary_table(md) == expected_table(PIPELINE)
    assert "| CORE |" not in md  # a partial CORE is never shown as the full one
    # key figures of a stage: tokens = steps x tokens per step, the last val bpb with its step, wall time, MFU
    base_section = md.split("## Stage base", 1)[1].split("## Stage mid", 1)[0]
    for row in ("| steps | 12 |", "| tokens | 3,072 (256 per step) |", "| val bpb | 1.8800 (step 12) |",
                "| MFU | 5.00% |", "| wall time | 12.5 s |", "| checkpoint | `checkpoints/base/d2/step_000012` |"):
        assert row in base_section
    assert "| hellaswag | 0.2875 | 16 |" in base_section  # per-task table of the result file
    assert "| total | 41.0 s |" in md  # 12.5 + 6.5 + 4.5 + 3.5 of training + 7 results x 2 s
    # every plot is linked, exists and is a valid PNG of the expected size (one 400 x 300 panel per stage that logged
    # the metric; the summary bars 4 panels wide)
    links = re.findall(r"!\[[^]]*\]\(plots/([a-z_0-9]+)\.png\)", md)
    panels = {"train_loss_steps": 4, "train_loss_tokens": 4, "val": 4, "lr": 4, "tok_per_s": 4, "mfu": 4,
              "reward": 1, "pass1": 1, "evals": 4}
    assert sorted(links) == sorted(panels)
    for name in links:
        path = report_dir(base) / "plots" / f"{name}.png"
        assert path.stat().st_size > 5000 and png_size(path) == (400 * panels[name], 300)
    html = (report_dir(base) / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(links) and "<td>0.1375</td>" in html


def test_missing_stages_are_dashes_and_a_stage_without_logs_comes_from_its_meta(base):
    write_stage(base, "base", "d2", 8, 256, {})
    sft_log = base / "logs" / "sft" / "d2.jsonl"
    write_stage(base, "sft", "d2", 5, 128, {"chat": {"mmlu": 0.3, "chatcore4": 0.05}},
                extra={"chatcore_name": "ChatCORE-4 (no GSM8K, HumanEval)", "chatcore_missing": ["gsm8k", "humaneval"]})
    sft_log.unlink()  # a stage with a checkpoint and results but no metrics file
    md = (build_report(base)).read_text()
    table = summary_table(md)
    assert table["bpb"] == {"base": "1.9200 †", "mid": "-", "sft": "-", "rl": "-"}  # from the log's last val_bpb
    assert table["MMLU"] == {"base": "-", "mid": "-", "sft": "0.3000", "rl": "-"}
    assert table["CORE"] == {s: "-" for s in ("base", "mid", "sft", "rl")}
    # a partial ChatCORE takes the name its result file gives it, and the full name is not shown
    assert table["ChatCORE-4 (no GSM8K, HumanEval)"] == {"base": "-", "mid": "-", "sft": "0.0500", "rl": "-"}
    assert "ChatCORE" not in table and "not evaluated (chatcore_missing): gsm8k, humaneval" in md
    assert "## Stage mid" not in md and "## Stage rl" not in md
    sft = md.split("## Stage sft", 1)[1].split("\n## ", 1)[0]
    assert "| steps | 5 |" in sft and "| tokens | 640 (128 per step) |" in sft and "| final train loss | - |" in sft
    assert not (report_dir(base) / "plots" / "reward.png").exists()  # no stage logged a reward


def test_build_is_idempotent_and_reset_moves_the_old_card(base):
    write_stage(base, "base", "d2", 8, 256, {"bpb": {"bpb": 1.5}})
    first = build_report(base).read_text()
    png = (report_dir(base) / "plots" / "val.png").read_bytes()
    assert build_report(base).read_text() == first and (report_dir(base) / "plots" / "val.png").read_bytes() == png
    assert main(["reset"]) == 0
    old = [p for p in report_dir(base).iterdir() if p.name.startswith("old-")]
    assert len(old) == 1 and (old[0] / "report.md").read_text() == first and (old[0] / "plots" / "val.png").exists()
    fresh = (report_dir(base) / "report.md").read_text()
    assert "Run started" in fresh and "## Environment" in fresh and "## Summary" not in fresh
    assert not (report_dir(base) / "plots").exists()
    header = json.loads((report_dir(base) / "header.json").read_text())
    rebuilt = build_report(base).read_text()
    assert f"Run started {header['started']}" in rebuilt and "wall clock from `picochat report reset`" in rebuilt
    assert main(["reset"]) == 0  # a second reset keeps the first old card and moves the new one beside it
    assert len([p for p in report_dir(base).iterdir() if p.name.startswith("old-")]) == 2


def test_resumed_and_shared_logs_keep_one_record_per_step(tmp_path, capsys):
    recs = [{"kind": "train", "step": s, "loss": float(s)} for s in range(1, 6)] + [{"kind": "eval", "step": 5}]
    # resumed from the step-3 checkpoint: steps 4 and 5 run again, and the eval after 5 came from the lost future
    recs += [{"kind": "train", "step": s, "loss": 10.0 + s} for s in (4, 5, 6)]
    recs += [{"kind": "summary", "run": "a", "steps": 6}]
    recs += [{"kind": "train", "step": 1, "loss": 99.0}, {"kind": "summary", "run": "b", "steps": 1}]
    path = tmp_path / "base.jsonl"  # the old layout: every run of a stage appended to one file
    lines = [json.dumps(r) for r in recs]
    lines[4] = lines[4][:20]  # step 5's record cut off by a kill; the resumed run appended after it
    path.write_text("\n".join(lines) + "\n")
    train, evals, summary = read_log(path, "a")
    assert "skipped 1 unreadable line(s) (5)" in capsys.readouterr().err
    assert [(r["step"], r["loss"]) for r in train] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    assert evals == [] and summary["steps"] == 6
    train, _, summary = read_log(path, "b")
    assert [r["loss"] for r in train] == [99.0] and summary["run"] == "b"
    # run b started again (--overwrite) and still running: its old summary no longer describes it; an untagged
    # segment of a file that names two runs belongs to neither
    with path.open("a") as f:
        f.write(json.dumps({"kind": "train", "run": "b", "step": 1, "loss": 98.0}) + "\n")
        f.write(json.dumps({"kind": "summary", "run": "b", "steps": 1}) + "\n")
        f.write(json.dumps({"kind": "train", "step": 1, "loss": 97.0}) + "\n")
    train, _, summary = read_log(path, "b")
    assert [r["loss"] for r in train] == [98.0] and summary["steps"] == 1
    assert [r["loss"] for r in read_log(path, "a")[0]][-1] == 16.0


def test_cost_is_wall_clock_times_gpus_times_price_and_bad_run_is_one_line(base, capsys):
    env = {"gpus": 8, "gpu": "NVIDIA H100 80GB HBM3"}
    text = cost_blocks([], env, started=0.0, last=5400.0, hourly_usd=None)[-1][1]
    assert text.startswith("Estimated cost: $35.88 = 1.50 h x 8 GPUs x $2.99 per GPU-hour")
    text = cost_blocks([], {"gpus": 2, "gpu": "Some GPU"}, started=0.0, last=3600.0, hourly_usd=None)[-1][1]
    assert "unknown" in text and "--gpu-hourly-usd" in text
    assert "$4.00 = 1.00 h x 2 GPUs x $2.00" in cost_blocks([], {"gpus": 2, "gpu": "Some GPU"}, 0.0, 3600.0, 2.0)[-1][1]
    two_nodes = StageData("base", "d20", meta={"world_size": 16})  # the card is built on one of two 8-GPU nodes
    assert "$32.00 = 1.00 h x 16 GPUs" in cost_blocks([two_nodes], {"gpus": 8, "gpu": "X"}, 0.0, 3600.0, 2.0)[-1][1]
    assert cost_blocks([two_nodes], {"gpus": 0}, 0.0, 3600.0, 2.0)[-1][1].startswith("Estimated cost: $0 (CPU only")
    write_stage(base, "base", "d2", 4, 256, {})
    assert main(["--run", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run 'nope'" in err[0] and "d2" in err[0]
