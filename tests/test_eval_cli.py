"""`picochat eval base` end to end on a tiny checkpoint: the result files where the report reads them, the summary
table, one-line errors, and two gloo ranks (torchrun's layout) giving the single process's numbers.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_eval_cli.py
"""

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT, make_tiny_model, randomize_outputs, spawn_gloo
from picochat.checkpoint import build_meta, run_dir, save_checkpoint
from picochat.data.corpus import write_corpus
from picochat.evals import run

FIXTURES = Path(__file__).parent / "fixtures" / "core"
ARGS = ["base", "--run", "t", "--tasks", "core,hellaswag,bpb", "--core-bundle", str(FIXTURES / "bundle"),
        "--hellaswag-data", str(FIXTURES / "hellaswag"), "--device", "cpu"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    base = tmp_path_factory.mktemp("eval_base")
    old = os.environ.get("PICOCHAT_BASE_DIR")
    os.environ["PICOCHAT_BASE_DIR"] = str(base)
    try:
        tiny_tokenizer.save(base / "tokenizer")
        words = TINY_TEXT.split()
        docs = [" ".join(words[i:i + 9 + i % 13]) for i in range(0, 600, 7)]
        write_corpus("default", docs, rows_per_group=4, val_docs=24)
        model = randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, depth=1, n_embd=32, sequence_len=64))
        rc = {"device_batch_size": 2, "eval_tokens": 4000, "corpus": "default"}
        meta = build_meta(model.config, rc, tiny_tokenizer.hash(), step=3, world_size=1)
        save_checkpoint(run_dir("base", "t", base), 3, model.state_dict(), None, meta)
    finally:
        if old is None:
            os.environ.pop("PICOCHAT_BASE_DIR")
        else:
            os.environ["PICOCHAT_BASE_DIR"] = old
    return base


def read_results(base: Path) -> dict:
    d = base / "eval" / "base" / "t" / "step_3"
    return {p.name: json.loads(p.read_text()) if p.suffix == ".json" else
            [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(d.iterdir())}


def test_eval_base_writes_results_and_a_summary(base_dir, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(base_dir))
    assert run.main(ARGS) == 0
    out = capsys.readouterr().out
    files = read_results(base_dir)
    assert sorted(files) == ["bpb.json", "core-fixture_lm.jsonl", "core-fixture_mc.jsonl", "core-fixture_schema.jsonl",
                             "core.json", "hellaswag-hellaswag.jsonl", "hellaswag.json"]
    core = files["core.json"]
    assert (core["suite"], core["stage"], core["run"], core["step"]) == ("core", "base", "t", 3)
    assert [core["tasks"][t]["n"] for t in ("fixture_mc", "fixture_schema", "fixture_lm")] == [5, 4, 4]
    acc = sum(r["correct"] for r in files["core-fixture_mc.jsonl"]) / 5
    assert core["tasks"]["fixture_mc"]["accuracy"] == acc
    assert core["metrics"]["core_subset"] == pytest.approx(sum(t["centered"] for t in core["tasks"].values()) / 3)
    bpb = files["bpb.json"]["metrics"]["bpb"]
    assert 0 < bpb < 20 and math.isfinite(bpb)
    assert files["hellaswag.json"]["tasks"]["hellaswag"]["n"] == 3
    # the summary table: one row per suite metric, with its time
    table = out[out.index("suite      metric"):].splitlines()
    assert [line.split()[:2] for line in table[1:]] == [["core", "core_subset"], ["hellaswag", "hellaswag"],
                                                        ["bpb", "bpb"]]
    assert all(line.endswith(" s") for line in table[1:])


def test_eval_errors_are_one_line(base_dir, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(base_dir))
    assert run.main(["base", "--tasks", "core,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "core, hellaswag, bpb" in err
    assert run.main(["sideways"]) == 2
    assert "picochat eval base" in capsys.readouterr().err
    assert run.main(["base", "--run", "t", "--tasks", "core", "--core-bundle", str(base_dir)]) == 2
    assert "no core.yaml" in capsys.readouterr().err


def _worker(rank, world, port, base):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PICOCHAT_BASE_DIR=str(base))
    torch.set_num_threads(1)
    if run.main(ARGS) != 0:
        raise SystemExit(f"rank {rank} failed")


def test_two_ranks_give_the_single_process_numbers(base_dir, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(base_dir))
    assert run.main(ARGS) == 0
    one = read_results(base_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_gloo(_worker, (2, port, base_dir), 2)
    two = read_results(base_dir)
    assert two["core.json"]["world_size"] == 2
    for suite in ("core.json", "hellaswag.json"):
        assert two[suite]["metrics"] == one[suite]["metrics"]
        assert {t: v["accuracy"] for t, v in two[suite]["tasks"].items()} == \
               {t: v["accuracy"] for t, v in one[suite]["tasks"].items()}
    assert two["bpb.json"]["metrics"]["bpb"] == pytest.approx(one["bpb.json"]["metrics"]["bpb"], rel=1e-9)
    for name in one:
        if name.endswith(".jsonl"):  # the same problems, in the same order, with the same outcome
            assert [(r["index"], r.get("correct", r.get("pred_norm"))) for r in two[name]] == \
                   [(r["index"], r.get("correct", r.get("pred_norm"))) for r in one[name]]


class CopyingModel(torch.nn.Module):
    """A perfect copier of a sequence that repeats with period L: from position L on it predicts the token L - 1
    back (what comes next the previous time around), before it nothing in particular."""

    def __init__(self, vocab_size: int, sequence_len: int, period: int):
        super().__init__()
        self.config = type("Config", (), {"sequence_len": sequence_len})()
        self.vocab_size, self.period = vocab_size, period

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for t in range(self.period, T):
            logits[torch.arange(B), t, idx[:, t - self.period + 1]] = 30.0
        return logits


def test_copy_suite_tells_a_copier_from_a_model_that_does_not_copy(base_dir, monkeypatch, capsys, tiny_tokenizer):
    from picochat.evals.copy import copy_sequences, evaluate_copy

    V = tiny_tokenizer.vocab_size
    oracle = evaluate_copy(CopyingModel(V, 129, period=64), tiny_tokenizer, "cpu", n=8)
    task = oracle["tasks"]["copy"]
    assert oracle["metrics"]["copy_acc"] == 1.0 and task["length"] == 64 and task["second_nats"] < 1e-6
    assert task["first_nats"] == pytest.approx(math.log(V))  # uniform before the sequence repeats
    assert oracle["metrics"]["copy_gain"] == pytest.approx(task["first_nats"] - task["second_nats"])
    seqs = copy_sequences(V, 9, 4, 10)
    assert seqs.max() < V - 9 and torch.equal(seqs, copy_sequences(V, 9, 4, 10))  # ordinary ids, seeded
    # the tiny random checkpoint through the CLI: no copying, a result file the report reads, a summary row
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(base_dir))
    assert run.main(["base", "--run", "t", "--tasks", "copy", "--device", "cpu"]) == 0
    result = read_results(base_dir)["copy.json"]
    assert result["tasks"]["copy"]["length"] == 31  # (context 64 - BOS) // 2
    assert result["metrics"]["copy_acc"] < 0.2 and abs(result["metrics"]["copy_gain"]) < 0.5
    assert "copy       copy_acc" in capsys.readouterr().out
