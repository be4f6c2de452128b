"""Conversation batches for midtraining and SFT: tasks rendered with their loss masks, packed BOS-aligned by the
pretraining loader's best-fit `Packer`, with exact resume, rank sharding and a fixed validation slice.

    loader = ConversationLoader(tokenizer, task, B=8, T=512, rank=rt.rank, world_size=rt.world_size, device=rt.device)
    x, y = next(loader)                   # (B, T) int64; y = next token where it is a training target, else -1
    meta["loader"] = loader.state_dict()  # ConversationLoader(..., state=meta["loader"]) yields the next batch
    loader.epochs_done()                  # passes over this rank's conversations (SFT's schedule unit)
    loader.stats()                        # {"conv_used_frac": ..., "epochs": ..., "supervised_frac": ..., ...}
    val = ConversationValidation(tokenizer, task, B=8, T=512, max_conversations=256, rank=rt.rank,
                                 world_size=rt.world_size)
    for x, y in val.batches(device): ...  # the same tensors on every call

`task` is any picochat.tasks Task or TaskMixture: len(task) and task[i] -> {"messages": [...]}. Used by
picochat/train/midtrain.py and sft.py; tests in tests/test_conversations.py.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import torch

from picochat.common import UserError
from picochat.data.loader import MAX_AGE_BUFFERS, DealtRows, Packer, Prefetcher, pack_all, shift, to_device

STATE_VERSION = 1
PACKING = ("pad", "split")
# Conversations rendered per prefetched chunk (at most QUEUE_CHUNKS chunks wait). Rendering is Python-heavy: one
# B=8, T=2,048 batch's worth of the offline mixtures took 46-53 ms on one loaded Zen 5 core (README).
RENDER_CHUNK = 32


def conversation_pieces(tokenizer, conv: dict, row: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """A conversation as BOS-led pieces of at most `row` tokens, each with its render mask, and the number of
    tokens cropped away.

    One that fits is one piece. A longer one is split at exchange boundaries (before a <|user_start|>): each piece
    holds as many whole user+assistant exchanges as fit, so each is itself a valid rendered conversation and every
    assistant token is trained with its own question in view; only the earlier exchanges are out of view. Splitting
    mid-turn instead would train a reply's tail with neither its question nor its start. A single exchange longer
    than the row is cropped to it with its mask (its head kept, as `render_conversation(max_tokens=...)` does: the
    question and the start of the reply; a question longer than the row leaves that piece with no target, which the
    loop counts as zero supervised tokens)."""
    ids, mask = tokenizer.render_conversation(conv, max_tokens=sys.maxsize)  # the mask comes from the renderer only
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8)
    if len(ids) <= row:
        return [(ids, mask)], 0
    bos = ids[:1]
    starts = np.flatnonzero(ids == tokenizer.special_id("<|user_start|>")).tolist()  # ids[0] is BOS, then a user turn
    pieces, cropped, a = [], 0, 1  # a: where the current piece's body starts (after its BOS)

    def piece(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate((bos, ids[a:b])), np.concatenate(([0], mask[a:b])).astype(np.int8)

    for b, c in zip(starts, starts[1:] + [len(ids)]):  # exchange [b, c)
        if 1 + c - a > row and b > a:  # it does not fit after the exchanges gathered so far: close them as a piece
            pieces.append(piece(a, b))
            a = b
        if 1 + c - a > row:  # the exchange alone is longer than a row
            pieces.append(piece(a, a + row - 1))
            cropped += c - a - (row - 1)
            a = c
    if a < len(ids):
        pieces.append(piece(a, len(ids)))
    return pieces, cropped


class PassOrder:
    """Which task index is this rank's conversation number g (0, 1, ... over all passes): pass p = g // per_pass
    visits the task in a permutation seeded by (seed, p) and the rank takes positions rank, rank + world_size, ...
    of it. numpy's PCG64 from a fixed seed gives the same permutation on every machine."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.per_pass = len(range(rank, n, world_size))
        self._perm: tuple[int, np.ndarray] | None = None  # (pass, permutation) of the pass last looked up

    def __call__(self, g: int) -> int:
        p, pos = divmod(g, self.per_pass)
        if self._perm is None or self._perm[0] != p:
            self._perm = (p, np.random.default_rng([self.seed, p]).permutation(self.n))
        return int(self._perm[1][self.rank + pos * self.world_size])


def task_pieces(tokenizer, task, i: int, row: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """`conversation_pieces` of task[i]; a malformed conversation is an error naming the task and the index."""
    try:
        return conversation_pieces(tokenizer, task[i], row)
    except UserError as e:
        raise UserError(f"{type(task).__name__} conversation {i}: {e}") from None


def _render_ahead(tokenizer, task, order: PassOrder, row: int, start: int, put) -> None:
    """Prefetch body: (g, pieces, cropped) for g = start, start + 1, ... in chunks, until `put` says stop."""
    for g in range(start, sys.maxsize, RENDER_CHUNK):
        if not put([(h, *task_pieces(tokenizer, task, order(h), row)) for h in range(g, g + RENDER_CHUNK)]):
            return


def task_fingerprint(task) -> str:
    """A cheap identity of a task's contents (its length and three conversations), so a resume against a changed
    mixture is refused instead of silently continuing at the wrong place."""
    n = len(task)
    probe = [task[i] for i in sorted({0, n // 2, n - 1})]
    return hashlib.sha256(json.dumps([n, probe], sort_keys=True, default=str).encode()).hexdigest()[:16]


class ConversationLoader:
    """Yields (inputs, targets), each (B, T) int64 on `device`, from BOS-led rows of T+1 tokens packed best-fit from
    rendered conversations. targets[i] = inputs[i+1]'s token where the render mask is 1 (assistant text, python
    calls with their markers, <|assistant_end|>), else -1: BOS, user turns, <|assistant_start|>, tool output,
    padding and the BOS that starts the next conversation in a row are never targets. A row with no target at all
    is possible (y all -1); the training loop normalises by the supervised count of the whole step.

    Order (`PassOrder`): every pass over the task is a new permutation seeded by (seed, pass), and rank r takes
    positions r, r + world_size, ... of it. The data never runs out: after this rank's share the next pass begins.
    Conversations longer than a row are split by `conversation_pieces`. A thread renders conversations ahead
    (`Prefetcher`, in order, so batches do not depend on its timing): with a step that releases the GIL for 60 ms
    (as a GPU step does), the training thread waited 3-5 ms per B=8, T=2,048 batch instead of rendering for 46-53
    (README).

    Packing (`packing`): "pad" (default) ends a row when no buffered piece fits the space left and pads it (mask 0),
    so every piece stays whole and every target sees its piece's context; "split" fills the row with the shortest
    piece and puts its tail back as a BOS-led piece (no padding, but that tail is trained without its start). On
    the offline mixtures both cost under half a percent (README: pad 0.07-0.5% of row tokens, split 0.07-0.4% of
    targets in such tails), so the default keeps the context. `stats()["pad_frac"]` says what padding costs.

    `buffer_docs` pieces wait in the best-fit buffer (at most this rank's share, so a small task is not held in the
    buffer several times over); the Packer's age rule (MAX_AGE_BUFFERS) bounds how long one waits.
    """

    def __init__(self, tokenizer, task, B: int, T: int, *, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", seed: int = 0, state: dict | None = None,
                 packing: str = "pad", buffer_docs: int = 256):
        if B < 1 or T < 1 or buffer_docs < 1:
            raise UserError(f"ConversationLoader needs B, T and buffer_docs >= 1 (got B={B}, T={T}, "
                            f"buffer_docs={buffer_docs})")
        if packing not in PACKING:
            raise UserError(f"conversation packing '{packing}' is not one of {', '.join(PACKING)}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        n = len(task)
        if n < world_size:
            raise UserError(f"{type(task).__name__} has {n} conversations, fewer than world_size {world_size}; add "
                            f"data or use fewer ranks")
        self.tokenizer, self.task, self.B, self.T = tokenizer, task, B, T
        self.rank, self.world_size, self.seed, self.packing = rank, world_size, seed, packing
        self.device = torch.device(device)
        self.order = PassOrder(n, rank, world_size, seed)
        self.per_pass = self.order.per_pass  # this rank's conversations in each pass
        self.buffer_docs = min(buffer_docs, self.per_pass)
        self.fingerprint = task_fingerprint(task)
        self.packer = Packer(packing, self.buffer_docs, MAX_AGE_BUFFERS * self.buffer_docs, tokenizer.bos_id)
        # reader: conversation number g (0, 1, ... over all passes of this rank), its next piece k; a piece's ref
        # in the buffer is (g, k), so a resume re-renders exactly the buffered pieces
        self._g = self._k = 0
        self._pieces: list[tuple[np.ndarray, np.ndarray]] | None = None  # conversation g's pieces once rendered
        self._prefetch: Prefetcher | None = None  # renders ahead from g; started on first use
        self.counts = {"rows": 0, "targets": 0, "supervised": 0, "padding": 0}  # over the batches yielded
        if state is not None:
            self._load_state(state)

    # ----------------------------------------------------------------------------------------------------------------
    # reading conversations

    def task_index(self, g: int) -> int:
        """The task index of this rank's conversation number `g`."""
        return self.order(g)

    def _pull(self) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
        if self._pieces is None:
            if self._prefetch is None:  # its own PassOrder: the thread shares no mutable state with this one
                order = PassOrder(len(self.task), self.rank, self.world_size, self.seed)
                self._prefetch = Prefetcher(_render_ahead, (self.tokenizer, self.task, order, self.T + 1, self._g),
                                            name=f"picochat-conversations-r{self.rank}")
            g, self._pieces, cropped = self._prefetch.next()
            if g != self._g:  # the thread renders exactly g, g + 1, ...; anything else is a bug
                raise RuntimeError(f"conversation loader position mismatch: expected {self._g}, got {g}")
            if self._k == 0:  # else a resumed reader re-rendered it: its crop was counted before the save
                self.packer.dropped += cropped
        ref = (self._g, self._k)
        tokens, mask = self._pieces[self._k]
        self._k += 1
        if self._k == len(self._pieces):
            self._g, self._k, self._pieces = self._g + 1, 0, None
        return ref, tokens, mask

    # ----------------------------------------------------------------------------------------------------------------
    # iteration, progress and state

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.full((self.B, self.T + 1), self.tokenizer.bos_id, dtype=np.int64)  # padding is BOS, mask 0
        masks = np.zeros((self.B, self.T + 1), dtype=np.int8)
        for b in range(self.B):
            filled = self.packer.fill(rows[b], self._pull, masks[b])
            self.counts["padding"] += self.T + 1 - filled
        x, y = shift(rows, masks)  # (B, T) each
        self.counts["rows"] += self.B
        self.counts["targets"] += y.size
        self.counts["supervised"] += int((y != -1).sum())
        return to_device(x, y, self.device)

    def epochs_done(self) -> float:
        """Passes over this rank's conversations so far, fractional: conversations whose pieces have all left the
        buffer, over the conversations of one pass."""
        waiting = {ref[0] for ref, *_ in self.packer.items if ref[0] < self._g}
        return (self._g - len(waiting)) / self.per_pass

    def stats(self) -> dict:
        """`conv_used_frac`: of the conversation tokens rendered, the share that reached a row (1.0 minus what was
        cropped from exchanges longer than a row); `epochs`: `epochs_done()`; `supervised_frac`: the share of the
        target positions yielded so far that are trained on (y != -1); `pad_frac`: the share of row tokens that
        are padding."""
        p, c = self.packer, self.counts
        return {"conv_used_frac": p.used / (p.used + p.dropped) if p.used + p.dropped else 1.0,
                "epochs": self.epochs_done(),
                "supervised_frac": c["supervised"] / c["targets"] if c["targets"] else 0.0,
                "pad_frac": c["padding"] / (c["rows"] * (self.T + 1)) if c["rows"] else 0.0}

    def _identity(self) -> dict:
        return {"version": STATE_VERSION, "kind": "conversations", "task": self.fingerprint, "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed, "T": self.T, "packing": self.packing,
                "buffer_docs": self.buffer_docs}

    def state_dict(self) -> dict:
        """JSON-serialisable: what the loader was built with, the reader (conversation number, next piece), the
        counts, and the buffered pieces as [conversation number, piece, offset, seq]."""
        return {**self._identity(), "next": [self._g, self._k], "counts": dict(self.counts),
                **self.packer.state_dict()}

    def _load_state(self, state: dict) -> None:
        def fields(s: dict):
            g, k = (int(v) for v in s["next"])
            return g, k, {name: int(s["counts"][name]) for name in self.counts}

        (g, k, counts), refs, packer_counts = Packer.check_state(
            state, self._identity(), "conversation loader", "resume with the same data, world size, seed and "
            "sequence length, or start the data from scratch", fields, "conversation, piece")
        rendered = {}
        pieces = []
        for (rg, rk), offset, seq in sorted(refs, key=lambda r: r[0]):  # sorted: one permutation per pass
            if rg not in rendered:
                rendered[rg] = task_pieces(self.tokenizer, self.task, self.order(rg), self.T + 1)[0]
            if not 0 <= rk < len(rendered[rg]) or not 0 <= offset < len(rendered[rg][rk][0]):
                raise UserError(f"conversation loader state names piece {rk} offset {offset} of conversation {rg}, "
                                f"which does not exist; start the data from scratch")
            pieces.append(((rg, rk), offset, seq, *rendered[rg][rk]))
        self.packer.load(pieces, packer_counts)
        self._g, self._k, self.counts = g, k, counts

    def close(self) -> None:
        """Stop the rendering thread and wait for it (see `Prefetcher.close`)."""
        if self._prefetch is not None:
            self._prefetch.close()


class ConversationValidation(DealtRows):
    """The first `max_conversations` conversations of `task`, in order, rendered and split as in training
    (`conversation_pieces`) and packed once into BOS-led rows of T+1 (pieces in order; one that does not fit the
    row's rest starts the next row, the rest padded), so each conversation is scored once and every call of
    `batches` yields the same tensors. Rows are dealt round-robin to ranks as in the pretraining validation slice,
    so the union over ranks does not depend on the rank count. Attributes: `conversations`, `tokens`,
    `supervised` (targets over all ranks), `rows`, `steps` (batches per rank)."""

    def __init__(self, tokenizer, task, B: int, T: int, *, max_conversations: int = 256, rank: int = 0,
                 world_size: int = 1):
        if B < 1 or T < 1 or max_conversations < 1:
            raise UserError(f"conversation validation needs B, T and max_conversations >= 1 (got B={B}, T={T}, "
                            f"max_conversations={max_conversations})")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.conversations = min(max_conversations, len(task))
        if self.conversations == 0:
            raise UserError(f"{type(task).__name__} has no conversations to validate on")
        self.task_len = len(task)
        feed = iter([((i, k), tokens, mask) for i in range(self.conversations)
                     for k, (tokens, mask) in enumerate(task_pieces(tokenizer, task, i, T + 1)[0])])
        rows, masks, filled = pack_all(Packer("pad", 1, 0, tokenizer.bos_id), lambda: next(feed, None), T + 1,
                                       tokenizer.bos_id)
        self.tokens = int(filled.sum())
        x, y = shift(rows, masks)  # (rows, T) each
        self.supervised = int((y != -1).sum())
        self._deal(x, y, B, rank, world_size, tokenizer.bos_id)

    def describe(self) -> str:
        part = "all" if self.conversations == self.task_len else f"the first {self.conversations:,}"
        return (f"validation: {part} of {self.task_len:,} conversations in order, {self.tokens:,} tokens "
                f"({self.supervised:,} targets) in {self.rows:,} rows, {self.steps} batches per rank")
