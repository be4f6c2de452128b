"""The command table, `picochat --help`, the README and the files on disk agree; bad flags give one clear line."""

import re
import subprocess
import sys
from pathlib import Path

from picochat.__main__ import COMMANDS, main, usage

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, desc) in COMMANDS.items():
        assert re.search(rf"^\s+{re.escape(name)}\s+{re.escape(desc)}$", out, re.M), name


def test_readme_command_table_matches():
    listed = re.findall(r"^\| `picochat ([a-z-]+)` \|", README, re.M)
    assert listed == list(COMMANDS), (listed, list(COMMANDS))


def test_every_command_module_has_main():
    import importlib

    for name, (mod, _) in COMMANDS.items():
        assert callable(importlib.import_module(mod).main), name


def test_readme_quickstart_and_file_map():
    cmds = re.findall(r"^bash (runs/\S+)", README, re.M)
    assert cmds[:2] == ["runs/quickstart.sh", "runs/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash runs/test.sh" in ci  # CI runs the README's test command
    mapped = set(re.findall(r"^\| `([^`]+)` \|", README, re.M))
    on_disk = {str(p.relative_to(ROOT)) for d in ("picochat", "benchmarks", "runs") for p in (ROOT / d).rglob("*")
               if p.is_file() and p.suffix in (".py", ".sh", ".html") and p.name != "__init__.py"
               and "__pycache__" not in p.parts}
    missing = on_disk - mapped
    assert not missing, f"files missing from the README file map: {sorted(missing)}"
    stale = {m for m in mapped if not m.startswith("picochat ") and not (ROOT / m).exists()}
    assert not stale, f"README maps files that do not exist: {sorted(stale)}"


def test_unknown_command_and_bad_flag_are_one_line():
    r = subprocess.run([sys.executable, "-m", "picochat", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown command 'frobnicate'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "picochat", "pretrain", "--depht", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments: --depht" in r.stderr
    r = subprocess.run([sys.executable, "-m", "picochat", "serve", "--threads", "-1"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--threads must be >= 0" in r.stderr


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    import os

    env = {**os.environ, "PICOCHAT_BASE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "picochat", "pretrain", "--num-steps", "1"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "tok-train" in r.stderr


def test_d20_parameter_claim_matches_the_model():
    """Issue 12 item 11: the d20 preset claimed ~560M parameters, true only with a 65,536 vocabulary while
    `tok-train` defaults to 8,192. Its docstring must state the count the model has at both vocabularies."""
    import torch

    from picochat.config import ModelConfig, derive_model_config, preset_d20
    from picochat.model import GPT
    from picochat.tok_train import TokTrainConfig

    p = preset_d20()
    for vocab in (TokTrainConfig().vocab_size, 65536):
        cfg = derive_model_config(ModelConfig(depth=p["depth"], head_dim=p["head_dim"], vocab_size=vocab,
                                              sequence_len=p["max_seq_len"]))
        with torch.device("meta"):  # shapes only: no 400M-parameter allocation
            total = GPT(cfg).num_params()["total"]
        assert f" {total / 1e6:.0f}M " in preset_d20.__doc__, (vocab, total)


def test_learning_rate_help_says_which_rates_scale_with_width():
    """Issue 12 item 11: --scalar-lr is width-scaled like the other AdamW rates, and its --help did not say so. Each
    rate's help must mention the (C/768)^-0.5 factor exactly when the optimizer applies one."""
    from dataclasses import fields

    from conftest import make_tiny_model
    from picochat.config import TrainConfig
    from picochat.optim import build_optimizer

    docs = {fl.name: fl.metadata["doc"] for fl in fields(TrainConfig)}
    model = make_tiny_model(100, n_embd=192, head_dim=32, resid_scalars=True)
    flags = {"matrix": 0.02, "embedding": 0.2, "unembedding": 0.004, "scalar": 0.5}
    opt = build_optimizer(model.param_kinds(), n_embd=192, **{f"{k}_lr": v for k, v in flags.items()})
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == set(flags)
    for name, lr in flags.items():
        scaled = abs(groups[name]["initial_lr"] / lr - (192 / 768) ** -0.5) < 1e-9
        assert scaled or groups[name]["initial_lr"] == lr, name
        assert ("scaled by (C/768)^-0.5" in docs[f"{name}_lr"]) == scaled, (name, docs[f"{name}_lr"])
