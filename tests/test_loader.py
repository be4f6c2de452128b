"""PackingLoader: full rows, BOS alignment, best-fit order, every document once per pass, the split policy's used
fraction, exact resume (both policies), rank sharding, clear errors; the validation slice; the corpus token count.

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
from picochat.data.loader import PackingLoader, ValidationSlice, corpus_tokens

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
    loader = PackingLoader(ByteTokenizer(), "train", B=3, T=40, corpus="c", buffer_docs=6, tokenizer_threads=1,
                           packing="crop")  # split's pieces are checked token by token further down
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


# tokens per doc (BOS + bytes): a 5, b 8, c 3, d 2, e 10, f 13; rows of T+1 = 10, 3 docs buffered; the clock ticks
# at each arrival and placement, and a document more than 12 ticks old (4 buffers) starts the next row
HAND_ROWS = {
    "crop": ["|bbbbbbb|d",  # b (8) is the largest that fits; then only d (2) fits the 2 left
             "|eeeeeeeee",  # e fills the row exactly
             "|fffffffff",  # f is longer than a row: under crop it starts one (and its last 3 are dropped)
             "|aaaa|aaaa",  # a (5), then the second epoch's a (5)
             "|cc|cc|d|b"],  # c is 13 ticks old: it starts the row; c' and d' fit; nothing fits 2: b' is cropped
    "split": ["|bbbbbbb|d", "|eeeeeeeee",
              "|aaaa|aaaa",  # f (13) waits: split has no long-first rule, it will be split anyway
              "|bbbbbbb|c",  # nothing fits 2: the shortest (the older c, 3) fills it, its rest goes back as |c
              "|c|cc|d|ee",  # the |c piece is 14 ticks old and starts the row; e' (10) is split to fill the last 3
              "|fffffffff",  # f is 15 ticks old: its first 10, then
              "|fff|aaaa|"],  # its |fff piece (same age) starts the next row; one slot left: a BOS, not a document
}


@pytest.mark.parametrize("packing", ["crop", "split"])
def test_best_fit_order_hand_built(packing):
    train = ["aaaa", "bbbbbbb", "cc", "d", "eeeeeeeee", "ffffffffffff"]
    write_corpus("hand", train + ["zz"], rows_per_group=2, val_docs=1)
    loader = PackingLoader(ByteTokenizer(), "train", B=1, T=9, corpus="hand", buffer_docs=3, tokenizer_threads=1,
                           packing=packing)

    def row():
        x, y = next(loader)
        return "".join("|" if t == BOS else chr(t) for t in x[0].tolist() + y[0, -1:].tolist())

    rows = [row() for _ in HAND_ROWS[packing]]
    assert rows == HAND_ROWS[packing]
    assert loader.epoch == (2 if packing == "crop" else 3)


def test_best_fit_ties_go_to_the_oldest_document():
    write_corpus("tie", ["aa", "bb", "c", "zz"], rows_per_group=1, val_docs=1)
    loader = PackingLoader(ByteTokenizer(), "train", B=1, T=2, corpus="tie", buffer_docs=3, tokenizer_threads=1)
    rows = ["".join(chr(t) for t in next(loader)[0][0].tolist()[1:]) for _ in range(4)]
    assert rows == ["a", "b", "a", "b"]  # aa and bb (3 tokens each) both fill the row: the older one goes first


def _collect(loader, n):
    return [tuple(t.clone() for t in next(loader)) for _ in range(n)]


@pytest.mark.parametrize("packing", ["crop", "split"])
def test_resume_is_exact_including_across_epochs(packing):
    docs = random_docs(50, seed=2, hi=40)  # up to 41 tokens in rows of 25: split pieces are in the saved states
    write_corpus("r", docs, rows_per_group=4, val_docs=6)
    kw = dict(B=2, T=24, corpus="r", buffer_docs=5, tokenizer_threads=1, packing=packing)
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
    loader.packer.add((0, 0), np.zeros(3, dtype=np.int64))  # one waiting in the buffer is not done yet
    assert loader.epochs_done() - before == pytest.approx(0.0, abs=1e-12)
    loader.close()


def test_resume_rejects_a_state_from_another_setup():
    write_corpus("s", random_docs(30, seed=3), rows_per_group=2, val_docs=4)
    state = PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="s").state_dict()
    with pytest.raises(UserError, match="world_size"):
        PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="s", rank=1, world_size=2, state=state)
    with pytest.raises(UserError, match="packing 'split' \\(this run: 'crop'\\).*--packing"):
        PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="s", packing="crop", state=state)
    with pytest.raises(UserError, match="packing 'bestfit' is not one of split, crop"):
        PackingLoader(ByteTokenizer(), "train", B=1, T=16, corpus="s", packing="bestfit")


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


# ---------------------------------------------------------------------------------------------------------------------
# every token accounted for: documents whose tokens name their document and position


class PositionTokenizer:
    """Test fixture: the text "i L" is document i of L tokens, token j being i * 100_000 + j + 1; BOS is 0. So every
    token in a packed row says which document it came from and where."""

    bos_id = 0

    def encode(self, texts, prepend=None, num_threads=1):
        out = []
        for t in texts:
            i, n = map(int, t.split())
            out.append(([prepend] if prepend is not None else []) + [i * 100_000 + j + 1 for j in range(n)])
        return out


def long_tailed(n, T, seed=0):
    """Document lengths with a FineWeb-like long tail (log-normal, median T/2, sigma 1.2): about 30% of them are longer
    than a row, a few several rows long."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(np.log(T / 2), 1.2, n), 1, 12 * T)]


def position_corpus(name, lengths, val=8):
    write_corpus(name, [f"{i} {n}" for i, n in enumerate(lengths)] + [f"{len(lengths) + i} 5" for i in range(val)],
                 rows_per_group=8, val_docs=val)


def emitted(loader, rows):
    """The non-BOS tokens of the next `rows` packed rows (each row is inputs + the last target), in order."""
    out = []
    while len(out) < rows * (loader.T + 1):
        x, y = next(loader)
        out += [t for row in torch.cat([x, y[:, -1:]], dim=1).tolist() for t in row]
    return np.array([t for t in out if t != 0])


@pytest.mark.parametrize("packing", ["crop", "split"])
def test_no_document_starved_or_repeated_within_a_pass(packing):
    """Over the first 4 passes' worth of document starts, every document starts 3-5 times (4 but for the passes'
    edges). Best-fit alone kept documents longer than a row in the buffer until nothing else was left: they were
    never emitted while the short ones were emitted again and again."""
    T, n_docs, passes = 32, 200, 4
    position_corpus("lt", long_tailed(n_docs, T, seed=1))
    loader = PackingLoader(PositionTokenizer(), "train", B=4, T=T, corpus="lt", buffer_docs=12, tokenizer_threads=1,
                           packing=packing)
    starts = []
    while len(starts) < passes * n_docs:
        tokens = emitted(loader, 4)
        starts += [t // 100_000 for t in tokens if t % 100_000 == 1]
    counts = np.bincount(starts[:passes * n_docs], minlength=n_docs)
    assert counts.min() >= passes - 1 and counts.max() <= passes + 1, (counts.min(), counts.max())
    loader.close()


def test_split_packing_puts_every_token_of_a_pass_in_a_row():
    """The split policy's goal (issue 12): >= 97% of a pass's tokens reach a row. With pieces going back into the
    buffer nothing is dropped, so once the reader is a full pass further, every token of the first pass was emitted
    exactly once; the loader's own count agrees."""
    T = 32
    lengths = long_tailed(200, T, seed=2)
    position_corpus("lt2", lengths)
    loader = PackingLoader(PositionTokenizer(), "train", B=4, T=T, corpus="lt2", buffer_docs=12, tokenizer_threads=1,
                           packing="split")
    seen = []
    while loader.epoch < 3:
        seen.append(emitted(loader, 4))
    assert loader.stats()["loader_used_frac"] == 1.0
    seen = np.concatenate(seen)
    want = np.concatenate([i * 100_000 + np.arange(1, n + 1) for i, n in enumerate(lengths)])
    first_pass = np.unique(seen, return_counts=True)
    assert np.isin(want, first_pass[0]).mean() >= 0.97
    assert np.isin(want, first_pass[0]).all()  # in fact all of them
    assert first_pass[1].max() <= 2  # and none more often than the passes read (2, plus the one in progress)
    loader.close()


def test_crop_counts_what_it_drops():
    """Crop's used fraction: row tokens over row tokens + cropped tails; with the tokens still buffered the three
    add up to everything read (checked within the first pass, before the per-pass counts restart)."""
    T = 32
    lengths = long_tailed(200, T, seed=3)
    position_corpus("lt3", lengths)
    loader = PackingLoader(PositionTokenizer(), "train", B=4, T=T, corpus="lt3", buffer_docs=12, tokenizer_threads=1,
                           packing="crop")
    last = [y[:, -1] for y in (next(loader)[1] for _ in range(5))]
    lone_bos = int(sum((t == 0).sum() for t in last))  # a row's last slot that nothing fitted holds a BOS
    p, (e, k, d) = loader.packer, loader._pos
    assert e == 1
    read = sum(n + 1 for n in lengths[:sum(g[3] for g in loader.groups[:k]) + d])
    buffered = sum(key[0] for key in p.keys)
    assert p.used == 5 * 4 * (T + 1) - lone_bos and p.used + p.dropped + buffered == read
    assert loader.stats()["loader_used_frac"] == pytest.approx(p.used / (p.used + p.dropped))
    assert 0.3 < loader.stats()["loader_used_frac"] < 0.9  # a long tail loses a real share to cropping
    loader.close()


# ---------------------------------------------------------------------------------------------------------------------
# the validation slice


def test_validation_slice_is_fixed_in_order_and_the_same_on_any_rank_count():
    """Every evaluation sees the same tokens; each document of the slice is scored once, whole, in document order
    from the split's start; 2 ranks score exactly the targets 1 rank scores and run the same number of batches."""
    val_lengths = [70, 3, 15, 200, 40, 1, 33, 90, 12, 50]  # tokens per document, some longer than a row
    write_corpus("v", [f"{i} 5" for i in range(20)] + [f"{100 + i} {n}" for i, n in enumerate(val_lengths)],
                 rows_per_group=2, val_docs=len(val_lengths))
    tok = PositionTokenizer()
    budget = 300  # covers the first 5 documents (71 + 4 + 16 + 201 = 292 tokens with BOS, then 41 more)

    def targets(vs):
        ys = [y for _, y in vs.batches()]
        assert all(y.shape == (2, 16) for y in ys) and len(ys) == vs.steps
        flat = torch.cat([y.flatten() for y in ys])
        return flat[flat > 0].tolist()  # -1 is padding, 0 a BOS (no bytes: not scored)

    one = ValidationSlice(tok, B=2, T=16, tokens=budget, corpus="v", tokenizer_threads=1)
    assert (one.docs, one.tokens, one.split_docs) == (5, 333, 10)
    first = targets(one)
    assert targets(one) == first  # the same tokens on every call
    want = [(100 + i) * 100_000 + j + 1 for i, n in enumerate(val_lengths[:5]) for j in range(n)]
    assert first == want  # every token of the first 5 documents once, in order (each row starts at a BOS)
    ranks = [ValidationSlice(tok, B=2, T=16, tokens=budget, corpus="v", rank=r, world_size=2, tokenizer_threads=1)
             for r in (0, 1)]
    assert ranks[0].steps == ranks[1].steps
    assert sorted(targets(ranks[0]) + targets(ranks[1])) == sorted(first)
    whole = ValidationSlice(tok, B=2, T=16, tokens=10**9, corpus="v", tokenizer_threads=1)
    assert whole.docs == 10 and "all of the split's 10 documents" in whole.describe()


# ---------------------------------------------------------------------------------------------------------------------
# corpus size


def test_corpus_tokens_exact_when_small_and_estimated_when_large():
    docs = random_docs(400, seed=8, lo=20, hi=400)
    write_corpus("size", docs, rows_per_group=10, val_docs=40)
    exact = sum(len(d.encode()) + 1 for d in docs[:-40])  # byte tokens + a BOS each
    assert corpus_tokens(ByteTokenizer(), "train", "size") == (exact, "exact", 1.0)
    n, how, _ = corpus_tokens(ByteTokenizer(), "train", "size", sample_bytes=8000)
    assert how.startswith("estimated from") and "bytes/token" in how
    assert abs(n - exact) / exact < 0.05  # footer sizes x tokens per byte of a tenth of the row groups
    crop = sum(min(len(d.encode()) + 1, 101) for d in docs[:-40]) / exact  # what rows of 101 can keep
    assert corpus_tokens(ByteTokenizer(), "train", "size", row=101).crop_frac == pytest.approx(crop)


def test_pretrain_plan_warns_refuses_and_picks_packing(capsys):
    """Planned tokens against the corpus: a warning above 4 passes, a refusal above --allow-epochs (one line naming
    the flag), --max-epochs caps the plan, and packing=auto picks crop only while crop would read every document at
    most once (planned tokens <= what crop keeps of a pass), else split."""
    from picochat.config import PretrainConfig
    from picochat.train.pretrain import plan_epochs

    docs = random_docs(100, seed=9, lo=50, hi=150)
    write_corpus("default", docs, rows_per_group=10, val_docs=10)
    n = sum(len(d.encode()) + 1 for d in docs[:-10])
    keep = sum(min(len(d.encode()) + 1, 101) for d in docs[:-10]) / n  # crop's share at rows of T + 1 = 101
    cfg = PretrainConfig(total_batch_size=n // 100, max_seq_len=100, packing="auto")  # 100 steps = one pass
    steps = int(keep * 100)
    assert plan_epochs(cfg, ByteTokenizer(), steps - 1) == (pytest.approx((steps - 1) / 100, rel=0.02), "crop")
    assert plan_epochs(cfg, ByteTokenizer(), steps + 2)[1] == "split"
    assert plan_epochs(cfg, ByteTokenizer(), 300) == (pytest.approx(3.0, rel=0.02), "split")
    assert "warning" not in capsys.readouterr().out
    assert plan_epochs(cfg, ByteTokenizer(), 600)[0] == pytest.approx(6.0, rel=0.02)
    assert f"warning: {600 * (n // 100) / n:.1f} passes over the training corpus" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"plans {3000 * (n // 100) / n:.1f} passes over corpus 'default'.*raise "
                                        f"--allow-epochs"):
        plan_epochs(cfg, ByteTokenizer(), 3000)
    capped = PretrainConfig(total_batch_size=n // 100, max_epochs=2.0, allow_epochs=1000.0)
    assert plan_epochs(capped, ByteTokenizer(), 3000)[0] == 2.0
