"""PackingLoader: full rows, BOS alignment, best-fit order, exact resume, rank sharding, clear errors.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_loader.py
"""

import json
import random
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat.common import UserError
from picochat.data.corpus import corpus_dir, write_corpus, write_manifest
from picochat.data.loader import PackingLoader

BOS = 256


class ByteTokenizer:
    """Test fixture with the two members the loader uses: byte ids 0..255 and a BOS id of 256."""

    bos_id = BOS

    def encode(self, texts, prepend=None, num_threads=1):
        return [([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in texts]


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def random_docs(n, seed=0, lo=1, hi=60):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def segments(row):
    """Split a row at its BOS tokens: [[BOS, ...], [BOS, ...], ...]."""
    starts = [i for i, t in enumerate(row) if t == BOS]
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def test_rows_full_bos_aligned_and_made_of_documents():
    docs = random_docs(60, seed=1)
    write_corpus("c", docs, rows_per_group=8, val_docs=8)
    whole = {tuple([BOS] + list(d.encode())) for d in docs[:-8]}
    loader = PackingLoader(ByteTokenizer(), "train", B=3, T=40, corpus="c", buffer_docs=6, tokenizer_threads=1)
    n_whole = n_crop = 0
    for _ in range(12):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 40) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        rows = torch.cat([x, y[:, -1:]], dim=1).tolist()  # (3, 41): the packed rows
        for row in rows:
            assert row[0] == BOS and len(row) == 41
            segs = segments(row)
            for seg in segs[:-1]:  # only the last document in a row can be cropped
                assert tuple(seg) in whole
            last = tuple(segs[-1])
            if last in whole:
                n_whole += 1
            else:  # a crop: a strict prefix of some document, filling the row exactly (no padding anywhere)
                assert any(w[:len(last)] == last and len(w) > len(last) for w in whole)
                n_crop += 1
    assert n_crop > 0 and n_whole > 0


def test_best_fit_order_hand_built():
    # tokens per doc (BOS + bytes): a 5, b 8, c 3, d 2, e 10, f 13; rows of T+1 = 10, 3 docs buffered
    train = ["aaaa", "bbbbbbb", "cc", "d", "eeeeeeeee", "ffffffffffff"]
    write_corpus("hand", train + ["zz"], rows_per_group=2, val_docs=1)
    loader = PackingLoader(ByteTokenizer(), "train", B=1, T=9, corpus="hand", buffer_docs=3, tokenizer_threads=1)

    def row():
        x, y = next(loader)
        return "".join("|" if t == BOS else chr(t) for t in x[0].tolist() + y[0, -1:].tolist())

    assert row() == "|bbbbbbb|d"  # b (8) is the largest that fits; then only d (2) fits the 2 left
    assert row() == "|eeeeeeeee"  # e fills the row exactly
    assert loader.epoch == 1
    assert row() == "|aaaa|aaaa"  # a (5) then, with f (13) and c (3) buffered, the second epoch's a (5)
    assert loader.epoch == 2
    assert row() == "|bbbbbbb|c"  # b (8); nothing fits 2, so the shortest (the older c, 3) is cropped
    assert row() == "|cc|d|eeee"  # c (3), d (2), then e (10) cropped to the last 5


def test_best_fit_ties_go_to_the_oldest_document():
    write_corpus("tie", ["aa", "bb", "cccccc", "zz"], rows_per_group=1, val_docs=1)
    loader = PackingLoader(ByteTokenizer(), "train", B=1, T=2, corpus="tie", buffer_docs=3, tokenizer_threads=1)
    rows = ["".join(chr(t) for t in next(loader)[0][0].tolist()[1:]) for _ in range(4)]
    assert rows == ["a", "b", "a", "b"]  # aa and bb (3 tokens each) both fill the row: the older one goes first


def _collect(loader, n):
    return [tuple(t.clone() for t in next(loader)) for _ in range(n)]


def test_resume_is_exact_including_across_epochs():
    docs = random_docs(50, seed=2, hi=40)
    write_corpus("r", docs, rows_per_group=4, val_docs=6)
    kw = dict(B=2, T=24, corpus="r", buffer_docs=5, tokenizer_threads=1)
    ref = PackingLoader(ByteTokenizer(), "train", **kw)
    states, batches, epochs = [], [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(ref.state_dict())))  # must survive JSON (it goes into checkpoints)
        batches.append(tuple(t.clone() for t in next(ref)))
        epochs.append(ref.epoch)
    assert max(epochs) >= 3, "the reference run must cross epoch boundaries"
    boundary = epochs.index(2)  # the batch that started epoch 2
    for i in sorted({0, 1, 7, boundary, boundary + 1, epochs.index(3), 39}):
        assert len(json.dumps(states[i])) < 1_000_000
        resumed = PackingLoader(ByteTokenizer(), "train", state=states[i], **kw)
        got = _collect(resumed, min(3, 40 - i))
        for j, (x, y) in enumerate(got):
            assert torch.equal(x, batches[i + j][0]) and torch.equal(y, batches[i + j][1]), (i, j)
        assert resumed.epoch == epochs[i + len(got) - 1]
        resumed.close()
    # a chain of resumes stays exact too
    loader = PackingLoader(ByteTokenizer(), "train", state=states[5], **kw)
    next(loader)
    loader = PackingLoader(ByteTokenizer(), "train", state=loader.state_dict(), **kw)
    x, _ = next(loader)
    assert torch.equal(x, batches[6][0])


def test_epochs_done_counts_documents_read():
    """epochs_done (what --max-epochs schedules by) counts documents that left the buffer: it rises monotonically,
    never runs ahead of `epoch`, and each document pulled past the buffer moves it by exactly 1 / documents."""
    docs = random_docs(30, seed=4, hi=30)
    write_corpus("e", docs, rows_per_group=4, val_docs=5)
    loader = PackingLoader(ByteTokenizer(), "train", B=2, T=16, corpus="e", buffer_docs=3, tokenizer_threads=1)
    n_train = sum(n for *_, n in loader.groups)
    assert loader.epochs_done() == 0.0
    seen = []
    for _ in range(60):
        next(loader)
        seen.append(loader.epochs_done())
        assert seen[-1] < loader.epoch
    assert seen == sorted(seen) and seen[-1] > 1.0
    for k in range(1, 2 * n_train):  # a document read without entering the buffer moves it by exactly 1 / n_train
        before = loader.epochs_done()
        loader._pull()
        assert loader.epochs_done() - before == pytest.approx(1 / n_train)
    loader._add(0, 0, np.zeros(3, dtype=np.int64))  # one waiting in the buffer is not done yet
    assert loader.epochs_done() - before == pytest.approx(0.0, abs=1e-12)
    loader.close()


def test_resume_rejects_a_state_from_another_setup():
    write_corpus("s", random_docs(30, seed=3), rows_per_group=2, val_docs=4)
    state = PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="s").state_dict()
    with pytest.raises(UserError, match="world_size"):
        PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="s", rank=1, world_size=2, state=state)


def test_ranks_read_disjoint_row_groups_covering_all():
    letters = "abcdefgh"
    rng = random.Random(4)
    docs = [letters[g] * rng.randint(3, 30) for g in range(8) for _ in range(2)]  # row group g is all letter g
    write_corpus("ranks", docs + ["zz"], rows_per_group=2, val_docs=1)
    seen = []
    for rank in (0, 1):
        loader = PackingLoader(ByteTokenizer(), "train", B=2, T=16, corpus="ranks", rank=rank, world_size=2,
                               buffer_docs=2, tokenizer_threads=1)
        assert [g for g, *_ in loader.groups] == list(range(rank, 8, 2))
        tokens = torch.cat([x for x, _ in _collect(loader, 20)]).unique().tolist()
        seen.append({chr(t) for t in tokens if t != BOS})
    assert seen[0] == set(letters[0::2]) and seen[1] == set(letters[1::2])


def test_too_few_row_groups_for_world_size_fails_fast():
    write_corpus("small", random_docs(20, seed=5), rows_per_group=4, val_docs=4)  # val: 1 row group
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="fewer than world_size 2"):
        PackingLoader(ByteTokenizer(), "val", B=1, T=16, corpus="small", rank=0, world_size=2)
    assert time.perf_counter() - t0 < 5


def test_split_without_documents_fails_fast():
    write_corpus("empty", random_docs(20, seed=6), rows_per_group=4, val_docs=4)
    directory = corpus_dir("empty")
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), directory / "shard_00001.parquet")
    write_manifest(directory, ["shard_00000.parquet", "shard_00001.parquet"], "shard_00001.parquet",
                   name="empty", source="test")
    with pytest.raises(UserError, match="'val'"):
        PackingLoader(ByteTokenizer(), "val", B=1, T=16, corpus="empty")


def test_missing_and_corrupt_shards_name_the_file():
    with pytest.raises(UserError, match="corpus 'nope' not found"):
        PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="nope")
    write_corpus("bad", random_docs(40, seed=7), rows_per_group=4, val_docs=4)
    shard = corpus_dir("bad") / "shard_00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated: caught by the size check before any thread starts
    with pytest.raises(UserError, match="shard_00000.parquet"):
        PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="bad")
    shard.write_bytes(data[:-64] + bytes(64))  # same size, footer destroyed: caught by the reader thread
    loader = PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="bad")
    with pytest.raises(UserError, match="shard_00000.parquet.*re-run"):
        next(loader)


def test_state_position_survives_buffer_larger_than_epoch():
    # 5 docs per epoch but 12 buffered: the buffer holds several epochs' copies of the same docs at once
    write_corpus("tiny", ["ab", "cde", "fghi", "j", "klmno", "zz"], rows_per_group=2, val_docs=1)
    kw = dict(B=2, T=7, corpus="tiny", buffer_docs=12, tokenizer_threads=1)
    ref = PackingLoader(ByteTokenizer(), "train", **kw)
    next(ref)
    state = ref.state_dict()
    assert len(state["buffer"]) >= 10 and state["epoch"] >= 3  # topped up before each pick, not after
    want = _collect(ref, 4)
    got = _collect(PackingLoader(ByteTokenizer(), "train", state=state, **kw), 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(want, got))
    assert np.all([torch.equal(a[1], b[1]) for a, b in zip(want, got)])
