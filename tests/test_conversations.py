"""Conversation batches (picochat/data/conversations.py) and the shared Packer's mask: mask alignment through
packing and splitting, exact resume, rank sharding, long conversations, all-masked rows, the validation slice; and
the pretraining loader's batches pinned across the Packer change.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_conversations.py
"""

import hashlib
import random

import numpy as np
import pytest

from picochat.data.corpus import write_corpus
from picochat.data.loader import PackingLoader, ValidationSlice

BOS = 256


class ByteTokenizer:
    """The two members PackingLoader uses: byte ids 0..255 and BOS 256 (independent of any trained tokenizer, so
    the pinned digest below depends on the loader alone)."""

    bos_id = BOS

    def encode(self, texts, prepend=None, num_threads=1):
        return [([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in texts]


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


# sha256 of the batches below, computed on commit ae24ec9 (the Packer before it carried masks): the generalised
# Packer must give pretraining exactly the rows it gave before, under both policies, and the same validation slice
PINNED_PRETRAIN_DIGEST = "8f0341d44c7351196d893fcee7644be9df0548fc93dde3dea0887032180998d5"


def pretrain_digest() -> str:
    rng = random.Random(7)
    docs = ["".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 70))) for _ in range(80)]
    write_corpus("pin", docs, rows_per_group=4, val_docs=10)
    h = hashlib.sha256()
    for packing in ("split", "crop"):
        loader = PackingLoader(ByteTokenizer(), "train", B=2, T=24, corpus="pin", buffer_docs=5,
                               tokenizer_threads=1, packing=packing)
        for i in range(60):
            for t in next(loader):
                h.update(t.numpy().tobytes())
            if i == 25:  # a resumed loader continues with the same rows
                state = loader.state_dict()
                loader.close()
                loader = PackingLoader(ByteTokenizer(), "train", B=2, T=24, corpus="pin", buffer_docs=5,
                                       tokenizer_threads=1, packing=packing, state=state)
        assert loader.epoch >= 2, loader.epoch  # the pinned rows cross a pass boundary
        h.update(repr(loader.stats()).encode())
        loader.close()
    val = ValidationSlice(ByteTokenizer(), B=2, T=24, tokens=400, corpus="pin", tokenizer_threads=1)
    for x, y in val.batches():
        h.update(x.numpy().tobytes() + y.numpy().tobytes())
    return h.hexdigest()


def test_pretraining_batches_unchanged_by_the_mask_carrying_packer():
    assert pretrain_digest() == PINNED_PRETRAIN_DIGEST
