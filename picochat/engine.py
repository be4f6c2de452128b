"""The inference engine: KV cache, prefill/decode, sampling, tool use, streaming. The ONLY sampling code in picochat.

Everything that generates text goes through here: the chat CLI, the server (continuous batching via `Scheduler`),
training-time samples, evaluation and RL.

    engine = Engine(model, tokenizer, tool=make_tool("calculator"))
    for events in engine.generate(prompt_ids, num_samples=4, params=SamplingParams(temperature=0.8)):
        ...                                  # one Event per live row per step
    seqs, masks = engine.generate_batch(prompt_ids, num_samples=4)

How a request runs (the same code path for one call and for the server's batch):
1. prefill: the prompt is run ONCE at batch 1 straight into a free row of the preallocated cache; that row's cache
   is then copied into the other num_samples-1 rows (so N samples cost one prefill).
2. decode: all live rows advance one token per step (`decode_one_token`); each row has its own position, so rows of
   different requests (different prompt lengths) share a step. Finished rows leave between steps: the last live row is
   moved into the hole so live rows stay contiguous and the batch never computes dead rows.
3. per row, after sampling: forced tokens (a tool's output block) override the sample; the python-block state machine
   collects code between <|python_start|> and <|python_end|>, runs the tool and queues
   <|output_start|> result <|output_end|> as forced tokens; a row completes on <|assistant_end|> or <|bos|>, a stop
   string, max_tokens or the context limit.
"""

from __future__ import annotations

import codecs
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from picochat.common import UserError, autocast_ctx

# ---------------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values, (layers, batch, time, kv_heads, head_dim). Owned by the engine.

    The model sees a `CacheView` of some rows: `.pos` (int when the rows are aligned, else a (B,) int64 tensor of
    start positions), `.kv_len(T)` and `.layer(i) -> (k, v)` of shape (B, Tmax, Hkv, D). Attention writes the new
    entries in place; the engine advances positions after the forward pass.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_head: int, head_dim: int, device, dtype):
        shape = (n_layers, batch, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def view(self, rows: slice, positions: list[int]) -> "CacheView":
        return CacheView(self.k[:, rows], self.v[:, rows], positions)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]


class CacheView:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: list[int]):
        self.k, self.v = k, v
        self._max = max(positions)
        if all(p == positions[0] for p in positions):
            self.pos: int | torch.Tensor = positions[0]
        else:
            self.pos = torch.tensor(positions, dtype=torch.long, device=k.device)

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def kv_len(self, T: int) -> int:
        return self._max + T


# ---------------------------------------------------------------------------------------------------------------------
# sampling


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: keep the smallest set with cumulative probability >= top_p
    max_tokens: int = 256  # completion tokens per row, forced tool tokens included
    seed: int | None = None  # per-call generator: the same seed reproduces the same tokens
    stop: tuple[str, ...] = ()  # generation ends when the text contains one of these; it is never emitted


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (n, V) fp32 -> (n,) int64."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sp, si = torch.sort(probs, dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # a token is dropped when the mass before it already reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    # inverse-CDF sampling: one uniform number per row. torch.multinomial draws an exponential per vocabulary entry
    # on one thread (131k draws per step at 16 rows x 8k vocab: 18% of a 16-sample decode step on 2 CPU cores).
    cdf = probs.cumsum(dim=-1)  # (n, V)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.size(-1) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# per-row state


@dataclass
class Event:
    row: int  # sample index within the request, 0..n-1
    token: int  # token id appended at this step (-1 on a pure finish event)
    forced: bool  # True for tokens forced by the tool (the output block)
    segment: str  # "text" | "python" (the code block, delimiters included) | "output" (tool output block)
    text: str  # printable delta: UTF-8 complete, special tokens -> "", stop strings never emitted
    finish_reason: str | None = None  # None while running; "stop" | "length" | "cancelled" | "error"


class OverloadedError(Exception):
    """The scheduler's queue is full; the server answers 429."""


class _Text:
    """Turns a row's token bytes into printable deltas: complete UTF-8 only, stop strings held back and cut."""

    def __init__(self, stop: tuple[str, ...]):
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # all decoded text
        self.emitted = 0  # chars of self.text already given out

    def push(self, data: bytes) -> tuple[str, bool]:
        """Returns (delta, hit_stop)."""
        self.text += self.dec.decode(data)
        if self.stop:
            # search from a little before the unemitted tail so a stop string spanning the boundary is found
            start = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                delta = self.text[self.emitted : cut] if cut > self.emitted else ""
                self.emitted = max(self.emitted, cut)
                return delta, True
            hold = 0  # longest suffix that could still become a stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            end = len(self.text) - hold
        else:
            end = len(self.text)
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta, False


@dataclass
class _Row:
    request: "_Request"
    index: int  # sample index within its request
    pos: int  # tokens in the cache for this row
    last_token: int = -1  # the token to feed at the next decode step
    produced: int = 0
    forced: deque = field(default_factory=deque)
    segment: str = "text"
    code: list[int] = field(default_factory=list)
    text: _Text | None = None
    done: bool = False


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    n: int
    params: SamplingParams
    on_event: Callable[[Event], None]
    generator: torch.Generator | None = None
    cancelled: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# the engine


class Engine:
    """Owns the model, the tokenizer's special ids and the tool. Cheap to construct; caches are per batch."""

    def __init__(self, model, tokenizer, *, tool: Callable[[str], str] | None = None, compile: bool = False,
                 dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.tool = tool
        self.device = next(model.parameters()).device
        # bf16 on CUDA; fp32 on CPU even with native bf16: autocast re-casts every weight at every decode step, and
        # with the CPU preset model a batch-1 server stream measured 203 tok/s in bf16 vs 707 in fp32 (Zen 5, 2 cores)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.context = model.config.sequence_len
        sid = tokenizer.special_id
        self.bos = tokenizer.bos_id
        self.assistant_end = sid("<|assistant_end|>")
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")
        self._fwd = torch.compile(model, dynamic=True) if compile else model
        # token id -> bytes, specials -> b"" (built lazily: 8k-65k entries)
        self._bytes: list[bytes] | None = None

    # -- the compile-sized pieces -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: KVCache, row: int) -> torch.Tensor:
        """Run the prompt at batch 1 into `row` of the cache; returns the last position's logits (1, V)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with autocast_ctx(self.device, self.dtype):
            logits = self.model(x, kv_cache=cache.view(slice(row, row + 1), [0]))
        return logits[:, -1]

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, cache: KVCache, positions: list[int]) -> torch.Tensor:
        """tokens (n,) for live rows 0..n-1 at their positions -> logits (n, V)."""
        n = tokens.size(0)
        with autocast_ctx(self.device, self.dtype):
            logits = self._fwd(tokens[:, None], kv_cache=cache.view(slice(0, n), positions))
        return logits[:, -1]

    def token_bytes(self, t: int) -> bytes:
        if self._bytes is None:
            self._bytes = [b"" if self.tok.is_special(i) else self.tok.decode_bytes([i])
                           for i in range(self.tok.vocab_size)]
        return self._bytes[t]

    # -- public API ---------------------------------------------------------------------------------------------------

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise UserError("prompt is empty")
        if len(ids) >= self.context:
            raise UserError(f"prompt is {len(ids)} tokens; the model's context is {self.context} "
                            f"(shorten the prompt or conversation)")

    def generate(self, prompt_ids: list[int], num_samples: int = 1,
                 params: SamplingParams | None = None) -> Iterator[list[Event]]:
        """Stream a request: yields the list of Events of each step until every row has finished."""
        params = params or SamplingParams()
        self.check_prompt(prompt_ids)
        out: list[Event] = []
        batch = _Batch(self, max_rows=num_samples)
        batch.add(_Request(0, list(prompt_ids), num_samples, params, out.append))
        while batch.rows:
            batch.step()
            if out:
                yield list(out)
                out.clear()

    def generate_batch(self, prompt_ids: list[int], num_samples: int = 1,
                       params: SamplingParams | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Whole completions (terminal token excluded) and masks (1 = sampled, 0 = forced by a tool)."""
        seqs: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        for events in self.generate(prompt_ids, num_samples, params):
            for ev in events:
                if ev.token >= 0 and not (ev.finish_reason == "stop" and ev.token in (self.assistant_end, self.bos)):
                    seqs[ev.row].append(ev.token)
                    masks[ev.row].append(0 if ev.forced else 1)
        return seqs, masks


class _Batch:
    """Live rows [0, len(rows)) of one KV cache, stepped together. Used by Engine.generate and by Scheduler."""

    def __init__(self, engine: Engine, max_rows: int):
        e = engine
        cfg = e.model.config
        self.e = e
        self.max_rows = max_rows
        self.cache = KVCache(cfg.depth, max_rows, e.context, cfg.n_kv_head, cfg.head_dim, e.device, e.dtype)
        self.rows: list[_Row] = []

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    def add(self, req: _Request) -> None:
        """Prefill once at batch 1 into the first free row, clone into the request's other rows, sample each row's
        first token from the prompt's last logits."""
        e = self.e
        if req.params.seed is not None:
            req.generator = torch.Generator(device=e.device)
            req.generator.manual_seed(req.params.seed % 2**63)  # any int is a valid seed; torch takes 64-bit
        elif req.params.temperature > 0:
            req.generator = torch.Generator(device=e.device)
            req.generator.manual_seed(random.getrandbits(63))
        first = len(self.rows)
        logits = e.prefill(req.prompt, self.cache, first)  # (1, V)
        P = len(req.prompt)
        for i in range(1, req.n):
            self.cache.copy_row(first, first + i, P)
        new_rows = [_Row(req, i, P, text=_Text(req.params.stop)) for i in range(req.n)]
        self.rows.extend(new_rows)
        self._advance(new_rows, logits.expand(req.n, -1))

    def step(self) -> None:
        """One decode step for every live row, then drop the finished ones."""
        live = [r for r in self.rows if not r.done]
        if live:
            tokens = torch.tensor([r.last_token for r in self.rows], dtype=torch.long, device=self.e.device)
            logits = self.e.decode_one_token(tokens, self.cache, [r.pos for r in self.rows])
            for r in self.rows:
                r.pos += 1
            self._advance(self.rows, logits)
        self._compact()

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample per request (each request its own params and generator), then run the per-row state machine."""
        by_req: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_req.setdefault(r.request.rid, []).append(i)
        chosen = [0] * len(rows)
        for idx in by_req.values():
            req = rows[idx[0]].request
            sub = logits if len(idx) == len(rows) else logits[idx]
            p = req.params
            toks = sample_next(sub.float(), p.temperature, p.top_k, p.top_p, req.generator).tolist()
            for j, t in zip(idx, toks):
                chosen[j] = t
        for r, t in zip(rows, chosen):
            self._row_token(r, t)

    def _row_token(self, r: _Row, sampled: int) -> None:
        e, req = self.e, r.request
        if req.cancelled:
            r.done = True
            req.on_event(Event(r.index, -1, False, r.segment, "", "cancelled"))
            return
        forced = bool(r.forced)
        t = r.forced.popleft() if forced else sampled
        r.last_token = t
        r.produced += 1
        segment = "output" if forced else ("python" if (r.segment == "python" or t == e.python_start) else "text")
        finish = None
        text = ""
        if t in (e.assistant_end, e.bos) and not forced:
            finish = "stop"
        else:
            if t == e.python_start:
                r.segment, r.code = "python", []
            elif t == e.python_end and r.segment == "python":
                r.segment = "text"
                r.forced.extend(self._tool_output(r.code))
            elif r.segment == "python":
                r.code.append(t)
            text, hit = r.text.push(e.token_bytes(t))
            if hit:
                finish = "stop"
            elif r.produced >= req.params.max_tokens or r.pos + 1 >= e.context:
                finish = "length"
        if finish:
            r.done = True
        req.on_event(Event(r.index, t, forced, segment, text, finish))

    def _tool_output(self, code_ids: list[int]) -> list[int]:
        e = self.e
        if e.tool is None:
            return []  # no tool configured: the model just continues after <|python_end|>
        try:
            result = e.tool(e.tok.decode(code_ids))
        except Exception as exc:  # a tool must never take the engine down; its error becomes the output text
            result = f"Error: {type(exc).__name__}: {exc}"
        return [e.output_start, *e.tok.encode(str(result)), e.output_end]

    def _compact(self) -> None:
        """Move the last live row into each finished row's slot so live rows stay in [0, n)."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].done:
                last = len(self.rows) - 1
                if i != last:
                    self.cache.copy_row(last, i, self.rows[last].pos)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1


# ---------------------------------------------------------------------------------------------------------------------
# continuous batching for the server


class Scheduler:
    """Continuous batching across requests: a background thread admits queued requests into free rows between
    decode steps and steps all live rows together. `on_event` callbacks run on that thread and must not block."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 256):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: deque[_Request] = deque()
        self._cancel: set[int] = set()
        self._cv = threading.Condition()
        self._next_id = 1
        self._thread: threading.Thread | None = None
        self._stop = False
        self._batch: _Batch | None = None
        self.steps = 0

    def start(self) -> None:
        if self._thread is None:
            self._batch = _Batch(self.engine, self.max_batch)
            self._thread = threading.Thread(target=self._loop, name="picochat-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def load(self) -> tuple[int, int]:
        """(live rows, queued rows)."""
        running = len(self._batch.rows) if self._batch else 0
        return running, sum(r.n for r in self._queue)

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, on_event: Callable[[Event], None]) -> int:
        self.engine.check_prompt(prompt_ids)
        if n < 1 or n > self.max_batch:
            raise UserError(f"n={n} must be between 1 and the server's max batch {self.max_batch}")
        with self._cv:
            if sum(r.n for r in self._queue) + n > self.max_queue:
                raise OverloadedError(f"server busy: {self.max_queue} rows already queued; retry later")
            rid = self._next_id
            self._next_id += 1
            self._queue.append(_Request(rid, list(prompt_ids), n, params, on_event))
            self._cv.notify_all()
        return rid

    def cancel(self, request_id: int) -> None:
        with self._cv:
            self._cancel.add(request_id)
            self._cv.notify_all()

    def _loop(self) -> None:
        b = self._batch
        while True:
            with self._cv:
                while not self._stop and not b.rows and not self._queue:
                    self._cv.wait()
                if self._stop:
                    return
                admit = []
                while self._queue and self._queue[0].n <= b.free - sum(r.n for r in admit):
                    admit.append(self._queue.popleft())
                cancel, self._cancel = self._cancel, set()
            for req in admit:
                if req.rid in cancel:
                    for i in range(req.n):
                        req.on_event(Event(i, -1, False, "text", "", "cancelled"))
                    continue
                self._guard(req, lambda: b.add(req))
            for r in b.rows:
                if r.request.rid in cancel:
                    r.request.cancelled = True
            if b.rows:
                try:
                    b.step()
                    self.steps += 1
                except Exception as exc:  # a failed step fails its rows' requests, never the server
                    for r in b.rows:
                        r.done = True
                        r.request.on_event(Event(r.index, -1, False, r.segment, f"{exc}", "error"))
                    b._compact()
            # a request cancelled while queued also needs its cancel remembered
            with self._cv:
                self._cancel |= {rid for rid in cancel if any(q.rid == rid for q in self._queue)}

    def _guard(self, req: _Request, fn) -> None:
        try:
            fn()
        except Exception as exc:
            for i in range(req.n):
                req.on_event(Event(i, -1, False, "text", f"{exc}", "error"))
            self._batch.rows = [r for r in self._batch.rows if r.request is not req]

