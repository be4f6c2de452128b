"""Arithmetic: generated word problems and bare expressions whose reply computes with the calculator tool.

There is no GSM8K train split offline (issue 14), so this is the offline stand-in that teaches the GSM8K reply
format: worked steps in which every computation is a calculator call, then a final "#### N". Each reply is written
as a GSM8K answer with <<expr=result>> annotations and turned into parts by `gsm8k.tool_parts`, so both families
give the model exactly the same shape of reply, and both are scored by `FinalNumberTask` (the number after "####").

    from picochat.tasks.arithmetic import Arithmetic
    task = Arithmetic("train", size=10_000, seed=0)   # example i is the same on every machine (seeded by split, i)

Numbers and phrasing vary: ints from 1 to 5 digits (sometimes written with thousands commas), negative results,
prices with cents, percentages, and several wordings of every question. A question belongs to the split
`base.split_of` gives its text (one in ten test, one in ten val), so a train problem is never a test problem.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from picochat.common import UserError
from picochat.tasks.base import check_split, seeded, split_of
from picochat.tasks.gsm8k import FinalNumberTask, tool_parts
from picochat.tools import calculator

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kim", "Liam", "Mei",
         "Noah", "Olga", "Priya", "Quinn", "Ravi", "Sara", "Tom")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "cards", "shells", "eggs")
# how an operator may be written in a question; the tool always gets the Python operator
SPOKEN = {"+": ("+", "plus"), "-": ("-", "minus"), "*": ("*", "×", "x", "times"), "/": ("/", "÷", "divided by")}
ASK = ("What is {e}?", "Compute {e}.", "Calculate {e}", "{e} = ?", "what's {e}", "Evaluate {e}.",
       "Please work out {e}.", "Can you tell me what {e} is?")
_MAX_DRAWS = 1000  # a draw lands in the wanted split 8 (train) or 1 (val, test) times in 10


class _Work:
    """The worked solution as it is built: each `calc` runs the calculator, as the model's tool will, and records
    a GSM8K line "lead a * b = <<a*b=out>>out tail"; later steps compute with the printed result."""

    def __init__(self):
        self.lines: list[str] = []

    def calc(self, lead: str, expr: str, tail: str = "") -> str:
        out = calculator(expr.replace(" ", ""))
        if out is None:
            raise ValueError(f"the calculator refuses {expr!r}")
        self.lines.append(f"{lead}{expr} = <<{expr.replace(' ', '')}={out}>>{out}{tail}")
        return out

    def answer(self, final: str) -> str:
        return "\n".join(self.lines + [f"#### {final}"])


def _show(rng: random.Random, x: int) -> str:
    """A number as a question writes it: 12345 or, half the time, 12,345."""
    return f"{x:,}" if abs(x) >= 1000 and rng.random() < 0.5 else str(x)


def _operand(x: int | float) -> str:
    return f"({x})" if x < 0 else str(x)  # 12 - (-5): the tool's syntax needs no "--"


def _expression(rng: random.Random) -> tuple[str, _Work]:
    """A bare expression: two operands (ints of 1-5 digits, negatives, decimals), three with parentheses, a percentage
    or a square."""
    w = _Work()
    kind = rng.choice(("binary", "binary", "binary", "three", "percent", "square"))
    if kind == "percent":
        k, n = rng.choice((5, 10, 12, 15, 20, 25, 30, 40, 50, 75)), rng.randint(2, 400) * 5
        out = w.calc(rng.choice(("", "Using the calculator: ")), f"{n} * {k} / 100")
        q = rng.choice(("What is {k}% of {n}?", "Find {k} percent of {n}.", "how much is {k}% of {n}"))
        return q.format(k=k, n=_show(rng, n)), w.answer(out)
    if kind == "square":
        a = rng.randint(2, 99)
        out = w.calc("", f"{a} ** 2")
        return rng.choice(("What is {a} squared?", "Compute {a}^2.", "What is {a} to the power of 2?")).format(a=a), \
            w.answer(out)
    digits = rng.choice((1, 2, 2, 3, 4, 5))
    a, b = (rng.randint(1, 10**digits - 1) for _ in range(2))
    if rng.random() < 0.2:
        a = -a
    if rng.random() < 0.15:  # decimals with one or two places
        places = rng.choice((1, 2))
        a, b = round(a / 10**places, places), round(b / 10**places, places)
    op = rng.choice("+-*/")
    if op == "/":  # exact quotients only: a word problem's division comes out even, and so do these
        b = abs(int(b)) % 97 + 2
        a = a * b if isinstance(a, int) else round(a * b, 2)  # (a * b) / b: the quotient is the a drawn
    if kind == "three":
        c, op2 = rng.randint(2, 99), rng.choice("+-*")
        tool, spoken = f"({_operand(a)} {op} {b}) {op2} {c}", f"({a} {rng.choice(SPOKEN[op])} {b}) " \
                                                                f"{rng.choice(SPOKEN[op2])} {c}"
    else:
        tool, spoken = f"{_operand(a)} {op} {b}", f"{a} {rng.choice(SPOKEN[op])} {b}"
    out = w.calc(rng.choice(("", "Let me calculate that.\n", "With the calculator: ")), tool)
    return rng.choice(ASK).format(e=spoken), w.answer(out)


def _groups(rng, w, name, item):
    a, b = rng.randint(2, 25), rng.randint(2, 48)
    q = rng.choice((f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?",
                    f"There are {a} bags with {b} {item} in each bag. How many {item} are there in all?"))
    return q, w.answer(w.calc(f"{a} groups of {b} make ", f"{a} * {b}", f" {item}."))


def _left(rng, w, name, item):
    a = rng.randint(20, 2000)
    b = rng.randint(1, a)
    q = rng.choice((f"{name} had {_show(rng, a)} {item} and gave {b} of them to a friend. How many {item} does "
                    f"{name} have left?", f"{name} has {_show(rng, a)} {item}. After losing {b}, how many remain?"))
    return q, w.answer(w.calc(f"{name} is left with ", f"{a} - {b}", f" {item}."))


def _share(rng, w, name, item):
    b, each = rng.randint(2, 12), rng.randint(2, 60)
    q = f"{b * each} {item} are shared equally among {b} children. How many does each child get?"
    return q, w.answer(w.calc("Each child gets ", f"{b * each} / {b}", f" {item}."))


def _change(rng, w, name, item):
    n, cents = rng.randint(2, 9), rng.randint(10, 400) * 5
    price = f"{cents // 100}.{cents % 100:02d}"
    bill = next((x for x in (10, 20, 50, 100) if x * 100 > n * cents), None)
    if bill is None:
        raise ValueError("too expensive for a bill")
    cost = w.calc(f"{n} notebooks cost ", f"{n} * {price}", " dollars.")
    change = w.calc("The change is ", f"{bill} - {cost}", " dollars.")
    q = f"{name} buys {n} notebooks at ${price} each and pays with a ${bill} bill. How much change does {name} get?"
    return q, w.answer(change)


def _temperature(rng, w, name, item):
    t, d = rng.randint(-10, 25), rng.randint(1, 35)
    q = rng.choice((f"The temperature was {t} degrees at noon and fell {d} degrees by midnight. What was the "
                    f"temperature at midnight?", f"It is {t}°C and the temperature drops by {d}°C. What is it now?"))
    return q, w.answer(w.calc("The temperature is ", f"{t} - {d}", " degrees."))


def _distance(rng, w, name, item):
    v, h = rng.randint(20, 120), rng.choice((1, 2, 3, 4, 5, 6, 8, 0.5, 1.5, 2.5))
    q = f"A car drives at {v} km per hour for {h} hours. How many kilometers does it travel?"
    return q, w.answer(w.calc("Distance is speed times time: ", f"{v} * {h}", " km."))


def _discount(rng, w, name, item):
    p, k = rng.randint(10, 500), rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 75))
    off = w.calc("The discount is ", f"{p} * {k} / 100", " dollars.")
    sale = w.calc("The sale price is ", f"{p} - {off}", " dollars.")
    q = rng.choice((f"A jacket costs ${p}. It is on sale for {k}% off. What is the sale price?",
                    f"{name} wants a bike that costs ${p}, and the shop takes {k}% off. How much does {name} pay?"))
    return q, w.answer(sale)


def _average(rng, w, name, item):
    x, y = rng.randint(50, 100), rng.randint(50, 100)
    z = rng.randint(50, 98)
    z += (-(x + y + z)) % 3  # the three scores sum to a multiple of 3, so the average is whole
    total = w.calc("The scores add up to ", f"{x} + {y} + {z}", ".")
    mean = w.calc("The average is ", f"{total} / 3", ".")
    return f"{name} scored {x}, {y} and {z} on three tests. What is the average score?", w.answer(mean)


def _savings(rng, w, name, item):
    a, weeks = rng.randint(2, 50), rng.randint(2, 20)
    spent = rng.randint(1, a * weeks)
    saved = w.calc(f"In {weeks} weeks {name} saves ", f"{a} * {weeks}", " dollars.")
    left = w.calc("After spending, ", f"{saved} - {spent}", " dollars are left.")
    q = f"{name} saves ${a} every week. After {weeks} weeks, {name} spends ${spent}. How much money is left?"
    return q, w.answer(left)


def _pages(rng, w, name, item):
    r, d = rng.randint(5, 40), rng.randint(2, 10)
    n = r * d + rng.randint(1, 600)
    read = w.calc(f"{name} reads ", f"{r} * {d}", " pages.")
    left = w.calc("Pages left: ", f"{n} - {read}", ".")
    return f"A book has {n} pages. {name} reads {r} pages a day for {d} days. How many pages are left?", \
        w.answer(left)


def _rectangle(rng, w, name, item):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    if rng.random() < 0.5:
        return f"A rectangle is {a} m long and {b} m wide. What is its area in square meters?", \
            w.answer(w.calc("The area is ", f"{a} * {b}", " square meters."))
    return f"What is the perimeter of a rectangle {a} cm long and {b} cm wide?", \
        w.answer(w.calc("The perimeter is ", f"2 * ({a} + {b})", " cm."))


def _hours(rng, w, name, item):
    m = rng.randint(2, 24) * 15
    return f"A movie is {m} minutes long. How many hours is that?", \
        w.answer(w.calc("An hour has 60 minutes: ", f"{m} / 60", " hours."))


WORD_PROBLEMS: tuple[Callable, ...] = (_groups, _left, _share, _change, _temperature, _distance, _discount, _average,
                                       _savings, _pages, _rectangle, _hours)


def arithmetic_problem(rng: random.Random) -> tuple[str, str]:
    """(question, GSM8K-style answer) drawn from `rng`: half word problems, half bare expressions."""
    while True:
        try:
            if rng.random() < 0.5:
                return _expression(rng)
            return rng.choice(WORD_PROBLEMS)(rng, _Work(), rng.choice(NAMES), rng.choice(ITEMS))
        except ValueError:  # a draw the template cannot use (e.g. a total over $100): draw again
            continue


class Arithmetic(FinalNumberTask):
    """`size` generated problems of one split; scored by the number after "####" (GSM8K's rule)."""

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0, **slice_kw):
        super().__init__(**slice_kw)
        self.split = check_split(split, "Arithmetic")
        if size < 0:
            raise UserError(f"Arithmetic size must be >= 0, got {size}")
        self.size, self.seed = size, f"arithmetic:{seed}:{split}"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = seeded(self.seed, index)
        for _ in range(_MAX_DRAWS):
            question, answer = arithmetic_problem(rng)
            if split_of(question) == self.split:
                return {"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": tool_parts(answer)}]}
        raise RuntimeError(f"no {self.split} problem in {_MAX_DRAWS} draws")  # ~1e-46 for val/test: a bug if seen
