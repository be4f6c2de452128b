"""ElementaryMathQA: BIG-bench's `elementary_math_qa` (7,688 MathQA word problems, Amini et al., 2019), with each
problem's operation program rendered as calculator calls, so the model learns to solve word problems with its tool.

The task ships in the bigbench==1.0.0 sdist (see `sources.bigbench_tasks`) in five subtask folders holding the same
7,688 problems; `question_with_mathematical_hint/task.json` gives, per example,

    {"input": "<question>\\n<program>", "target_scores": {"229": 0, "270": 1, ...}}

with programs such as `divide(90, subtract(1, divide(2, 3)))` over four operations (add, subtract, multiply, divide;
checked: no other appears in the file). The program is parsed with `ast` (it is Python call syntax) and rendered
innermost operation first, one calculator call per operation, each step computing with the result the tool printed
before, exactly what the model will see at inference. The reply ends "#### N" with N the choice scored 1.

A row is skipped (and counted in `skipped`, by reason) when its answer is not one number ("2 : 5", "5 / 2"), its
program does not parse into those operations, or the chained calculator result, rounded to the precision the answer
is written in, is not the answer. Measured on the real file: 7,278 of 7,688 kept, the 410 skipped all for ratio or
fraction answers (every numeric answer is reached by its program); train 5,825, val 707, test 746.
Scoring accepts a final number equal to the answer at that precision ("#### 42.857" for 42.86), since MathQA
rounds its answers. Splits by a hash of the question (`base.split_of`): test is for held-out evaluation (RL).
BIG-bench marks its files with a canary ("should never appear in training corpora"): issue 14 trains on this task
on purpose, so a model trained with it must not report BIG-bench elementary_math_qa scores.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

from picochat.common import UserError
from picochat.tasks.base import check_split, parse_number, split_of
from picochat.tasks.gsm8k import FinalNumberTask, tool_parts
from picochat.tasks.sources import bigbench_tasks
from picochat.tools import calculator

OPERATORS = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
_LEADS = ("First, ", "Then ", "Next, ")
_ONE_NUMBER = re.compile(r"[^\d\-.,]*(-?[\d,]*\.?\d+)[^\d]*")  # "240 %", "rs. 500", "$ 25" -> the number
_SPACE_BEFORE = re.compile(r" ([.,?!;:%])")
_SENTENCE_START = re.compile(r"([.?!] )([a-z])")
_THOUSANDS = re.compile(r"(\d),(\d{3})\b")
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(\d)")


class RenderError(ValueError):
    """A row whose program cannot become calculator calls that reach its answer; the message is the reason."""


def render_program(program: str) -> tuple[list[str], str]:
    """(GSM8K-style lines, the final printed result) of a MathQA program, one calculator call per operation."""
    # 18 programs of the real file write literals as "1,000" (a thousands comma, where arguments are separated by
    # ", ") or "05" (a leading zero, a syntax error in Python 3): normalised, they are ordinary programs
    program = _LEADING_ZEROS.sub(r"\1", _THOUSANDS.sub(r"\1\2", program.strip()))
    try:
        tree = ast.parse(program, mode="eval").body
    except SyntaxError:
        raise RenderError("program does not parse") from None
    lines: list[str] = []

    def walk(node: ast.AST) -> str:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return repr(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return f"(-{walk(node.operand)})"
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in OPERATORS
                and len(node.args) == 2 and not node.keywords):
            raise RenderError("unknown operation")
        a, b = walk(node.args[0]), walk(node.args[1])
        expr = f"{a} {OPERATORS[node.func.id]} {b}"
        out = calculator(expr.replace(" ", ""))
        if out is None:
            raise RenderError("the calculator refuses a step (e.g. a division by zero)")
        lead = _LEADS[min(len(lines), 2)]
        lines.append(f"{lead}{expr} = <<{expr.replace(' ', '')}={out}>>{out}")
        return f"({out})" if out.startswith("-") else out

    final = walk(tree)
    if not lines:
        raise RenderError("program has no operation")
    return lines, final.strip("()")


def answer_number(text: str) -> Decimal | None:
    """The answer choice as one number, or None when it is not one ("2 : 5", "5 / 2", "none of these")."""
    m = _ONE_NUMBER.fullmatch(text.strip())
    return parse_number(m.group(1)) if m else None


def at_precision(got: Decimal, want: Decimal) -> bool:
    """Is `got` equal to `want` when rounded to the decimal places `want` is written with?"""
    places = min(want.as_tuple().exponent, 0)
    return got.quantize(Decimal(1).scaleb(places)) == want


def clean_question(text: str) -> str:
    """MathQA's tokenized lowercase text ("a book . she ... ?") with the space before punctuation removed and each
    sentence's first letter in capitals."""
    text = _SPACE_BEFORE.sub(r"\1", " ".join(text.split()))
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text[:1].upper() + text[1:])


def mathqa_conversation(example: dict) -> dict:
    """A conversation for one task.json example, or RenderError naming why the row cannot be used."""
    question, _, program = example["input"].rpartition("\n")
    scores = example["target_scores"]
    best = max(scores, key=lambda c: float(scores[c]))
    want = answer_number(best)
    if want is None:
        raise RenderError("answer is not one number")
    lines, final = render_program(program)
    got = parse_number(final)
    if got is None or not at_precision(got, want):
        raise RenderError("program result is not the answer")
    answer = "\n".join(lines + [f"The answer is {best.strip()}.", f"#### {want}"])
    return {"messages": [{"role": "user", "content": clean_question(question)},
                         {"role": "assistant", "content": tool_parts(answer)}], "program": program.strip()}


class ElementaryMathQA(FinalNumberTask):
    """`path`: the elementary_math_qa folder or its question_with_mathematical_hint/task.json (default: unpacked from
    the bigbench sdist)."""

    def __init__(self, split: str = "train", path: str | Path | None = None, **slice_kw):
        super().__init__(**slice_kw)
        self.split = check_split(split, "ElementaryMathQA")
        path = Path(path) if path is not None else bigbench_tasks(["elementary_math_qa"])["elementary_math_qa"]
        if path.is_dir():
            path = path / "question_with_mathematical_hint" / "task.json"
        try:
            examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not BIG-bench's elementary_math_qa question_with_mathematical_hint task.json "
                            f"({type(e).__name__}: {e})") from None
        self.path, self.skipped, self.conversations = path, Counter(), []
        for e in examples:
            try:
                conv = mathqa_conversation(e)
            except RenderError as why:
                self.skipped[str(why)] += 1
                continue
            if split_of(conv["messages"][0]["content"]) == split:
                self.conversations.append(conv)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    def matches(self, got: Decimal, want: Decimal) -> bool:
        return at_precision(got, want)
