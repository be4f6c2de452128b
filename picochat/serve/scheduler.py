"""Continuous batching for the server: one thread admits queued requests into free rows of one batch between decode
steps and steps every live row together, so concurrent requests share decode steps.

    sched = Scheduler(Engine(model, tokenizer, tool=tool), max_batch=32)
    sched.start()
    rid = sched.submit(prompt_ids, SamplingParams(max_tokens=64), n=2, on_event=handle)   # handle(Event), 1 per token
    sched.submit_score(ids, top=5, on_done=handle_score)    # Engine.score between decode steps
    sched.cancel(rid); sched.load; sched.dead; sched.stop()

Callbacks run on the scheduler thread and must not block. `serve/worker.py` runs the same class in a child process.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Union

import torch

from picochat.common import UserError
from picochat.engine import Batch, Engine, Event, Request, SamplingParams

log = logging.getLogger("picochat.serve")

ScoreResult = tuple[list[Union[float, None]], list[list[tuple[int, float]]]]

# a round admits new requests while their prompts, padded to the longest, stay within this many tokens (at least
# one request): their prefill runs before the next decode step, so this bounds how long a burst of arrivals
# stalls the streams already decoding
PREFILL_TOKENS_PER_ROUND = 512
# tool calls run on this many threads: a slow tool (the python sandbox: up to its timeout) stalls only its own row
TOOL_WORKERS = 4
# a round scores queued prompts until this many tokens (at least one prompt), then decodes a step: a queue of long
# scoring requests (an evaluation client) must not stall the streams that are decoding
SCORE_TOKENS_PER_ROUND = 2048


class OverloadedError(Exception):
    """The scheduler's queue is full; the server answers 429."""


class EngineDied(Exception):
    """The scheduler's thread (or the engine process) is gone; the server answers 503."""


@dataclass
class _Score:
    """A queued Engine.score call: one queue row."""
    rid: int
    ids: list[int]
    top: int
    on_done: Callable[[Union[ScoreResult, BaseException]], None]
    n: int = 1


class Scheduler:
    """Continuous batching across requests on a background thread; see the module docstring."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 256,
                 on_step: Callable[[], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called on the scheduler thread after each round (admissions + one step)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: deque[Request | _Score] = deque()
        self._queued_rows = 0  # sum of n over the queue; both under _cv
        self._running = 0  # live rows of the batch, as of the end of the last round; under _cv
        self._cancel: set[int] = set()
        self._cv = threading.Condition()
        self._next_id = 1
        self._thread: threading.Thread | None = None
        self._stop = False
        self._dead: str | None = None
        self._batch: Batch | None = None
        self._tools: ThreadPoolExecutor | None = None
        self._threads = torch.get_num_threads()
        self.steps = 0
        self.compile_seconds = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Compile the decode graphs (a compiled engine; `compile_seconds` says how long it took), then start the
        scheduler thread."""
        if self._thread is None:
            self.compile_seconds = self.engine.warmup(self.max_batch)
            self._tools = ThreadPoolExecutor(TOOL_WORKERS, thread_name_prefix="picochat-tool")
            self._batch = Batch(self.engine, self.max_batch, run_tool=self._run_tool)
            self._thread = threading.Thread(target=self._run, name="picochat-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._tools is not None:
            self._tools.shutdown(wait=False, cancel_futures=True)
            self._tools = None

    @property
    def dead(self) -> str | None:
        """Why the scheduler thread is gone, or None while it runs (or before start / after stop)."""
        if self._dead is None and self._thread is not None and not self._thread.is_alive() and not self._stop:
            return "the scheduler thread exited"
        return self._dead

    @property
    def load(self) -> tuple[int, int]:
        """(live rows, queued rows)."""
        with self._cv:
            return self._running, self._queued_rows

    # -- requests -----------------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, on_event: Callable[[Event], None]) -> int:
        self.engine.check_prompt(prompt_ids)
        if n < 1 or n > self.max_batch:
            raise UserError(f"n={n} must be between 1 and the server's max batch {self.max_batch}")
        return self._enqueue(lambda rid: Request(rid, list(prompt_ids), n, params, on_event))

    def submit_score(self, ids: list[int], top: int,
                     on_done: Callable[[Union[ScoreResult, BaseException]], None]) -> int:
        """Queue `Engine.score(ids, top)`; `on_done` gets its result, or the exception it raised, on the scheduler
        thread. Counts one row against the queue limit."""
        self.engine.check_score(ids, top)
        return self._enqueue(lambda rid: _Score(rid, list(ids), top, on_done))

    def _enqueue(self, make: Callable[[int], Request | _Score]) -> int:
        with self._cv:
            if self.dead is not None:
                raise EngineDied(self.dead)
            item = make(self._next_id)
            if self._queued_rows + item.n > self.max_queue:
                raise OverloadedError(f"server busy: {self.max_queue} rows already queued; retry later")
            self._next_id += 1
            self._queue.append(item)
            self._queued_rows += item.n
            self._cv.notify_all()
        return item.rid

    def cancel(self, request_id: int) -> None:
        with self._cv:
            self._cancel.add(request_id)
            self._cv.notify_all()

    # -- the scheduler thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a dead loop must be reported, whatever killed it
            why = f"the scheduler thread died: {type(exc).__name__}: {exc}"
            with self._cv:
                self._dead = why
                queued, self._queue, self._queued_rows, self._running = list(self._queue), deque(), 0, 0
            for item in queued:
                _fail(item, why)
            self._batch.fail(why)
            log.error("%s; failed %d queued request(s)", why, len(queued), exc_info=exc)

    def _loop(self) -> None:
        # OpenMP's thread count is per thread: a new thread starts from the process default (all cores), not from
        # what torch.set_num_threads set on the thread that built the scheduler. Carry it over.
        torch.set_num_threads(self._threads)
        b = self._batch
        while True:
            with self._cv:
                while not self._stop and not b.busy and not self._queue:
                    self._cv.wait()
                if self._stop:
                    return
                admit, scores = self._take(b.free)
                cancel, self._cancel = self._cancel, set()
            for job in scores:
                if job.rid not in cancel:
                    try:
                        result: ScoreResult | BaseException = self.engine.score(job.ids, job.top)
                    except Exception as exc:  # noqa: BLE001 - handed to the caller, which answers the client
                        result = exc
                    job.on_done(result)
            for req in [r for r in admit if r.rid in cancel]:
                for i in range(req.n):
                    req.on_event(Event(i, -1, False, "text", "", "cancelled"))
            admit = [r for r in admit if r.rid not in cancel]
            if admit:
                try:
                    b.add(admit)
                except Exception as exc:  # a failed prefill fails its requests, never the server
                    b.rows = [r for r in b.rows if r.request not in admit]
                    for req in admit:
                        _fail(req, f"{exc}")
            for r in b.rows:
                if r.request.rid in cancel:
                    r.request.cancelled = True
            if b.rows:
                try:
                    b.step()
                    self.steps += 1
                except Exception as exc:  # a failed step fails its rows' requests, never the server
                    b.fail(f"{exc}")
            with self._cv:
                self._running = len(b.rows)
                # a request cancelled while queued also needs its cancel remembered
                self._cancel |= {rid for rid in cancel if any(q.rid == rid for q in self._queue)}
            if self.on_step is not None:
                self.on_step()

    def _take(self, free: int) -> tuple[list[Request], list[_Score]]:
        """Under the lock: the generation requests to admit this round (in order of arrival, while they fit in the
        free rows and, after the first, in `PREFILL_TOKENS_PER_ROUND` padded prompt tokens) and the scoring requests
        to run (up to `SCORE_TOKENS_PER_ROUND` tokens; they take no rows, so they do not wait for them)."""
        admit: list[Request] = []
        scores: list[_Score] = []
        keep: deque[Request | _Score] = deque()
        score_budget, blocked = SCORE_TOKENS_PER_ROUND, False
        for item in self._queue:
            if isinstance(item, _Score):
                if score_budget > 0:
                    scores.append(item)
                    score_budget -= len(item.ids)
                    continue
            elif not blocked and item.n <= free:
                longest = max(len(r.prompt) for r in admit + [item])
                if not admit or (len(admit) + 1) * longest <= PREFILL_TOKENS_PER_ROUND:
                    admit.append(item)
                    free -= item.n
                    continue
                blocked = True
            else:
                blocked = True  # first come, first served: a later small request does not overtake a big one
            keep.append(item)
        self._queue = keep
        self._queued_rows -= sum(q.n for q in admit) + len(scores)
        return admit, scores

    def _run_tool(self, code: str, deliver: Callable[[str], None]) -> None:
        """The Batch's tool runner: the tool runs on the pool; its row waits while the others keep decoding."""
        def job() -> None:
            output = self.engine.run_tool(code)
            deliver(output)
            with self._cv:  # wake the loop if every row is waiting
                self._cv.notify_all()
        self._tools.submit(job)


def _fail(item: Request | _Score, why: str) -> None:
    if isinstance(item, _Score):
        item.on_done(EngineDied(why))
    else:
        for i in range(item.n):
            item.on_event(Event(i, -1, False, "text", why, "error"))
