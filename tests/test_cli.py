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
