"""`picochat serve`: the web chat UI and an OpenAI-compatible HTTP API in one FastAPI app, served by uvicorn.

    picochat serve                               # latest checkpoint (rl > sft > mid > base) on 127.0.0.1:8000
    picochat serve --source sft --port 8080 --max-batch 16
    picochat serve --host 0.0.0.0 --allowed-hosts chat.lan --api-key "$KEY"   # reachable from the network
    python -m picochat.serve.app --help

Routes:
    GET  /                      the chat page (ui.html)
    POST /v1/chat/completions   OpenAI chat completions, streamed (SSE) or not
    POST /v1/completions        text completion for base models: string prompts (BOS + text) or token arrays scored
                                as given, several prompts per request, `echo` and `logprobs` (lm-evaluation-harness)
    GET  /v1/models[/{id}]      the one served model
    GET  /tokenizer_info, POST /tokenize, POST /detokenize     vLLM's tokenizer endpoints (lm-eval's remote tokenizer)
    GET  /health                model, source, step, running/queued rows; 503 once the engine is gone

Who may call (picochat/serve/guard.py): the Host must be an allowed name (loopback names by default: DNS rebinding),
a browser's Origin must be this server, a POST must be `Content-Type: application/json` (so no other site's page can
send one), and with --api-key the API routes need `Authorization: Bearer <key>`.

The pieces: serve/protocol.py parses requests and shapes responses (pure functions); serve/bridge.py carries
requests to ONE scheduler (serve/scheduler.py; on CPU in its own process, serve/worker.py) and their events back;
this file has the routes and the command line. Concurrent requests share decode steps; a client that disconnects
has its rows cancelled at once.

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

Request fields: messages (roles system/developer/user/assistant: system and developer text goes in front of the next
user message, consecutive messages of one role are joined), model (optional; must be the served name), temperature
(0..2, 0 = greedy), top_p (0 = greedy), top_k (extension; 0 = off), max_tokens / max_completion_tokens (default: what
fits, at most --max-tokens; more than that, or more than the context leaves, is a 400), n (1..--max-batch), stop
(string or list), seed, stream, stream_options.include_usage. Fields we cannot honour (tools, tool_choice,
response_format, logprobs on chat, penalties, logit_bias) are a 400 naming the field unless neutral (null, [],
"none", 0); other OpenAI fields (user, metadata, ...) are ignored.

Errors are OpenAI error objects `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON or bad
parameters (code "context_length_exceeded" when the prompt or max_tokens does not fit), 401 without the API key, 403
for a Host or Origin not allowed, 404 for unknown models and routes, 413 for a body over 8 MiB, 415 for a POST that is
not JSON, 429 (code "queue_full", Retry-After: 1) when the scheduler queue is full, 503 when the engine is gone. An
internal failure is answered with a generic error; its text and traceback go to the server log only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
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
from picochat.engine import Engine
from picochat.serve import protocol as P
from picochat.serve.bridge import Bridge, Job
from picochat.serve.guard import LOOPBACK_NAMES, Guard, is_loopback, parse_allowed_hosts
from picochat.serve.protocol import ApiError
from picochat.serve.scheduler import Scheduler
from picochat.serve.worker import EngineProcess
from picochat.tools import TOOL_HELP, TOOL_KINDS

log = logging.getLogger("picochat.serve")
ENGINE_PROCESS = {"auto": None, "true": True, "false": False}  # --engine-process -> create_app(engine_process=...)
MAX_BODY_BYTES = 8 * 2**20  # far beyond any prompt that fits a context; bounds what one request can make us parse


@dataclass
class ServeConfig(CheckpointSource):
    host: str = f("127.0.0.1", "interface to listen on (0.0.0.0 exposes the server to your network)")
    port: int = f(8000, "TCP port")
    allowed_hosts: str = f("", "comma-separated host names clients may reach the server under (the Host header; "
                               "guards against DNS rebinding); default: the loopback names, plus this machine's "
                               "names and the --host address when bound elsewhere; '*' = any")
    api_key: str = f("", "require 'Authorization: Bearer <key>' on the API routes (default: $PICOCHAT_API_KEY; "
                         "empty = no key)")
    max_batch: int = f(32, "most sample rows decoded together; also the largest n a request may ask for")
    max_queue: int = f(256, "most rows waiting for a batch slot; beyond that requests get HTTP 429")
    max_tokens: int = f(512, "default and per-request cap of generated tokens")
    tool: str = f("calculator", TOOL_HELP, choices=list(TOOL_KINDS))
    model_name: str = f("picochat", "model id reported by /v1/models and accepted in requests")
    threads: int = f(0, "CPU threads for the model; 0 = all cores but one, which is left to the HTTP side")
    # a server runs long enough to repay the warm-up; --compile false starts at once
    compile: bool = f(True, "torch.compile the decode step at startup (tens of seconds on a laptop CPU, then several "
                            "times faster decoding: README, Measured)")
    engine_process: str = f("auto", "run the engine in its own process, so decoding and the HTTP side do not share "
                                    "one GIL: auto (yes on CPU, no on CUDA), true, false",
                            choices=list(ENGINE_PROCESS))


def _respond(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


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


class GuardMiddleware:
    """Runs `Guard.check` before any route (plain ASGI, so streaming responses pass through untouched)."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            err = self.guard.check(scope["method"], scope["path"], headers)
            if err is not None:
                await _respond(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class ServerState:
    tokenizer: object
    bridge: Bridge
    model_name: str
    source: str | None
    step: int | None
    limits: P.Limits
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def scheduler(self):
        return self.bridge.scheduler

    def card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "picochat",
                "max_model_len": self.limits.context}


def create_app(model, tokenizer, *, model_name: str = "picochat", max_batch: int = 32, max_queue: int = 256,
               max_tokens: int = 512, tool=None, source: str | None = None, step: int | None = None,
               compile: bool = False, engine_process: bool | None = None,
               allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a GPT in eval mode) with `tokenizer`. The scheduler starts and stops with the
    app's lifespan (uvicorn runs it; a TestClient runs it inside `with`). engine_process: run it in a child process
    (picochat/serve/worker.py; the model and `tool` are pickled to it); None = on CPU only. allowed_hosts / api_key:
    see serve/guard.py."""
    if engine_process is None:
        engine_process = next(model.parameters()).device.type == "cpu"
    if engine_process:
        scheduler = EngineProcess(model, tokenizer, tool=tool, compile=compile, max_batch=max_batch,
                                  max_queue=max_queue)
    else:
        scheduler = Scheduler(Engine(model, tokenizer, tool=tool, compile=compile), max_batch=max_batch,
                              max_queue=max_queue)
    limits = P.Limits(max_batch=max_batch, max_tokens=max_tokens, context=model.config.sequence_len)
    state = ServerState(tokenizer=tokenizer, bridge=Bridge(scheduler), model_name=model_name, source=source,
                        step=step, limits=limits)
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
    app.add_middleware(GuardMiddleware, guard=Guard(allowed_hosts=tuple(allowed_hosts), api_key=api_key or None))

    # -- errors: always an OpenAI error object, never a traceback -------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return _respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return _respond(ApiError(400, f"invalid request: {first.get('msg', 'bad input')}", param=loc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see /v1/chat/completions, /v1/completions, /v1/models"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return _respond(ApiError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None,
                                 headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette re-raises after this handler answers, so uvicorn logs the traceback server-side (once)
        return _respond(ApiError(500, "internal server error; see the server log", type="server_error"))

    # -- routes --------------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        dead = state.scheduler.dead
        body = {"status": "ok" if dead is None else "unavailable", "model": state.model_name, "source": state.source,
                "step": state.step, "context": limits.context, "max_batch": limits.max_batch,
                **state.bridge.counts()}
        if dead is not None:
            return JSONResponse({**body, "error": dead}, status_code=503)
        return body

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [state.card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        P.check_model({"model": model_id}, state.model_name)
        return state.card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        P.check_model(body, state.model_name)
        P.check_supported(body, P.UNSUPPORTED_CHAT)
        conv = P.conversation(body)
        try:
            prompt_ids = tokenizer.render_for_completion(conv)
        except UserError as e:  # the tokenizer's own schema checks
            raise ApiError(400, str(e), param="messages") from None
        req = P.sampling(body, prompt_ids, limits, param="messages")
        job = state.bridge.submit(req, param="messages")
        head = _head("chatcmpl", state)
        if req.stream:
            return _sse_response(_stream(state, job, P.ChatChunks(head, req.n, len(prompt_ids), req.include_usage)))
        rows = await _collect(state, job, req.n, request)
        return P.chat_response(head, len(prompt_ids), rows)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        P.check_model(body, state.model_name)
        P.check_supported(body, P.UNSUPPORTED_COMPLETION)
        prompts, _ = P.prompts(body, tokenizer.vocab_size, lambda s: tokenizer.encode(s, prepend=tokenizer.bos_id))
        echo = P.boolean(body, "echo", False)
        top = P.number(body, "logprobs", None, integer=True, lo=0, hi=P.MAX_LOGPROBS)
        scoring = echo or top is not None
        reqs = [P.sampling(body, ids, limits, param="prompt", allow_zero=echo) for ids in prompts]
        first = reqs[0]
        if first.params.max_tokens == 0 and top is None:
            raise ApiError(400, "'max_tokens' 0 only makes sense with echo and logprobs (scoring the prompt)",
                           param="max_tokens")
        head = _head("cmpl", state)
        if first.stream:
            if scoring or len(reqs) > 1:
                raise ApiError(400, "'stream' works with one prompt and without echo/logprobs; send stream: false",
                               param="stream")
            job = state.bridge.submit(first, param="prompt")
            return _sse_response(_stream(state, job, P.TextChunks(head, first.n, len(first.prompt_ids),
                                                                  first.include_usage)))
        return await _text_completion(state, request, head, reqs, echo, top)

    # -- vLLM's tokenizer endpoints (lm-eval's remote tokenizer reads these) ------------------------------------

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": "picochat", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
                "pad_token": None, "model_max_length": limits.context, "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request)
        if "messages" in body:
            try:
                ids = tokenizer.render_for_completion(P.conversation(body))
            except UserError as e:
                raise ApiError(400, str(e), param="messages") from None
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise ApiError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
            ids = P.encode_with_specials(tokenizer, text)
        return {"count": len(ids), "max_model_len": limits.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json_body(request)
        ids = body.get("tokens")
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              and 0 <= t < tokenizer.vocab_size for t in ids)):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {tokenizer.vocab_size})",
                           param="tokens")
        return {"prompt": tokenizer.decode(ids)}

    return app


def _head(prefix: str, state: ServerState) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}


def _sse_response(stream) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(state: ServerState, job: Job, n: int, request: Request) -> list[P.RowText]:
    """A non-streamed request: gather every row's events (the client's disconnect still cancels the job)."""
    rows = [P.RowText() for _ in range(n)]
    async with aclosing(state.bridge.events(job, request.is_disconnected)) as events:
        async for ev in events:
            rows[ev.row].feed(ev)
    return rows


async def _stream(state: ServerState, job: Job, chunks: P.ChatChunks) -> AsyncIterator[str]:
    """SSE of one request (chat or text: `chunks` shapes them): one write per wake-up, not per chunk, since under
    load several steps' chunks queue up; a failed row ends the stream with a generic error object (no [DONE])."""
    out = chunks.start()
    async with aclosing(state.bridge.events(job)) as events:
        async for ev in events:
            if ev.finish_reason == "error":
                yield "".join(out) + P.SSE_ENGINE_ERROR
                return  # closing `events` cancels the other rows
            out += chunks.feed(ev)
            if out and not job.pending:
                yield "".join(out)
                out.clear()
    yield "".join(out) + chunks.end()


async def _text_completion(state: ServerState, request: Request, head: dict, reqs: list[P.GenRequest], echo: bool,
                           top: int | None) -> dict:
    """/v1/completions without streaming: every prompt's rows generated (together: they share decode steps), then,
    for echo/logprobs, each prompt + completion scored in one forward (Engine.score): the logprobs of the tokens as
    the model sees them, the prompt's exactly as given. Choice i * n + j is prompt i's sample j."""
    jobs = [state.bridge.submit(r, param="prompt") if r.params.max_tokens > 0 else None for r in reqs]
    rows = await asyncio.gather(*[_collect(state, j, r.n, request) if j is not None else _no_rows(r.n)
                                  for j, r in zip(jobs, reqs)])
    scores = None
    if top is not None:
        scores = await asyncio.gather(*[state.bridge.score(r.prompt_ids + row.token_ids, top)
                                        for r, rs in zip(reqs, rows) for row in rs])
    return P.text_response(head, state.tokenizer, reqs, rows, scores, echo)


async def _no_rows(n: int) -> list[P.RowText]:
    return [P.RowText() for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# command line


def set_model_threads(device, threads: int) -> int:
    """On CPU, give the model `threads` cores (0: all but one). Why: the event loop that streams tokens shares the
    machine with the model's OpenMP threads, and every parallel region waits for its slowest thread: on 2 cores one
    model thread streamed ~2.8x faster to one client than two threads did (README, Measured: serving)."""
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
    api_key = cfg.api_key or os.environ.get("PICOCHAT_API_KEY", "")
    allowed_hosts = parse_allowed_hosts(cfg.allowed_hosts, cfg.host)
    log_config(dataclasses.replace(cfg, api_key="***" if cfg.api_key else ""), "serve")  # never print the key
    _check_port_free(cfg.host, cfg.port)
    device = autodetect_device(cfg.device)
    set_model_threads(device, cfg.threads)
    # "auto": the latest stage; no --run: its most recently written run
    model, tokenizer, meta = load_model(cfg.source, step=cfg.step, run=cfg.run or None, device=device)
    source = meta["source"]
    model.eval()
    app = create_app(model, tokenizer, model_name=cfg.model_name, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                     max_tokens=cfg.max_tokens, tool=make_tool(cfg.tool),
                     source=source, step=meta.get("step", cfg.step), compile=cfg.compile,
                     engine_process=ENGINE_PROCESS[cfg.engine_process], allowed_hosts=allowed_hosts,
                     api_key=api_key or None)
    del model  # the engine process has its own copy once started
    print0(f"serving {source} run '{meta['run'] or '(old layout)'}' step {meta.get('step')} as '{cfg.model_name}' on "
           f"http://{cfg.host}:{cfg.port}/ "
           f"(Host names served: {', '.join(allowed_hosts)}; API key {'required' if api_key else 'off'})")
    if not is_loopback(cfg.host) and not api_key:
        print0("warning: the server is reachable from the network without an API key; pass --api-key")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
