"""BIG-bench tasks (Srivastava et al., 2022) from a `task.json` file, in its published schema:

    {"name": ..., "examples": [{"input": str, "target_scores": {choice: 0|1, ...}} | {"input": str,
                                "target": str | [str, ...]}, ...], "task_prefix"?: str}

An example with `target_scores` becomes a multiple-choice question (the choices in the file's order, the answer
the choice scored highest), one with `target` a question whose reply is the first target (scored by exact match
with any target, case and surrounding space ignored). Multi-part tasks keep a task.json per subtask folder; pass
one of them. The sdist `bigbench==1.0.0` (358 MB, `pip download --no-deps`) holds them under
bigbench/benchmark_tasks/<task>/task.json, e.g. elementary_math_qa, natural_instructions and the multiple-choice
tasks usable in place of MMLU auxiliary_train.
"""

from __future__ import annotations

import json
from pathlib import Path

from picochat.common import UserError
from picochat.tasks.base import Task, mc_conversation, mc_correct, seeded


class BigBench(Task):
    """One BIG-bench task.json. Mixed files are fine: `eval_type` follows each example's kind."""

    def __init__(self, path: str | Path, shuffle_seed: int | None = None, **slice_kw):
        """`shuffle_seed`: shuffle each multiple-choice example's choices (seeded by it and the index). Training
        needs it: some files list the right choice first in every example (date_understanding,
        movie_recommendation), which would teach "the answer is A"."""
        super().__init__(**slice_kw)
        self.shuffle_seed = shuffle_seed
        path = Path(path)
        if path.is_dir():
            path = path / "task.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            examples = data["examples"]
        except FileNotFoundError:
            raise UserError(f"BIG-bench task file {path} does not exist; pass a bigbench/benchmark_tasks/<task> "
                            f"folder or its task.json") from None
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a BIG-bench task.json with 'examples' ({type(e).__name__}: {e})") \
                from None
        self.path, self.name, self.prefix = path, data.get("name", path.parent.name), data.get("task_prefix", "")
        self.examples = [e for e in examples if isinstance(e, dict) and isinstance(e.get("input"), str)
                         and ("target_scores" in e or "target" in e)]
        if not self.examples:
            raise UserError(f"{path} has no examples with 'input' and 'target_scores' or 'target'")
        kinds = {"target_scores" in e for e in self.examples}
        self.eval_type = "categorical" if kinds == {True} else "generative"

    def num_examples(self) -> int:
        return len(self.examples)

    def get_example(self, index: int) -> dict:
        e = self.examples[index]
        question = (self.prefix + e["input"]).strip()
        if "target_scores" in e:
            choices = list(e["target_scores"])
            if self.shuffle_seed is not None:
                seeded(f"bigbench:{self.shuffle_seed}:{self.name}", index).shuffle(choices)
            scores = [float(e["target_scores"][c]) for c in choices]
            return mc_conversation(question, choices, scores.index(max(scores)))
        targets = [e["target"]] if isinstance(e["target"], str) else [str(t) for t in e["target"]]
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": targets[0]}], "targets": targets}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        if "letters" in conversation:
            return mc_correct(conversation, completion)
        return completion.strip().lower() in {t.strip().lower() for t in conversation["targets"]}
