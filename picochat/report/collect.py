"""What the report card shows, read from files only (never from a stage's stdout): the metrics JSONL of each stage's
run, its newest checkpoint's meta.json, the evaluation result files, the tokenizer and the machine.

Inputs under the base dir:
    logs/<stage>/<run>.jsonl         records {"kind": "train"|"eval"|"summary", "step", ...}; older runs wrote
                                     logs/<stage>.jsonl (all runs of a stage appended to one file), read as a fallback
    checkpoints/<stage>/<run>/step_N/meta.json
    eval/<stage>/<run>/step_N/<suite>.json   {"suite", "metrics": {name: float}, "tasks": {task: {...}}, "elapsed_s"}
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from picochat.checkpoint import STAGES, git_info, list_runs, list_steps, run_dir
from picochat.common import UserError

# rows of the summary table: (metric key in the result files, label). "core" and "chatcore" also come as partial
# variants named by their task count ("core20" = CORE over the 20 tasks available offline): see summary_rows
SUMMARY_ROWS = [("bpb", "bpb"), ("core", "CORE"), ("hellaswag", "HellaSwag"), ("copy_acc", "copying"),
                ("arc_easy", "ARC-E"), ("arc_challenge", "ARC-C"), ("mmlu", "MMLU"), ("gsm8k", "GSM8K"),
                ("humaneval", "HumanEval"), ("spellingbee", "SpellingBee"), ("chatcore", "ChatCORE")]
_PARTIAL_RE = re.compile(r"^(core|chatcore)(\d+|_subset)$")

# bytes/token is measured on the first documents of the validation split, up to this many characters: 1M characters
# encode in well under a second, and the ratio moves by <1% beyond a few hundred thousand on the embedded corpus
TOKENIZER_SAMPLE_CHARS = 1_000_000


@dataclass
class StageData:
    """One stage's run as the report sees it; every part may be missing (empty list / None / {})."""

    stage: str
    run: str | None
    train: list[dict] = field(default_factory=list)  # train records, one per step, with "tokens" (cumulative) added
    evals: list[dict] = field(default_factory=list)  # in-training eval records
    summary: dict | None = None
    meta: dict | None = None
    checkpoint: Path | None = None  # the step folder the meta was read from
    log: Path | None = None
    results: dict[str, dict] = field(default_factory=dict)  # suite -> evaluation result object
    results_step: int | None = None
    results_time: float | None = None  # mtime of the newest result file

    @property
    def present(self) -> bool:
        return bool(self.train or self.evals or self.summary or self.meta or self.results)

    def metrics(self) -> dict[str, float]:
        """The summary metrics of every evaluation suite of this stage, merged."""
        out: dict[str, float] = {}
        for res in self.results.values():
            out.update({k: float(v) for k, v in (res.get("metrics") or {}).items() if _is_number(v)})
        return out

    def last_eval(self, *keys: str) -> tuple[str, float] | None:
        """(key, value) of the first of `keys` in the newest in-training eval record that has one."""
        for rec in reversed(self.evals):
            for k in keys:
                if _is_number(rec.get(k)):
                    return k, float(rec[k])
        return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------------------
# runs and their files


def parse_runs(spec: str) -> dict[str, str]:
    """--run: "NAME" (every stage) or "base=A,sft=B" -> {stage: run}; stages not named use their newest run."""
    if not spec:
        return {}
    if "=" not in spec:
        return {s: spec for s in STAGES}
    out = {}
    for part in spec.split(","):
        stage, _, run = part.partition("=")
        if stage.strip() not in STAGES or not run.strip():
            raise UserError(f"--run {spec!r}: expected NAME or stage=NAME,... with stage one of {', '.join(STAGES)}")
        out[stage.strip()] = run.strip()
    return out


def default_run(base: Path, stage: str) -> str | None:
    """The stage's most recently written run (checkpoint.list_runs' order), else the newest per-run log file, else
    None (a stage known only from the old shared log file)."""
    runs = list_runs(stage, base)
    if runs:
        return runs[-1]
    logs = sorted((base / "logs" / stage).glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    return logs[-1].stem if logs else None


def read_log(path: Path, run: str | None) -> tuple[list[dict], list[dict], dict | None]:
    """(train records, eval records, last summary) of `run` in a metrics file.

    A resumed run appends to the same file from its checkpoint's step, and a run started again with --overwrite from
    step 1, so records are replayed in file order on a timeline where train step s sits at (s, 0) and the eval after
    it at (s, 1): each record drops the kept ones at or after its own position (the abandoned future), leaving one
    train record per step, and the summary counts only when no record follows it. In the old shared file
    (logs/<stage>.jsonl) only `run`'s segments (the records up to a summary) are read: those whose records name it,
    and those that name no run when no other run is named in the file."""
    records = _parse_lines(path)
    if run is not None:
        records = _records_of(records, run)
    kept: list[tuple[tuple[int, int], dict]] = []
    summary = None
    for rec in records:
        kind = rec.get("kind")
        if kind == "summary":
            summary = rec
            continue
        if kind not in ("train", "eval") or not _is_number(rec.get("step")):
            continue
        summary = None  # a summary is a run's last record: records after it belong to a resumed or a new run
        pos = (int(rec["step"]), 0 if kind == "train" else 1)
        while kept and kept[-1][0] >= pos:
            kept.pop()
        kept.append((pos, rec))
    train = [r for (_, k), r in kept if k == 0]
    evals = [r for (_, k), r in kept if k == 1]
    return train, evals, summary


def _parse_lines(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"metrics file {path} cannot be read ({e}); fix or delete it") from None
    records, bad = [], []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line cut off by a kill mid-write; the resumed run appends after it
            rec = None
            bad.append(i)
        if isinstance(rec, dict):
            records.append(rec)
    if bad:
        print(f"picochat: warning: {path}: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}), "
              f"e.g. a record cut off when a run was killed", file=sys.stderr, flush=True)
    return records


def _records_of(records: list[dict], run: str) -> list[dict]:
    segments, current = [], []
    for rec in records:
        current.append(rec)
        if rec.get("kind") == "summary":
            segments.append(current)
            current = []
    segments.append(current)
    owners = [next((r["run"] for r in reversed(s) if "run" in r), None) for s in segments]
    # a segment that names no run (files from before runs had names, an untagged run in progress) is this run's only
    # when the file names no other run
    alone = all(o in (None, run) for o in owners)
    return [r for s, o in zip(segments, owners) if o == run or (o is None and alone) for r in s
            if r.get("run", run) == run]


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or one error line naming the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); fix or delete it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds {type(obj).__name__}, not a JSON object; fix or delete it")
    return obj


def eval_results(base: Path, stage: str, run: str, step: int | None) -> tuple[int | None, dict[str, dict],
                                                                             float | None]:
    """(step, {suite: result}, newest file mtime) of the evaluations of one run: those of checkpoint step `step` when
    it has any, else of the newest evaluated step. Per-problem files (<suite>-<task>.jsonl) are not read."""
    folders: dict[int, list[Path]] = {}  # step_6 and step_000006 are the same step (evaluators pad differently)
    for p in (base / "eval" / stage / run).glob("step_*"):
        if p.name[5:].isdigit() and p.is_dir():
            folders.setdefault(int(p.name[5:]), []).append(p)
    if not folders:
        return None, {}, None
    pick = step if step in folders else max(folders)
    files = sorted(f for d in folders[pick] for f in d.glob("*.json"))
    if not files:
        return None, {}, None
    return pick, {p.stem: read_json(p) for p in files}, max(p.stat().st_mtime for p in files)


def load_stage(base: Path, stage: str, run: str | None) -> StageData:
    data = StageData(stage, run)
    per_run = base / "logs" / stage / f"{run or 'default'}.jsonl"  # the loop's name for the old layout's run ""
    shared = base / "logs" / f"{stage}.jsonl"
    data.log = per_run if run is not None and per_run.is_file() else shared if shared.is_file() else None
    if data.log is not None:
        data.train, data.evals, data.summary = read_log(data.log, run)
    if run is not None and list_steps(run_dir(stage, run, base)):
        d = run_dir(stage, run, base)
        data.checkpoint = d / f"step_{list_steps(d)[-1]:06d}"
        data.meta = read_json(data.checkpoint / "meta.json")
    if run is not None:
        ckpt_step = data.meta.get("step") if data.meta else None
        data.results_step, data.results, data.results_time = eval_results(base, stage, run, ckpt_step)
    tps = tokens_per_step(data)
    total = 0
    for rec in data.train:  # a record's own "tokens" (variable-size batches) wins over the stage's constant
        step_tokens = rec.get("tokens", tps)
        total = total + step_tokens if step_tokens is not None and total is not None else None
        rec["tokens_seen"] = total
    return data


def tokens_per_step(data: StageData) -> int | None:
    if data.summary and data.summary.get("tokens_per_step"):
        return int(data.summary["tokens_per_step"])
    run_config = (data.meta or {}).get("run_config") or {}
    return int(run_config["total_batch_size"]) if run_config.get("total_batch_size") else None


def collect_stages(base: Path, runs: dict[str, str]) -> list[StageData]:
    """Every stage in pipeline order (absent ones too, for the summary table's "-")."""
    known = {r for s in STAGES for r in list_runs(s, base)} | {p.stem for p in (base / "logs").glob("*/*.jsonl")}
    for stage, run in runs.items():
        if run not in known:
            raise UserError(f"--run {run!r}: no checkpoints or logs of that run under {base}; runs: "
                            f"{', '.join(sorted(r for r in known if r)) or 'none'}")
    return [load_stage(base, s, runs.get(s) or default_run(base, s)) for s in STAGES]


# ---------------------------------------------------------------------------------------------------------------------
# figures derived from the files


def summary_rows(stages: list[StageData]) -> list[tuple[str, dict[str, float | None], dict[str, str]]]:
    """(label, {stage: value or None}, {stage: note}) per row of the summary table. A partial CORE or ChatCORE
    ("core20") gets its own row, labelled by its task count ("CORE-20"), in place of the full one; the full row stays
    when some stage has the full metric or none has either. The base stage's bpb falls back to its training log's last
    val_bpb (noted)."""
    metrics = {s.stage: s.metrics() for s in stages}
    rows = []
    for key, label in SUMMARY_ROWS:
        partial = sorted({k for m in metrics.values() for k in m if (p := _PARTIAL_RE.match(k)) and p[1] == key},
                         key=lambda k: -int(_PARTIAL_RE.match(k)[2].replace("_subset", "0")))
        has_full = any(key in m for m in metrics.values())
        keys = ([key] if has_full or not partial else []) + partial
        for k in keys:
            values, notes = {}, {}
            for s in stages:
                values[s.stage] = metrics[s.stage].get(k)
                # only base: its training log's val_bpb is on the pretraining validation slice, like `eval base`'s;
                # mid/sft log bpb on held-out conversations, another text
                if k == "bpb" and s.stage == "base" and values[s.stage] is None and (last := s.last_eval("val_bpb")):
                    values[s.stage], notes[s.stage] = last[1], "log"
            rows.append((label if k == key else _partial_label(stages, k, label), values, notes))
    return rows


def _partial_label(stages: list[StageData], key: str, label: str) -> str:
    """The name a result file gives a partial metric (a string field such as "core_name": "CORE-20" that starts with
    the full label), else "CORE-20" from the key's task count, or "CORE subset"."""
    for s in stages:
        for res in s.results.values():
            if key in (res.get("metrics") or {}):
                names = [v for k, v in res.items() if k.endswith("_name") and isinstance(v, str)]
                named = [n for n in names if n.startswith(label) and n != label]
                if named:
                    return named[0]
    n = _PARTIAL_RE.match(key)[2]
    return f"{label} subset" if n == "_subset" else f"{label}-{n}"


def stage_wall_s(data: StageData) -> float | None:
    for source in (data.summary, data.meta, data.train[-1] if data.train else None):
        if source and _is_number(source.get("elapsed_s")):
            return float(source["elapsed_s"])
    return None


def eval_wall_s(data: StageData) -> float:
    return sum(float(r["elapsed_s"]) for r in data.results.values() if _is_number(r.get("elapsed_s")))


def last_activity(stages: list[StageData]) -> float | None:
    """Unix time of the newest thing the report read: a record's "time", a checkpoint's saved_at, a result file."""
    times = [r["time"] for s in stages for r in (s.train[-1:] + s.evals[-1:] + ([s.summary] if s.summary else []))
             if _is_number(r.get("time"))]
    times += [s.meta["saved_at"] for s in stages if s.meta and _is_number(s.meta.get("saved_at"))]
    times += [s.results_time for s in stages if s.results_time is not None]
    return max(times) if times else None


# ---------------------------------------------------------------------------------------------------------------------
# machine and tokenizer


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(when: float | None = None) -> dict:
    """The machine and source tree the report is built on (`report reset` stores it as the run's environment);
    "date" is `when` (unix seconds), default now."""
    import torch

    from picochat.common import autodetect_device, pick_dtype

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = autodetect_device("auto")
    return {"git": git_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)),
            "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "gpus": gpus,
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "device": device.type,
            "dtype": str(pick_dtype(device)).removeprefix("torch.")}


def tokenizer_stats(base: Path, corpus: str) -> dict:
    """Vocabulary size, special tokens, hash, and bytes/token on the start of the corpus's validation split
    (`picochat tok-eval` prints its table only, so it is measured here); {} when there is no tokenizer."""
    from picochat.tokenizer import FILE_NAME, Tokenizer

    directory = base / "tokenizer"
    if not (directory / FILE_NAME).is_file():
        return {}
    tok = Tokenizer.load(directory)
    stats = {"vocab_size": tok.vocab_size, "special_tokens": sum(tok.is_special(i) for i in range(tok.vocab_size)),
             "hash": tok.hash()[:12], "corpus": corpus}
    try:
        from picochat.data.corpus import iter_documents

        docs, chars = [], 0
        for doc in iter_documents("val", corpus):
            docs.append(doc)
            chars += len(doc)
            if chars >= TOKENIZER_SAMPLE_CHARS:
                break
    except UserError:  # no corpus (e.g. only the tokenizer was copied here): the row is left out, said in the card
        return stats
    if docs:
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        n_tokens = sum(map(len, tok.encode(docs)))
        stats.update(val_docs=len(docs), val_bytes=n_bytes, bytes_per_token=n_bytes / max(n_tokens, 1))
    return stats
