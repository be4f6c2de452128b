"""The Task contract, mixtures and curricula of tasks, and the scoring helpers the task families share.

A Task is a dataset of conversations plus a scorer. SFT/midtraining batches read `task[i]`, chat evaluation calls
`evaluate(conversation, completion)` and RL calls `reward(...)`, which is the same scorer as a float, so a scorer is
written once. Conversations are the schema `picochat.tokenizer.Tokenizer.render_conversation` reads:

    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..." | [{"type": "text" | "python" | "python_output",
                                                              "text": "..."}, ...]}]}

Multiple-choice conversations also carry "letters" (the choice letters, so a categorical evaluator can compare the
logits of just those tokens); task families may add other keys, which rendering ignores.

    from picochat.tasks import get_task, TaskMixture
    mix = TaskMixture([get_task("spellingbee", "train", size=1000), get_task("identity", "train")], seed=0)
    conv = mix[0]
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from picochat.common import UserError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Task:
    """A start/stop/step view over a dataset of conversations.

    Subclasses implement `num_examples()` and `get_example(i)` over the whole dataset, set `eval_type` and override
    `evaluate`. `task[i]` is example `range(start, stop, step)[i]`, so `Task(start=0, stop=100)` is the first 100
    and `step=2` every other one; negative indices count from the end as for lists.
    """

    eval_type: str = "generative"  # "categorical": the answer is one of the "letters"; "generative": free text

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise UserError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step}; need "
                            f"0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def _range(self) -> range:
        n = self.num_examples()
        return range(self.start, n if self.stop is None else min(self.stop, n), self.step)

    def __len__(self) -> int:
        return len(self._range())

    def __getitem__(self, i: int) -> dict:
        return self.get_example(self._range()[i])  # range indexing raises IndexError past the end

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Is `completion` (the assistant's reply as text) a correct answer to `conversation`'s question?"""
        raise NotImplementedError

    def reward(self, conversation: dict, completion: str) -> float:
        """The RL reward: the evaluation as a float (1.0 right, 0.0 wrong)."""
        return float(self.evaluate(conversation, completion))

    def chance(self, conversations: list[dict]) -> float:
        """The accuracy a model that ignores each question would get on `conversations` (0 for free text); a task
        whose answers cluster (letter counts: most are 1) says what the best constant answer scores."""
        return 0.0

    def diagnose(self, conversation: dict, completion: str) -> dict[str, bool]:
        """Named yes/no facts about a reply besides its correctness (e.g. "called the tool"), averaged by the
        generative evaluation; none by default."""
        return {}


class TaskSequence(Task):
    """Tasks one after another (a curriculum): every example of tasks[0], then of tasks[1], ..."""

    def __init__(self, tasks: Sequence[Task], **slice_kw):
        super().__init__(**slice_kw)
        if not tasks:
            raise UserError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self._offsets = [0]
        for t in self.tasks:
            self._offsets.append(self._offsets[-1] + len(t))

    def num_examples(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> tuple[Task, int]:
        """(task, index within it) of example `index` of the whole sequence."""
        for k, t in enumerate(self.tasks):
            if index < self._offsets[k + 1]:
                return t, index - self._offsets[k]
        raise IndexError(index)

    def get_example(self, index: int) -> dict:
        task, j = self.locate(index)
        return task[j]

    def _scorer(self) -> Task:
        """The one scorer of a sequence whose tasks are all one family (e.g. a slice of a train split); a mixture of
        families has none: its conversations do not say which task they came from, so score each task on its own."""
        if len({type(t) for t in self.tasks}) != 1:
            raise UserError(f"{type(self).__name__} of different task families "
                            f"({', '.join(sorted({type(t).__name__ for t in self.tasks}))}) has no single scorer; "
                            f"evaluate each task on its own")
        return self.tasks[0]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self._scorer().evaluate(conversation, completion)

    def reward(self, conversation: dict, completion: str) -> float:
        return self._scorer().reward(conversation, completion)


class TaskMixture(TaskSequence):
    """All examples of all tasks in one deterministic shuffled order (`seed`); a task listed twice is seen twice
    as often (oversampled), since each listing contributes all of its examples."""

    def __init__(self, tasks: Sequence[Task], seed: int = 0, **slice_kw):
        super().__init__(tasks, **slice_kw)
        self.seed = seed
        self._order = list(range(self._offsets[-1]))
        random.Random(seed).shuffle(self._order)  # a private generator: the global random state is not touched

    def locate(self, index: int) -> tuple[Task, int]:
        return super().locate(self._order[index])


# ---------------------------------------------------------------------------------------------------------------------
# multiple choice


def render_mc(question: str, choices: Sequence[str], letters: Sequence[str] | None = None) -> str:
    """The user message of a multiple-choice question whose answer is one letter.

    Each choice sits on its own line as "A. text". The letter there is a pre-token of its own under the split
    pattern (a newline is never joined to the letter that follows it), and the assistant's reply is the bare letter
    with nothing before it, so both are the letter's single byte token in any byte-level BPE: the letter the model
    reads next to a choice is the very token it must write (tests/test_tasks.py checks this with a trained
    tokenizer)."""
    letters = list(letters) if letters is not None else list(LETTERS[:len(choices)])
    if len(letters) != len(choices) or not 2 <= len(choices) <= len(LETTERS):
        raise UserError(f"a multiple-choice question needs 2-{len(LETTERS)} choices, one letter each "
                        f"(got {len(choices)} choices, {len(letters)} letters): {question[:60]!r}")
    lines = [question.strip(), ""] + [f"{letter}. {str(c).strip()}" for letter, c in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return "\n".join(lines)


def mc_conversation(question: str, choices: Sequence[str], answer: int, letters: Sequence[str] | None = None,
                    **extra) -> dict:
    """A multiple-choice conversation: user = render_mc(...), assistant = the answer's letter alone."""
    letters = list(letters) if letters is not None else list(LETTERS[:len(choices)])
    if not 0 <= answer < len(choices):
        raise UserError(f"answer index {answer} is outside the {len(choices)} choices of {question[:60]!r}")
    return {"messages": [{"role": "user", "content": render_mc(question, choices, letters)},
                         {"role": "assistant", "content": letters[answer]}],
            "letters": letters, **extra}


def extract_letter(completion: str, letters: Sequence[str]) -> str | None:
    """The choice letter a reply gives, or None when it gives none or several.

    Accepted: the letter alone ("B", " b.", "(B)"), "answer is B" / "Answer: B", or text in which exactly one of
    `letters` stands alone as a capital ("I think B is right"). "A" is also an English word, so "A guess: C" has
    two standalone letters and gives None, while "A good answer is C" resolves through the "answer is" phrasing."""
    text = completion.strip()
    valid = {x.upper() for x in letters}
    bare = text.strip("()[]{}.:*` \n\t").upper()
    if bare in valid:
        return bare
    # the letter in capitals: "the answer is a mammal" names no choice
    m = re.search(r"(?i:answer)\s*(?:(?i:is)|:)?\s*[(\[]?([A-Z])\b", text)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    found = {w for w in re.findall(r"\b([A-Z])\b", text) if w in valid}
    return found.pop() if len(found) == 1 else None


def mc_correct(conversation: dict, completion: str) -> bool:
    """Does `completion` give the letter of an `mc_conversation`'s answer?"""
    return extract_letter(completion, conversation["letters"]) == conversation["messages"][-1]["content"]


class MultipleChoiceTask(Task):
    """A categorical task whose conversations come from `mc_conversation`; scoring compares letters."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return mc_correct(conversation, completion)


# ---------------------------------------------------------------------------------------------------------------------
# numbers


_NUMBER = re.compile(r"[-\u2212]?\$?\d[\d,]*(?:\.\d+)?|[-\u2212]?\.\d+")


def parse_number(text: str) -> Decimal | None:
    """A number as written in an answer: "1,234", "-5", "\u22125" (Unicode minus), "$18", "3.50", "18." all parse;
    anything else is None. Decimal, so "0.1" + "0.2" style float noise never decides a comparison."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace("\u2212", "-")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def last_number(text: str) -> Decimal | None:
    """The last number written in `text` (None if there is none)."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def marked_number(text: str, marker: str = "####") -> Decimal | None:
    """The number right after the last `marker` (GSM8K's "#### 72"); None without a marker."""
    if marker not in text:
        return None
    line = text.rsplit(marker, 1)[1].split("\n", 1)[0]
    found = _NUMBER.search(line)
    return parse_number(found.group()) if found else None


def seeded(seed: int | str, index: int) -> random.Random:
    """A generator for example `index` of a generated task: the same example for the same (seed, index) on every
    machine and in every process, independent of which examples were drawn before."""
    return random.Random(f"{seed}:{index}")  # a str seed is hashed with SHA-512, not hash(): PYTHONHASHSEED-proof


# ---------------------------------------------------------------------------------------------------------------------
# held-out splits

SPLITS = ("train", "val", "test")


def split_of(key: str) -> str:
    """The split a row belongs to, from a hash of its text: one row in ten is test, one in ten val, the rest train.

    A hash of the content, not a position, so the split of a row never depends on the order a file lists rows in or
    on how many rows a generator has drawn, and two copies of one question land in the same split. crc32 is the same
    on every machine and in every process (Python's hash() of a str is salted per process)."""
    bucket = zlib.crc32(key.encode("utf-8")) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def check_split(split: str, family: str, splits: Sequence[str] = SPLITS) -> str:
    """`split`, or one error line naming `family`'s splits."""
    if split not in splits:
        raise UserError(f"{family} has splits {', '.join(splits)}, not {split!r}")
    return split


class HeldOut(Task):
    """The rows of a fixed dataset `task` on one side of a held-out split: "val" is the rows `split_of` puts in
    val (about one in ten, by a hash of the whole conversation, so a conversation repeated in the data is never on
    both sides), "train" all the others. For sources with no split of their own (chat corpora, BIG-bench files,
    MMLU dev), so a stage's validation loss is measured on conversations it never trains on."""

    def __init__(self, task: Task, split: str, **slice_kw):
        super().__init__(**slice_kw)
        check_split(split, f"HeldOut({type(task).__name__})", ("train", "val"))
        self.task, self.split = task, split
        self.indices = [i for i in range(len(task)) if (split_of(_key(task[i])) == "val") == (split == "val")]

    def num_examples(self) -> int:
        return len(self.indices)

    def get_example(self, index: int) -> dict:
        return self.task[self.indices[index]]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self.task.evaluate(conversation, completion)

    @property
    def eval_type(self) -> str:  # type: ignore[override]
        return self.task.eval_type


def _key(conversation: dict) -> str:
    return json.dumps(conversation["messages"], sort_keys=True, ensure_ascii=False)
