"""`picochat chat` against a tiny checkpoint saved in tmp_path: the one-shot reply equals the Engine's greedy text,
and the interactive loop handles /clear and /exit through stdin of a real subprocess.

    OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_chat_cli.py
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_model, randomize_outputs
from picochat.checkpoint import build_meta, checkpoint_dir, load_model, save_checkpoint
from picochat.engine import Engine, Event, SamplingParams
from picochat.serve import chat_cli

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    base = tmp_path_factory.mktemp("chat_base")
    tiny_tokenizer.save(base / "tokenizer")
    model = randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, sequence_len=256))
    meta = build_meta(model.config, None, tiny_tokenizer.hash(), step=5, world_size=1)
    save_checkpoint(checkpoint_dir("sft", base), 5, model.state_dict(), None, meta)
    return base


def greedy_reply(base: Path, messages: list[dict], **penalties) -> str:
    model, tok, _ = load_model("sft", base_dir=base)
    engine = Engine(model, tok)
    prompt = tok.render_for_completion({"messages": messages})
    steps = engine.generate(prompt, 1, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **penalties))
    events = [ev for step in steps for ev in step]
    assert {ev.segment for ev in events} == {"text"}  # no tool call, so the CLI prints the text as is
    return "".join(ev.text for ev in events)


def run_cli(base: Path, args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PICOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "picochat", "chat", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_one_shot_prints_engine_greedy_reply(base_dir):
    proc = run_cli(base_dir, ["-p", "hello there", "--temperature", "0", "--max-tokens", str(MAX_TOKENS)])
    assert proc.returncode == 0, proc.stderr
    # shown with control characters escaped (this random model's reply has some)
    reply = greedy_reply(base_dir, [{"role": "user", "content": "hello there"}])
    assert proc.stdout == chat_cli.printable(reply) + "\n"


def test_penalty_flags_reach_the_engine_and_are_range_checked(base_dir, monkeypatch, capsys):
    proc = run_cli(base_dir, ["-p", "hello there", "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                              "--presence-penalty", "2", "--frequency-penalty", "1.5"])
    assert proc.returncode == 0, proc.stderr
    reply = greedy_reply(base_dir, [{"role": "user", "content": "hello there"}], presence_penalty=2.0,
                         frequency_penalty=1.5)
    assert proc.stdout == chat_cli.printable(reply) + "\n"
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(base_dir))
    assert chat_cli.main(["-p", "hi", "--frequency-penalty", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the fixture's note on its old layout
    assert err.startswith("picochat: error:") and "--frequency-penalty" in err


def test_interactive_clear_and_exit(base_dir):
    flags = ["--source", "sft", "--temperature", "0", "--max-tokens", str(MAX_TOKENS)]
    proc = run_cli(base_dir, flags, stdin="hello there\n/clear\nhi\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("picochat> ") == 2  # "never read" after /exit got no reply
    assert "(conversation cleared)" in out
    first, second = [chunk.split("\n")[0] for chunk in out.split("picochat> ")[1:]]
    raw_first = greedy_reply(base_dir, [{"role": "user", "content": "hello there"}])
    assert first == chat_cli.printable(raw_first)
    # after /clear the second turn is answered as a fresh conversation, not as a follow-up
    assert second == chat_cli.printable(greedy_reply(base_dir, [{"role": "user", "content": "hi"}]))
    assert second != chat_cli.printable(greedy_reply(base_dir, [{"role": "user", "content": "hello there"},
                                                                {"role": "assistant", "content": raw_first},
                                                                {"role": "user", "content": "hi"}]))


def test_missing_checkpoint_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    assert chat_cli.main(["--source", "rl", "-p", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("picochat: error:") and "\n" not in err and "rl" in err


def test_reply_printer_shows_tool_blocks():
    """Tool segments: fenced blocks when not a terminal, coloured labels on a terminal; parts keep the schema."""
    events = [Event(0, 1, False, "text", "Let me count.", None),
              Event(0, 2, False, "python", "", None),  # <|python_start|>
              Event(0, 3, False, "python", "'strawberry'.count('r')", None),
              Event(0, 4, False, "python", "", None),  # <|python_end|>
              Event(0, 5, True, "output", "", None),  # <|output_start|>
              Event(0, 6, True, "output", "3", None),
              Event(0, 7, True, "output", "", None),  # <|output_end|>
              Event(0, 8, False, "text", " There are 3.", None),
              Event(0, 9, False, "text", "", "stop")]
    plain = chat_cli.ReplyPrinter(io.StringIO(), color=False)
    for ev in events:
        plain.feed(ev)
    assert plain.out.getvalue() == ("Let me count.\n```python\n'strawberry'.count('r')\n```\n"
                                    "```output\n3\n```\n There are 3.")
    assert plain.reply_parts() == [{"type": "text", "text": "Let me count."},
                                   {"type": "python", "text": "'strawberry'.count('r')"},
                                   {"type": "python_output", "text": "3"},
                                   {"type": "text", "text": " There are 3."}]
    tty = chat_cli.ReplyPrinter(io.StringIO(), color=True)
    for ev in events:
        tty.feed(ev)
    shown = tty.out.getvalue()
    assert "\033[36m[python] 'strawberry'.count('r')\033[0m" in shown and "[output] 3\033[0m" in shown
    assert "```" not in shown and tty.reply_parts() == plain.reply_parts()


def test_control_characters_from_the_model_and_the_tool_are_escaped():
    """Model text and tool output can hold terminal escapes (clear screen, retitle the window, move the cursor, a
    fake prompt after a carriage return): printed raw, they act on the user's terminal. They are shown escaped."""
    hostile = "ok\x1b[2J\x1b]0;pwned\x07\rfake> \x08\x9b31m\ttab\nline"
    events = [Event(0, 1, False, "text", hostile, None),
              Event(0, 2, False, "python", "", None),
              Event(0, 3, False, "python", "print('\\x1b[31m')", None),
              Event(0, 4, False, "python", "", None),
              Event(0, 5, True, "output", "", None),
              Event(0, 6, True, "output", "\x1b[31mred", None),
              Event(0, 7, True, "output", "", None),
              Event(0, 8, False, "text", "", "stop")]
    for color in (False, True):
        printer = chat_cli.ReplyPrinter(io.StringIO(), color=color)
        for ev in events:
            printer.feed(ev)
        shown = printer.out.getvalue()
        ours = set(printer.STYLE.values()) | {(printer.RESET, "")}
        for code, _ in ours:  # the printer's own colours are the only escapes left
            shown = shown.replace(code, "")
        assert not any(c in shown for c in "\x1b\x07\r\x08\x9b"), repr(shown)
        assert "ok\\x1b[2J\\x1b]0;pwned\\x07\\x0dfake> \\x08\\x9b31m\ttab\nline" in shown  # visible, tabs/newlines kept
        assert "\\x1b[31mred" in shown
        # the conversation keeps the model's real text (it is sent back to the model, not to a terminal)
        assert printer.reply_parts()[0]["text"] == hostile
