import json

import pytest
import torch

from conftest import make_tiny_model, randomize_outputs
from picochat import checkpoint as ck
from picochat.common import UserError


def _trained(vocab=100):
    torch.manual_seed(0)
    model = randomize_outputs(make_tiny_model(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (2, 16))
    for _ in range(2):
        model(x, targets=x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def _save(d, model, opt, step, **kw):
    meta = ck.build_meta(model.config, None, "tokhash", step, 1)
    return ck.save_checkpoint(d, step, model.state_dict(), opt.state_dict(), meta, {"pos": step}, **kw)


def test_roundtrip_identical_logits_and_optimizer(tmp_path):
    model, opt, x = _trained()
    _save(tmp_path, model, opt, 5)
    got = ck.load_checkpoint(tmp_path)
    assert got["step"] == 5 and got["loader"] == {"pos": 5} and got["meta"]["tokenizer_hash"] == "tokhash"
    assert "commit" in got["meta"]["git"]
    model2 = make_tiny_model(100)
    model2.load_state_dict(got["model"])
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(got["optim"])
    assert_same_state(opt2.state_dict(), opt.state_dict())


def assert_same_state(got, want, where: str = "state_dict") -> None:
    """Equal nested optimizer states: the same keys at every level (so a missing or empty loaded state fails, which
    zipping the two states' values let pass), equal tensors, equal plain values."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for k in want:
            assert_same_state(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_state(a, b, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    else:
        assert got == want, where


def test_our_optimizer_state_survives_save_and_load(tmp_path):
    """MuonAdamW (what training uses) after two real steps: every parameter has state (Muon momentum buffers, AdamW
    moments), and a fresh optimizer that loads the checkpoint holds the same keys and tensors."""
    from picochat.optim import build_optimizer

    def fresh():
        torch.manual_seed(0)
        m = randomize_outputs(make_tiny_model(100))
        return m, build_optimizer(m.param_kinds(), n_embd=m.config.n_embd)

    model, opt = fresh()
    x = torch.randint(0, 100, (2, 16))
    for _ in range(2):
        model(x, targets=x).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    want = opt.state_dict()
    n_params = sum(len(g["params"]) for g in want["param_groups"])
    assert len(want["state"]) == n_params > 0 and all(want["state"].values())  # non-empty, so the check can fail
    _save(tmp_path, model, opt, 2)
    model2, opt2 = fresh()
    opt2.load_state_dict(ck.load_checkpoint(tmp_path)["optim"])
    assert_same_state(opt2.state_dict(), want)


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model, opt, x = _trained()
    _save(tmp_path, model, opt, 1)
    real_save = torch.save

    def exploding_save(obj, f, *a, **k):
        if isinstance(obj, dict) and any("weight" in str(k2) for k2 in obj):  # the model weights: die half-way
            f.write(b"partial")
            raise KeyboardInterrupt("simulated crash")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, model, opt, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.list_steps(tmp_path) == [1]
    got = ck.load_checkpoint(tmp_path)
    assert got["step"] == 1
    # the next save of the same step cleans the leftover temp dir and succeeds
    _save(tmp_path, model, opt, 2)
    assert ck.list_steps(tmp_path) == [1, 2]


def test_keep_last(tmp_path):
    model, opt, _ = _trained()
    for s in (1, 2, 3, 4):
        _save(tmp_path, model, opt, s, keep_last=2)
    assert ck.list_steps(tmp_path) == [3, 4]


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    model, opt, _ = _trained()
    d = _save(tmp_path, model, opt, 3)
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.pt.*truncated"):
        ck.load_checkpoint(tmp_path)
    (d / "model.pt").write_bytes(b"x" * len(data))  # right size, garbage content
    with pytest.raises(UserError, match="model.pt.*corrupt"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no checkpoint for step 7"):
        ck.load_checkpoint(tmp_path, step=7)


def test_mismatched_tokenizer_or_config(tmp_path):
    model, opt, _ = _trained()
    d = _save(tmp_path, model, opt, 3)
    meta = json.loads((d / "meta.json").read_text())
    with pytest.raises(UserError, match="tokenizer"):
        ck.check_compatible(meta, model.config, "otherhash", d)
    other = make_tiny_model(100, depth=3).config
    with pytest.raises(UserError, match="depth: checkpoint 2 vs now 3"):
        ck.check_compatible(meta, other, "tokhash", d)
    ck.check_compatible(meta, model.config, "tokhash", d)  # matching: no error


# -- runs and crash leftovers (issue 12 items 4, 11) ------------------------------------------------------------------


def test_crash_leftovers_are_cleaned_and_a_moved_aside_step_put_back(tmp_path):
    """A crash while re-saving step N, between moving step_N aside and renaming the new copy in, left only
    .old_step_N_<pid>: the one whole copy of step N. The next save puts it back; other leftovers (.tmp_ folders, an
    .old_ copy whose step exists) are deleted instead of piling up."""
    model, opt, _ = _trained()
    for s in (1, 2):
        _save(tmp_path, model, opt, s)
    (tmp_path / "step_000002").rename(tmp_path / ".old_step_000002_999")  # the crash: step 2 moved aside only
    _save(tmp_path, model, opt, 1)  # a re-save of step 1 leaves .old_step_000001_* only on a crash
    (tmp_path / ".old_step_000001_998").mkdir()  # ... as if one had happened before
    (tmp_path / ".tmp_step_000007").mkdir()  # a save of step 7 killed half-way
    _save(tmp_path, model, opt, 3, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002", "step_000003"]
    assert ck.load_checkpoint(tmp_path, step=2)["loader"] == {"pos": 2}


def test_runs_old_layout_and_run_names(tmp_path, tiny_tokenizer, capsys):
    """load_model picks the run written last (said on stderr) or the one named; checkpoints of the old layout
    (<stage>/step_*) still load, with a line saying how to name them; a run name cannot climb out of its stage."""
    tiny_tokenizer.save(tmp_path / "tokenizer")
    model = make_tiny_model(tiny_tokenizer.vocab_size)

    def save(d, step, saved_at):
        meta = {**ck.build_meta(model.config, None, tiny_tokenizer.hash(), step, 1), "saved_at": saved_at}
        ck.save_checkpoint(d, step, model.state_dict(), None, meta)

    save(ck.checkpoint_dir("base", tmp_path), 7, 100.0)  # old layout
    _, _, meta = ck.load_model("base", base_dir=tmp_path)
    assert (meta["run"], meta["step"]) == (ck.OLD_LAYOUT, 7)
    assert "old layout" in capsys.readouterr().err
    save(ck.run_dir("base", "b", tmp_path), 3, 300.0)
    save(ck.run_dir("base", "a", tmp_path), 5, 200.0)  # written after b by the clock, but saved_at says earlier
    assert ck.list_runs("base", tmp_path) == [ck.OLD_LAYOUT, "a", "b"]
    _, _, meta = ck.load_model(base_dir=tmp_path)  # source auto: base, the only stage
    assert (meta["source"], meta["run"], meta["step"]) == ("base", "b", 3)
    assert "run 'b', the most recently written of (old layout), a, b (pick one with --run)" in capsys.readouterr().err
    assert ck.load_model("base", base_dir=tmp_path, run="a")[2]["step"] == 5
    for bad in ("../x", ".hidden", "step_000001", "a/b", " "):
        with pytest.raises(UserError, match="a run name is"):
            ck.run_dir("base", bad, tmp_path)
