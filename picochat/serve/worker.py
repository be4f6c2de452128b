"""The server's engine in its own process: `EngineProcess` is a drop-in for `Scheduler` (submit / submit_score /
cancel / load / dead / start / stop) whose Engine and Scheduler run in a child process, fed over a pipe.

Why a process: in one process the scheduler thread (decode steps) and the event loop (HTTP, JSON, SSE) take turns
holding the GIL, so the server used ~1 of 2 cores however many clients streamed (`server_cores` of
benchmarks/serve.py; README, Measured: serving), and each decode step waited for the event loop's Python. Here the child decodes on its
own core and the parent's event loop only parses requests and writes chunks.

    parent (uvicorn, event loop)                       child (spawned: model, Engine, Scheduler thread)
    submit(prompt, params, n, on_event) ─ ("submit", rid, ...) ─►  Scheduler.submit
    cancel(rid)                         ─ ("cancel", rid) ──────►  Scheduler.cancel
    submit_score(ids, top, on_done)     ─ ("score", rid, ...) ──►  Scheduler.submit_score
    reader thread: on_event(Event) ◄── (steps, [event tuples of one decode step]) ── after every step
                   on_done(result) ◄── ("scored", rid, result, error) ── when a score is done

The parent keeps the queue accounting (so a full queue is answered 429 at once, without a round trip): a request is
queued until its first event arrives, running until its rows have finished. If the child dies, every open request
gets an "error" finish and later submits raise `EngineDied` (the server answers 503).
"""

from __future__ import annotations

import logging
import pickle
import signal
import threading
import time
from typing import Callable

import torch
import torch.multiprocessing as mp

from picochat.common import UserError
from picochat.engine import Engine, Event, SamplingParams, check_prompt
from picochat.serve.scheduler import EngineDied, OverloadedError, Scheduler

log = logging.getLogger("picochat.serve")

READY_TIMEOUT_S = 900.0  # model transfer + torch.compile of both decode graphs (tens of seconds on 2 cores: README)


def _child(conn, model, tokenizer, tool, compile: bool, max_batch: int, threads: int) -> None:
    """The child process: build the engine, compile, then serve submit/cancel messages until "stop" or EOF."""
    # Ctrl+C in a terminal reaches the whole process group: the parent shuts the server down and then stops us (a
    # KeyboardInterrupt here would only print a second traceback)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    send_lock = threading.Lock()  # the scheduler thread sends events, this thread sends submit errors
    outbox: list[tuple] = []  # this step's events, appended on the scheduler thread

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    def flush() -> None:  # scheduler thread, after each step: one message per step, not per event
        if outbox:
            batch = outbox.copy()
            outbox.clear()
            send((sched.steps, batch))

    # the parent enforces --max-queue; the child only queues what the parent admitted
    sched = Scheduler(Engine(model, tokenizer, tool=tool, compile=compile), max_batch=max_batch,
                      max_queue=2**31, on_step=flush)
    try:
        sched.start()  # compiles the decode graphs first
    except Exception as exc:  # a failed compile must reach the parent as one line, not a silent hang
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", sched.compile_seconds))
    ids: dict[int, int] = {}  # parent's request id -> the scheduler's, while the request runs (for cancels)
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the parent is gone
                return
            if msg[0] == "submit":
                _, prid, prompt, params, n = msg
                rows_left = [n]

                def on_event(ev: Event, prid=prid, rows_left=rows_left) -> None:  # on the scheduler thread
                    outbox.append((prid, ev.row, ev.token, ev.forced, ev.segment, ev.text, ev.finish_reason))
                    if ev.finish_reason is not None:
                        rows_left[0] -= 1
                        if rows_left[0] == 0:
                            ids.pop(prid, None)  # finished: nothing left to cancel (a long-running server)

                try:
                    rid = sched.submit(prompt, params, n, on_event)
                    if rows_left[0] > 0:  # not already over (then a stale id would stay)
                        ids[prid] = rid
                except Exception as exc:  # the parent checked these; answer a race or a bug per request
                    send((sched.steps, [(prid, i, -1, False, "text", str(exc), "error") for i in range(n)]))
            elif msg[0] == "score":
                _, prid, score_ids, top = msg

                def on_done(result, prid=prid) -> None:  # on the scheduler thread
                    if isinstance(result, BaseException):  # sent as text: not every exception pickles
                        send(("scored", prid, None, (type(result).__name__, str(result))))
                    else:
                        send(("scored", prid, result, None))

                try:
                    sched.submit_score(score_ids, top, on_done)
                except Exception as exc:  # the parent checked these; answer a race or a bug per request
                    on_done(exc)
            elif msg[0] == "cancel":
                if msg[1] in ids:
                    sched.cancel(ids.pop(msg[1]))
            elif msg[0] == "stop":
                return
    finally:
        sched.stop()


class _Open:
    """The parent's record of one submitted request."""

    __slots__ = ("n", "on_event", "started", "finished")

    def __init__(self, n: int, on_event: Callable[[Event], None]):
        self.n, self.on_event, self.started = n, on_event, False
        self.finished: set[int] = set()  # rows that had their finish event


class EngineProcess:
    """Runs `Engine(model, tokenizer, tool, compile)` and a `Scheduler` in a spawned child process. The model (any
    picklable module, e.g. GPT) is sent to the child once at `start()`; its tensors travel through shared memory."""

    def __init__(self, model, tokenizer, *, tool=None, compile: bool = False, max_batch: int = 32,
                 max_queue: int = 256):
        self.context = model.config.sequence_len
        self.max_batch, self.max_queue = max_batch, max_queue
        # the child decodes with the model thread count set in this process (serve --threads)
        self._args = (model, tokenizer, tool, compile, max_batch, torch.get_num_threads())
        self._open: dict[int, _Open] = {}
        self._scores: dict[int, Callable] = {}  # request id -> on_done, until the child answers
        self._lock = threading.Lock()
        self._next_id = 1
        self._proc = None
        self._conn = None
        self._reader: threading.Thread | None = None
        self._dead: str | None = None
        self.compile_seconds = 0.0
        self.steps = 0  # decode steps the child's scheduler has run, as of its last message

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the child and wait until it has compiled and started its scheduler."""
        if self._proc is not None:
            return
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads' state (OpenMP pool, event loop)
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child_conn, *self._args), name="picochat-engine", daemon=True)
        try:
            self._proc.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:  # e.g. a lambda as the tool
            self._proc = None
            raise UserError(f"cannot send the model/tokenizer/tool to the engine process ({e}); make them picklable "
                            f"(module-level functions) or serve with engine_process=False") from None
        finally:
            child_conn.close()
        self._args = None  # the child has its copy; do not pin the parent's
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._conn.poll(0.5):
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited with code {self._proc.exitcode} while starting; "
                                   f"see the log above")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"the engine process was not ready after {READY_TIMEOUT_S:.0f}s")
        kind, value = self._conn.recv()
        if kind == "failed":
            raise RuntimeError(f"the engine process failed to start: {value}")
        self.compile_seconds = value
        self._reader = threading.Thread(target=self._read, name="picochat-engine-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._proc = None

    @property
    def dead(self) -> str | None:
        """Why the engine process is gone, or None while it serves."""
        return self._dead

    # -- the Scheduler interface ---------------------------------------------------------------------------------------

    @property
    def load(self) -> tuple[int, int]:
        """(live rows, queued rows) as the parent sees them: queued until the first event arrives."""
        with self._lock:
            running = sum(o.n - len(o.finished) for o in self._open.values() if o.started)
            queued = self._queued()
        return running, queued

    def _queued(self) -> int:  # under _lock; a score counts one row, as in Scheduler
        return sum(o.n for o in self._open.values() if not o.started) + len(self._scores)

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, on_event: Callable[[Event], None]) -> int:
        check_prompt(prompt_ids, self.context)
        if n < 1 or n > self.max_batch:
            raise UserError(f"n={n} must be between 1 and the server's max batch {self.max_batch}")
        return self._send_new(n, lambda rid: self._open.__setitem__(rid, _Open(n, on_event)),
                              lambda rid: ("submit", rid, list(prompt_ids), params, n))

    def submit_score(self, ids: list[int], top: int, on_done: Callable) -> int:
        """`Engine.score(ids, top)` in the child; `on_done` gets the result or the exception (on the reader thread)."""
        if not ids or len(ids) > self.context:
            raise UserError(f"prompt to score is {len(ids)} tokens; it must be 1..{self.context} (the context)")
        return self._send_new(1, lambda rid: self._scores.__setitem__(rid, on_done),
                              lambda rid: ("score", rid, list(ids), top))

    def _send_new(self, rows: int, record: Callable[[int], None], message: Callable[[int], tuple]) -> int:
        with self._lock:
            if self._dead is not None:
                raise EngineDied(self._dead)
            if self._queued() + rows > self.max_queue:
                raise OverloadedError(f"server busy: {self.max_queue} rows already queued; retry later")
            rid = self._next_id
            self._next_id += 1
            record(rid)
            self._conn.send(message(rid))  # under the lock: one writer at a time
        return rid

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if self._dead is None and request_id in self._open:
                self._conn.send(("cancel", request_id))

    # -- the reader thread ---------------------------------------------------------------------------------------------

    def _read(self) -> None:
        """Deliver each step's events to their requests' callbacks (which must not block: see app.Job)."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "scored":
                _, prid, result, error = msg
                with self._lock:
                    on_done = self._scores.pop(prid, None)
                if on_done is not None:
                    kind, text = error or (None, None)
                    on_done(result if error is None else UserError(text) if kind == "UserError"
                            else RuntimeError(f"{kind}: {text}"))
                continue
            self.steps, batch = msg
            with self._lock:
                for prid, row, token, forced, segment, text, finish in batch:
                    o = self._open.get(prid)
                    if o is None:
                        continue
                    o.started = True
                    if finish is not None:
                        o.finished.add(row)
                        if len(o.finished) == o.n:
                            del self._open[prid]
                    o.on_event(Event(row, token, forced, segment, text, finish))
        self._fail_all("the engine process stopped" if self._proc is None or not self._proc.is_alive()
                       else "lost the connection to the engine process")

    def _fail_all(self, why: str) -> None:
        code = self._proc.exitcode if self._proc is not None else None
        if code not in (None, 0):
            why += f" (exit code {code})"
        with self._lock:
            self._dead = why
            open_, self._open = self._open, {}
            scores, self._scores = self._scores, {}
        for on_done in scores.values():
            on_done(EngineDied(why))
        for o in open_.values():
            for i in set(range(o.n)) - o.finished:
                o.on_event(Event(i, -1, False, "text", why, "error"))
        if open_:
            log.error("%s; failed %d open request(s)", why, len(open_))
