"""Tools the model can call between <|python_start|> and <|python_end|>: a calculator and sandboxed Python.

The engine (picochat/engine/) builds one callable with `make_tool(kind)` and, when the model closes a tool call,
forces `<|output_start|> tool(code) <|output_end|>` into the sequence:

    from picochat.tools import make_tool, calculator
    tool = make_tool("calculator")          # or "python" (picochat.sandbox.run_python), or "none"
    tool("12*(3+4)")                        # '84'
    tool("'strawberry'.count('r')")         # '3'
    tool("import os")                       # 'Error: not a valid expression (SyntaxError)'
    calculator("2**10")                     # '1024'; None when the expression is refused or fails

A tool callable never raises because of the code it is given and never returns more than TOOL_OUTPUT_MAX_CHARS
characters: every failure is a short line starting with "Error:", which the model sees like any other output.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable

from picochat.common import UserError
from picochat.sandbox import SANDBOX_SUMMARY, run_python

TOOL_OUTPUT_MAX_CHARS = 1000
TOOL_KINDS = ("calculator", "python", "none")
# The --tool help of `picochat chat` and `picochat serve`: one line on what each kind does
TOOL_HELP = (f"tool the model may call: calculator, python (sandboxed: {SANDBOX_SUMMARY}) or none (calls are "
             "answered 'disabled')")
_SANDBOX_OPTIONS = {"timeout_s", "memory_mb", "max_output_bytes", "disk_mb"}

_MAX_EXPR_CHARS = 500
_MAX_INT_BITS = 1024  # ~308 decimal digits: more than any arithmetic word problem needs, small enough to print
_STR_METHODS = {"count", "index", "find", "upper", "lower"}


class CalcError(Exception):
    """The calculator refused an expression or could not evaluate it; the message is shown to the model."""


def calculator(expr: str) -> str | None:
    """Evaluate a small arithmetic or string expression; None if it is not allowed or fails (e.g. 1/0)."""
    try:
        return evaluate(expr)
    except CalcError:
        return None


def evaluate(expr: str) -> str:
    """Like `calculator`, but raises CalcError with a short reason instead of returning None.

    Allowed: int/float literals, + - * / // % and unary -/+, ** with a bounded result, parentheses; str literals,
    'abc'.count/index/find(...), .upper(), .lower(), len(...), and indexing/slicing a str. Nothing else: no names,
    no other attributes, calls or comprehensions. The input is parsed with `ast` and walked; it is never eval'ed.
    """
    if not isinstance(expr, str):
        raise CalcError("expression must be text")
    expr = expr.strip()
    if len(expr) > _MAX_EXPR_CHARS:
        raise CalcError(f"expression longer than {_MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: null bytes in the source
        raise CalcError(f"not a valid expression ({type(e).__name__})") from None
    try:
        return _format(_eval(tree.body))
    except (ZeroDivisionError, OverflowError, ValueError, IndexError, TypeError) as e:
        raise CalcError(str(e) or type(e).__name__) from None


def _format(value: int | float | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise CalcError("result is not a finite number")
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # 6/3 -> "2", not "2.0": answers compare as integers
    # 12 significant digits hide float noise (0.1+0.2 -> "0.3", 1/3 -> "0.333333333333") without rounding small
    # values to zero the way round(x, 10) would (1e-12 stays "1e-12"); repr then drops trailing zeros.
    return repr(float(f"{value:.12g}"))


def _eval(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float, str):  # type(), not isinstance: refuse True/False (bool is an int)
            return node.value
        raise CalcError(f"not a calculator expression: {type(node.value).__name__} literal")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        x = _number(_eval(node.operand))
        return -x if isinstance(node.op, ast.USub) else x
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _number(_eval(node.left)), _number(_eval(node.right)))
    if isinstance(node, ast.Call):
        return _call(node)
    if isinstance(node, ast.Subscript):
        s = _string(_eval(node.value))
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else _integer(_eval(p)) for p in (node.slice.lower, node.slice.upper,
                                                                             node.slice.step)]
            return s[parts[0]:parts[1]:parts[2]]
        return s[_integer(_eval(node.slice))]
    raise CalcError(f"not a calculator expression: {type(node).__name__}")


def _binop(op: ast.operator, a: int | float, b: int | float) -> int | float:
    if isinstance(op, ast.Add):
        result = a + b
    elif isinstance(op, ast.Sub):
        result = a - b
    elif isinstance(op, ast.Mult):
        result = a * b
    elif isinstance(op, ast.Div):
        result = a / b
    elif isinstance(op, ast.FloorDiv):
        result = a // b
    elif isinstance(op, ast.Mod):
        result = a % b
    elif isinstance(op, ast.Pow):
        result = _power(a, b)
    else:
        raise CalcError(f"operator {type(op).__name__} is not supported")
    if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
        raise CalcError("result too large")
    return result


def _power(a: int | float, b: int | float) -> int | float:
    # Bound the size of the result BEFORE computing it: 9**9**9 would take minutes and gigabytes.
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        if b * math.log2(abs(a)) > _MAX_INT_BITS:
            raise CalcError("result too large")
    result = a**b  # floats overflow with OverflowError (caught by evaluate); ints are bounded above
    if isinstance(result, complex):  # (-8) ** (1/3)
        raise CalcError("result is a complex number")
    return result


def _call(node: ast.Call) -> int | str:
    if node.keywords:
        raise CalcError("keyword arguments are not supported")
    if isinstance(node.func, ast.Name) and node.func.id == "len" and len(node.args) == 1:
        return len(_string(_eval(node.args[0])))
    if isinstance(node.func, ast.Attribute) and node.func.attr in _STR_METHODS:
        s = _string(_eval(node.func.value))
        args = [_eval(a) for a in node.args]
        if node.func.attr in ("upper", "lower"):
            if args:
                raise CalcError(f"str.{node.func.attr}() takes no arguments")
            return s.upper() if node.func.attr == "upper" else s.lower()
        # count/index/find(sub[, start[, end]])
        if not 1 <= len(args) <= 3 or not isinstance(args[0], str) or not all(_is_int(a) for a in args[1:]):
            raise CalcError(f"str.{node.func.attr}() takes a string and optional integer start, end")
        return getattr(s, node.func.attr)(*args)
    raise CalcError("only len() and the str methods count, index, find, upper, lower can be called")


def _is_int(x) -> bool:
    return type(x) is int


def _number(x) -> int | float:
    if type(x) not in (int, float):
        raise CalcError("arithmetic works on numbers only")
    return x


def _integer(x) -> int:
    if not _is_int(x):
        raise CalcError("string indices must be integers")
    return x


def _string(x) -> str:
    if type(x) is not str:
        raise CalcError("expected a string")
    return x


# ---------------------------------------------------------------------------------------------------------------------
# tool callables


def make_tool(kind: str = "calculator", **sandbox_kw) -> Callable[[str], str]:
    """A callable mapping the model's tool-call text to the text forced back into the sequence.

    kind: "calculator" (no keyword arguments), "python" (keyword arguments go to run_python: timeout_s, memory_mb,
    max_output_bytes, disk_mb), or "none" (every call answers that tools are disabled).
    """
    if kind not in TOOL_KINDS:
        raise UserError(f"tool '{kind}' is not one of {', '.join(TOOL_KINDS)}")
    if kind != "python" and sandbox_kw:
        raise TypeError(f"make_tool('{kind}') takes no sandbox options, got {sorted(sandbox_kw)}")
    if kind == "calculator":
        return _calculator_tool
    if kind == "none":
        return _disabled_tool
    unknown = set(sandbox_kw) - _SANDBOX_OPTIONS
    if unknown:
        raise TypeError(f"make_tool('python') got unknown options {sorted(unknown)}")

    return functools.partial(_python_tool, **sandbox_kw)  # picklable: the server sends it to its engine process


def _clip(text: str) -> str:
    if len(text) <= TOOL_OUTPUT_MAX_CHARS:
        return text
    marker = "\n...[output truncated]"
    return text[: TOOL_OUTPUT_MAX_CHARS - len(marker)] + marker


def _calculator_tool(code: str) -> str:
    try:
        return _clip(evaluate(code))
    except CalcError as e:
        return _clip(f"Error: {e}")


def _disabled_tool(code: str) -> str:
    return "Error: tool use is disabled"


def _python_tool(code: str, **sandbox_kw) -> str:
    if not isinstance(code, str):
        return "Error: code must be text"
    r = run_python(code, **sandbox_kw)
    out = r.stdout.rstrip("\n")
    if r.status == "ok":
        return _clip(out)
    if r.status == "timeout":
        timeout_s = sandbox_kw.get("timeout_s", 5.0)
        error = f"Error: timed out after {timeout_s:g}s"
    elif r.status == "memory":
        error = "Error: memory limit exceeded"
    elif r.status == "output_limit":
        marker = "\n...[output truncated]"
        return out[: TOOL_OUTPUT_MAX_CHARS - len(marker)] + marker
    else:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        # The last traceback line is the exception and its message: the part the model can act on.
        error = f"Error: {lines[-1].strip()[:300]}" if lines else f"Error: exited with status {r.returncode}"
    # Keep the error line whole: clip the stdout part instead.
    room = TOOL_OUTPUT_MAX_CHARS - len(error) - 1
    if out and room > 0:
        return (out if len(out) <= room else out[: room - 4] + "\n...") + "\n" + error
    return error
