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
import os
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
        # a prefix is often one sentence with no separator after it ("...the starting point?" + "Take 1 step.")
        gap = "\n" if self.prefix and not self.prefix[-1].isspace() else ""
        question = (self.prefix + gap + e["input"]).strip()
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
        return target_match(conversation, completion)


def target_match(conversation: dict, completion: str) -> bool:
    """Exact match with any of a generative example's targets, case and surrounding space ignored."""
    return completion.strip().lower() in {t.strip().lower() for t in conversation["targets"]}


class NaturalInstructions(Task):
    """BIG-bench's `natural_instructions` (Mishra et al., 2022): 61 subtask folders of instruction -> answer rows
    (193k in all, 160 MB of JSON), each a task.json whose `task_prefix` is the instruction ("Definition: Craft one
    correct answer to the question ...") and whose examples are `{"input", "target": [answers]}`. A capped sample:
    the first `per_task` examples of every subtask, so one subtask's 6,500 rows do not drown the others. Parsing the
    160 MB took 14 s on the loaded 2-core machine, so the sample is kept as JSONL beside the folder and read from
    there next time (a stage builds its mixture twice, train and val)."""

    eval_type = "generative"

    def __init__(self, per_task: int = 50, path: str | Path | None = None, **slice_kw):
        from picochat.tasks.sources import bigbench_tasks

        super().__init__(**slice_kw)
        root = Path(path) if path is not None else bigbench_tasks(["natural_instructions"])["natural_instructions"]
        cache = root / f".sample_{per_task}.jsonl"
        if cache.is_file():
            self.conversations = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
            return
        subtasks = sorted(p for p in root.iterdir() if (p / "task.json").is_file()) if root.is_dir() else []
        if not subtasks:
            raise UserError(f"no natural_instructions subtask folders (<name>/task.json) under {root}")
        self.conversations = [t[i] for t in (BigBench(p, stop=per_task) for p in subtasks) for i in range(len(t))]
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text("".join(json.dumps(c) + "\n" for c in self.conversations), encoding="utf-8")
        os.replace(tmp, cache)  # whole or absent: an interrupted run leaves no half sample

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return target_match(conversation, completion)
