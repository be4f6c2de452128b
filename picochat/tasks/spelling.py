"""Spelling tasks generated from an English word list: SpellingBee (count a letter with the python tool) and
SimpleSpelling (spell a word letter by letter). A small model cannot see the letters inside its tokens, so it must
count with code, and learn spelling as a task of its own: "how many r are in strawberry" is the classic failure.

Words (lowercase a-z, 3-14 letters) come from `words=` (a text file, one word a line), else Debian's `wamerican`
(/usr/share/dict/american-english), else PyPI `english-words==2.0.2` (its `web2` list). About one word in ten (by a
hash of the word, `base.split_of`) is held out for the test split and one in ten for val, so test words are never
trained on. Example i of a split is the same on every machine: it is drawn from its own generator seeded with
(seed, split, i).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from picochat.common import UserError
from picochat.tasks.base import Task, check_split, last_number, seeded, split_of
from picochat.tools import calculator

SYSTEM_WORDS = Path("/usr/share/dict/american-english")
_WORD = re.compile(r"[a-z]{3,14}")

_COUNT_QUESTIONS = (
    "How many {letter} are in {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the {letter}'s in the word {word}.",
    "how many {letter}s does {word} have",
    "In the word {word}, how many times do you see {letter}?",
    "What is the number of {letter} letters in {word}?",
    "Can you tell me how many {letter} there are in {word}?",
    "{word}: how many {letter}?",
)
_SPELL_QUESTIONS = (
    "Spell the word {word}.",
    "How do you spell {word}?",
    "Spell {word} letter by letter.",
    "Write out the letters of {word}, one at a time.",
)


def load_words(words: str | Path | None = None) -> list[str]:
    """The sorted word list: `words` if given, else wamerican, else english-words; one error line if none is there."""
    if words is not None:
        path = Path(words)
        if not path.is_file():
            raise UserError(f"word list {path} does not exist; give a text file with one word a line")
        raw = path.read_text(encoding="utf-8", errors="replace").split()
    elif SYSTEM_WORDS.is_file():
        raw = SYSTEM_WORDS.read_text(encoding="utf-8", errors="replace").split()
    else:
        try:
            from english_words import get_english_words_set
        except ImportError:
            raise UserError("the spelling tasks need a word list: apt-get install wamerican, or pip install "
                            "english-words==2.0.2, or pass words=<file>") from None
        raw = get_english_words_set(["web2"], lower=True, alpha=True)
    found = sorted({w for w in raw if _WORD.fullmatch(w)})
    if not found:
        raise UserError(f"the word list {words or SYSTEM_WORDS} has no lowercase a-z words of 3-14 letters")
    return found


def split_words(words: list[str], split: str) -> list[str]:
    check_split(split, "the spelling tasks")
    kept = [w for w in words if split_of(w) == split]  # by a hash of the word: test words are never trained on
    if not kept:
        raise UserError(f"the word list is too small to have {split} words; give a longer one")
    return kept


class _WordTask(Task):
    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, words: str | Path | None = None,
                 **slice_kw):
        super().__init__(**slice_kw)
        self.words = split_words(load_words(words), split)
        self.size = size
        self.seed = f"{seed}:{split}"  # each split draws from its own stream too

    def num_examples(self) -> int:
        return self.size


class SpellingBee(_WordTask):
    """Count one letter in a word: count with python, state the count."""

    def get_example(self, index: int) -> dict:
        rng = seeded(self.seed, index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes one it lacks, so 0 is a possible answer
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        quote = rng.choice(("", "'", '"'))
        question = rng.choice(_COUNT_QUESTIONS).format(letter=f"{quote}{letter}{quote}", word=f"{quote}{word}{quote}")
        if rng.random() < 0.3:
            question = question.lower()
        # The call copies the word token for token. Quoted, 'strawberry' pre-tokenises as 's + trawberry (a
        # contraction) and "wrestling" as one piece with its quote: other tokens than the ` straw|berry` of the
        # question and of the sentence before the call, so a small model would have to re-spell the word; the
        # leading space (which .count ignores) keeps the same tokens. Spelled out first (nanochat's order), the CPU
        # demo's model misspelled the word and copied its own misspelling into the call ("Spelled out, wrestling
        # is: p, o, n, ...", then 'cornies'.count('s')); SimpleSpelling teaches spelling.
        expr = f'" {word}".count("{letter}")'
        count = int(calculator(expr))
        reply = [
            {"type": "text", "text": f"Let me count the '{letter}' in {word} with Python.\n"},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\nThe letter '{letter}' appears {count} time{'' if count == 1 else 's'} "
                                     f"in \"{word}\"."},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
                "word": word, "letter": letter, "count": count}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        got = last_number(completion)
        return got is not None and got == conversation["count"]

    def chance(self, conversations: list[dict]) -> float:
        # the best constant answer: about half the questions have the count 1 (mostly a letter of the word, once)
        counts = Counter(c["count"] for c in conversations)
        return max(counts.values()) / len(conversations) if conversations else 0.0

    def diagnose(self, conversation: dict, completion: str) -> dict[str, bool]:
        """tool: the reply calls python; right_call: with this question's word and letter (whatever the quoting)."""
        call = re.search(r"<\|python_start\|>(.*?)<\|python_end\|>", completion, re.S)
        word, letter = conversation["word"], conversation["letter"]
        right = call is not None and re.fullmatch(
            rf"\s*['\"] ?{word}['\"]\s*\.count\(\s*['\"]{letter}['\"]\s*\)\s*", call.group(1)) is not None
        return {"tool": call is not None, "right_call": right}


class SimpleSpelling(_WordTask):
    """Spell a word: the reply is its letters separated by spaces."""

    def get_example(self, index: int) -> dict:
        rng = seeded(self.seed, index)
        word = rng.choice(self.words)
        question = rng.choice(_SPELL_QUESTIONS).format(word=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": " ".join(word)}], "word": word}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        letters = [x for x in re.split(r"[\s,\-]+", completion.strip().lower().rstrip(".")) if x]
        return letters == list(conversation["word"])
