"""The scheduler-to-asyncio bridge: requests go from the event loop to the scheduler (a thread here, or the engine
process of picochat/serve/worker.py), and each request's events come back to the handler that awaits them.

    job = bridge.submit(request)               # ApiError(400/429/503) when it cannot be queued
    async for ev in bridge.events(job, ...):   # Event per token per row, until every row finished
    logprobs, top = await bridge.score(ids, k)  # Engine.score on the scheduler, between decode steps

Leaving `events` early (client gone, generator closed or cancelled) cancels the request, so its rows leave the batch at
the next step. An "error" event's text (the engine's exception) is logged here and goes no further.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from picochat.common import UserError
from picochat.engine import Event
from picochat.serve.protocol import ApiError, GenRequest
from picochat.serve.scheduler import EngineDied, OverloadedError

log = logging.getLogger("picochat.serve")

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class Notifier:
    """Wakes the event loop for jobs with new events: at most one cross-thread wake-up pending at a time, however
    many jobs and tokens one decode step produced. A wake-up (and an asyncio.wait_for task) per token per request
    cost the event loop, which shares the GIL with the scheduler thread (8 clients got ~18% more tokens/s without
    them: README, Measured: serving)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._dirty: set[Job] = set()
        self._scheduled = False

    def mark(self, job: "Job") -> None:  # scheduler thread
        with self._lock:
            self._dirty.add(job)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            # the event loop is closed: the server is shutting down and nobody is waiting for these events
            log.debug("dropped a wake-up: event loop closed")

    def _flush(self) -> None:  # event loop thread
        with self._lock:
            jobs, self._dirty, self._scheduled = self._dirty, set(), False
        for job in jobs:
            job.ready.set()


class Job:
    """One submitted request. The scheduler thread calls `on_event` (appends, then asks the notifier for a wake-up);
    the handler drains `pending` after `ready` is set."""

    def __init__(self, notifier: Notifier, n: int):
        self.notifier = notifier
        self.n = n
        self.pending: deque[Event] = deque()  # appended on the scheduler thread, popped on the loop thread
        self.ready = asyncio.Event()
        self.request_id: int | None = None

    def on_event(self, ev: Event) -> None:  # runs on the scheduler thread: must not block
        self.pending.append(ev)
        self.notifier.mark(self)


def _unavailable(why: str) -> ApiError:
    return ApiError(503, f"the model is unavailable: {why}; restart the server (its log says why)",
                    type="server_error", code="engine_unavailable")


class Bridge:
    """The event loop's side of one scheduler (`Scheduler` or `EngineProcess`: submit / cancel / submit_score /
    load / dead)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._notifier: Notifier | None = None

    def _loop_notifier(self) -> Notifier:
        loop = asyncio.get_running_loop()
        if self._notifier is None or self._notifier.loop is not loop:
            self._notifier = Notifier(loop)
        return self._notifier

    def _check_alive(self) -> None:
        dead = self.scheduler.dead
        if dead is not None:
            raise _unavailable(dead)

    def submit(self, req: GenRequest, param: str) -> Job:
        self._check_alive()
        job = Job(self._loop_notifier(), req.n)
        try:
            job.request_id = self.scheduler.submit(req.prompt_ids, req.params, req.n, job.on_event)
        except OverloadedError as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineDied as e:
            raise _unavailable(str(e)) from None
        except UserError as e:  # the engine's prompt/context check
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        return job

    async def events(self, job: Job, disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[Event]:
        """The job's events until every row finished. With `disconnected` (non-streamed replies; a streaming
        response cancels its generator itself when the client goes), the client's connection is polled."""
        finished = 0
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while finished < job.n:
                if not job.pending:
                    # an event appended from here on has its wake-up run on this thread after we await: none is lost
                    job.ready.clear()
                    if disconnected is None:
                        await job.ready.wait()
                    else:
                        try:
                            await asyncio.wait_for(job.ready.wait(), timeout=DISCONNECT_POLL_S)
                        except TimeoutError:
                            pass
                # by the clock, not only when idle: a running request has events at every step
                if disconnected is not None and loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await disconnected():
                        log.info("client went away: cancelling request %s", job.request_id)
                        return
                if not job.pending:
                    continue
                ev = job.pending.popleft()
                if ev.finish_reason is not None:
                    finished += 1
                    if ev.finish_reason == "error":  # the detail stays here: the client gets a generic error
                        log.error("engine error on request %s row %d: %s", job.request_id, ev.row, ev.text)
                        ev = Event(ev.row, ev.token, ev.forced, ev.segment, "", "error")
                yield ev
        finally:
            if finished < job.n:
                self.scheduler.cancel(job.request_id)

    async def score(self, ids: list[int], top: int) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """Engine.score(ids, top) run by the scheduler between decode steps."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result) -> None:  # scheduler (or engine-process reader) thread
            def settle():
                if not fut.done():
                    fut.set_result(result)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                log.debug("dropped a score result: event loop closed")

        try:
            self.scheduler.submit_score(list(ids), top, done)
        except OverloadedError as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineDied as e:
            raise _unavailable(str(e)) from None
        result = await fut
        if isinstance(result, EngineDied):
            raise _unavailable(str(result))
        if isinstance(result, UserError):
            raise ApiError(400, str(result), param="prompt", code="context_length_exceeded")
        if isinstance(result, BaseException):
            log.error("scoring failed: %s: %s", type(result).__name__, result)
            raise ApiError(500, "the engine failed while scoring; see the server log", type="server_error")
        return result

    def counts(self) -> dict:
        running, queued = self.scheduler.load
        return {"running": running, "queued": queued}
