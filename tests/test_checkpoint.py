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
    for p1, p2 in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(p1["exp_avg"], p2["exp_avg"]) and torch.equal(p1["exp_avg_sq"], p2["exp_avg_sq"])


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
