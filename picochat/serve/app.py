"""`picochat serve`: the web chat UI and an OpenAI-compatible HTTP API in one FastAPI app, served by uvicorn.

    picochat serve                               # latest checkpoint (rl > sft > mid > base) on 127.0.0.1:8000
    picochat serve --source sft --port 8080 --max-batch 16
    python -m picochat.serve.app --help

Routes:
    GET  /                      the chat page (ui.html)
    POST /v1/chat/completions   OpenAI chat completions, streamed (SSE) or not
    POST /v1/completions        plain text completion for base models (BOS + prompt, no chat template)
    GET  /v1/models             the one served model
    GET  /health                model, source, step, running/queued rows

Every request goes through ONE `Scheduler` (picochat/engine.py), so concurrent requests share decode steps. A client
that disconnects has its rows cancelled at once. On CPU the scheduler runs in its own process (picochat/serve/worker.py)
so decoding does not wait for the event loop's Python.

Tool calls. The model may call the python tool mid-reply; the engine runs it and forces the output into the
sequence. In `message.content` (and in the streamed content deltas) they appear as fenced blocks, readable by any
OpenAI client:

    ```python            <- the model's call
    'strawberry'.count('r')
    ```
    ```output            <- what the tool returned
    3
    ```

Two picochat extensions mark them for the web UI (ordinary clients ignore unknown fields):
  * each streamed delta has `picochat_segment`: "text" | "python" | "python_output"; the fence lines themselves
    are sent as separate deltas with `picochat_markup: true`, so a UI can drop them and style the block instead;
  * a non-streamed `message` has `picochat_parts`: [{"type": "text" | "python" | "python_output", "text": ...}],
    the tokenizer's assistant-content schema. Sending those parts back as an assistant message's `content` (a list)
    replays the tool call exactly in the next turn; plain string content is read as text.

Request fields: messages (roles system/user/assistant; the system message is merged into the first user turn, as
the tokenizer renders it), model (optional; must be the served name), temperature (0..2, 0 = greedy), top_p, top_k
(extension; 0 = off), max_tokens / max_completion_tokens (capped at --max-tokens), n (1..--max-batch), stop (string or
list), seed, stream, stream_options.include_usage. Other OpenAI fields are accepted and ignored.

Errors are OpenAI error objects `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON or bad
parameters (code "context_length_exceeded" when the prompt does not fit), 404 for unknown models and routes, 413 for
a body over 8 MiB, 429 (code "queue_full", Retry-After: 1) when the scheduler queue is full, 503 when the engine
process has died. An unexpected failure is answered with a generic 500 and its traceback goes to the server log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.common import UserError, print0, run_main
from picochat.config import CheckpointSource, f, log_config, parse_config
from picochat.engine import Engine, Event, SamplingParams
from picochat.serve.scheduler import OverloadedError, Scheduler
from picochat.serve.chat_cli import SEGMENT_PART
from picochat.serve.worker import EngineDied, EngineProcess

log = logging.getLogger("picochat.serve")
ENGINE_PROCESS = {"auto": None, "true": True, "false": False}  # --engine-process -> create_app(engine_process=...)

FENCE_OPEN = {"python": "```python\n", "python_output": "```output\n"}
FENCE_CLOSE = "\n```\n"
MAX_STOP_STRINGS = 8
MAX_BODY_BYTES = 8 * 2**20  # far beyond any prompt that fits a context; bounds what one request can make us parse
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass
class ServeConfig(CheckpointSource):
    host: str = f("127.0.0.1", "interface to listen on (0.0.0.0 exposes the server to your network)")
    port: int = f(8000, "TCP port")
    max_batch: int = f(32, "most sample rows decoded together; also the largest n a request may ask for")
    max_queue: int = f(256, "most rows waiting for a batch slot; beyond that requests get HTTP 429")
    max_tokens: int = f(512, "default and per-request cap of generated tokens")
    tool: str = f("calculator", "tool the model may call: calculator, python (sandboxed) or none (calls are "
                  "answered 'disabled')",
                  choices=["calculator", "python", "none"])
    model_name: str = f("picochat", "model id reported by /v1/models and accepted in requests")
    threads: int = f(0, "CPU threads for the model; 0 = all cores but one, which is left to the HTTP side")
    # a server runs long enough to repay the warm-up; --compile false starts at once
    compile: bool = f(True, "torch.compile the decode step at startup (20-45 s on 2 cores; then 1 client got "
                            "1,322-1,920 tok/s instead of 707 with the CPU preset model: README, Measured)")
    engine_process: str = f("auto", "run the engine in its own process, so decoding and the HTTP side do not share "
                                    "one GIL: auto (yes on CPU, no on CUDA), true, false",
                            choices=list(ENGINE_PROCESS))


class ApiError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------------------------------
# request parsing: every check raises ApiError(400) naming the parameter


def _number(body: dict, name: str, default, *, integer: bool = False, lo=None, hi=None, lo_open: bool = False):
    """body[name] as an int/float within [lo, hi] (lo excluded when lo_open); null or absent -> default."""
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(v)[:40]}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise ApiError(400, f"'{name}' must be <= {hi}, got {v}", param=name)
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)[:40]}", param=name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(stops)


@dataclass
class GenRequest:
    """What both completion endpoints hand to the scheduler."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool


def _sampling(body: dict, prompt_ids: list[int], max_batch: int, max_tokens_cap: int) -> GenRequest:
    temperature = _number(body, "temperature", 1.0, lo=0, hi=2)
    top_p = _number(body, "top_p", None, lo=0, hi=1, lo_open=True)
    top_k = _number(body, "top_k", None, integer=True, lo=0)  # extension; 0 = off, as in most servers
    max_tokens = _number(body, "max_completion_tokens", None, integer=True, lo=1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, integer=True, lo=1)
    n = _number(body, "n", 1, integer=True, lo=1, hi=max_batch)
    seed = _number(body, "seed", None, integer=True, lo=-(2**63), hi=2**64 - 1)  # what torch generators accept
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
    include_usage = _bool(opts or {}, "include_usage", False)
    params = SamplingParams(
        temperature=float(temperature),
        top_k=top_k or None,
        top_p=None if top_p is None or top_p >= 1 else float(top_p),
        # the server's cap is a limit, not an error: a larger request is served up to the cap (finish "length")
        max_tokens=min(max_tokens or max_tokens_cap, max_tokens_cap),
        seed=seed,
        stop=_stop(body),
    )
    return GenRequest(prompt_ids, params, n, stream, include_usage)


def _text_of(content, where: str) -> str:
    """A system/user content: a string, or OpenAI's list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", param=where)


def _conversation(body: dict) -> dict:
    """The request's messages as the tokenizer's conversation dict (roles and contents checked)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", param=where)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"'{where}.role' is {json.dumps(role)[:40]}; use 'system', 'user' or 'assistant'",
                           param=f"{where}.role")
        if role == "assistant":
            # a list keeps picochat_parts (text/python/python_output) for the tokenizer; null is an empty reply
            if content is None:
                content = ""
            elif not isinstance(content, (str, list)):
                raise ApiError(400, f"'{where}.content' must be a string or a list of parts", param=f"{where}.content")
        else:
            content = _text_of(content, f"{where}.content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user (the server writes the assistant's reply)",
                       param="messages")
    return {"messages": out}


# ---------------------------------------------------------------------------------------------------------------------
# one request's events: scheduler thread -> asyncio queue -> handler


class Notifier:
    """Wakes the event loop for jobs with new events: at most one cross-thread wake-up pending at a time, however
    many jobs and tokens one decode step produced. A wake-up (and an asyncio.wait_for task) per token per request
    cost the event loop, which shares the GIL with the scheduler thread: 8 clients went 3,193 -> 3,770 tok/s."""

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


class RowText:
    """Assembles one sample row's reply: content deltas (tool segments fenced) and the parts list."""

    def __init__(self):
        self.segment = "text"
        self.content = ""
        self.parts: list[dict] = []
        self.tokens = 0
        self.finish_reason: str | None = None

    def feed(self, ev: Event) -> list[dict]:
        """The deltas this event adds: {"content", "picochat_segment"[, "picochat_markup"]}."""
        if ev.token >= 0:
            self.tokens += 1
        out = self._switch(SEGMENT_PART.get(ev.segment, "text"))
        if ev.text:
            out.append(self._add(self.segment, ev.text, markup=False))
        if ev.finish_reason is not None:
            out += self._switch("text")
            self.finish_reason = ev.finish_reason
        return out

    def _switch(self, seg: str) -> list[dict]:
        if seg == self.segment:
            return []
        out = []
        if self.segment != "text":
            out.append(self._add(self.segment, FENCE_CLOSE, markup=True))
        if seg != "text":
            lead = "" if self.content == "" or self.content.endswith("\n") else "\n"
            out.append(self._add(seg, lead + FENCE_OPEN[seg], markup=True))
        self.segment = seg
        self.parts.append({"type": seg, "text": ""})
        return out

    def _add(self, seg: str, text: str, markup: bool) -> dict:
        self.content += text
        if not markup:
            if not self.parts or self.parts[-1]["type"] != seg:
                self.parts.append({"type": seg, "text": ""})
            self.parts[-1]["text"] += text
        delta = {"content": text, "picochat_segment": seg}
        if markup:
            delta["picochat_markup"] = True
        return delta

    def final_parts(self) -> list[dict]:
        return [p for p in self.parts if p["type"] != "text" or p["text"]]


# ---------------------------------------------------------------------------------------------------------------------
# the app


@dataclass
class ServerState:
    tokenizer: object
    scheduler: Scheduler | EngineProcess
    model_name: str
    source: str | None
    step: int | None
    max_batch: int
    max_tokens: int
    context: int
    created: int = field(default_factory=lambda: int(time.time()))
    notifier: Notifier | None = None

    def submit(self, req: GenRequest, param: str) -> Job:
        if len(req.prompt_ids) >= self.context:
            raise ApiError(400, f"the prompt is {len(req.prompt_ids)} tokens; the model's context is {self.context} "
                                f"tokens and the reply needs at least one: shorten the input", param=param,
                           code="context_length_exceeded")
        if self.notifier is None or self.notifier.loop is not asyncio.get_running_loop():
            self.notifier = Notifier(asyncio.get_running_loop())
        job = Job(self.notifier, req.n)
        try:
            job.request_id = self.scheduler.submit(req.prompt_ids, req.params, req.n, job.on_event)
        except OverloadedError as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineDied as e:
            raise ApiError(503, f"the model is unavailable: {e}; restart the server (its log says why)",
                           type="server_error", code="engine_unavailable") from None
        except UserError as e:  # the engine's prompt/context check
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        return job

    async def events(self, job: Job, request: Request | None) -> AsyncIterator[Event]:
        """The job's events until every row finished. Leaving early (client gone, generator closed or cancelled)
        cancels the request so its rows leave the batch at the next step. With `request`, the client's connection
        is polled (non-streamed replies; a StreamingResponse cancels its generator itself on disconnect)."""
        finished = 0
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while finished < job.n:
                if not job.pending:
                    # an event appended from here on has its wake-up run on this thread after we await: none is lost
                    job.ready.clear()
                    if request is None:
                        await job.ready.wait()
                    else:
                        try:
                            await asyncio.wait_for(job.ready.wait(), timeout=DISCONNECT_POLL_S)
                        except TimeoutError:
                            pass
                # by the clock, not only when idle: a running request has events at every step
                if request is not None and loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await request.is_disconnected():
                        log.info("client went away: cancelling request %s", job.request_id)
                        return
                if not job.pending:
                    continue
                ev = job.pending.popleft()
                if ev.finish_reason is not None:
                    finished += 1
                    if ev.finish_reason == "error":  # the engine puts the exception's text in the event
                        log.error("engine error on request %s: %s", job.request_id, ev.text)
                yield ev
        finally:
            if finished < job.n:
                self.scheduler.cancel(job.request_id)

    def counts(self) -> dict:
        running, queued = self.scheduler.load
        return {"running": running, "queued": queued}


def _finish(reason: str | None) -> str:
    if reason == "error":
        raise ApiError(500, "the engine failed while generating; see the server log", type="server_error")
    return "length" if reason == "length" else "stop"


# sent in place of further chunks when the engine reports finish_reason "error" mid-stream (headers are gone by then)
_ENGINE_ERROR = ('data: {"error": {"message": "the engine failed while generating; see the server log", '
                 '"type": "server_error", "param": null, "code": null}}\n\n')


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _json_body(request: Request) -> dict:
    raw = bytearray()
    async for piece in request.stream():  # read in pieces so an oversized body is refused without holding it all
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _check_model(body: dict, name: str) -> None:
    model = body.get("model")
    if model is None:
        return  # a missing model means the one we serve
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model != name:
        raise ApiError(404, f"model '{model}' does not exist; this server serves '{name}'", param="model",
                       code="model_not_found")


def create_app(model, tokenizer, *, model_name: str = "picochat", max_batch: int = 32, max_queue: int = 256,
               max_tokens: int = 512, tool=None, source: str | None = None, step: int | None = None,
               compile: bool = False, engine_process: bool | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a GPT in eval mode) with `tokenizer`. The scheduler starts and stops with the
    app's lifespan (uvicorn runs it; a TestClient runs it inside `with`). engine_process: run it in a child process
    (picochat/serve/worker.py; the model and `tool` are pickled to it); None = on CPU only."""
    if engine_process is None:
        engine_process = next(model.parameters()).device.type == "cpu"
    if engine_process:
        scheduler = EngineProcess(model, tokenizer, tool=tool, compile=compile, max_batch=max_batch,
                                  max_queue=max_queue)
    else:
        scheduler = Scheduler(Engine(model, tokenizer, tool=tool, compile=compile), max_batch=max_batch,
                              max_queue=max_queue)
    state = ServerState(tokenizer=tokenizer, scheduler=scheduler, model_name=model_name, source=source, step=step,
                        max_batch=max_batch, max_tokens=max_tokens, context=model.config.sequence_len)
    page = resources.files("picochat.serve").joinpath("ui.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # blocking on purpose: nothing is served until the decode graphs are compiled (in this thread, whose torch
        # thread count is the one set for the model)
        scheduler.start()
        if compile:
            print0(f"compiled the decode step in {scheduler.compile_seconds:.0f}s")
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.picochat = state

    # -- errors: always an OpenAI error object, never a traceback -------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return ApiError(400, f"invalid request: {first.get('msg', 'bad input')}", param=loc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see /v1/chat/completions, /v1/completions, /v1/models"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return ApiError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette re-raises after this handler answers, so uvicorn logs the traceback server-side (once)
        return ApiError(500, "internal server error; see the server log", type="server_error").response()

    # -- routes --------------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        dead = getattr(state.scheduler, "dead", None)  # only an engine process can die on its own
        body = {"status": "ok" if dead is None else "unavailable", "model": state.model_name, "source": state.source,
                "step": state.step, "context": state.context, "max_batch": state.max_batch, **state.counts()}
        if dead is not None:
            return JSONResponse({**body, "error": dead}, status_code=503)
        return body

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "picochat"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        _check_model(body, state.model_name)
        conv = _conversation(body)
        try:
            prompt_ids = tokenizer.render_for_completion(conv)
        except UserError as e:  # e.g. roles that do not alternate
            raise ApiError(400, str(e), param="messages") from None
        req = _sampling(body, prompt_ids, state.max_batch, state.max_tokens)
        job = state.submit(req, param="messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        if req.stream:
            return _sse_response(_chat_stream(state, job, req, head))
        rows = await _collect(state, job, req, request)
        choices = [{"index": i, "finish_reason": _finish(r.finish_reason),
                    "message": {"role": "assistant", "content": r.content, "picochat_parts": r.final_parts()}}
                   for i, r in enumerate(rows)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(req, rows)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        _check_model(body, state.model_name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' is required: a string (one prompt per request)", param="prompt")
        req = _sampling(body, tokenizer.encode(prompt, prepend=tokenizer.bos_id), state.max_batch, state.max_tokens)
        job = state.submit(req, param="prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        if req.stream:
            return _sse_response(_text_stream(state, job, req, head))
        rows = await _collect(state, job, req, request)
        choices = [{"index": i, "text": "".join(p["text"] for p in r.parts), "logprobs": None,
                    "finish_reason": _finish(r.finish_reason)} for i, r in enumerate(rows)]
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(req, rows)}

    return app


def _sse_response(stream) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(state, job, req: GenRequest, request: Request) -> list[RowText]:
    """A non-streamed request: gather every row's events (the client's disconnect still cancels the job)."""
    rows = [RowText() for _ in range(req.n)]
    async with aclosing(state.events(job, request)) as events:
        async for ev in events:
            rows[ev.row].feed(ev)
    return rows


def _usage(req: GenRequest, rows: list[RowText]) -> dict:
    completion = sum(r.tokens for r in rows)
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(req.prompt_ids) + completion}


async def _chat_stream(state: ServerState, job: Job, req: GenRequest, head: dict) -> AsyncIterator[str]:
    """SSE for chat: a role delta per choice, content deltas as tokens land, a finish chunk per choice,
    an optional usage chunk, then [DONE]."""
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

    rows = [RowText() for _ in range(req.n)]
    out = [chunk(i, {"role": "assistant", "content": ""}) for i in range(req.n)]
    async with aclosing(state.events(job, None)) as events:
        async for ev in events:
            for delta in rows[ev.row].feed(ev):
                out.append(chunk(ev.row, delta))
            if ev.finish_reason == "error":
                yield "".join(out) + _ENGINE_ERROR
                return  # closing `events` cancels the other rows
            if ev.finish_reason is not None:
                out.append(chunk(ev.row, {}, _finish(ev.finish_reason)))
            if not job.pending:  # one write per wake-up, not per chunk: under load several steps' chunks queue up
                yield "".join(out)
                out.clear()
    if req.include_usage:
        out.append(_sse({**head, "choices": [], "usage": _usage(req, rows)}))
    yield "".join(out) + "data: [DONE]\n\n"


async def _text_stream(state: ServerState, job: Job, req: GenRequest, head: dict) -> AsyncIterator[str]:
    """SSE for /v1/completions: text deltas per choice, a finish chunk per choice, optional usage, [DONE]."""
    head = {**head, "object": "text_completion"}
    rows = [RowText() for _ in range(req.n)]
    out: list[str] = []
    async with aclosing(state.events(job, None)) as events:
        async for ev in events:
            rows[ev.row].feed(ev)
            if ev.finish_reason == "error":
                yield "".join(out) + _ENGINE_ERROR
                return
            finish = _finish(ev.finish_reason) if ev.finish_reason is not None else None
            if ev.text or finish:
                out.append(_sse({**head, "choices": [{"index": ev.row, "text": ev.text, "logprobs": None,
                                                      "finish_reason": finish}]}))
            if out and not job.pending:  # one write per wake-up (see _chat_stream)
                yield "".join(out)
                out.clear()
    if req.include_usage:
        out.append(_sse({**head, "choices": [], "usage": _usage(req, rows)}))
    yield "".join(out) + "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# command line


def set_model_threads(device, threads: int) -> int:
    """On CPU, give the model `threads` cores (0: all but one). Why: the event loop that streams tokens shares the
    machine with the model's OpenMP threads, and every parallel region waits for its slowest thread; on 2 cores a
    server with one model thread streamed 1,264 tok/s to one client vs 448 with two (8 clients: 2,420 vs 1,332)."""
    if device.type == "cpu":
        torch.set_num_threads(threads if threads > 0 else max(1, (os.cpu_count() or 1) - 1))
    return torch.get_num_threads()


def _check_port_free(host: str, port: int) -> None:
    """Fail with one line before loading the model, rather than uvicorn's log line after it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass a free --port") from None


def _run(argv: list[str] | None) -> None:
    import uvicorn

    from picochat.checkpoint import load_model
    from picochat.common import autodetect_device
    from picochat.tools import make_tool

    cfg, _, _ = parse_config(ServeConfig, argv, prog="picochat serve", description=__doc__.split("\n")[0])
    if not 1 <= cfg.port <= 65535:
        raise UserError(f"--port {cfg.port} is not a TCP port (1-65535)")
    if cfg.max_batch < 1 or cfg.max_queue < 1 or cfg.max_tokens < 1:
        raise UserError("--max-batch, --max-queue and --max-tokens must be >= 1")
    if cfg.threads < 0:
        raise UserError(f"--threads must be >= 0 (0 = all cores but one), got {cfg.threads}")
    log_config(cfg, "serve")
    _check_port_free(cfg.host, cfg.port)
    device = autodetect_device(cfg.device)
    set_model_threads(device, cfg.threads)
    model, tokenizer, meta = load_model(cfg.source, step=cfg.step, device=device)  # "auto": the latest stage
    source = meta["source"]
    model.eval()
    app = create_app(model, tokenizer, model_name=cfg.model_name, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                     max_tokens=cfg.max_tokens, tool=make_tool(cfg.tool),
                     source=source, step=meta.get("step", cfg.step), compile=cfg.compile,
                     engine_process=ENGINE_PROCESS[cfg.engine_process])
    del model  # the engine process has its own copy once started
    print0(f"serving {source} step {meta.get('step')} as '{cfg.model_name}' on http://{cfg.host}:{cfg.port}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
