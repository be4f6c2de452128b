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
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return text, chunks, usage


def engine_greedy(srv, prompt_ids: list[int], max_tokens: int) -> str:
    engine = Engine(srv.model, srv.tokenizer)
    steps = engine.generate(prompt_ids, 1, SamplingParams(temperature=0, max_tokens=max_tokens))
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
    assert a["usage"]["completion_tokens"] == 30
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
    assert "/v1/chat/completions" in page.text
    assert not any(sink in page.text for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"))


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"messages": [', 400, None, None),
    (b'[1, 2]', 400, None, None),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, None),
    (b'{"messages": "' + b"x" * (9 * 2**20) + b'"}', 413, None, None),
    ({"model": "tiny"}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n", None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", None),
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
