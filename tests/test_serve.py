"""The HTTP server end to end: a tiny random model behind a real uvicorn on 127.0.0.1 (in a thread), driven with
httpx and the official openai client. Greedy (temperature 0) replies are deterministic, so streamed, batched and
direct-engine answers are compared for equality.

    OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_serve.py
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

from conftest import make_tiny_model, randomize_outputs
from picochat.common import UserError
from picochat.engine import Engine, SamplingParams
from picochat.serve.app import create_app
from picochat.tools import make_tool

CHAT = "/v1/chat/completions"


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread; `url` once started."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def tiny_model(tokenizer, sequence_len: int = 256):
    # randomized weights: a fresh init is nearly constant, and these tests need replies that depend on the prompt
    return randomize_outputs(make_tiny_model(tokenizer.vocab_size, sequence_len=sequence_len)).eval()


def scripted_model(tokenizer, say: str = "Sum", code: str = "2+3", then: str = " ok"):
    """A real GPT whose greedy reply is: `say`, a python call with `code`, and after the tool's output, `then`.

    With the blocks' output projections at zero (a fresh init) every block is the identity, so the logits depend only
    on the current token: the model is a bigram table. Giving each scripted token its own orthogonal embedding
    direction and the next token's lm_head row that direction makes greedy decoding walk the script."""
    model = make_tiny_model(tokenizer.vocab_size, sequence_len=256)
    sid = tokenizer.special_id
    chain = [sid("<|assistant_start|>"), *tokenizer.encode(say), sid("<|python_start|>"), *tokenizer.encode(code),
             sid("<|python_end|>")]
    # the tool forces <|output_start|> result <|output_end|>; the model resumes from <|output_end|>
    tail = [sid("<|output_end|>"), *tokenizer.encode(then), sid("<|assistant_end|>")]
    links = list(zip(chain, chain[1:])) + list(zip(tail, tail[1:]))
    sources = [a for a, _ in links]
    assert len(set(sources)) == len(sources) <= model.config.n_embd, "script tokens must be distinct"
    with torch.no_grad():
        for i, (a, b) in enumerate(links):
            model.wte.weight[a] = 0.0
            model.wte.weight[a, i] = 1.0
            model.lm_head.weight[b] = 0.0
            model.lm_head.weight[b, i] = 5.0  # logit 5*sqrt(n_embd) after the RMS norm: far above the rest
    return model.eval()


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    app = create_app(model, tiny_tokenizer, model_name="tiny", max_batch=16, max_queue=64, max_tokens=64,
                     source="sft", step=7)
    with ServerThread(app) as srv:
        srv.app, srv.model, srv.tokenizer = app, model, tiny_tokenizer
        yield srv


def chat_body(text: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 12, **kw}


def sse_events(resp: httpx.Response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded except the final "[DONE]"."""
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def streamed_chat(url: str, body: dict) -> tuple[str, list, dict | None]:
    """(joined content, chat.completion.chunk objects, the usage chunk's usage or None), checking their form."""
    with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage = chunks.pop()["usage"] if chunks and chunks[-1]["choices"] == [] else None
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == body.get("model", "picochat")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] is not None  # its value is compared by the callers
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return text, chunks, usage


def engine_greedy(srv, prompt_ids: list[int], max_tokens: int, **penalties) -> str:
    engine = Engine(srv.model, srv.tokenizer)
    steps = engine.generate(prompt_ids, 1, SamplingParams(temperature=0, max_tokens=max_tokens, **penalties))
    return "".join(ev.text for events in steps for ev in events)


def test_nonstream_reply_matches_engine(served):
    r = httpx.post(served.url + CHAT, json=chat_body("hello there"), timeout=60)
    assert r.status_code == 200
    j = r.json()
    assert j["object"] == "chat.completion" and j["id"].startswith("chatcmpl-") and j["model"] == "tiny"
    assert isinstance(j["created"], int)
    (choice,) = j["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    prompt = served.tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hello there"}]})
    assert choice["message"]["content"] == engine_greedy(served, prompt, 12)
    assert choice["message"]["picochat_parts"] == [{"type": "text", "text": choice["message"]["content"]}]
    # a random model rarely emits <|assistant_end|> within 12 tokens: every token is a completion token
    assert choice["finish_reason"] == "length"
    assert j["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}


def test_stream_equals_nonstream_and_usage_chunk(served):
    body = chat_body("what is the fox", max_tokens=10)
    full = httpx.post(served.url + CHAT, json=body, timeout=60).json()
    text, chunks, usage = streamed_chat(served.url, {**body, "stream_options": {"include_usage": True}})
    assert usage == full["usage"]  # the usage chunk (empty choices) comes after the finish chunk
    assert text == full["choices"][0]["message"]["content"] and text
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    # every content delta is marked with its segment for the UI
    assert all(c["choices"][0]["delta"].get("picochat_segment") == "text" for c in chunks[1:-1])


def test_openai_client_stream_and_nonstream(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count to ten"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=9)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 9
    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=9, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == resp.choices[0].message.content
    # the system message is merged into the first user turn, as the tokenizer renders it
    conv = {"messages": messages}
    expected = engine_greedy(served, served.tokenizer.render_for_completion(conv), 9)
    assert resp.choices[0].message.content == expected
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_concurrent_streams_do_not_mix_rows(served):
    prompts = [f"question number {i}: {'abc'[: i % 3 + 1]} {i * 7}" for i in range(16)]
    bodies = [chat_body(p, max_tokens=8 + i % 5) for i, p in enumerate(prompts)]
    alone = [httpx.post(served.url + CHAT, json=b, timeout=60).json()["choices"][0]["message"]["content"]
             for b in bodies]
    assert len(set(alone)) > 8  # the prompts really give different answers, so a mix-up would show
    scheduler = served.app.state.picochat.scheduler
    steps = scheduler.steps
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: streamed_chat(served.url, b)[0], bodies))
    assert together == alone
    # rows shared decode steps: far fewer steps than the 16 requests' tokens one after another
    assert scheduler.steps - steps < sum(b["max_tokens"] for b in bodies) / 2


def test_n_seed_and_stop(served):
    body = chat_body("seeded sampling", temperature=1.0, seed=1234, n=3, max_tokens=10)
    a = httpx.post(served.url + CHAT, json=body, timeout=60).json()
    b = httpx.post(served.url + CHAT, json=body, timeout=60).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in b["choices"]]  # same seed, same samples
    # the same samples as the engine's own generate() with that seed (each row draws from its own (seed, index)
    # generator), and as many completion tokens as it made
    prompt = served.tokenizer.render_for_completion({"messages": body["messages"]})
    events = [ev for step in Engine(served.model, served.tokenizer).generate(
        prompt, 3, SamplingParams(temperature=1.0, seed=1234, max_tokens=10)) for ev in step]
    assert texts == ["".join(ev.text for ev in events if ev.row == i) for i in range(3)]
    assert a["usage"]["completion_tokens"] == sum(ev.token >= 0 for ev in events)
    # streamed with n=3: each choice index gets its own deltas, which join to the same samples
    with httpx.stream("POST", served.url + CHAT, json={**body, "stream": True}, timeout=60) as r:
        chunks = [e for e in sse_events(r) if e != "[DONE]"]
    joined = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i)
              for i in range(3)]
    assert joined == texts
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1, 2]
    # stop: cut the greedy answer at a substring from its middle
    greedy = httpx.post(served.url + CHAT, json=chat_body("stop here"), timeout=60).json()
    text = greedy["choices"][0]["message"]["content"]
    stop = text[4:7]
    cut = httpx.post(served.url + CHAT, json=chat_body("stop here", stop=[stop]), timeout=60).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == text[: text.index(stop)]


def test_completions_endpoint(served):
    tok = served.tokenizer
    body = {"prompt": "The quick brown", "temperature": 0, "max_tokens": 10}
    r = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    j = r.json()
    assert j["object"] == "text_completion" and j["id"].startswith("cmpl-")
    expected = engine_greedy(served, tok.encode("The quick brown", prepend=tok.bos_id), 10)
    assert j["choices"][0]["text"] == expected and expected
    assert j["usage"]["prompt_tokens"] == len(tok.encode("The quick brown")) + 1
    with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_health_and_page(served):
    models = httpx.get(served.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    health = httpx.get(served.url + "/health").json()
    assert health["model"] == "tiny" and health["source"] == "sft" and health["step"] == 7
    assert health["running"] == 0 and health["queued"] == 0 and health["context"] == 256
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text  # what the page renders is checked in a browser: test_webui.py


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"messages": [', 400, None, None),
    (b'[1, 2]', 400, None, None),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, None),
    (b'{"messages": "' + b"x" * (9 * 2**20) + b'"}', 413, None, None),
    ({"model": "tiny"}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n", None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": -0.1}, 400, "top_p", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream", None),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400, "seed", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages", "context_length_exceeded"),
])
def test_bad_chat_requests(served, body, status, param, code):
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kw = {"json": body}
    r = httpx.post(served.url + CHAT, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code


def test_bad_routes_and_completions_input(served):
    r = httpx.post(served.url + "/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(served.url + CHAT)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(served.url + "/v1/completions", json={"prompt": 42})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "x" * 2000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def wait_for(predicate, timeout: float = 10.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "in-process"])
def test_queue_full_429_and_disconnect_frees_rows(tiny_tokenizer, engine_process):
    """One row of batch and one row of queue: a long reply occupies the batch, a second request waits, a third gets
    429. Then the first client hangs up: its row is freed long before its 1000 tokens would have been generated.
    Both scheduler hosts: the engine process (the CPU default) keeps the queue's books in the parent."""
    model = tiny_model(tiny_tokenizer, sequence_len=1024)
    app = create_app(model, tiny_tokenizer, max_batch=1, max_queue=1, max_tokens=1000, engine_process=engine_process)
    long_body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 1000}
    with ServerThread(app) as srv:
        scheduler = app.state.picochat.scheduler
        health = lambda: httpx.get(srv.url + "/health").json()  # noqa: E731
        r = httpx.post(srv.url + CHAT, json={**long_body, "n": 2, "max_tokens": 1})
        assert r.status_code == 400  # n above max_batch is a bad parameter, not an overload
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", srv.url + CHAT, json={**long_body, "stream": True}) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data: ")  # streaming: the request is running
                wait_for(lambda: health()["running"] == 1)
                with ThreadPoolExecutor(1) as pool:
                    second = pool.submit(httpx.post, srv.url + CHAT, json={**long_body, "max_tokens": 3}, timeout=60)
                    wait_for(lambda: health()["queued"] == 1)
                    third = httpx.post(srv.url + CHAT, json=long_body, timeout=30)
                    assert third.status_code == 429, third.text
                    assert third.json()["error"]["code"] == "queue_full" and third.headers["retry-after"] == "1"
                    steps_at_hangup = scheduler.steps
                    first.close()  # the client goes away mid-stream
                    assert second.result().status_code == 200  # the queued request got the freed row
        assert second.result().json()["usage"]["completion_tokens"] == 3
        wait_for(lambda: (lambda h: (h["running"], h["queued"]) == (0, 0))(health()))
        # the long request was cut short: far fewer steps than its 1000 tokens
        assert scheduler.steps - steps_at_hangup < 500


def test_nonstream_disconnect_cancels(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer, sequence_len=1024)
    app = create_app(model, tiny_tokenizer, max_batch=2, max_tokens=1000)
    body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 1000}
    with ServerThread(app) as srv:
        scheduler = app.state.picochat.scheduler
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + CHAT, json=body, timeout=httpx.Timeout(30, read=0.3))
        steps = scheduler.steps
        wait_for(lambda: httpx.get(srv.url + "/health").json()["running"] == 0)
        assert scheduler.steps - steps < 500  # of 1000


def test_engine_process_death_fails_open_requests_and_answers_503(tiny_tokenizer):
    """The engine process is killed mid-stream: the open stream ends with an error object (not a hang), later requests
    get 503 with a reason, /health says unavailable; the HTTP side itself keeps answering."""
    model = tiny_model(tiny_tokenizer, sequence_len=1024)
    app = create_app(model, tiny_tokenizer, max_batch=2, max_tokens=1000, engine_process=True)
    body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 1000, "stream": True}
    with ServerThread(app) as srv:
        with httpx.stream("POST", srv.url + CHAT, json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # running
            app.state.picochat.scheduler._proc.kill()
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-1][len("data: "):])["error"]["type"] == "server_error"
        later = httpx.post(srv.url + CHAT, json={**body, "stream": False}, timeout=30)
        assert later.status_code == 503 and later.json()["error"]["code"] == "engine_unavailable"
        assert "engine process" in later.json()["error"]["message"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"


TOOL_CONTENT = "Sum\n```python\n2+3\n```\n```output\n5\n```\n ok"
TOOL_PARTS = [{"type": "text", "text": "Sum"}, {"type": "python", "text": "2+3"},
              {"type": "python_output", "text": "5"}, {"type": "text", "text": " ok"}]


def test_tool_call_fenced_in_content_and_marked_for_the_ui(tiny_tokenizer):
    app = create_app(scripted_model(tiny_tokenizer), tiny_tokenizer, tool=make_tool("calculator"), max_tokens=40)
    body = {"messages": [{"role": "user", "content": "what is 2+3?"}], "temperature": 0}
    with ServerThread(app) as srv:
        full = httpx.post(srv.url + CHAT, json=body, timeout=60).json()
        (choice,) = full["choices"]
        assert choice["finish_reason"] == "stop"  # the script ends with <|assistant_end|>
        assert choice["message"]["content"] == TOOL_CONTENT
        assert choice["message"]["picochat_parts"] == TOOL_PARTS
        text, chunks, _ = streamed_chat(srv.url, body)
        assert text == TOOL_CONTENT
        deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
        shown = {}  # what a UI shows per segment when it drops the fence markup
        for d in deltas:
            if not d.get("picochat_markup"):
                shown[d["picochat_segment"]] = shown.get(d["picochat_segment"], "") + d["content"]
        assert shown == {"text": "Sum ok", "python": "2+3", "python_output": "5"}
        markup = "".join(d["content"] for d in deltas if d.get("picochat_markup"))
        assert markup == "\n```python\n\n```\n```output\n\n```\n"
        # the parts go back as the assistant's content in the next turn, replaying the tool call token for token
        history = [*body["messages"], {"role": "assistant", "content": TOOL_PARTS}, {"role": "user", "content": "ok"}]
        r = httpx.post(srv.url + CHAT, json={**body, "messages": history, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
            tiny_tokenizer.render_for_completion({"messages": history}))


def test_engine_process_refuses_an_unpicklable_tool_in_one_line(tiny_tokenizer):
    app = create_app(tiny_model(tiny_tokenizer), tiny_tokenizer, tool=lambda code: "x", engine_process=True)
    with pytest.raises(UserError, match="picklable"):
        app.state.picochat.scheduler.start()


# ---------------------------------------------------------------------------------------------------------------------
# safe to run on a laptop: Host allow-list, Origin check, JSON-only POSTs, optional API key


def raw_post(url: str, path: str, body: bytes, **headers) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers, timeout=30)


def test_cross_site_and_rebinding_requests_are_refused(served):
    body = json.dumps(chat_body("hello", max_tokens=2)).encode()
    port = served.url.rsplit(":", 1)[1]
    # what any web page can make a browser send (a "simple" request: no preflight), here after DNS rebinding
    r = raw_post(served.url, CHAT, body, **{"content-type": "text/plain", "host": "attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(served.url + "/health", headers={"host": f"attacker.example:{port}"}).status_code == 403
    # the right Host, but not JSON: a cross-site form or text/plain fetch
    r = raw_post(served.url, CHAT, body, **{"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    # JSON from another site's page (the browser names it in Origin)
    r = raw_post(served.url, CHAT, body, **{"content-type": "application/json", "origin": "http://attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert raw_post(served.url, CHAT, body, **{"content-type": "application/json", "origin": "null"}).status_code == 403
    # the served page itself (same origin) and plain clients under the loopback names are served
    for headers in ({"origin": served.url}, {"host": f"localhost:{port}"},
                    {"content-type": "application/json; charset=utf-8"}):
        r = raw_post(served.url, CHAT, body, **{"content-type": "application/json", **headers})
        assert r.status_code == 200, (headers, r.text)


def test_api_key_and_allowed_hosts(tiny_tokenizer):
    openai = pytest.importorskip("openai")
    app = create_app(tiny_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", max_tokens=8,
                     api_key="s3cret", allowed_hosts=("chat.example", "127.0.0.1"), engine_process=False)
    with ServerThread(app) as srv:
        body = chat_body("hi", max_tokens=2)
        r = httpx.post(srv.url + CHAT, json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(srv.url + CHAT, json=body, headers={"authorization": "Bearer wrong"}, timeout=30)
        assert r.status_code == 401
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        # the page and the liveness probe stay open; the page asks for the key
        assert httpx.get(srv.url + "/").status_code == 200 and httpx.get(srv.url + "/health").status_code == 200
        # the official client sends the key as a Bearer token
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        # --allowed-hosts replaces the defaults: localhost is not in this list
        auth = {"authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/v1/models", headers={**auth, "host": "chat.example"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers={**auth, "host": "localhost"}).status_code == 403


def test_guard_defaults_follow_the_bind_address():
    from picochat.serve.guard import Guard, default_allowed_hosts, parse_allowed_hosts

    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert "10.1.2.3" in default_allowed_hosts("10.1.2.3")
    assert parse_allowed_hosts("Chat.Example:8000, other", "0.0.0.0") == ("chat.example", "other")
    g = Guard(allowed_hosts=parse_allowed_hosts("", "127.0.0.1"))
    assert g.check("GET", "/health", {"host": "[::1]:8000"}) is None
    assert g.check("GET", "/health", {"host": "127.0.0.1.attacker.example"}).status == 403
    assert Guard(allowed_hosts=("*",)).check("GET", "/health", {"host": "anything"}) is None


# ---------------------------------------------------------------------------------------------------------------------
# internal errors stay in the server log


class Exploding(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("SECRET-DETAIL at /internal/path/model.py")


def test_engine_exception_text_never_reaches_the_client(tiny_tokenizer, caplog):
    model = tiny_model(tiny_tokenizer)
    model.blocks[0].mlp = Exploding()
    app = create_app(model, tiny_tokenizer, model_name="tiny", max_tokens=8, engine_process=False)
    with ServerThread(app) as srv, caplog.at_level("ERROR", logger="picochat.serve"):
        body = chat_body("hi", max_tokens=4)
        with httpx.stream("POST", srv.url + CHAT, json={**body, "stream": True}, timeout=30) as r:
            streamed = r.read().decode()
        r2 = httpx.post(srv.url + CHAT, json=body, timeout=30)
        with httpx.stream("POST", srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True},
                          timeout=30) as r3:
            text_streamed = r3.read().decode()
    for out in (streamed, r2.text, text_streamed):
        assert "SECRET" not in out and "/internal/" not in out
    assert '"type": "server_error"' in streamed and "server log" in streamed
    assert r2.status_code == 500 and r2.json()["error"]["type"] == "server_error"
    assert "SECRET-DETAIL" in caplog.text  # the detail went to the log


def test_health_is_503_once_the_scheduler_thread_died(tiny_tokenizer):
    app = create_app(tiny_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", max_tokens=8,
                     engine_process=False)
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        scheduler = app.state.picochat.scheduler

        calls = []

        def crash(ev):  # a callback bug that is not an Exception: it ends the scheduler thread (once)
            calls.append(ev)
            if len(calls) == 1:
                raise SystemExit("callback bug")

        scheduler.submit(tiny_tokenizer.encode("hi", prepend=tiny_tokenizer.bos_id),
                         SamplingParams(max_tokens=2), 1, crash)
        wait_for(lambda: httpx.get(srv.url + "/health").status_code == 503)
        h = httpx.get(srv.url + "/health").json()
        assert h["status"] == "unavailable" and h["error"]
        r = httpx.post(srv.url + CHAT, json=chat_body("hi", max_tokens=2), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI compatibility gaps that real clients hit


def post_chat(srv, **kw) -> httpx.Response:
    return httpx.post(srv.url + CHAT, json={"model": "tiny", "temperature": 0, "max_tokens": 6, **kw}, timeout=60)


def test_developer_and_system_messages_anywhere_and_consecutive_users(served):
    tok = served.tokenizer
    cases = [  # what the client sends -> the conversation it means, in the tokenizer's one-system-message form
        ([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
        ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "hi"}],
         [{"role": "user", "content": "a\n\nb\n\nhi"}]),
        ([{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
         [{"role": "user", "content": "one\n\ntwo"}]),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}, {"role": "system", "content": "s"},
          {"role": "user", "content": "q2"}],
         [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"},
          {"role": "user", "content": "s\n\nq2"}]),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "late"}],
         [{"role": "user", "content": "q\n\nlate"}]),
    ]
    for sent, meant in cases:
        r = post_chat(served, messages=sent)
        assert r.status_code == 200, (sent, r.text)
        prompt = tok.render_for_completion({"messages": meant})
        assert r.json()["usage"]["prompt_tokens"] == len(prompt)
        assert r.json()["choices"][0]["message"]["content"] == engine_greedy(served, prompt, 6)


def test_model_card_top_p_zero_and_neutral_fields(served):
    r = httpx.get(served.url + "/v1/models/tiny")
    assert r.status_code == 200 and r.json()["id"] == "tiny" and r.json()["object"] == "model"
    r = httpx.get(served.url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    msgs = [{"role": "user", "content": "nucleus"}]
    greedy = post_chat(served, messages=msgs).json()["choices"][0]["message"]["content"]
    # top_p = 0 keeps only the most likely token: greedy, even at temperature 1
    for seed in (1, 2):
        r = post_chat(served, messages=msgs, temperature=1.0, top_p=0, seed=seed)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy
    # clients often send the neutral value of a field we do not support: that is fine
    neutral = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False,
               "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}
    assert post_chat(served, messages=msgs, **neutral).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("logit_bias", {"12": 5}),
])
def test_fields_we_cannot_honour_are_400_naming_the_field(served, field, value):
    r = post_chat(served, messages=[{"role": "user", "content": "hi"}], **{field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]


def test_frequency_and_presence_penalties_reach_the_engine(served):
    msgs = [{"role": "user", "content": "say it again"}]
    prompt = served.tokenizer.render_for_completion({"messages": msgs})
    plain = post_chat(served, messages=msgs, max_tokens=40).json()["choices"][0]["message"]["content"]
    for pen in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": -0.5}):
        r = post_chat(served, messages=msgs, max_tokens=40, **pen)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == engine_greedy(
            served, prompt, 40, **pen)
    assert engine_greedy(served, prompt, 40, frequency_penalty=2.0) != plain  # the penalty changed this reply
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -3), ("frequency_penalty", "high")):
        r = post_chat(served, messages=msgs, **{field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_max_tokens_that_does_not_fit_is_400_like_openai(served):
    msgs = [{"role": "user", "content": "hello there"}]
    prompt = len(served.tokenizer.render_for_completion({"messages": msgs}))
    room = 256 - prompt  # the fixture's context
    r = post_chat(served, messages=msgs, max_tokens=room + 1)
    # the fixture caps replies at 64: asking for more is refused too, naming the cap
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    model = tiny_model(served.tokenizer)
    big = create_app(model, served.tokenizer, model_name="tiny", max_tokens=1000, engine_process=False)
    with ServerThread(big) as srv:
        srv.model, srv.tokenizer = model, served.tokenizer
        r = post_chat(srv, messages=msgs, max_tokens=room + 1)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert "maximum context length is 256 tokens" in err["message"]
        assert f"{prompt} in the prompt, {room + 1} in the completion" in err["message"]
        # exactly what fits is served, and the limit binds: this greedy reply runs to the last position of the context
        r = post_chat(srv, messages=msgs, max_tokens=room)
        assert r.status_code == 200
        usage, choice = r.json()["usage"], r.json()["choices"][0]
        assert (choice["finish_reason"], usage["completion_tokens"], usage["total_tokens"]) == ("length", room, 256)
        assert choice["message"]["content"] == engine_greedy(srv, served.tokenizer.render_for_completion(
            {"messages": msgs}), room)
        # without max_tokens a reply gets what fits (here less than the 1000 cap), not an error
        r = post_chat(srv, messages=msgs, max_tokens=None)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 256


# ---------------------------------------------------------------------------------------------------------------------
# evaluation clients: lm-evaluation-harness `local-completions` (token arrays, echo, logprobs) and vLLM's tokenizer
# endpoints


def direct_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward of the model: what the server must reproduce."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_lm_eval_loglikelihood_requests_score_like_the_model(served):
    """The exact payload lm-eval's local-completions sends for a multiple-choice item (one context, four
    continuations, batched in one request as token arrays): each choice's log-likelihood and greediness, computed as
    lm-eval's parse_logprobs does, equal the model's own."""
    tok = served.tokenizer
    context = tok.encode("The quick brown fox jumps over the")
    choices = [tok.encode(c) for c in (" lazy dog.", " moon", " fence and away", " big question")]
    prompts = [context + c for c in choices]
    payload = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    r = httpx.post(served.url + "/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["choices"]
    assert sorted(c["index"] for c in out) == [0, 1, 2, 3]
    ours, theirs = [], []
    for choice, ids in zip(sorted(out, key=lambda c: c["index"]), prompts):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None  # echo + 1 generated
        assert lp["top_logprobs"][0] is None and all(len(t) >= 1 for t in lp["top_logprobs"][1:])
        assert lp["tokens"][: len(ids)] == [tok.decode([t]) for t in ids]  # ASCII: every token is whole text
        assert lp["text_offset"][: len(ids)] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
        assert choice["text"].startswith(tok.decode(ids))
        ctxlen = len(context)
        ll = sum(lp["token_logprobs"][ctxlen:-1])  # lm-eval's parse_logprobs
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                             lp["top_logprobs"][ctxlen:-1]))
        direct = direct_logprobs(served.model, ids)
        assert lp["token_logprobs"][1: len(ids)] == pytest.approx(direct, abs=1e-4)
        ours.append((ll, greedy))
        theirs.append(sum(direct[ctxlen - 1:]))
        engine_lp, _ = Engine(served.model, tok).score(ids)
        assert lp["token_logprobs"][: len(ids)] == pytest.approx(engine_lp, abs=1e-5)
    assert [o[0] for o in ours] == pytest.approx(theirs, abs=1e-4)
    assert max(range(4), key=lambda i: ours[i][0]) == max(range(4), key=lambda i: theirs[i])


def test_completions_echo_logprobs_shapes(served):
    tok = served.tokenizer
    # strings are BOS + text; logprobs without echo cover the generated tokens only; max_tokens 0 with echo scores
    r = httpx.post(served.url + "/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 3, "temperature": 0,
                                                         "logprobs": 2}, timeout=60)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == 3 and len(lp["token_logprobs"]) == 3
        # the 2 best, plus the chosen one when not among them; tokens that are part of a character are named by their
        # bytes, so two of them never collapse into one key
        assert all(len(t) in (2, 3) for t in lp["top_logprobs"])
        prompt_len = len(tok.decode(tok.encode("ab" if c["index"] == 0 else "cd", prepend=tok.bos_id)))
        assert lp["text_offset"][0] == prompt_len
    ids = tok.encode("hello world", prepend=tok.bos_id)
    r = httpx.post(served.url + "/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0},
                   timeout=60).json()
    (c,) = r["choices"]
    assert c["text"] == tok.decode(ids) and len(c["logprobs"]["token_logprobs"]) == len(ids)
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    for bad, param in ([{"prompt": [1, -2]}, "prompt"], [{"prompt": ["a", [1]]}, "prompt"],
                       [{"prompt": "a", "max_tokens": 0}, "max_tokens"], [{"prompt": "a", "logprobs": 99}, "logprobs"],
                       [{"prompt": "a", "echo": True, "logprobs": 1, "stream": True}, "stream"]):
        r = httpx.post(served.url + "/v1/completions", json=bad, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_vllm_tokenizer_endpoints(served):
    tok = served.tokenizer
    info = httpx.get(served.url + "/tokenizer_info").json()
    assert info["bos_token"] == "<|bos|>" and info["eos_token"] and info["model_max_length"] == 256
    r = httpx.post(served.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    # special token names are tokenized as the special tokens (lm-eval finds the BOS/EOS ids this way)
    r = httpx.post(served.url + "/tokenize", json={"prompt": "<|bos|>hi"}).json()
    assert r["tokens"] == [tok.bos_id, *tok.encode("hi")]
    r = httpx.post(served.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert r["tokens"] == tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    assert httpx.post(served.url + "/detokenize", json={"tokens": tok.encode("héllo")}).json() == {"prompt": "héllo"}
    assert httpx.post(served.url + "/detokenize", json={"tokens": ["x"]}).status_code == 400


# ---------------------------------------------------------------------------------------------------------------------
# the official openai client: a seeded n > 1 request reproduces under concurrent load


def test_openai_client_seeded_n_reproduces_under_load(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "tell me a story"}]
    kw = dict(model="tiny", messages=messages, temperature=1.0, seed=77, n=3, max_tokens=12)
    alone = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert len(set(alone)) > 1  # three different samples

    def load(i: int) -> str:  # other clients streaming while the seeded request runs: rows join and leave
        stream = client.chat.completions.create(model="tiny", temperature=1.0, max_tokens=6 + 5 * (i % 3), n=1 + i % 2,
                                                messages=[{"role": "user", "content": f"load {i}"}], stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ThreadPoolExecutor(7) as pool:
        others = [pool.submit(load, i) for i in range(6)]
        time.sleep(0.05)
        loaded = [c.message.content for c in client.chat.completions.create(**kw).choices]
        streamed = client.chat.completions.create(**kw, stream=True)
        joined = ["", "", ""]
        for ch in streamed:
            for c in ch.choices:
                joined[c.index] += c.delta.content or ""
        [f.result() for f in others]
    assert loaded == alone and joined == alone


# ---------------------------------------------------------------------------------------------------------------------
# the protocol's pure functions, without a server


def test_protocol_parsing_and_shaping_without_a_server(tiny_tokenizer):
    from picochat.serve import protocol as P

    limits = P.Limits(max_batch=4, max_tokens=50, context=100)
    req = P.sampling({"temperature": 0.7, "top_p": 0, "n": 2, "seed": 5, "stop": "x"}, [1] * 30, limits, "messages")
    assert (req.params.temperature, req.params.top_p, req.params.max_tokens, req.n) == (0.0, None, 50, 2)
    assert P.sampling({}, [1] * 90, limits, "messages").params.max_tokens == 10  # what fits, under the cap
    with pytest.raises(P.ApiError, match="at most 50") as e:
        P.sampling({"max_tokens": 51}, [1] * 10, limits, "messages")
    assert e.value.param == "max_tokens"
    assert P.sampling({"max_tokens": 0}, [1] * 100, limits, "prompt", allow_zero=True).params.max_tokens == 0
    conv = P.conversation({"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u1"},
                                        {"role": "assistant", "content": "a"}, {"role": "assistant", "content": None},
                                        {"role": "user", "content": [{"type": "text", "text": "u2"}]}]})
    assert conv == {"messages": [{"role": "user", "content": "d\n\nu1"},
                                 {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                                 {"role": "user", "content": "u2"}]}
    ids, as_text = P.prompts({"prompt": [[1, 2], [3]]}, 320, None)
    assert (ids, as_text) == ([[1, 2], [3]], False)
    # two tokens that are each part of one character must not share a name (top_logprobs is keyed by it)
    tok = tiny_tokenizer
    names = P.token_strings(tok, list(range(256)))  # ids 0..255 are the single bytes
    assert len(set(names)) == 256 and names[0xc3].startswith("bytes:\\x")
    assert P.text_offsets(tok, tok.encode("aé b"), 3)[-1] == 3 + len("aé")
    assert P.encode_with_specials(tok, "x<|bos|><|user_start|>") == [*tok.encode("x"), tok.bos_id,
                                                                   tok.special_id("<|user_start|>")]
