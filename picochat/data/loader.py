"""The pretraining data loader: BOS-aligned best-fit packing of corpus documents into (B, T) token batches.

    loader = PackingLoader(tokenizer, "train", B=8, T=512, rank=rt.rank, world_size=rt.world_size, device=rt.device)
    inputs, targets = next(loader)            # (B, T) int64 each; targets are inputs shifted left by one
    meta["loader"] = loader.state_dict()      # PackingLoader(..., state=meta["loader"]) resumes at the next batch

Used by picochat/train/pretrain.py (and midtrain for plain-text mixing); tests in tests/test_loader.py.
"""

from __future__ import annotations

import queue
import threading
from bisect import bisect_left, bisect_right
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from picochat.common import UserError
from picochat.data.corpus import corpus_fingerprint, load_manifest, open_shard, read_row_group, row_groups

STATE_VERSION = 1
# Prefetch depth in tokenized chunks: enough to hide a row group read + tokenization behind a few training steps,
# small enough that read-ahead memory stays at a few chunks of documents.
QUEUE_CHUNKS = 4


class PackingLoader:
    """BOS-aligned best-fit packing. Yields (inputs, targets), each (B, T) int64 on `device`.

    Every row holds T+1 real tokens (inputs = row[:-1], targets = row[1:]) and starts at a document's BOS. A row is
    filled by repeatedly taking the LARGEST buffered document that fits the remaining space; when none fits, the
    SHORTEST buffered document is cropped to fill the row exactly and its tail is dropped. No padding.

    Row group i of the split (counted across its shards in order) belongs to rank i % world_size. A background thread
    reads and tokenizes this rank's row groups ahead of use, forever, epoch after epoch. `epoch` counts the passes
    over this rank's data that have started (1 during the first). `state_dict()` names the reader position and the
    buffered documents by (row group, row) reference, so a resumed loader re-reads and re-tokenizes them and yields
    exactly the batch the uninterrupted loader would have yielded next.
    """

    def __init__(self, tokenizer, split: str, B: int, T: int, *, corpus: str = "default", rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", buffer_docs: int = 256,
                 tokenizer_threads: int = 4, state: dict | None = None):
        if B < 1 or T < 1 or buffer_docs < 1:
            raise UserError(f"PackingLoader needs B, T and buffer_docs >= 1 (got B={B}, T={T}, "
                            f"buffer_docs={buffer_docs})")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.tokenizer, self.split, self.B, self.T = tokenizer, split, B, T
        self.corpus, self.rank, self.world_size = corpus, rank, world_size
        self.device = torch.device(device)
        self.buffer_docs, self.tokenizer_threads = buffer_docs, tokenizer_threads
        self.fingerprint = corpus_fingerprint(load_manifest(corpus))
        groups = row_groups(split, corpus)
        if len(groups) < world_size:
            raise UserError(f"corpus '{corpus}' split '{split}' has {len(groups)} row groups, fewer than world_size "
                            f"{world_size}; rebuild it with a smaller --rows-per-group or use fewer ranks")
        # this rank's row groups: (global index in the split, shard path, index in the shard, rows)
        self.groups: list[tuple[int, Path, int, int]] = [(g, p, i, n) for g, (p, i, n) in enumerate(groups)
                                                         if g % world_size == rank]
        if sum(n for *_, n in self.groups) == 0:
            raise UserError(f"corpus '{corpus}' split '{split}' has no documents for rank {rank} of {world_size}")
        self.epoch = 1
        self._pos = self._normalize((1, 0, 0))  # (epoch, index into self.groups, row): next doc to enter the buffer
        self._keys: list[tuple[int, int]] = []  # buffer sorted by (length, arrival seq) ...
        self._docs: list[tuple[int, int, np.ndarray]] = []  # ... aligned: (global row group, row, tokens)
        self._seq = 0
        self._chunk: list = []  # the prefetched chunk being consumed, and how far
        self._chunk_at = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if state is not None:
            self._load_state(state)

    # ----------------------------------------------------------------------------------------------------------------
    # reader position

    def epochs_done(self) -> float:
        """Passes over this rank's documents so far, fractional: documents that entered the buffer minus those still
        waiting in it, over the documents of the split (both parts are in state_dict, so it resumes exactly)."""
        e, k, d = self._pos
        total = sum(n for *_, n in self.groups)
        read = (e - 1) * total + sum(n for *_, n in self.groups[:k]) + d
        return (read - len(self._docs)) / total

    def _normalize(self, pos: tuple[int, int, int]) -> tuple[int, int, int]:
        """Move `pos` past the end of row groups (and over empty ones) to the next document that exists."""
        e, k, d = pos
        while d >= self.groups[k][3]:
            e, k, d = (e, k + 1, 0) if k + 1 < len(self.groups) else (e + 1, 0, 0)
        return e, k, d

    def _pull(self) -> tuple[tuple[int, int, int], np.ndarray]:
        """The next document from the prefetch thread, with its position; starts the thread on first use."""
        if self._thread is None:
            self._queue = queue.Queue(maxsize=QUEUE_CHUNKS)
            self._thread = threading.Thread(
                target=_produce, daemon=True, name=f"picochat-loader-{self.split}-r{self.rank}",
                args=(self.tokenizer, self.tokenizer_threads, self.groups, self.corpus, self._pos,
                      max(16, min(256, self.buffer_docs)), self._queue, self._stop))
            self._thread.start()
        while self._chunk_at >= len(self._chunk):
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the loader's background thread stopped without an error") from None
                continue
            if isinstance(item, BaseException):
                raise item
            self._chunk, self._chunk_at = item, 0
        pos, tokens = self._chunk[self._chunk_at]
        self._chunk_at += 1
        if pos != self._pos:  # the thread reads exactly the sequence _normalize walks; anything else is a bug
            raise RuntimeError(f"loader position mismatch: expected {self._pos}, got {pos}")
        self.epoch = pos[0]
        self._pos = self._normalize((pos[0], pos[1], pos[2] + 1))
        return pos, tokens

    # ----------------------------------------------------------------------------------------------------------------
    # the buffer

    def _add(self, g: int, d: int, tokens: np.ndarray) -> None:
        key = (len(tokens), self._seq)
        self._seq += 1
        at = bisect_left(self._keys, key)
        self._keys.insert(at, key)
        self._docs.insert(at, (g, d, tokens))

    def _take(self, space: int) -> np.ndarray:
        """Remove and return the largest buffered doc of length <= space (oldest first among equal lengths), else
        the shortest one cropped to `space`."""
        while len(self._keys) < self.buffer_docs:
            (_, k, d), tokens = self._pull()
            self._add(self.groups[k][0], d, tokens)
        last = bisect_right(self._keys, (space, float("inf"))) - 1
        if last >= 0:
            at = bisect_left(self._keys, (self._keys[last][0], -1))
            self._keys.pop(at)
            return self._docs.pop(at)[2]
        self._keys.pop(0)
        return self._docs.pop(0)[2][:space]

    def _row(self, out: np.ndarray) -> None:
        filled, n = 0, len(out)
        while filled < n:
            tokens = self._take(n - filled)
            out[filled:filled + len(tokens)] = tokens
            filled += len(tokens)

    # ----------------------------------------------------------------------------------------------------------------
    # iteration and state

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for b in range(self.B):
            self._row(rows[b])
        inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))  # (B, T)
        targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))  # (B, T)
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def state_dict(self) -> dict:
        """JSON-serialisable position: reader (epoch, group, row) + buffered docs as [row group, row] refs."""
        order = sorted(range(len(self._keys)), key=lambda i: self._keys[i][1])  # arrival order
        return {"version": STATE_VERSION, "corpus": self.corpus, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self.fingerprint, "epoch": self.epoch,
                "pos": list(self._pos), "buffer": [[self._docs[i][0], self._docs[i][1]] for i in order]}

    def _load_state(self, state: dict) -> None:
        want = {"version": STATE_VERSION, "corpus": self.corpus, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self.fingerprint}
        try:
            got = {k: state[k] for k in want}
            epoch, pos, refs = int(state["epoch"]), tuple(int(x) for x in state["pos"]), state["buffer"]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"loader state is malformed ({e!r}); start without it or use a matching "
                            f"checkpoint") from None
        if got != want:
            diff = ", ".join(f"{k} {got[k]!r} (this run: {want[k]!r})" for k in want if got[k] != want[k])
            raise UserError(f"loader state does not match this loader: {diff}; resume with the same corpus and "
                            f"world size, or start the data from scratch")
        if len(pos) != 3 or not 0 <= pos[1] < len(self.groups) or pos[2] >= self.groups[pos[1]][3]:
            raise UserError(f"loader state position {list(pos)} is outside this corpus; start the data from scratch")
        self.epoch, self._pos = epoch, pos
        local = {g: k for k, (g, *_) in enumerate(self.groups)}
        wanted: dict[int, list[int]] = defaultdict(list)
        for g, d in refs:
            if g not in local or d >= self.groups[local[g]][3]:
                raise UserError(f"loader state names row {d} of row group {g}, which this rank does not have")
            wanted[g].append(d)
        texts = {}
        for g in wanted:
            _, path, index, _ = self.groups[local[g]]
            rows = read_row_group(path, index, self.corpus)
            texts.update({(g, d): rows[d] for d in wanted[g]})
        ids = self.tokenizer.encode([texts[(g, d)] for g, d in refs], prepend=self.tokenizer.bos_id,
                                    num_threads=self.tokenizer_threads) if refs else []
        for (g, d), tokens in zip(refs, ids):
            self._add(g, d, np.asarray(tokens, dtype=np.int64))

    def close(self) -> None:
        """Stop the prefetch thread (it also stops by itself when the loader is garbage-collected)."""
        self._stop.set()

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ raised early
        if stop is not None:
            stop.set()


def _produce(tokenizer, threads: int, groups: list, corpus: str, start: tuple[int, int, int], chunk: int,
             out: queue.Queue, stop: threading.Event) -> None:
    """Thread body: read this rank's row groups from `start` on, forever, and queue tokenized chunks of
    [((epoch, group index, row), tokens), ...]. Any error is queued for the training thread to raise.
    Takes no reference to the loader, so dropping the loader lets it be collected (and stop this thread)."""
    e, k, d = start
    open_path, pf = None, None
    try:
        while not stop.is_set():
            _, path, index, rows = groups[k]
            if d < rows:
                if path != open_path:
                    open_path, pf = path, open_shard(path, corpus)
                texts = read_row_group(path, index, corpus, pf)
                if len(texts) != rows:
                    raise UserError(f"corpus shard {path} row group {index} has {len(texts)} rows, the manifest "
                                    f"says {rows}; re-run `picochat data prepare --force` for '{corpus}'")
                for a in range(d, rows, chunk):
                    ids = tokenizer.encode(texts[a:a + chunk], prepend=tokenizer.bos_id, num_threads=threads)
                    item = [((e, k, a + i), np.asarray(t, dtype=np.int64)) for i, t in enumerate(ids)]
                    if not _put(out, item, stop):
                        return
            e, k, d = (e, k + 1, 0) if k + 1 < len(groups) else (e + 1, 0, 0)
    except Exception as exc:  # handed over, not swallowed: the training thread re-raises it on its next batch
        _put(out, exc, stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False
