"""General conversation data: SmolTalk from the hub, any JSONL of conversations, and two offline chat corpora.

- SmolTalk (HuggingFaceTB/smol-smoltalk, train ~460k / test ~24k): rows hold `messages`, a list of {role, content}
  with an optional leading system message, exactly the schema rendering reads.
- CustomJSON(path): one conversation a line, either {"messages": [...]} or the bare list of messages; each line is
  checked when the file is read, so a bad line is an error naming file and line, not a crash mid-training.
- ChitChat: `chitchat-dataset==0.9.0` (7,168 casual human chats; consecutive messages of one sender joined).
- Chatterbot: `chatterbot-corpus==1.3.3` (short Q&A conversations in YAML, English files; needs PyYAML).
- TopicalChat: BIG-bench `topical_chat` (1,078 long human conversations about a topic) from the bigbench sdist.
These are training data: they have no scorer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from picochat.common import UserError
from picochat.tasks.base import Task
from picochat.tasks.sources import choose_rows, package_dir
from picochat.tokenizer import validated_turns  # the renderer's own schema check, so both accept the same files


class ChatTask(Task):
    """Conversations held in memory as a list; no scorer."""

    def __init__(self, conversations: list[dict], **slice_kw):
        super().__init__(**slice_kw)
        self.conversations = conversations

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise UserError(f"{type(self).__name__} is training data only: it has no scorer")


class SmolTalk(ChatTask):
    def __init__(self, split: str = "train", source: str = "auto", data_dir: str | Path | None = None, **slice_kw):
        if split not in ("train", "test"):
            raise UserError(f"SmolTalk has splits train and test, not {split!r}")
        rows, self.source = choose_rows(source, ("HuggingFaceTB/smol-smoltalk", "default", split), None, data_dir)
        super().__init__([{"messages": r["messages"]} for r in rows], **slice_kw)


def _merged(turns: list[tuple[str, str]]) -> list[str]:
    """The texts of (speaker, text) turns with one speaker's consecutive turns joined by a newline: two humans chat
    in bursts, the conversation format alternates."""
    merged: list[tuple[str, str]] = []
    for speaker, text in turns:
        text = text.strip()
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1] = (speaker, merged[-1][1] + "\n" + text)
        else:
            merged.append((speaker, text))
    return [t for _, t in merged]


def _alternating(texts: list[str]) -> dict | None:
    """Turns of two speakers, first = user, as a conversation ending with the assistant; None if under one pair."""
    texts = texts[: len(texts) // 2 * 2]
    if not texts:
        return None
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[k % 2], "content": t} for k, t in enumerate(texts)]}


class CustomJSON(ChatTask):
    def __init__(self, path: str | Path, **slice_kw):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"conversation file {path} does not exist; give a JSONL file, one conversation a line")
        conversations = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    conv = {"messages": row} if isinstance(row, list) else row
                    validated_turns(conv)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not JSON ({e.msg}); each line must be one conversation") \
                        from None
                except UserError as e:
                    raise UserError(f"{path}:{lineno}: {e}") from None
                conversations.append(conv)
        if not conversations:
            raise UserError(f"conversation file {path} has no conversations")
        self.path = path
        super().__init__(conversations, **slice_kw)


class ChitChat(ChatTask):
    def __init__(self, path: str | Path | None = None, **slice_kw):
        """`path`: a dataset.json in the package's schema (default: the installed package's)."""
        if path is None:
            path = package_dir("chitchat_dataset", "chitchat-dataset==0.9.0") / "dataset.json"
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        conversations = []
        for key in sorted(data):  # sorted: the order of a JSON object is not something to rely on
            conv = _alternating(_merged([(m["sender"], m["text"]) for turn in data[key]["messages"] for m in turn]))
            if conv:
                conversations.append(conv)
        super().__init__(conversations, **slice_kw)


class Chatterbot(ChatTask):
    def __init__(self, language: str = "english", path: str | Path | None = None, **slice_kw):
        """`path`: a folder of corpus .yml files (default: the installed package's files of `language`)."""
        try:
            import yaml
        except ImportError:
            raise UserError("the chatterbot corpus is YAML: pip install pyyaml") from None
        root = Path(path) if path is not None else \
            package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / language
        if not root.is_dir():
            raise UserError(f"no chatterbot corpus folder {root} (languages: english, spanish, german, ...)")
        conversations = []
        for path in sorted(root.glob("*.yml")):
            # BaseLoader keeps every scalar a string: the safe loader would turn a reply "yes" into True. The libyaml
            # one where PyYAML has it: the pure-Python parser took 3.8 s for the English corpus, most of a mixture's
            # build time
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CBaseLoader", yaml.BaseLoader)) \
                or {}
            for texts in doc.get("conversations", []):
                conv = _alternating([t.strip() for t in texts if isinstance(t, str) and t.strip()])
                if conv:
                    conversations.append(conv)
        super().__init__(conversations, **slice_kw)


class TopicalChat(ChatTask):
    """BIG-bench's `topical_chat` (Gopalakrishnan et al., 2019): 1,078 knowledge-grounded human conversations of
    about 22 turns. The task.json has one row per turn to predict, `{"input": 'agent_A: "..." agent_B: "..."',
    "target": '"..."', "comment": <conversation id>}`, the speakers renamed so the target is always agent_B's. So
    a conversation is its rows' longest input (every earlier turn) plus that row's target (checked on the real file:
    every other row's target is inside it), split at the speaker markers, the quotes around each turn removed."""

    def __init__(self, path: str | Path | None = None, **slice_kw):
        """`path`: the topical_chat folder or its task.json (default: unpacked from the bigbench sdist)."""
        from picochat.tasks.sources import bigbench_tasks

        path = Path(path) if path is not None else bigbench_tasks(["topical_chat"])["topical_chat"]
        path = path / "task.json" if path.is_dir() else path
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not BIG-bench's topical_chat task.json ({type(e).__name__}: {e})") from None
        longest: dict[str, dict] = {}  # conversation id -> its row with the longest input, in first-seen order
        for r in rows:
            if r["comment"] not in longest or len(r["input"]) > len(longest[r["comment"]]["input"]):
                longest[r["comment"]] = r
        conversations = []
        for r in longest.values():
            pieces = _SPEAKER.split(r["input"])  # ['', 'agent_A', text, 'agent_B', text, ...]
            turns = list(zip(pieces[1::2], pieces[2::2])) + [("agent_B", r["target"])]
            conv = _alternating(_merged([(who, _unquoted(text)) for who, text in turns]))
            if conv:
                conversations.append(conv)
        super().__init__(conversations, **slice_kw)


_SPEAKER = re.compile(r"(?:^|\s)(agent_[AB]): ")


def _unquoted(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text
