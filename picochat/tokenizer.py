"""The BPE tokenizer: training (rustbpe), encoding/decoding (tiktoken), special tokens, and chat rendering.

Training happens once per corpus with `picochat tok-train`; every later stage calls `get_tokenizer()` to load the
saved file. The file (`<dir>/tokenizer.json`) is self-describing JSON: the split regex, the mergeable byte
sequences in rank order (base64) and the special tokens, so loading needs only tiktoken, never rustbpe.

Chat rendering turns a conversation dict into token ids plus a loss mask (1 = the model is trained to predict this
token). The same schema is used by SFT data, the chat CLI and the API:

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": str | [{"type": "text" | "python" | "python_output", "text": str}, ...]}]}

Try it:  python -c "from picochat.tokenizer import get_tokenizer; print(get_tokenizer().encode('hello world'))"
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from picochat.common import UserError, get_base_dir

if TYPE_CHECKING:  # torch is only needed by token_bytes(); importing it costs ~1 s the tokenizer commands do not need
    import torch

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output is pasted back between these
    "<|output_end|>",
]

# The GPT-4 (cl100k) split, with one change: digits are split into runs of at most 2 (cl100k uses 3). With an
# 8k vocabulary, 3-digit number tokens would spend ~1,000 ids on numbers; 2 digits need only 100.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,2}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)

FILE_NAME = "tokenizer.json"
FILE_FORMAT = "picochat-tokenizer"
FILE_VERSION = 1

# Assistant content part types and the special tokens wrapping them (None = no wrapper).
_PART_WRAPPERS = {
    "text": None,
    "python": ("<|python_start|>", "<|python_end|>"),
    "python_output": ("<|output_start|>", "<|output_end|>"),
}


class Tokenizer:
    """Byte-level BPE with 9 special tokens occupying the LAST 9 ids, in SPECIAL_TOKENS order.

    `encode` never produces a special id from text: "<|bos|>" typed by a user is ordinary bytes. Special ids enter
    only through `prepend`/`append` or the render_* methods.
    """

    def __init__(self, pattern: str, ranks: list[bytes], special_tokens: Sequence[str] = SPECIAL_TOKENS):
        """`ranks[i]` is the byte sequence of token id i (the first 256 are the single bytes)."""
        self._pattern = pattern
        self._ranks = list(ranks)
        self._specials = {name: len(self._ranks) + i for i, name in enumerate(special_tokens)}
        self._enc = tiktoken.Encoding(
            name="picochat",
            pat_str=pattern,
            mergeable_ranks={b: i for i, b in enumerate(self._ranks)},
            special_tokens=self._specials,
        )

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train BPE with rustbpe. `vocab_size` counts the 9 special tokens. If the texts run out of pairs to merge
        the result is smaller than asked; check `.vocab_size`."""
        import rustbpe  # only training needs it; loading a saved tokenizer must work without it

        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise UserError(f"vocab_size {vocab_size} is too small: it must be at least {min_size} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        pairs = bpe.get_mergeable_ranks()  # [(bytes, rank)], ranks 0..n-1
        ranks: list[bytes] = [b""] * len(pairs)
        for token, rank in pairs:
            ranks[rank] = bytes(token)
        return cls(SPLIT_PATTERN, ranks)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load `<directory>/tokenizer.json` as written by `save`."""
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            raise UserError(f"no tokenizer at {path}; run `picochat tok-train` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FILE_FORMAT or data.get("version") != FILE_VERSION:
                raise ValueError(f"expected format {FILE_FORMAT!r} version {FILE_VERSION}")
            ranks = [base64.b64decode(s, validate=True) for s in data["ranks"]]
            pattern, specials = data["pattern"], data["special_tokens"]
            if len(ranks) < 256 or sorted(ranks[:256]) != [bytes([i]) for i in range(256)]:
                raise ValueError("the first 256 tokens must be the single bytes")
            if len(set(ranks)) != len(ranks):
                raise ValueError("a token appears twice")
            if specials != SPECIAL_TOKENS:
                raise UserError(f"tokenizer file {path} has special tokens {specials}, this picochat expects "
                                f"{SPECIAL_TOKENS}; run `picochat tok-train` to rebuild it")
            return cls(pattern, ranks, specials)  # tiktoken raises ValueError for a pattern that does not compile
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
                binascii.Error, ValueError) as e:
            raise UserError(f"tokenizer file {path} is corrupt ({type(e).__name__}: {e}); "
                            f"run `picochat tok-train` to rebuild it") from None

    def save(self, directory: str | Path) -> None:
        """Write `<directory>/tokenizer.json` atomically: a temp file, fsynced, renamed over the old one, then the
        folder fsynced, so a crash or power loss leaves the old file or the new one, never a half-written one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"format": FILE_FORMAT, "version": FILE_VERSION, **self._canonical(), "hash": self.hash()}
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the tokenizer is no secret and others' jobs read it
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, directory / FILE_NAME)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # makes the rename itself durable
        finally:
            os.close(dir_fd)

    def _canonical(self) -> dict:
        return {
            "pattern": self._pattern,
            "ranks": [base64.b64encode(b).decode("ascii") for b in self._ranks],
            "special_tokens": list(self._specials),
        }

    def hash(self) -> str:
        """Hex SHA-256 of the split pattern, the merges (rank order) and the special tokens: equal hashes mean equal
        encodings. Checkpoints store it so a model is never paired with a different tokenizer."""
        blob = json.dumps(self._canonical(), sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    # -- vocabulary --------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._ranks) + len(self._specials)

    @property
    def bos_id(self) -> int:
        return self._specials["<|bos|>"]

    def special_id(self, name: str) -> int:
        """Id of a special token by its full name, e.g. "<|assistant_end|>"."""
        try:
            return self._specials[name]
        except KeyError:
            raise UserError(f"unknown special token {name!r}; the special tokens are {list(self._specials)}") from None

    def is_special(self, token_id: int) -> bool:
        return len(self._ranks) <= token_id < self.vocab_size

    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int32: UTF-8 byte length of each token, 0 for special tokens. Summing it over the targets
        turns a loss in nats/token into bits per byte, a number comparable across tokenizers."""
        import torch

        lengths = [len(b) for b in self._ranks] + [0] * len(self._specials)
        return torch.tensor(lengths, dtype=torch.int32)

    # -- encode / decode ---------------------------------------------------------------------------------------------

    def encode(self, text: str | list[str], prepend: int | None = None, append: int | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of `text` (special-token strings in it are ordinary text). A list of strings is encoded on
        `num_threads` threads and gives a list of id lists. `prepend`/`append` add one id (e.g. bos_id) to each."""
        if isinstance(text, str):
            ids = self._enc.encode_ordinary(text)
            return self._wrap(ids, prepend, append)
        if isinstance(text, list):
            batch = self._enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [self._wrap(ids, prepend, append) for ids in batch]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    @staticmethod
    def _wrap(ids: list[int], prepend: int | None, append: int | None) -> list[int]:
        if prepend is not None:
            ids.insert(0, prepend)
        if append is not None:
            ids.append(append)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids become their names; bytes that are not valid UTF-8 become U+FFFD."""
        return self._enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of `ids`, so a streamer can hold back an incomplete UTF-8 character until its next token."""
        return self._enc.decode_bytes(list(ids))

    # -- chat rendering ----------------------------------------------------------------------------------------------

    def render_conversation(self, conv: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) for a conversation, both truncated to `max_tokens`. mask[i] == 1 iff ids[i] is a training
        target: assistant text, python calls including their <|python_start|>/<|python_end|>, and
        <|assistant_end|>. BOS, user turns, <|assistant_start|> and tool output (written by the tool, not the
        model) are 0."""
        ids, mask = self._render(validated_turns(conv))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conv: dict) -> list[int]:
        """Prompt ids asking the model for the next assistant turn: a final assistant message, if any, is dropped;
        the rest must end with a user message; <|assistant_start|> is appended."""
        messages = _messages(conv)
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        turns = validated_turns({"messages": messages})
        if turns[-1][1] != "user":
            raise UserError(f"message {turns[-1][0]}: a completion prompt must end with a user message")
        ids, _ = self._render(turns)
        ids.append(self.special_id("<|assistant_start|>"))
        return ids

    def _render(self, turns: list[tuple[int, str, str | list]]) -> tuple[list[int], list[int]]:
        sp = self._specials
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], target: int) -> None:
            ids.extend(tokens)
            mask.extend([target] * len(tokens))

        add([self.bos_id], 0)
        for _, role, content in turns:
            if role == "user":
                add([sp["<|user_start|>"]], 0)
                add(self._enc.encode_ordinary(content), 0)
                add([sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            for part in content:
                wrapper = _PART_WRAPPERS[part["type"]]
                target = 0 if part["type"] == "python_output" else 1
                if wrapper:
                    add([sp[wrapper[0]]], target)
                add(self._enc.encode_ordinary(part["text"]), target)
                if wrapper:
                    add([sp[wrapper[1]]], target)
            add([sp["<|assistant_end|>"]], 1)  # the model must learn to stop
        return ids, mask


def _messages(conv: dict) -> list:
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise UserError('a conversation must be a dict {"messages": [...]} with a list of messages')
    return conv["messages"]


def validated_turns(conv: dict) -> list[tuple[int, str, str | list]]:
    """Check the schema and return (original message index, role, content) turns with the system message merged
    into the first user message and assistant content normalized to a list of parts."""
    messages = _messages(conv)
    turns: list[tuple[int, str, str | list]] = []
    system: str | None = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise UserError(f"message {i}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant"):
            raise UserError(f"message {i}: unknown role {role!r}; use 'system', 'user' or 'assistant'")
        if role == "system":
            if i != 0:
                raise UserError(f"message {i}: a system message is only allowed as the first message")
            if not isinstance(content, str):
                raise UserError(f"message {i}: system content must be a string")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise UserError(f"message {i}: role {role!r} where {expected!r} was expected "
                            f"(after an optional system message, roles must alternate user/assistant, user first)")
        if role == "user":
            if not isinstance(content, str):
                raise UserError(f"message {i}: user content must be a string, got {type(content).__name__}")
            if system is not None:
                content, system = f"{system}\n\n{content}", None
            turns.append((i, role, content))
        else:
            turns.append((i, role, _assistant_parts(i, content)))
    if not turns:
        raise UserError("the conversation has no user message")
    return turns


_validated_turns = validated_turns  # the old private name, kept for code written against it


def _assistant_parts(i: int, content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise UserError(f"message {i}: assistant content must be a string or a list of parts")
    for j, part in enumerate(content):
        valid = isinstance(part, dict) and part.get("type") in _PART_WRAPPERS and isinstance(part.get("text"), str)
        if not valid:
            raise UserError(f"message {i} part {j}: expected {{'type': one of {list(_PART_WRAPPERS)}, "
                            f"'text': str}}, got {part!r:.100}")
    return content


def get_tokenizer(directory: str | Path | None = None) -> Tokenizer:
    """The trained tokenizer from `directory` (default: <base dir>/tokenizer)."""
    directory = Path(directory) if directory is not None else get_base_dir() / "tokenizer"
    if not (directory / FILE_NAME).is_file():
        raise UserError(f"no tokenizer at {directory}; run `picochat tok-train` first")
    return Tokenizer.load(directory)
