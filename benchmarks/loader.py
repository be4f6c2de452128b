"""Packing loader figures: the share of a pass's tokens that reach a training row, how evenly documents are emitted,
and the loader's own time per row. Prints one JSON line.

    PICOCHAT_BASE_DIR=... python benchmarks/loader.py            # needs `picochat data prepare` and `tok-train`
    python benchmarks/loader.py --docs 1000 --passes 2           # quicker

Two length distributions, each measured at T = 256, 512, 2048 under both policies:
  embedded   the token lengths of the embedded corpus's training documents (tokenized once with your tokenizer),
  longtail   a FineWeb-like log-normal (median 650 tokens, sigma 1.0: ~12% longer than 2,048, a few 20k+).
Both are written as corpora of "i L" texts that a counting tokenizer turns into document i's L tokens, so every
emitted token names its document and the figures need no trust in the loader's own counters:
  used_frac       content tokens that reached a row / the tokens of the documents that started in a row (split's
                  pieces still buffered at the end count as lost: a slight underestimate),
  starts_min/max  how often the least / most emitted document started in the first `passes` passes' worth of
                  document starts (ideal: `passes` for every document; +-1 at the passes' edges),
  max_wait_rows   the most rows any document waited in the 256-document buffer (bounded: no starvation), against
  rows_per_pass   the rows one pass of the corpus fills when every token is used,
  pack_us_per_row the packing alone, per row (the counting tokenizer costs next to nothing).
Then us_per_row_T256: the real loader (real tokenizer, background thread) on the embedded corpus at T = 256, B = 16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picochat.common import get_base_dir  # noqa: E402
from picochat.data.corpus import iter_documents, write_corpus  # noqa: E402
from picochat.data.loader import PackingLoader  # noqa: E402

from _env import stamp  # noqa: E402 (benchmarks/_env.py: machine, date, command)

STRIDE = 1_000_000  # token id = doc * STRIDE + position + 1; 0 is BOS


class CountingTokenizer:
    """"i L" -> [BOS] + document i's L position ids."""

    bos_id = 0

    def encode(self, texts, prepend=None, num_threads=1):
        out = []
        for t in texts:
            i, n = map(int, t.split())
            ids = np.arange(i * STRIDE + 1, i * STRIDE + n + 1)
            out.append(np.concatenate(([prepend], ids)) if prepend is not None else ids)
        return out


def measure(corpus: str, lengths: list[int], T: int, packing: str, passes: int, B: int = 16) -> dict:
    """Rows until `passes` passes' worth of document starts were emitted; used fraction and start counts from them."""
    loader = PackingLoader(CountingTokenizer(), "train", B, T, corpus=corpus, packing=packing, tokenizer_threads=1)
    n_docs = len(lengths)
    starts, content, wait, busy, rows_done, seen = [], 0, 0, 0.0, 0, {}
    while len(starts) < passes * n_docs:
        t0 = time.perf_counter()
        x, y = next(loader)
        busy += time.perf_counter() - t0
        rows_done += B
        for _, seq in loader.packer.keys:  # the row count when each buffered document was first seen there
            seen.setdefault(seq, rows_done)
        wait = max(wait, rows_done - seen[min(seq for _, seq in loader.packer.keys)])
        rows = np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1)  # (B, T+1)
        tok = rows[rows > 0]
        starts += (tok[tok % STRIDE == 1] // STRIDE).tolist()
        content += len(tok)
    counts = np.bincount(starts[:passes * n_docs], minlength=n_docs)
    # every started document brought all its tokens: what did not reach a row was dropped, or (split) is still
    # buffered, which makes the figure a slight underestimate for split
    started = np.bincount(starts, minlength=n_docs) @ np.asarray(lengths)
    loader.close()
    return {"used_frac": round(content / started, 4), "starts_min": int(counts.min()),
            "starts_max": int(counts.max()), "max_wait_rows": int(wait), "rows_per_pass": round(sum(lengths) / (T + 1)),
            "pack_us_per_row": round(busy / rows_done * 1e6, 1)}


def write_lengths(name: str, lengths: list[int]) -> None:
    write_corpus(name, [f"{i} {n}" for i, n in enumerate(lengths)] + ["0 5"] * 8, rows_per_group=64, val_docs=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=2000, help="documents in the long-tailed corpus")
    ap.add_argument("--passes", type=int, default=3, help="passes measured per setting")
    args = ap.parse_args()

    from picochat.tokenizer import get_tokenizer

    real_base = get_base_dir()
    tok = get_tokenizer()
    texts = list(iter_documents("train", "default"))
    embedded = [len(ids) for ids in tok.encode(texts)]
    rng = np.random.default_rng(0)
    longtail = [int(x) for x in np.clip(rng.lognormal(np.log(650), 1.0, args.docs), 16, 100_000)]

    out = {"passes": args.passes, "corpora": {"embedded": {"docs": len(embedded), "tokens": sum(embedded)},
                                              "longtail": {"docs": len(longtail), "tokens": sum(longtail)}}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PICOCHAT_BASE_DIR"] = tmp
        for name, lengths in (("embedded", embedded), ("longtail", longtail)):
            write_lengths(name, lengths)
            for packing in ("split", "crop"):
                for T in (256, 512, 2048):
                    out.setdefault(name, {}).setdefault(packing, {})[T] = measure(name, lengths, T, packing,
                                                                                  args.passes)
    os.environ["PICOCHAT_BASE_DIR"] = str(real_base)

    for packing in ("split", "crop"):  # the loader's own time: real tokenizer, real corpus, prefetch thread
        loader = PackingLoader(tok, "train", 16, 256, packing=packing)
        next(loader)
        t0, n = time.perf_counter(), 200
        for _ in range(n):
            next(loader)
        out.setdefault("us_per_row_T256", {})[packing] = round((time.perf_counter() - t0) / (n * 16) * 1e6, 1)
        loader.close()
    print(json.dumps({**stamp(__file__), **out}))


if __name__ == "__main__":
    main()
