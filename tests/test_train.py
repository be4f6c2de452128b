"""Pretraining end to end on a tiny corpus: loss goes down, resume is exact, a SIGKILLed run resumes, two
processes (gloo) equal one process on the same global batch, with and without --fsdp, and an --fsdp checkpoint
resumes exactly and loads for inference; the step's loss is the mean over all its targets with unequal masked counts;
runs own their checkpoint folders; the last step is saved once; an error on one of two ranks ends both."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import spawn_gloo
from picochat.common import read_jsonl

WORDS = ("the king queen lord spake unto them and said behold thou art my servant whom I have chosen "
         "to be or not that is question whether nobler in mind suffer slings arrows outrageous fortune").split()

TINY = ["--depth", "2", "--n-embd", "64", "--head-dim", "16", "--max-seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "512", "--eval-tokens", "512", "--warmup-steps", "2", "--device", "cpu",
        "--dtype", "fp32"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A private base dir with a tiny corpus and tokenizer (module-scoped: built once)."""
    d = tmp_path_factory.mktemp("base")
    old = os.environ.get("PICOCHAT_BASE_DIR")
    os.environ["PICOCHAT_BASE_DIR"] = str(d)
    from picochat.data.corpus import write_corpus
    from picochat.tokenizer import Tokenizer

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(400)]
    write_corpus("default", docs)
    Tokenizer.train(docs, vocab_size=300).save(d / "tokenizer")
    yield d
    if old is None:
        os.environ.pop("PICOCHAT_BASE_DIR", None)
    else:
        os.environ["PICOCHAT_BASE_DIR"] = old


def pretrain(argv, metrics):
    from picochat.train import pretrain as pt

    return pt.run(TINY + ["--metrics", str(metrics)] + argv)


def train_losses(path):
    return [r["loss"] for r in read_jsonl(path) if r["kind"] == "train"]


def _fresh(base) -> Path:
    """No checkpoints of any run under base/checkpoints/base; returns the default run's folder (tag d<depth>)."""
    import shutil

    shutil.rmtree(base / "checkpoints" / "base", ignore_errors=True)
    return base / "checkpoints" / "base" / "d2"


def test_max_epochs_ends_the_run_after_that_share_of_the_data(base, tmp_path):
    """--max-epochs 0.5 of ~400 docs: the run stops (with its warmdown) once half the documents were read, well
    before --num-steps, and the LR reaches its final value on the last step."""
    _fresh(base)
    summary = pretrain(["--num-steps", "1000", "--max-epochs", "0.5", "--eval-every", "0", "--save-every", "0",
                        "--warmdown-ratio", "0.5"], tmp_path / "m.jsonl")
    recs = [r for r in read_jsonl(tmp_path / "m.jsonl") if r["kind"] == "train"]
    # ~400 docs of ~70 words ≈ 60 tokens per 100 chars; half of them is a few dozen 512-token steps
    assert 5 < summary["steps"] < 200
    assert recs[-1]["lr_factor"] < 0.2 < recs[len(recs) // 4]["lr_factor"]  # warmdown happened by data progress
    _fresh(base)


def test_pretrain_learns_and_resume_is_exact(base, tmp_path):
    import shutil

    ck = _fresh(base)
    full = pretrain(["--num-steps", "12", "--eval-every", "6"], tmp_path / "full.jsonl")
    losses = train_losses(tmp_path / "full.jsonl")
    evals = [r["val_bpb"] for r in read_jsonl(tmp_path / "full.jsonl") if r["kind"] == "eval"]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert full["steps"] == 12 and abs(full["val_bpb"] - evals[-1]) < 1e-12

    shutil.rmtree(ck)
    pretrain(["--num-steps", "12", "--eval-every", "0", "--stop-at", "6"], tmp_path / "a.jsonl")
    assert sorted(p.name for p in ck.iterdir()) == ["step_000006"]
    pretrain(["--num-steps", "12", "--eval-every", "0", "--resume"], tmp_path / "b.jsonl")
    resumed = train_losses(tmp_path / "a.jsonl") + train_losses(tmp_path / "b.jsonl")
    assert resumed == pytest.approx(losses, abs=1e-6, rel=0)
    meta = json.loads((ck / "step_000012" / "meta.json").read_text())
    assert meta["step"] == 12 and meta["model_config"]["depth"] == 2 and meta["world_size"] == 1
    assert "commit" in meta["git"] and meta["tokenizer_hash"]


def test_resume_refuses_other_model_shape(base, tmp_path):
    from picochat.common import UserError

    _fresh(base)
    pretrain(["--num-steps", "2", "--eval-every", "0"], tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="different model config"):
        pretrain(["--num-steps", "4", "--resume", "--run", "d2", "--depth", "3"], tmp_path / "y.jsonl")
    # without --run the depth-3 run is another run (d3), which has nothing to resume; the message names d2
    with pytest.raises(UserError, match=r"--resume: no checkpoint in .*d3; runs of this stage: d2 \(pick one"):
        pretrain(["--num-steps", "4", "--resume", "--depth", "3"], tmp_path / "y.jsonl")


def _cli(base, *args):
    env = {**os.environ, "PICOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "picochat", "pretrain", *TINY, *args], env


def test_sigkill_during_training_resumes_from_last_checkpoint(base, tmp_path):
    ck = _fresh(base)
    cmd, env = _cli(base, "--num-steps", "400", "--save-every", "3", "--eval-every", "0",
                    "--metrics", str(tmp_path / "k.jsonl"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (ck / "step_000006").exists():
            time.sleep(0.05)
        assert (ck / "step_000006").exists(), "run did not reach step 6"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # a kill during a later save leaves at most a .tmp_ folder, never a partial step_ folder
    steps = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
    assert all((ck / s / "meta.json").exists() for s in steps)
    last = int(steps[-1].split("_")[1])
    (ck / f".tmp_step_{last + 3:06d}").mkdir(exist_ok=True)  # what a SIGKILL mid-save leaves behind
    (ck / f".tmp_step_{last + 3:06d}" / "model.pt").write_bytes(b"half")
    cmd, env = _cli(base, "--num-steps", "400", "--save-every", "3", "--eval-every", "0", "--resume",
                    "--stop-at", str(last + 3), "--metrics", str(tmp_path / "r.jsonl"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"(step {last})" in out.stdout
    recs = [r for r in read_jsonl(tmp_path / "r.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in recs] == list(range(last + 1, last + 4))
    assert not (ck / f".tmp_step_{last + 3:06d}").exists()


def _ddp_worker(rank, world, port, base, out, global_batches, fsdp=False, state_out=None, ignore=None,
                grads_out=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PICOCHAT_BASE_DIR=str(base))
    torch.set_num_threads(1)
    _run_synthetic(rank, world, out, global_batches, fsdp, state_out, ignore, grads_out)


def _run_synthetic(rank, world, out, global_batches, fsdp=False, state_out=None, ignore=None, grads_out=None):
    """The real loop and optimizer on a fixed global batch sequence; each rank takes its share of every batch.
    state_out: where rank 0 saves the final model state dict, gathered as a checkpoint gathers it.
    ignore: (8, 32) bool, targets masked out (-1) in every global batch, or a list of one such mask per global batch
    (None entries: no mask). grads_out: where each rank saves the
    gradients the loop hands to the optimizer's first step (suffix .rank<r>)."""
    from picochat.checkpoint import model_state_for_save
    from picochat.common import setup_runtime, teardown_runtime
    from picochat.config import PretrainConfig
    from picochat.train.loop import Prepared, Stage, make_optimizer, shard_model, sync_params, train
    from picochat.train.pretrain import model_config_for
    from picochat.model import GPT

    rt = setup_runtime("cpu", "fp32", 0)
    cfg = PretrainConfig(depth=2, n_embd=64, head_dim=16, max_seq_len=32, device_batch_size=2,
                         total_batch_size=2 * 2 * 32 * 2, num_steps=len(global_batches), warmup_steps=2,
                         eval_every=0, metrics=str(out), device="cpu", dtype="fp32", fsdp=fsdp,
                         weight_decay=0.1)  # decay on: the FSDP path must apply it exactly as the others do
    model = GPT(model_config_for(cfg, 128))
    model.init_weights(0)
    sync_params(model)
    assert shard_model(model, cfg, rt) == (fsdp and world > 1)
    opt = make_optimizer(model, cfg, rt)
    accum = 2 * 2 // world  # 4 rows of the global batch per step = accum micro-batches x world ranks x 2 rows... / 2
    micro = []
    masks = ignore if isinstance(ignore, list) else [ignore] * len(global_batches)
    for gb, mask in zip(global_batches, masks):  # gb (8, 33): rows split as micro-batches of 2 rows, rank-major
        y = gb[:, 1:].masked_fill(mask, -1) if mask is not None else gb[:, 1:]
        for m in range(accum):
            lo = (rank * accum + m) * 2
            micro.append((gb[lo : lo + 2, :-1], y[lo : lo + 2]))
    it = iter(micro)

    def next_batch():
        return next(it)

    if grads_out is not None:  # the real step still runs: this only copies what it is given
        real_step = opt.step

        def recording_step(*a, **k):
            if not Path(f"{grads_out}.rank{rank}").exists():
                torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, f"{grads_out}.rank{rank}")
            return real_step(*a, **k)

        opt.step = recording_step

    stage = Stage(name="base", cfg=cfg, next_batch=next_batch, num_steps=len(global_batches), grad_accum=accum,
                  checkpoints=False)
    train(stage, Prepared(model, opt, None), rt)
    state = model_state_for_save(model, rank == 0)  # every rank joins: under FSDP this gathers the shards
    if state_out is not None and rank == 0:
        torch.save(state, state_out)
    teardown_runtime()


def test_two_processes_equal_one(tmp_path):
    import socket


    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (8, 33), generator=g) for _ in range(2)] * 10  # learnable: repeats
    single = tmp_path / "single.jsonl"
    _run_synthetic(0, 1, single, batches)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = tmp_path / "ddp.jsonl"
    spawn_gloo(_ddp_worker, (2, port, tmp_path, ddp, batches), 2)
    a, b = train_losses(single), train_losses(ddp)
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert a[-1] < a[0]


def test_loss_is_the_mean_over_every_target_of_the_step(tmp_path):
    """Masked targets with very unequal counts per micro-batch (36, 23, 3 and 30) and per rank (59 and 33): the
    gradient the loop hands the optimizer, on 1 process and averaged over 2 gloo ranks, and the logged loss equal
    those of the mean over all 92 targets of the step computed in one piece, and the data is such that averaging
    per-micro-batch means (or per-rank means) would give a gradient far from it."""
    import torch.nn.functional as F

    from picochat.model import GPT
    from picochat.train.pretrain import model_config_for
    from picochat.config import PretrainConfig

    g = torch.Generator().manual_seed(1)
    gb = torch.randint(0, 128, (8, 33), generator=g)
    cut = torch.tensor([0, 28, 31, 10, 30, 31, 5, 29])  # row i supervises its targets from position cut[i] on
    ignore = torch.arange(32)[None, :] < cut[:, None]  # (8, 32)
    counts = (~ignore).sum(1)
    assert [int(c) for c in counts.view(4, 2).sum(1)] == [36, 23, 3, 30]
    _run_synthetic(0, 1, tmp_path / "one.jsonl", [gb], ignore=ignore, grads_out=tmp_path / "one")
    spawn_gloo(_ddp_worker, (2, _free_port(), tmp_path, tmp_path / "two.jsonl", [gb], False, None, ignore,
                             tmp_path / "two"), 2)

    model = GPT(model_config_for(PretrainConfig(depth=2, n_embd=64, head_dim=16, max_seq_len=32), 128))
    model.init_weights(0)

    def grads_of(rows_groups):
        """Average over groups of the mean loss within each group: one group of all rows = the step's true mean."""
        model.zero_grad(set_to_none=True)
        losses = []
        for rows in rows_groups:
            y = gb[rows, 1:].masked_fill(ignore[rows], -1)
            logits = model(gb[rows, :-1]).float()  # (R, 32, V)
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1))
        loss = sum(losses) / len(losses)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want = grads_of([list(range(8))])
    one = torch.load(tmp_path / "one.rank0", weights_only=True)
    two = [torch.load(tmp_path / f"two.rank{r}", weights_only=True) for r in range(2)]
    assert set(one) == set(want) and len(want) > 0
    for n in want:
        tol = 1e-5 * float(want[n].abs().max()) + 1e-9
        assert float((one[n] - want[n]).abs().max()) <= tol, n
        assert float(((two[0][n] + two[1][n]) / 2 - want[n]).abs().max()) <= tol, n
    for path in ("one.jsonl", "two.jsonl"):
        assert train_losses(tmp_path / path)[0] == pytest.approx(want_loss, rel=1e-5)

    def rel_dist(a, b):
        flat = lambda d: torch.cat([d[n].flatten() for n in b])  # noqa: E731
        return float((flat(a) - flat(b)).norm() / flat(b).norm())

    _, per_micro = grads_of([[0, 1], [2, 3], [4, 5], [6, 7]])
    _, per_rank = grads_of([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert rel_dist(per_micro, want) > 0.1 and rel_dist(per_rank, want) > 0.05  # the test can tell them apart


def _assert_close_weights(got: dict, want: dict) -> None:
    """Same keys in the same order, plain full tensors, equal to fp32 round-off relative to each tensor's scale: the
    embedding (entries up to ~5, AdamW at lr ~0.7 here) ends ~2e-5 apart between 1 and 2 processes on the default
    path too, because averaging over ranks sums in another order."""
    assert list(got) == list(want)
    for k in want:
        assert type(got[k]) is torch.Tensor and got[k].shape == want[k].shape, k  # full tensors, not DTensors
        tol = 1e-5 * max(1.0, float(want[k].abs().max()))
        assert float((got[k] - want[k]).abs().max()) <= tol, k


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_two_processes_equal_one(tmp_path):
    """--fsdp (FSDP2 on gloo) with 2 processes gives the per-step losses and the final weights of 1 process."""

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (8, 33), generator=g) for _ in range(2)] * 8  # learnable: repeats
    _run_synthetic(0, 1, tmp_path / "single.jsonl", batches, fsdp=True, state_out=tmp_path / "single.pt")  # warns
    spawn_gloo(_ddp_worker, (2, _free_port(), tmp_path, tmp_path / "fsdp.jsonl", batches, True, tmp_path / "fsdp.pt"),
               2)
    a, b = train_losses(tmp_path / "single.jsonl"), train_losses(tmp_path / "fsdp.jsonl")
    assert len(a) == len(b) == 16
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert a[-1] < a[0] - 0.5  # it learned, so the comparison covers real updates
    norms = [[r["grad_norm"] for r in read_jsonl(p) if r["kind"] == "train"] for p in (tmp_path / "single.jsonl",
                                                                                      tmp_path / "fsdp.jsonl")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    single, sharded = (torch.load(tmp_path / n, weights_only=True) for n in ("single.pt", "fsdp.pt"))
    _assert_close_weights(sharded, single)  # the gathered state dict is the plain model's


def _pretrain_worker(rank, world, runs):
    """Runs several `picochat pretrain` invocations in turn as one rank of a torchrun-like job."""
    from picochat.train import pretrain as pt

    torch.set_num_threads(1)
    for port, base_dir, argv in runs:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), PICOCHAT_BASE_DIR=str(base_dir))
        pt.run(TINY + argv)


def test_fsdp_checkpoint_resumes_exactly_and_loads_for_inference(base, tmp_path):
    """Real pretraining on 2 processes with --fsdp: stop at step 4 and resume equals an uninterrupted run; both equal
    the default (unsharded) 2-process path; the checkpoint is a plain full state dict that `load_model` reads."""

    from picochat.checkpoint import load_model

    dirs = {}
    for name in ("resumed", "straight", "plain"):  # one base dir per run: each has its own checkpoints/base
        d = dirs[name] = tmp_path / name
        d.mkdir()
        for sub in ("corpus", "tokenizer"):
            (d / sub).symlink_to(base / sub)
    m = {name: tmp_path / f"{name}.jsonl" for name in ("a", "b", "straight", "plain")}
    steps = ["--num-steps", "8", "--eval-every", "0"]
    runs = [(_free_port(), dirs["resumed"], steps + ["--fsdp", "--stop-at", "4", "--metrics", str(m["a"])]),
            (_free_port(), dirs["resumed"], steps + ["--fsdp", "--resume", "--metrics", str(m["b"])]),
            (_free_port(), dirs["straight"], steps + ["--fsdp", "--metrics", str(m["straight"])]),
            (_free_port(), dirs["plain"], steps + ["--metrics", str(m["plain"])])]
    spawn_gloo(_pretrain_worker, (2, runs), 2)

    straight = train_losses(m["straight"])
    assert len(straight) == 8 and straight[-1] < straight[0] - 0.5
    assert train_losses(m["a"]) + train_losses(m["b"]) == pytest.approx(straight, abs=1e-6, rel=0)
    assert train_losses(m["plain"]) == pytest.approx(straight, abs=1e-5, rel=0)

    ck = dirs["resumed"] / "checkpoints" / "base" / "d2"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000004", "step_000008"]
    assert sorted(p.name for p in (ck / "step_000008").iterdir()) == [
        "loader_rank0.json", "loader_rank1.json", "meta.json", "model.pt", "optim_rank0.pt", "optim_rank1.pt"]
    meta = json.loads((ck / "step_000008" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["run_config"]["fsdp"] is True
    model, _, _ = load_model("base", base_dir=dirs["resumed"])  # the unchanged inference loader
    plain, straight_sd = (torch.load(dirs[n] / "checkpoints" / "base" / "d2" / "step_000008" / "model.pt",
                                     weights_only=True) for n in ("plain", "straight"))
    got = model.state_dict()
    assert list(got) == list(straight_sd)
    assert all(torch.equal(got[k], straight_sd[k]) for k in got)  # resumed == uninterrupted, bit for bit
    _assert_close_weights(got, plain)  # FSDP == the default path


# -- run identity, saving once, errors on one rank (issue 12 items 4, 5, 11) ------------------------------------------


def test_fresh_run_never_loses_its_checkpoint_to_an_older_run(base, tmp_path):
    """Issue 12 item 4: an older run saved steps 4 and 6; a fresh 3-step run into the same folder used to save step 3
    and delete it at once (keep-last-2 of [3, 4, 6]), and load_model served the old step 6. Now the fresh run is
    refused with one line, --overwrite replaces the old steps, and another --run keeps its own folder."""
    from picochat.checkpoint import list_steps, load_model
    from picochat.common import UserError

    d2 = _fresh(base)
    pretrain(["--num-steps", "6", "--save-every", "2", "--eval-every", "0"], tmp_path / "old.jsonl")
    assert list_steps(d2) == [4, 6]
    with pytest.raises(UserError, match=r"d2 already holds checkpoints \(steps 4, 6\).*--resume.*--overwrite"):
        pretrain(["--num-steps", "3", "--eval-every", "0", "--seed", "1"], tmp_path / "new.jsonl")
    pretrain(["--num-steps", "3", "--eval-every", "0", "--seed", "1", "--overwrite"], tmp_path / "new.jsonl")
    assert list_steps(d2) == [3]
    model, _, meta = load_model("base")
    assert (meta["run"], meta["step"]) == ("d2", 3)
    saved = torch.load(d2 / "step_000003" / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    # a second run beside it: keep-last acts within each run; load_model takes the newest unless told
    pretrain(["--num-steps", "2", "--eval-every", "0", "--run", "other"], tmp_path / "other.jsonl")
    assert list_steps(d2) == [3] and list_steps(d2.parent / "other") == [2]
    assert load_model("base")[2]["run"] == "other"
    assert load_model("base", run="d2")[2]["step"] == 3
    with pytest.raises(UserError, match="no checkpoint in .*nope.*runs of this stage: d2, other"):
        load_model("base", run="nope")


def test_last_step_is_saved_once(base, tmp_path, capsys):
    """Issue 12 item 11: a run that ends on a --save-every multiple (here --stop-at 6 with --save-every 3) wrote
    step 6 twice, the second time moving the first copy aside and deleting it."""
    d2 = _fresh(base)
    pretrain(["--num-steps", "9", "--save-every", "3", "--stop-at", "6", "--eval-every", "0"], tmp_path / "a.jsonl")
    out = capsys.readouterr().out
    assert out.count(f"saved {d2 / 'step_000003'} in") == 1
    assert out.count(f"saved {d2 / 'step_000006'} in") == 1


def test_an_error_on_one_rank_ends_every_rank_with_its_message(base, tmp_path):
    """Issue 12 item 5: rank 1's node lacks the shared filesystem (an empty base dir: no tokenizer), so it raises a
    UserError while rank 0 goes on into the first collective. Both processes must end within seconds, non-zero, with
    rank 1's message on its stderr; before, both hung in the teardown barrier with nothing printed."""
    port, node2 = _free_port(), tmp_path / "node2"
    node2.mkdir()
    procs = []
    for rank, base_dir in ((0, base), (1, node2)):
        env = {**os.environ, "PICOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "picochat", "pretrain", *TINY, "--num-steps", "2", "--eval-every", "0",
               "--run", "two-ranks", "--metrics", str(tmp_path / "m.jsonl")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]  # a hang fails here instead of hanging the suite
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[1].returncode == 2, errs[1][-2000:]
    assert "picochat: error (rank 1 of 2): no tokenizer at" in errs[1]
    assert procs[0].returncode != 0 and "rank 0 of 2" in errs[0], errs[0][-2000:]


def test_core_every_adds_core_to_the_evaluations_on_its_multiples(base, tmp_path):
    """--core-every N: the evaluations at multiples of N carry the CORE metric of the bundle (here the three-task
    fixture bundle of tests/test_core.py), the others only bpb."""
    _fresh(base)
    bundle = Path(__file__).parent / "fixtures" / "core" / "bundle"
    metrics = tmp_path / "m.jsonl"
    pretrain(["--num-steps", "4", "--eval-every", "1", "--core-every", "2", "--core-max-per-task", "3",
              "--core-bundle", str(bundle)], metrics)
    evals = {r["step"]: r for r in read_jsonl(metrics) if r["kind"] == "eval"}
    assert sorted(evals) == [0, 1, 2, 3, 4]
    keys = [k for k in evals[2] if k.startswith("core")]
    assert len(keys) == 1, evals[2]  # the subset's metric (named for what it is, never plain "core")
    key = keys[0]
    assert [s for s in evals if key in evals[s]] == [2, 4]
    assert all(-1.0 <= evals[s][key] <= 1.0 for s in (2, 4))
