"""The pretraining data loader: BOS-aligned best-fit packing of corpus documents into (B, T) token batches, the
in-order validation slice, and the corpus-size count that pretraining plans its epochs with.

    loader = PackingLoader(tokenizer, "train", B=8, T=512, rank=rt.rank, world_size=rt.world_size, device=rt.device)
    inputs, targets = next(loader)            # (B, T) int64 each; targets are inputs shifted left by one
    meta["loader"] = loader.state_dict()      # PackingLoader(..., state=meta["loader"]) resumes at the next batch
    loader.stats()                            # {"loader_used_frac": ..., "epochs": ...}
    val = ValidationSlice(tokenizer, B=8, T=512, tokens=65536, rank=rt.rank, world_size=rt.world_size)
    for x, y in val.batches(device): ...      # the same tokens on every call; y == -1 is padding
    corpus_tokens(tokenizer, "train", row=513)   # CorpusSize(tokens, how it was counted, crop's share at most)

Used by picochat/train/pretrain.py; the Packer, the Prefetcher and the row dealing also serve the conversation
loader (picochat/data/conversations.py). Tests in tests/test_loader.py; figures from benchmarks/loader.py.
"""

from __future__ import annotations

import math
import queue
import threading
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from picochat.common import UserError
from picochat.data.corpus import corpus_fingerprint, iter_documents, load_manifest, open_shard, read_row_group, \
    row_groups

STATE_VERSION = 2
PACKING = ("split", "crop")
# Prefetch depth in tokenized chunks: enough to hide a row group read + tokenization behind a few training steps,
# small enough that read-ahead memory stays at a few chunks of documents.
QUEUE_CHUNKS = 4
# A buffered document older than this many buffers' worth of clock ticks (arrivals + placements) starts the next
# row, whatever its length. Best-fit alone let over-long documents sit until nothing else was left (the 61 longest of
# the embedded corpus were never emitted in 4 passes while others were emitted 5+ times). Measured over 2 passes of
# the embedded and a FineWeb-like corpus at T = 256 and 2,048 (benchmarks/loader.py): with no age limit the longest
# waits were 1.5-2.3 passes and some documents never started a row; at 4 buffers the longest wait is 256-1,840 rows,
# under a quarter of a pass, and crop's used fraction is within 1.2 points of 8 buffers (T = 2,048: 87.5 vs 88.7%).
MAX_AGE_BUFFERS = 4


class Packer:
    """The best-fit buffer, shared by the training loader, the validation slice and the conversation loader
    (picochat/data/conversations.py).

    Items are (ref, offset, seq, tokens, mask): `tokens` a whole document (its BOS first), `mask` None or an array
    beside it (conversations: 1 where the token is a training target), `offset` how much of it already went into
    rows, `seq` its arrival time on a clock that ticks at every arrival and every placement (unique per document,
    and it keeps advancing while rows are filled from the buffer alone). An item's piece is tokens[offset:], led by
    a BOS when offset > 0 (that BOS's mask is 0: it is no target). Filling a row of n tokens:
      row start:  the oldest item if it arrived more than `max_age` ticks ago (no document waits longer: its pieces
                  keep its seq, so a long document then fills consecutive rows); else, under crop, the oldest item
                  longer than the row (it fills the row whole: the most of it any row can keep); else best fit;
      best fit:   the LARGEST piece that fits the space left (oldest first among equal lengths);
      none fits:  "pad" ends the row there (the caller pads it; for items that never exceed a row, so every piece
                  stays whole); otherwise the SHORTEST piece fills the space: "crop" drops its tail (every token
                  then sees its document's start: nanochat's trade), "split" puts the tail back as a BOS-led piece
                  with the same seq. A last single slot gets a BOS instead: it is only a target (the
                  end-of-document prediction), and cropping a document to its BOS would lose all of it.
    `used` and `dropped` count document tokens that reached a row or were cropped away (a split piece's added BOS
    is not a document token).
    """

    def __init__(self, policy: str, buffer_docs: int, max_age: int, bos: int):
        self.policy, self.buffer_docs, self.max_age, self.bos = policy, buffer_docs, max_age, bos
        self.keys: list[tuple[int, int]] = []  # sorted (piece length, seq) ...
        # ... aligned with them: (ref, offset, seq, tokens, mask)
        self.items: list[tuple[tuple, int, int, np.ndarray, np.ndarray | None]] = []
        self.seq = 0  # the clock: arrivals + placements so far
        self.used = self.dropped = 0

    def add(self, ref: tuple, tokens: np.ndarray, mask: np.ndarray | None = None, offset: int = 0,
            seq: int | None = None) -> None:
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        key = (len(tokens) - offset + (offset > 0), seq)
        at = bisect_left(self.keys, key)
        self.keys.insert(at, key)
        self.items.insert(at, (ref, offset, seq, tokens, mask))

    def _pick(self, space: int, row_start: bool) -> int | None:
        """Index of the item to place next, or None when nothing fits."""
        keys = self.keys
        fits = bisect_right(keys, (space, math.inf))  # keys[:fits] fit the space
        if row_start:
            oldest = min(range(len(keys)), key=lambda i: keys[i][1])
            if self.seq - keys[oldest][1] > self.max_age:
                return oldest
            if self.policy == "crop" and fits < len(keys):
                return min(range(fits, len(keys)), key=lambda i: keys[i][1])
        return bisect_left(keys, (keys[fits - 1][0], -1)) if fits else None

    def fill(self, out: np.ndarray, pull: Callable[[], tuple | None], out_mask: np.ndarray | None = None) -> int:
        """Fill `out` (1-D) from the buffer, topping it up from `pull` (None: no more documents; else the arguments
        of `add`: (ref, tokens) or (ref, tokens, mask)) before each pick; with `out_mask` (beside `out`) the items'
        masks are written there. Returns how many tokens were written: len(out), or fewer once `pull` and the
        buffer are both empty or, under "pad", when no piece fits the rest of the row."""
        filled, n = 0, len(out)
        while filled < n:
            while len(self.keys) < self.buffer_docs:
                got = pull()
                if got is None:
                    break
                self.add(*got)
            if not self.keys:
                break
            at = self._pick(n - filled, filled == 0)
            if at is None and self.policy == "pad":
                break
            if at is None and filled == n - 1:  # a BOS, not the first token of a document lost to crop
                out[filled] = self.bos
                if out_mask is not None:
                    out_mask[filled] = 0
                filled += 1
                continue
            at = 0 if at is None else at
            self.keys.pop(at)
            ref, offset, seq, tokens, mask = self.items.pop(at)
            self.seq += 1
            size = len(tokens) - offset + (offset > 0)  # the piece: tokens[offset:], BOS-led when offset > 0
            take = min(size, n - filled)
            for dst, src, lead in ((out, tokens, self.bos), (out_mask, mask, 0)):
                if dst is not None and src is not None:
                    piece = src if offset == 0 else np.concatenate(([lead], src[offset:]))
                    dst[filled:filled + take] = piece[:take]
            filled += take
            self.used += take - (offset > 0)
            if take < size:
                if self.policy == "split":
                    self.add(ref, tokens, mask, offset + take - (offset > 0), seq)
                else:
                    self.dropped += size - take
        return filled

    def arrival_order(self) -> list[int]:
        return sorted(range(len(self.keys)), key=lambda i: self.keys[i][1])

    def state_dict(self) -> dict:
        """The clock, the token counts and the buffered pieces as [*ref, offset, seq] in arrival order (the tokens
        themselves are not saved: the owner re-reads them by ref)."""
        return {"seq": self.seq, "used": self.used, "dropped": self.dropped,
                "buffer": [[*self.items[i][0], self.items[i][1], self.items[i][2]] for i in self.arrival_order()]}

    @staticmethod
    def parse_state(state: dict) -> tuple[list[tuple[tuple[int, ...], int, int]], tuple[int, int, int]]:
        """([(ref, offset, seq), ...], (seq, used, dropped)) from a state_dict; KeyError/TypeError/ValueError when
        malformed (the owner turns that into its UserError)."""
        refs = [(tuple(int(x) for x in r[:-2]), int(r[-2]), int(r[-1])) for r in state["buffer"]]
        return refs, (int(state["seq"]), int(state["used"]), int(state["dropped"]))

    @staticmethod
    def check_state(state: dict, want: dict, what: str, hint: str, fields: Callable[[dict], Any], ref: str):
        """A loader's saved state, validated: its identity keys must equal `want` (else one line naming each
        difference, then `hint`), `fields(state)` parses the owner's reader position, and each buffered piece is
        [`ref` (two numbers), offset, seq]. Returns (fields(state), refs, counts) as `parse_state` gives them."""
        try:
            got = {k: state.get(k) for k in want}
            own = fields(state)
            refs, counts = Packer.parse_state(state)
            if any(len(r) != 2 for r, _, _ in refs):
                raise ValueError(f"a buffered piece is not [{ref}, offset, seq]")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{what} state is malformed ({e!r}); start without it or use a matching "
                            f"checkpoint") from None
        if got != want:
            diff = ", ".join(f"{k} {got[k]!r} (this run: {want[k]!r})" for k in want if got[k] != want[k])
            raise UserError(f"{what} state does not match this loader: {diff}; {hint}")
        return own, refs, counts

    def load(self, pieces: list[tuple[tuple, int, int, np.ndarray, np.ndarray | None]],
             counts: tuple[int, int, int]) -> None:
        """Restore a parsed state: `pieces` as (ref, offset, seq, tokens, mask) with the tokens re-read."""
        for ref, offset, seq, tokens, mask in pieces:
            self.add(ref, tokens, mask, offset, seq)
        self.seq, self.used, self.dropped = counts


class PackingLoader:
    """BOS-aligned best-fit packing (see `Packer` for the rule). Yields (inputs, targets), each (B, T) int64 on
    `device`. Every row holds T+1 real tokens (inputs = row[:-1], targets = row[1:]) and starts at a BOS. No padding.

    Row group i of the split (counted across its shards in order) belongs to rank i % world_size. A background thread
    reads and tokenizes this rank's row groups ahead of use, forever, epoch after epoch. `epoch` counts the passes
    over this rank's data that have started (1 during the first). `state_dict()` names the reader position and the
    buffered pieces by (row group, row, offset, seq), so a resumed loader re-reads and re-tokenizes them and yields
    exactly the batch the uninterrupted loader would have yielded next.
    """

    def __init__(self, tokenizer, split: str, B: int, T: int, *, corpus: str = "default", rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", packing: str = "split",
                 buffer_docs: int = 256, tokenizer_threads: int = 4, state: dict | None = None):
        if B < 1 or T < 1 or buffer_docs < 1:
            raise UserError(f"PackingLoader needs B, T and buffer_docs >= 1 (got B={B}, T={T}, "
                            f"buffer_docs={buffer_docs})")
        if packing not in PACKING:
            raise UserError(f"packing '{packing}' is not one of {', '.join(PACKING)}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.tokenizer, self.split, self.B, self.T = tokenizer, split, B, T
        self.corpus, self.rank, self.world_size, self.packing = corpus, rank, world_size, packing
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
        self.docs_per_pass = sum(n for *_, n in self.groups)
        if self.docs_per_pass == 0:
            raise UserError(f"corpus '{corpus}' split '{split}' has no documents for rank {rank} of {world_size}")
        self.packer = Packer(packing, buffer_docs, MAX_AGE_BUFFERS * buffer_docs, tokenizer.bos_id)
        self.epoch = 1
        self._pos = self._normalize((1, 0, 0))  # (epoch, index into self.groups, row): next doc to enter the buffer
        self._prefetch: Prefetcher | None = None  # started on first use, at the position a resume restored
        if state is not None:
            self._load_state(state)

    # ----------------------------------------------------------------------------------------------------------------
    # reader position and stats

    def epochs_done(self) -> float:
        """Passes over this rank's documents so far, fractional: documents that entered the buffer minus those still
        waiting in it (a split document counts as waiting until its last piece left), over the documents of the
        split (both parts are in state_dict, so it resumes exactly)."""
        e, k, d = self._pos
        read = (e - 1) * self.docs_per_pass + sum(n for *_, n in self.groups[:k]) + d
        return (read - len(self.packer.keys)) / self.docs_per_pass

    def stats(self) -> dict:
        """`loader_used_frac`: of the corpus tokens that left the buffer since this pass began, the share that
        reached a row (1.0 minus what crop dropped; 1.0 before anything left); `epochs`: `epochs_done()`."""
        p = self.packer
        return {"loader_used_frac": p.used / (p.used + p.dropped) if p.used + p.dropped else 1.0,
                "epochs": self.epochs_done()}

    def _normalize(self, pos: tuple[int, int, int]) -> tuple[int, int, int]:
        """Move `pos` past the end of row groups (and over empty ones) to the next document that exists."""
        e, k, d = pos
        while d >= self.groups[k][3]:
            e, k, d = (e, k + 1, 0) if k + 1 < len(self.groups) else (e + 1, 0, 0)
        return e, k, d

    def _pull(self) -> tuple[tuple[int, int], np.ndarray]:
        """The next document from the prefetch thread as ((global row group, row), tokens); starts the thread on
        first use and restarts the used/dropped counts when a new pass begins."""
        if self._prefetch is None:
            self._prefetch = Prefetcher(_produce, (self.tokenizer, self.tokenizer_threads, self.groups, self.corpus,
                                                   self._pos, max(16, min(256, self.buffer_docs))),
                                        name=f"picochat-loader-{self.split}-r{self.rank}")
        pos, tokens = self._prefetch.next()
        if pos != self._pos:  # the thread reads exactly the sequence _normalize walks; anything else is a bug
            raise RuntimeError(f"loader position mismatch: expected {self._pos}, got {pos}")
        if pos[0] != self.epoch:
            self.packer.used = self.packer.dropped = 0
        self.epoch = pos[0]
        self._pos = self._normalize((pos[0], pos[1], pos[2] + 1))
        return (self.groups[pos[1]][0], pos[2]), tokens

    # ----------------------------------------------------------------------------------------------------------------
    # iteration and state

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for b in range(self.B):
            self.packer.fill(rows[b], self._pull)
        return to_device(rows[:, :-1], rows[:, 1:], self.device)  # (B, T) each

    def _identity(self) -> dict:
        return {"version": STATE_VERSION, "corpus": self.corpus, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self.fingerprint, "packing": self.packing,
                "buffer_docs": self.buffer_docs}

    def state_dict(self) -> dict:
        """JSON-serialisable position: reader (epoch, group, row), the pass's token counts and the buffered pieces
        as [row group, row, offset, seq] in arrival order."""
        return {**self._identity(), "epoch": self.epoch, "pos": list(self._pos), **self.packer.state_dict()}

    def _load_state(self, state: dict) -> None:
        (epoch, pos), refs, counts = Packer.check_state(
            state, self._identity(), "loader", "resume with the same corpus, world size and --packing, or start the "
            "data from scratch", lambda s: (int(s["epoch"]), tuple(int(x) for x in s["pos"])), "row group, row")
        if len(pos) != 3 or not 0 <= pos[1] < len(self.groups) or pos[2] >= self.groups[pos[1]][3]:
            raise UserError(f"loader state position {list(pos)} is outside this corpus; start the data from scratch")
        self.epoch, self._pos = epoch, pos
        local = {g: k for k, (g, *_) in enumerate(self.groups)}
        wanted: dict[int, list[int]] = defaultdict(list)
        for (g, d), _, _ in refs:
            if g not in local or d >= self.groups[local[g]][3]:
                raise UserError(f"loader state names row {d} of row group {g}, which this rank does not have")
            wanted[g].append(d)
        texts = {}
        for g in wanted:
            _, path, index, _ = self.groups[local[g]]
            rows = read_row_group(path, index, self.corpus)
            texts.update({(g, d): rows[d] for d in wanted[g]})
        ids = self.tokenizer.encode([texts[ref] for ref, _, _ in refs], prepend=self.tokenizer.bos_id,
                                    num_threads=self.tokenizer_threads) if refs else []
        self.packer.load([(ref, offset, s, np.asarray(tokens, dtype=np.int64), None)
                          for (ref, offset, s), tokens in zip(refs, ids)], counts)

    def close(self) -> None:
        """Stop the prefetch thread and wait for it (see `Prefetcher.close`)."""
        if self._prefetch is not None:
            self._prefetch.close()


def _produce(tokenizer, threads: int, groups: list, corpus: str, start: tuple[int, int, int], chunk: int,
             put: Callable[[list], bool]) -> None:
    """Prefetch body: read this rank's row groups from `start` on, forever, and `put` tokenized chunks of
    [((epoch, group index, row), tokens), ...] until `put` says stop."""
    e, k, d = start
    open_path, pf = None, None
    while True:
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
                if not put([((e, k, a + i), np.asarray(t, dtype=np.int64)) for i, t in enumerate(ids)]):
                    return
        e, k, d = (e, k + 1, 0) if k + 1 < len(groups) else (e + 1, 0, 0)


class Prefetcher:
    """Runs `produce(*args, put)` in a daemon thread, ahead of use: `put(chunk)` queues a list of items (at most
    QUEUE_CHUNKS chunks wait) and returns False once the consumer stopped; `next()` hands the items over one at a
    time, in order, and re-raises any exception `produce` raised. The thread takes no reference to this object
    or its owner, so dropping the owner lets it be collected and the thread stop. Shared by the pretraining and
    the conversation loaders."""

    def __init__(self, produce: Callable, args: tuple, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._chunk: list = []  # the chunk being consumed, and how far
        self._at = 0
        self._thread = threading.Thread(target=_prefetch_body, args=(produce, args, self._queue, self._stop),
                                        daemon=True, name=name)
        self._thread.start()

    def next(self):
        while self._at >= len(self._chunk):
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"the loader thread {self._thread.name} stopped without an error") from None
                continue
            if isinstance(item, BaseException):
                raise item
            self._chunk, self._at = item, 0
        self._at += 1
        return self._chunk[self._at - 1]

    def close(self) -> None:
        """Stop the thread and wait for it (it also stops by itself when this object is garbage-collected): a
        daemon thread still inside the tokenizer's native code at interpreter exit aborted a process once
        ("terminate called without an active exception", SIGABRT after a finished --stop-at run)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __del__(self):
        self._stop.set()


def _prefetch_body(produce: Callable, args: tuple, out: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        produce(*args, put)
    except Exception as exc:  # handed over, not swallowed: the consumer re-raises it on its next item
        put(exc)


# ---------------------------------------------------------------------------------------------------------------------
# validation


class DealtRows:
    """Packed rows dealt round-robin to ranks (row i to rank i % world_size), each rank's share padded with ignored
    rows (targets -1) to the same number of batches, so the union over ranks does not depend on the rank count.
    Attributes after `_deal`: `rows` (over all ranks), `steps` (batches per rank)."""

    def _deal(self, x: np.ndarray, y: np.ndarray, B: int, rank: int, world_size: int, pad: int) -> None:
        """x, y: (rows, T) inputs and targets of all ranks."""
        self.rows, self.B = len(x), B
        self.steps = math.ceil(math.ceil(len(x) / world_size) / B)
        mine = slice(rank, None, world_size)
        self._x = np.full((self.steps * B, x.shape[1]), pad, dtype=np.int64)  # (steps * B, T)
        self._y = np.full((self.steps * B, x.shape[1]), -1, dtype=np.int64)  # (steps * B, T); -1 = not scored
        self._x[:len(x[mine])], self._y[:len(y[mine])] = x[mine], y[mine]

    def batches(self, device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `steps` batches of (inputs, targets), each (B, T) int64 on `device`."""
        for a in range(0, len(self._x), self.B):
            yield (torch.from_numpy(self._x[a:a + self.B]).to(device),
                   torch.from_numpy(self._y[a:a + self.B]).to(device))


def pack_all(packer: Packer, pull: Callable[[], tuple | None], row: int,
             pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row `packer` fills from `pull` until both run dry: the rows (N, row) with unfilled slots set to `pad`,
    their masks (N, row; 0 where unfilled or the items carry none) and how many tokens each row holds (N,)."""
    rows, masks, filled = [], [], []
    while True:
        r, m = np.full(row, pad, dtype=np.int64), np.zeros(row, dtype=np.int8)
        n = packer.fill(r, pull, m)
        if n == 0:
            return (np.array(rows, dtype=np.int64).reshape(-1, row), np.array(masks, dtype=np.int8).reshape(-1, row),
                    np.array(filled, dtype=np.int64))
        rows.append(r)
        masks.append(m)
        filled.append(n)


def shift(rows: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (N, T), from packed rows and their masks (N, T+1): inputs = rows[:, :-1]; targets =
    rows[:, 1:] where that token's mask is 1, else -1 (ignored by the loss)."""
    return rows[:, :-1], np.where(masks[:, 1:] != 0, rows[:, 1:], -1)


def to_device(inputs: np.ndarray, targets: np.ndarray,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (B, T) int64 arrays as tensors on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class ValidationSlice(DealtRows):
    """The first `tokens` tokens' worth of the validation split, whole documents in document order, packed once into
    BOS-led rows of T+1 in that order (the split rule with a one-document buffer: a document that does not fit the
    row's rest continues at the next row's start), so every document token is a target exactly once and every call
    of `batches` yields the same tokens. Rows are dealt round-robin to ranks (row i to rank i % world_size) and each
    rank's share is padded with ignored rows (targets -1) to the same number of batches, so the union over ranks,
    and with it the bits per byte, does not depend on the rank count. Attributes: `docs`, `tokens` (document tokens,
    BOS included), `split_docs`, `rows` (over all ranks), `steps` (batches per rank)."""

    def __init__(self, tokenizer, B: int, T: int, tokens: int, *, corpus: str = "default", rank: int = 0,
                 world_size: int = 1, tokenizer_threads: int = 4):
        if B < 1 or T < 1 or tokens < 1:
            raise UserError(f"the validation slice needs B, T and eval tokens >= 1 (got B={B}, T={T}, "
                            f"tokens={tokens})")
        self.split_docs = sum(n for *_, n in row_groups("val", corpus))
        docs: list[np.ndarray] = []
        self.tokens = 0
        texts = iter_documents("val", corpus)
        while self.tokens < tokens:
            chunk = [t for _, t in zip(range(64), texts)]
            if not chunk:
                break
            for ids in tokenizer.encode(chunk, prepend=tokenizer.bos_id, num_threads=tokenizer_threads):
                if self.tokens < tokens:
                    docs.append(np.asarray(ids, dtype=np.int64))
                    self.tokens += len(ids)
        if not docs:
            raise UserError(f"corpus '{corpus}' has no validation documents; rebuild it with `picochat data prepare`")
        self.docs = len(docs)
        feed = iter(enumerate(docs))

        def pull() -> tuple[tuple[int, int], np.ndarray] | None:
            got = next(feed, None)
            return None if got is None else ((0, got[0]), got[1])

        rows, _, filled = pack_all(Packer("split", 1, 0, tokenizer.bos_id), pull, T + 1, tokenizer.bos_id)
        targets = np.arange(T + 1) < filled[:, None]  # (rows, T+1): every token in a row is a target
        self._deal(*shift(rows, targets), B, rank, world_size, tokenizer.bos_id)

    def describe(self) -> str:
        part = "all" if self.docs == self.split_docs else f"the first {self.docs:,}"
        return (f"validation slice: {part} of the split's {self.split_docs:,} documents in order, {self.tokens:,} "
                f"tokens in {self.rows:,} rows, {self.steps} batches per rank")


# ---------------------------------------------------------------------------------------------------------------------
# corpus size


class CorpusSize(NamedTuple):
    tokens: int  # BOS included
    how: str  # "exact", or how it was estimated
    crop_frac: float  # sum(min(L, row)) / sum(L) over the documents counted: at most what crop keeps of a pass


def corpus_tokens(tokenizer, split: str = "train", corpus: str = "default", sample_bytes: int = 4 << 20,
                  row: int = 0) -> CorpusSize:
    """Tokens in `split`, how they were counted, and (for rows of `row` tokens) the share of them crop can keep.
    Splits of up to `sample_bytes` of text are tokenized whole ("exact"); larger ones are estimated from the parquet
    footers: the `text` column's uncompressed size in every row group, times the tokens per footer byte measured on
    whole row groups spread evenly over the split (about `sample_bytes` of them; the ratio absorbs the page headers
    and length prefixes the footer size includes). Reading the footers costs milliseconds per shard; the sample ~1 s
    per 4 MB on 2 cores."""
    groups = row_groups(split, corpus)
    footers: dict[Path, object] = {}
    sizes = []
    for path, index, _ in groups:
        if path not in footers:
            footers[path] = open_shard(path, corpus).metadata
        rg = footers[path].row_group(index)
        sizes.append(next(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                          if rg.column(c).path_in_schema == "text"))
    total = sum(sizes)
    order = list(range(len(groups)))
    if total > sample_bytes:  # every step-th row group: a spread of the split's sources and positions
        order = order[::max(1, round(total / sample_bytes))]
    n_tok = n_bytes = n_footer = n_crop = 0
    for i in order:
        path, index, _ = groups[i]
        texts = read_row_group(path, index, corpus)
        lengths = [len(t) for t in tokenizer.encode(texts, prepend=tokenizer.bos_id)]
        n_tok += sum(lengths)
        n_crop += sum(min(n, row) for n in lengths) if row > 0 else sum(lengths)
        n_bytes += sum(len(t.encode("utf-8")) for t in texts)
        n_footer += sizes[i]
    crop_frac = n_crop / max(1, n_tok)
    if len(order) == len(groups):
        return CorpusSize(n_tok, "exact", crop_frac)
    return CorpusSize(round(total * n_tok / max(1, n_footer)),
                      f"estimated from the shard footers ({total / 1e6:,.1f} MB) at {n_bytes / max(1, n_tok):.2f} "
                      f"bytes/token measured on {len(order)} of {len(groups)} row groups", crop_frac)
