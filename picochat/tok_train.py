"""Train the BPE tokenizer on the corpus's train split and save it to <base dir>/tokenizer.

    picochat tok-train                           # 8,192 tokens on the default corpus
    picochat tok-train --vocab-size 4096 --max-chars 50000000
    python -m picochat.tok_train --help

Prints the training time and a few sample encodings, then one JSON line {"vocab_size", "seconds", "hash"}.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from picochat.common import UserError, get_base_dir, print0, run_main
from picochat.config import f, log_config, parse_config
from picochat.tokenizer import Tokenizer

SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 12345 + 678",
    "<|bos|> is plain text here, 日本語 and émojis 🎉",
]


@dataclass
class TokTrainConfig:
    vocab_size: int = f(8192, "vocabulary size including the 9 special tokens")
    max_chars: int = f(2_000_000_000, "stop reading the corpus after this many characters")
    doc_cap: int = f(10_000, "use at most this many characters of each document (long documents would dominate)")
    corpus: str = f("default", "corpus name given to picochat.data.corpus.iter_documents")
    output_dir: str = f("", "where to save the tokenizer; empty = <base dir>/tokenizer")


def capped_texts(docs: Iterator[str], max_chars: int, doc_cap: int, stats: dict) -> Iterator[str]:
    """Documents cut to `doc_cap` chars, stopping once `max_chars` have been yielded; counts go into `stats`."""
    for doc in docs:
        if stats["chars"] >= max_chars:
            break
        text = doc[: min(doc_cap, max_chars - stats["chars"])]
        stats["chars"] += len(text)
        stats["docs"] += 1
        yield text


def _main(argv: list[str] | None) -> None:
    cfg, _, _ = parse_config(TokTrainConfig, argv, prog="picochat tok-train", description=__doc__.splitlines()[0])
    log_config(cfg, "tok-train")
    if cfg.max_chars < 1 or cfg.doc_cap < 1:
        raise UserError(f"--max-chars ({cfg.max_chars}) and --doc-cap ({cfg.doc_cap}) must be positive")
    from picochat.data.corpus import iter_documents  # imported here so `--help` works before the data stage exists

    out_dir = Path(cfg.output_dir) if cfg.output_dir else get_base_dir() / "tokenizer"
    stats = {"chars": 0, "docs": 0}
    t0 = time.perf_counter()
    tok = Tokenizer.train(capped_texts(iter_documents(split="train", corpus=cfg.corpus), cfg.max_chars,
                                       cfg.doc_cap, stats), cfg.vocab_size)
    seconds = time.perf_counter() - t0
    if stats["docs"] == 0:
        raise UserError(f"corpus '{cfg.corpus}' yielded no training documents; run `picochat data` first")
    print0(f"trained on {stats['docs']:,} documents / {stats['chars']:,} chars in {seconds:.1f} s")
    if tok.vocab_size < cfg.vocab_size:
        print0(f"note: the corpus ran out of pairs to merge; vocab_size is {tok.vocab_size}, not {cfg.vocab_size}")
    for text in SAMPLES:
        ids = tok.encode(text)
        # a token holding part of a UTF-8 character shows as its bytes (\xe6) rather than U+FFFD
        pieces = [tok.decode_bytes([i]).decode("utf-8", "backslashreplace") for i in ids]
        print0(f"  {len(text.encode()):3d} bytes -> {len(ids):3d} tokens: {pieces}")
    tok.save(out_dir)
    print0(f"saved to {out_dir}")
    print0(json.dumps({"vocab_size": tok.vocab_size, "seconds": round(seconds, 2), "hash": tok.hash()}))


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
