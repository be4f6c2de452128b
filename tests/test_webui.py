"""The web UI in a real browser: Debian's /usr/bin/chromium driven by PyPI playwright (never `playwright install`),
against the real server (uvicorn in a thread) with a tiny random model.

    OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_webui.py        # needs: apt-get install -y chromium
"""

from __future__ import annotations

import json
import os

import httpx
import pytest

from picochat.serve.app import create_app
from picochat.tools import make_tool
from test_serve import TOOL_PARTS, ServerThread, scripted_model, tiny_model, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
XSS = "<script>window.__pwned=1</script><b>x</b>"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing: apt-get install -y chromium to run the browser test")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, srv):
    pg = browser.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(srv.url + "/")
    pg.srv = srv
    return pg


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    app = create_app(tiny_model(tiny_tokenizer, sequence_len=512), tiny_tokenizer, model_name="tiny", max_batch=4,
                     max_tokens=300)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def page(browser, server):
    """A fresh page (empty conversation) with greedy sampling set in the UI."""
    pg = open_page(browser, server)
    pg.fill("#temperature", "0")
    yield pg
    pg.close()


def api_reply(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"messages": messages, "temperature": 0, "top_k": 50, "max_tokens": max_tokens}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def turn(page, text: str, max_tokens: int) -> None:
    """Send `text` and wait until its reply has finished streaming."""
    page.fill("#max-tokens", str(max_tokens))
    n = len(assistant_texts(page))
    send(page, text)
    wait_for(lambda: page.eval_on_selector_all(".msg.assistant", "els => els.map(e => e.dataset.state)")
             == ["done"] * (n + 1))


def assistant_texts(page) -> list[str]:
    """The replies' text, without the page's own notes ("(stopped)", "(cut at ...)")."""
    return page.eval_on_selector_all(".msg.assistant", "els => els.map(e => [...e.querySelectorAll('[class^=part-]')]"
                                                       ".map(p => p.textContent).join(''))")


def test_reply_streams_in_and_matches_api(page):
    page.fill("#max-tokens", "150")
    # record the bubble's text length at every DOM change, to see it grow token by token
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant');
            if (b) window.__lengths.push(b.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    send(page, "hello there")
    page.wait_for_selector('.msg.assistant[data-state="done"]')
    lengths = page.evaluate("window.__lengths")
    # it streamed: the text was seen at intermediate sizes before the final one, only ever growing
    assert len(set(lengths) - {0}) >= 2 and lengths == sorted(lengths), lengths
    (reply,) = assistant_texts(page)
    assert reply and reply == api_reply(page.srv.url, [{"role": "user", "content": "hello there"}], 150)
    assert page.text_content(".msg.user") == "hello there"


def test_html_in_messages_is_text_and_turns_carry_over(page):
    turn(page, "hello there", 60)
    first = assistant_texts(page)[0]
    turn(page, XSS, 60)
    users = page.eval_on_selector_all(".msg.user", "els => els.map(e => e.textContent)")
    assert users == ["hello there", XSS]  # the literal <script> is shown as text
    assert page.query_selector_all("#messages b") == [] and page.query_selector_all("#messages script") == []
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # the second reply continues the conversation: the UI sent both turns
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": XSS}]
    assert assistant_texts(page)[-1] == api_reply(page.srv.url, history, 60)


def test_regenerate_edit_stop_and_new_chat(page):
    turn(page, "first question", 30)
    turn(page, "second question", 30)
    before = assistant_texts(page)
    page.evaluate("document.querySelectorAll('.msg.assistant')[1].__old = true")
    page.click("#regenerate")  # greedy: the same last reply again, in a new bubble replacing the old one
    wait_for(lambda: page.evaluate("""() => { const b = document.querySelectorAll('.msg.assistant');
        return b.length === 2 && !b[1].__old && b[1].dataset.state === 'done'; }"""))
    assert assistant_texts(page) == before
    page.click("#edit-last")  # the last user message goes back into the box, its turn disappears
    assert page.input_value("#input") == "second question"
    assert page.eval_on_selector_all(".msg", "els => els.length") == 2
    page.fill("#max-tokens", "300")
    # press Stop from inside the page as soon as the reply has a few characters: a click from the test process can
    # arrive after all 300 tokens when the machine is loaded
    page.evaluate("""() => new MutationObserver((_, obs) => {
        const b = document.querySelectorAll('.msg.assistant');
        if (b.length === 2 && b[1].textContent.length > 3) {
            obs.disconnect(); document.getElementById('stop').click();
        }
    }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true})""")
    send(page, "a long answer please")
    page.wait_for_selector('.msg.assistant[data-state="stopped"]')
    # the aborted fetch closes the connection: the server cancels the request and frees its row
    wait_for(lambda: httpx.get(page.srv.url + "/health").json()["running"] == 0)
    assert page.is_hidden("#stop")
    page.click("#new-chat")
    assert page.eval_on_selector_all(".msg", "els => els.length") == 0


def test_tool_call_and_output_shown_as_blocks(browser, tiny_tokenizer):
    app = create_app(scripted_model(tiny_tokenizer), tiny_tokenizer, tool=make_tool("calculator"), max_tokens=40)
    with ServerThread(app) as srv:
        page = open_page(browser, srv)
        page.fill("#temperature", "0")
        turn(page, "what is 2+3?", 40)
        parts = page.eval_on_selector_all(".msg.assistant > *", "els => els.map(e => [e.className, e.textContent])")
        assert parts == [["part-" + p["type"], p["text"]] for p in TOOL_PARTS]
        # the tool blocks are styled apart from the text (monospace, own background)
        styles = page.eval_on_selector_all(".msg.assistant > *", "els => els.map(e => getComputedStyle(e).fontFamily)")
        assert "monospace" in styles[1] and "monospace" in styles[2] and "monospace" not in styles[0]
        # the next turn sends the parts back: the server accepts them and answers
        turn(page, "thanks", 40)
        assert page.query_selector_all(".msg.error") == []
        page.close()


def test_error_then_the_next_message_succeeds(page):
    """A message too long for the context fails (400): it leaves the conversation and goes back into the box, so the
    next message is answered as if the failed one had never been sent."""
    page.fill("#max-tokens", "20")
    too_long = "word " * 600  # > the 512-token context
    send(page, too_long)
    page.wait_for_selector(".msg.error")
    assert "context length" in page.text_content(".msg.error")
    assert page.eval_on_selector_all(".msg.user, .msg.assistant", "els => els.length") == 0
    assert page.input_value("#input") == too_long and page.is_hidden("#stop")
    page.fill("#input", "")
    turn(page, "hello there", 20)
    assert page.query_selector_all(".msg.error") == []  # the old error went away with the new message
    assert page.eval_on_selector_all(".msg.user", "els => els.map(e => e.textContent)") == ["hello there"]
    assert assistant_texts(page) == [api_reply(page.srv.url, [{"role": "user", "content": "hello there"}], 20)]


def test_reply_cut_by_max_tokens_is_marked(page):
    turn(page, "hello there", 4)  # a random model does not end a reply within 4 tokens
    bubble = page.query_selector(".msg.assistant")
    assert bubble.get_attribute("data-finish") == "length"
    assert "max tokens" in bubble.query_selector(".note").text_content()
    assert assistant_texts(page)[0] == api_reply(page.srv.url, [{"role": "user", "content": "hello there"}], 4)


def sse_body(contents: list[str], done: bool, sep: str = "\n\n", finish: str = "stop") -> str:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": c, "picochat_segment": "text"}, "finish_reason": None}]}
               for c in contents]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    body = "".join(f"data: {json.dumps(c)}{sep}" for c in chunks)
    return body + (f"data: [DONE]{sep}" if done else "")


def test_stream_without_done_is_incomplete_and_model_html_is_text(page):
    """The page's rendering of what a stream carries, with the stream written by the test (page.route) so that it can
    end early and carry HTML: the connection closes before [DONE] -> marked incomplete; a reply of markup -> text in
    the DOM, no element made from it."""
    hostile = "<img src=x onerror=\"window.__pwned=1\"><b>bold</b><script>window.__pwned=2</script>"
    replies = iter([sse_body(["half a ", "reply"], done=False), sse_body([hostile[:9], hostile[9:]], done=True,
                                                                         sep="\r\n\r\n")])
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=next(replies)))
    send(page, "first")
    page.wait_for_selector('.msg.assistant[data-state="incomplete"]')
    assert "incomplete" in page.text_content(".msg.assistant .note")
    send(page, "second")
    wait_for(lambda: page.eval_on_selector_all(".msg.assistant", "els => els.map(e => e.dataset.state)")
             == ["incomplete", "done"])
    last = page.query_selector_all(".msg.assistant")[-1]
    assert last.query_selector(".part-text").text_content() == hostile
    # a DOM assertion, not a search of the page source: nothing in the conversation became an element
    tags = page.eval_on_selector_all("#messages *", "els => [...new Set(els.map(e => e.tagName))]")
    assert set(tags) <= {"DIV", "SPAN"}, tags
    page.wait_for_timeout(100)  # an onerror handler would have run by now
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_sse_parser_takes_any_line_ending_and_any_split(page):
    events = ['{"a": 1}', '{"b": "x\\ny"}', "[DONE]"]
    for sep in ("\n", "\r\n", "\r"):
        stream = f"data: {events[0]}{sep}{sep}: a comment{sep}data:{events[1]}{sep}{sep}data: {events[2]}{sep}{sep}"
        # every split point of the stream into two pieces, and one piece per character
        got = page.evaluate("""(stream) => {
            const runs = [];
            for (let i = 0; i <= stream.length; i++) {
                const p = new window.PicochatSSEParser();
                runs.push([...p.push(stream.slice(0, i)), ...p.push(stream.slice(i)), ...p.end()]);
            }
            const p = new window.PicochatSSEParser();
            runs.push([...[...stream].flatMap((c) => p.push(c)), ...p.end()]);
            return runs;
        }""", stream)
        assert all(run == events for run in got), (repr(sep), [r for r in got if r != events][:2])
    # a data field over two lines is one payload joined by "\n" (the SSE spec)
    assert page.evaluate("new window.PicochatSSEParser().push('data: a\\r\\ndata: b\\r\\n\\r\\n')") == ["a\nb"]


def test_page_asks_for_the_api_key_and_then_works(browser, tiny_tokenizer):
    app = create_app(tiny_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", max_tokens=20, api_key="k3y",
                     engine_process=False)
    with ServerThread(app) as srv:
        page = open_page(browser, srv)
        page.fill("#temperature", "0")
        assert page.is_hidden("#api-key")
        send(page, "hello there")
        page.wait_for_selector(".msg.error")
        assert "API key" in page.text_content(".msg.error") and page.is_visible("#api-key")
        page.fill("#api-key", "k3y")
        page.click("#send")  # the failed message went back into the box: send it again
        page.wait_for_selector('.msg.assistant[data-state="done"]')
        assert page.query_selector_all(".msg.error") == []
        body = {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "top_k": 50}
        expected = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer k3y"},
                              timeout=60).json()["choices"][0]["message"]["content"]
        assert assistant_texts(page) == [expected]
        page.close()
