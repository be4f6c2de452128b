"""Validation bits per byte on the in-order slice: the value from the batches equals one computed document by
document, and two gloo ranks (each scoring its share of the slice's rows) give the single process's value.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_bpb.py
"""

import math
import os
import socket

import torch
import torch.nn.functional as F

from conftest import make_tiny_model, randomize_outputs, spawn_gloo
from picochat.data.corpus import write_corpus
from picochat.data.loader import ValidationSlice
from picochat.evals.bpb import evaluate_bpb

BOS = 256
VOCAB = 320  # bytes, the BOS, padding to a multiple of 64


class ByteTokenizer:
    bos_id = BOS

    def encode(self, texts, prepend=None, num_threads=1):
        return [([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in texts]


def token_bytes() -> torch.Tensor:
    return torch.tensor([1] * 256 + [0] * (VOCAB - 256), dtype=torch.int64)


def docs():
    words = "in the beginning was the word and the word was with god".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(3 + 7 * i % 23)) for i in range(30)]


def slice_bpb(rank: int, world: int) -> float:
    model = randomize_outputs(make_tiny_model(VOCAB, depth=1, n_embd=32, sequence_len=16))
    val = ValidationSlice(ByteTokenizer(), B=2, T=16, tokens=10**6, rank=rank, world_size=world, tokenizer_threads=1)
    batches = val.batches()
    return evaluate_bpb(model, lambda: next(batches), val.steps, token_bytes())


def test_slice_bpb_equals_the_per_document_value(tmp_path, monkeypatch):
    """Rows cut documents at row ends and continue them after a BOS: the slice's bpb equals the rows' losses (from
    the logits, row by row) over the bytes of all the documents, so every byte is scored exactly once."""
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    d = docs()
    write_corpus("default", ["x y"] * 10 + d, rows_per_group=3, val_docs=len(d))
    got = slice_bpb(0, 1)
    model = randomize_outputs(make_tiny_model(VOCAB, depth=1, n_embd=32, sequence_len=16))
    val = ValidationSlice(ByteTokenizer(), B=2, T=16, tokens=10**6, tokenizer_threads=1)
    nats = 0.0
    with torch.no_grad():
        for x, y in val.batches():
            for row_x, row_y in zip(x, y):
                logits = model(row_x[None]).float()[0]  # (T, V)
                keep = (row_y >= 0) & (row_y != BOS)
                nats += F.cross_entropy(logits[keep], row_y[keep], reduction="sum").item()
    n_bytes = sum(len(t.encode()) for t in d)
    assert val.docs == len(d)
    assert math.isclose(got, nats / (math.log(2) * n_bytes), rel_tol=1e-5)


def _worker(rank, world, port, base, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PICOCHAT_BASE_DIR=str(base))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        value = slice_bpb(rank, world)
        (out / f"rank{rank}.txt").write_text(repr(value))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_bpb(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    d = docs()
    write_corpus("default", ["x y"] * 10 + d, rows_per_group=3, val_docs=len(d))
    one = slice_bpb(0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_gloo(_worker, (2, port, tmp_path, tmp_path), 2)
    two = [float((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert two[0] == two[1]  # all-reduced: every rank reports the same value
    assert math.isclose(two[0], one, rel_tol=1e-9)
