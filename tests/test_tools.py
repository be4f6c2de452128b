"""Tests for picochat.tools: the ast calculator and the tool callables the engine uses.

    OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_tools.py
"""

import time

import pytest

from picochat.common import UserError
from picochat.tools import TOOL_HELP, TOOL_OUTPUT_MAX_CHARS, calculator, evaluate, CalcError, make_tool


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("1+2*3", "7"),
        ("(1+2)*3", "9"),
        ("2*3**2", "18"),
        ("-2**2", "-4"),  # ** binds tighter than unary minus, as in Python
        ("2**3**2", "512"),  # right-associative
        ("10-4-3", "3"),
        ("7/2", "3.5"),
        ("6/3", "2"),  # integral float prints as an int
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("7%3", "1"),
        ("-7%3", "2"),
        ("2**-1", "0.5"),
        ("0.1+0.2", "0.3"),
        ("1/3", "0.333333333333"),
        ("1e-12*1", "1e-12"),
        ("1_000 * 3", "3000"),
        ("  12 * (3 + 4)  ", "84"),
        ("2**100", "1267650600228229401496703205376"),
        ("1.5e3 + 1", "1501"),
        ("'strawberry'.count('r')", "3"),
        ("'banana'.count('a', 2)", "2"),
        ("len('hello')", "5"),
        ("len('hello') * 2", "10"),
        ("'abc'.upper()", "ABC"),
        ("'ABC'.lower()", "abc"),
        ("'hello'.find('l')", "2"),
        ("'hello'.find('z')", "-1"),
        ("'hello'.index('o')", "4"),
        ("'hello'[1]", "e"),
        ("'hello'[-1]", "o"),
        ("'hello'[1:3]", "el"),
        ("'hello'[::-1]", "olleh"),
    ],
)
def test_calculator_values(expr, expected):
    assert calculator(expr) == expected


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "__import__('os').system('echo hi')",
        "x",
        "x + 1",
        "lambda: 1",
        "[i for i in range(3)]",
        "(1, 2)",
        "True + 1",
        "None",
        "'a' * 3",
        "'abc'.__class__",
        "'abc'.replace('a', 'b')",
        "abs(-1)",
        "len([1, 2])",
        "open('/etc/passwd')",
        "1 if 1 else 2",
        "1 < 2",
        "1 << 3",
        "9**9**9",
        "10**300 * 10**300",
        "2**(10**100)",
        "1e308 * 10",
        "(-8) ** (1/3)",
        "1/0",
        "5 % 0",
        "'abc'.index('z')",
        "'abc'[10]",
        "3 +",
        "",
        "1" * 600,
    ],
)
def test_calculator_refusals_return_none(expr):
    assert calculator(expr) is None


def test_huge_power_is_refused_without_computing_it():
    t0 = time.monotonic()
    assert calculator("9**9**9") is None
    assert calculator("123456789**987654321") is None
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(CalcError, match="too large"):
        evaluate("9**9**9")


def test_calculator_tool_errors_are_short_text():
    tool = make_tool("calculator")
    assert tool("2+2") == "4"
    assert tool("'strawberry'.count('r')") == "3"
    assert tool("1/0") == "Error: division by zero"
    assert tool("__import__('os')").startswith("Error: only len() and the str methods count, index, find")
    assert tool("x") == "Error: not a calculator expression: Name"
    assert tool(None) == "Error: expression must be text"  # never raises, whatever the engine hands it


def test_python_tool_outputs():
    tool = make_tool("python", timeout_s=1)
    assert tool("print(1+1)") == "2"
    assert tool("print('a')\nprint('b')") == "a\nb"
    assert tool("x = 1") == ""
    assert tool("1/0") == "Error: ZeroDivisionError: division by zero"
    assert tool("print('partial')\nraise ValueError('bad value')") == "partial\nError: ValueError: bad value"
    assert tool("import sys\nsys.exit(4)") == "Error: exited with status 4"
    assert tool("while True:\n    pass") == "Error: timed out after 1s"
    assert tool("b = bytearray(2 * 1024**3)") == "Error: memory limit exceeded"
    long = tool("print('z' * 100_000)")
    assert len(long) <= TOOL_OUTPUT_MAX_CHARS and long.startswith("zzz") and long.endswith("[output truncated]")
    # a long error line and long stdout together still fit
    both = tool("print('q' * 5000)\nraise RuntimeError('e' * 5000)")
    assert len(both) <= TOOL_OUTPUT_MAX_CHARS and both.startswith("qqq") and "Error: RuntimeError: eee" in both


def test_make_tool_kinds():
    assert make_tool("none")("print(1)") == "Error: tool use is disabled"
    with pytest.raises(UserError, match="calculator, python, none"):
        make_tool("bash")
    with pytest.raises(TypeError):
        make_tool("calculator", timeout_s=1)
    with pytest.raises(TypeError):
        make_tool("python", timeout=1)


def test_python_tool_passes_the_disk_quota():
    tool = make_tool("python", timeout_s=2, disk_mb=1)
    assert tool("open('f', 'wb').write(b'x' * 2_000_000)") == "Error: OSError: [Errno 28] No space left on device"
    assert tool("print(open('f', 'wb').write(b'x' * 500_000))") == "500000"


def test_tool_help_says_what_the_sandbox_does():
    assert TOOL_HELP.startswith("tool the model may call: calculator, python (")
    assert all(word in TOOL_HELP for word in ("no network", "new processes", "stdlib", "memory", "disk"))
