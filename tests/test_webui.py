"""The web UI in a real browser: Debian's /usr/bin/chromium driven by PyPI playwright (never `playwright install`),
against the real server (uvicorn in a thread) with a tiny random model.

    OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_webui.py        # needs: apt-get install -y chromium
"""

from __future__ import annotations

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
    return page.eval_on_selector_all(".msg.assistant", "els => els.map(e => e.textContent)")


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
    assert len(set(lengths) - {0}) >= 2 and lengths == sorted(lengths)
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
    send(page, "a long answer please")
    page.wait_for_selector(".msg.assistant:nth-of-type(4)")
    wait_for(lambda: len(assistant_texts(page)[-1]) > 3)
    page.click("#stop")
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
