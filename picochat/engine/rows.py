"""Per-row state: one sample of one request, its text stream, its random numbers and the tool state machine.

A row's life: prefill gives its first token; then each token it accepts (sampled, or forced by a tool's output) is
queued in `feed` until the next forward pass writes it into the cache. The tool state machine:

    text ─<|python_start|>─► python (code collected) ─<|python_end|>─► WAIT (the tool runs, maybe on another
    thread; the row sits out the decode steps) ─output─► <|output_start|> result <|output_end|> queued as forced
    tokens, fed in ONE forward pass (an extend) ─► text

A row finishes on <|assistant_end|> or <|bos|>, a stop string, max_tokens or the context's end.
"""

from __future__ import annotations

import codecs
import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from picochat.engine.sampling import SamplingParams


@dataclass
class Event:
    row: int  # sample index within the request, 0..n-1
    token: int  # token id appended at this step (-1 on a pure finish event)
    forced: bool  # True for tokens forced by the tool (the output block)
    segment: str  # "text" | "python" (the code block, delimiters included) | "output" (tool output block)
    text: str  # printable delta: UTF-8 complete, special tokens -> "", stop strings never emitted
    finish_reason: str | None = None  # None while running; "stop" | "length" | "cancelled" | "error"
    # on a "stop" finish: how many of the row's last tokens, this one included, are not part of the reply (the
    # terminal special token, or every token that holds part of the stop string); generate_batch drops them
    drop: int = 0


class TextStream:
    """Turns a row's token bytes into printable deltas: complete UTF-8 only, stop strings held back and cut, the
    held-back text and an incomplete UTF-8 tail given out at the finish."""

    def __init__(self, stop: tuple[str, ...]):
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # all decoded text
        self.emitted = 0  # chars of self.text already given out
        self.ends: list[int] = []  # len(self.text) after each token

    def push(self, data: bytes) -> tuple[str, int]:
        """-> (delta, tokens to drop): drop > 0 when a stop string completed (the tokens that hold part of it)."""
        self.text += self.dec.decode(data)
        self.ends.append(len(self.text))
        return self._deltas()

    def finish(self) -> str:
        """The rest: the held-back text, and U+FFFD for bytes of an unfinished character (what decode() gives)."""
        self.text += self.dec.decode(b"", final=True)
        delta, _ = self._deltas(final=True)
        return delta

    def _deltas(self, final: bool = False) -> tuple[str, int]:
        end = len(self.text)
        if self.stop:
            # search from a little before the unemitted tail so a stop string spanning the boundary is found
            start = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                delta = self.text[self.emitted : cut] if cut > self.emitted else ""
                self.emitted = max(self.emitted, cut)
                return delta, sum(e > cut for e in self.ends)
            if not final:
                end -= self._hold()
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta, 0

    def _hold(self) -> int:
        """The longest unemitted suffix that could still become a stop string."""
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold


@dataclass(eq=False)  # compared by identity: two requests with the same fields are still two
class Request:
    rid: int
    prompt: list[int]
    n: int
    params: SamplingParams
    on_event: Callable[[Event], None]
    cancelled: bool = False


def row_seed(seed: int | None, index: int) -> int:
    """The generator seed of sample `index` of a request: a hash of (request seed, index), so sample i draws the same
    numbers whichever cache row it occupies and whatever shares the batch; a random one without a seed."""
    if seed is None:
        return random.getrandbits(63)
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


class Uniforms:
    """A row's uniform numbers in [0, 1), drawn from its own generator in blocks and handed out in order: `peek(k)`
    the next k, `take(m)` the first m of them used. A row that used fewer than it peeked (it stopped for a tool
    mid-chunk) gets the rest next time, so the draws do not depend on the chunk size. Greedy rows draw nothing.
    Kept as Python floats on the CPU: the batch builds one (k, n) tensor from every row's list in one call (a
    torch.stack of 32 per-row slices cost ~3x as much), and a seed gives the same numbers on every device."""

    BLOCK = 256  # numbers per draw: one torch.rand call per row per 256 sampled tokens

    def __init__(self, seed: int | None, index: int, temperature: float):
        self.gen = None
        if temperature > 0:
            self.gen = torch.Generator()
            self.gen.manual_seed(row_seed(seed, index))
        self.buf: list[float] = [] if self.gen is not None else [0.0] * self.BLOCK  # greedy: zeros, kept

    def peek(self, k: int) -> list[float]:
        if self.gen is None:
            return self.buf[:k] if k <= self.BLOCK else [0.0] * k
        if len(self.buf) < k:
            self.buf += torch.rand(max(k, self.BLOCK), generator=self.gen).tolist()
        return self.buf[:k]

    def take(self, m: int) -> None:
        if self.gen is not None:
            del self.buf[:m]


@dataclass(eq=False)
class Row:
    request: Request
    index: int  # sample index within its request
    pos: int  # tokens in the cache for this row
    text: TextStream
    uniforms: Uniforms
    feed: list[int] = field(default_factory=list)  # accepted tokens the next forward pass writes into the cache
    produced: int = 0
    segment: str = "text"  # "text" | "python"
    code: list[int] = field(default_factory=list)
    sampled: dict[int, int] = field(default_factory=dict)  # text token -> times sampled, for a penalized request
    waiting: bool = False  # a tool call is running: the row sits out decode steps
    done: bool = False

    def accept(self, t: int, forced: bool, specials: "Specials", token_bytes: bytes, context: int) -> list[int] | None:
        """Take token `t` (sampled, or forced by a tool): emit its Event, advance the state machine, finish the row
        where it ends. Returns the code of a python block that `t` closed (the caller runs the tool), else None."""
        req = self.request
        if req.cancelled:
            return self.finish("cancelled")
        at = self.pos + len(self.feed)  # the position t is fed at
        self.feed.append(t)
        self.produced += 1
        segment = "output" if forced else ("python" if (self.segment == "python" or t == specials.python_start)
                                          else "text")
        if segment == "text" and req.params.penalized:
            self.sampled[t] = self.sampled.get(t, 0) + 1
        if t in (specials.assistant_end, specials.bos) and not forced:
            self._emit(Event(self.index, t, forced, segment, self.text.finish(), "stop", drop=1))
            return None
        call = None
        if t == specials.python_start and not forced:
            self.segment, self.code = "python", []
        elif t == specials.python_end and self.segment == "python":
            self.segment, call = "text", self.code
        elif self.segment == "python":
            self.code.append(t)
        delta, drop = self.text.push(token_bytes)
        if drop:
            self._emit(Event(self.index, t, forced, segment, delta, "stop", drop=drop))
        elif self.produced >= req.params.max_tokens or at + 1 >= context:
            self._emit(Event(self.index, t, forced, segment, delta + self.text.finish(), "length"))
        else:
            self._emit(Event(self.index, t, forced, segment, delta))
            return call
        return None

    def finish(self, reason: str, text: str = "") -> None:
        """End the row without a token ("cancelled", "error")."""
        if not self.done:
            self._emit(Event(self.index, -1, False, self.segment, text, reason))

    def _emit(self, ev: Event) -> None:
        if ev.finish_reason is not None:
            self.done = True
        self.request.on_event(ev)


@dataclass(frozen=True)
class Specials:
    """The special token ids the state machine reacts to."""
    bos: int
    assistant_end: int
    python_start: int
    python_end: int
    output_start: int
    output_end: int
