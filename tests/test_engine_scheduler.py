"""The server's continuous-batching Scheduler (picochat/serve/scheduler.py) and Engine.score, on tiny CPU models."""

import threading
import time

import pytest
import torch

from conftest import make_tiny_model, randomize_outputs
from picochat.common import UserError
from picochat.engine import Engine, SamplingParams
from picochat.serve.scheduler import EngineDied, Scheduler


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, n_kv_head=2, n_embd=64, head_dim=16, seed=2),
                             seed=12).eval()


def test_score_is_the_full_forwards_log_softmax(tiny_tokenizer, model):
    """score(): per token the log-probability given the tokens before it (None for the first), in fp32, and the
    `top` most likely tokens at each position in order; out-of-vocabulary ids and an empty prompt are refused."""
    tok = tiny_tokenizer
    ids = tok.encode("To be, or not to be, that is", prepend=tok.bos_id)
    engine = Engine(model, tok)
    lps, tops = engine.score(ids, top=3)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)  # (T, V)
    assert lps[0] is None and tops[0] == [] and len(lps) == len(tops) == len(ids)
    for i in range(1, len(ids)):
        assert lps[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-5)
        want = ref[i - 1].topk(3)
        assert [t for t, _ in tops[i]] == want.indices.tolist()
        assert [lp for _, lp in tops[i]] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert sum(lps[1:]) < 0 and engine.score(ids)[1] == [[]] * len(ids)
    for bad, match in (([], "empty"), ([1, tok.vocab_size], "outside the vocabulary"), ([1] * 200, "context")):
        with pytest.raises(UserError, match=match):
            engine.score(bad)


def _collect(n_rows):
    """An on_event that records (time, event) and sets `done` after n_rows finish events."""
    got, done = [], threading.Event()

    def on_event(ev):
        got.append((time.monotonic(), ev))
        if sum(e.finish_reason is not None for _, e in got) == n_rows:
            done.set()
    return got, done, on_event


def test_submit_score_runs_between_decode_steps(tiny_tokenizer, model):
    """A scoring request queued while a long generation decodes is answered before that generation ends, with the
    values of Engine.score; the generation's tokens are those it gets alone."""
    tok = tiny_tokenizer
    engine = Engine(model, tok)
    ids = tok.encode("In the beginning", prepend=tok.bos_id)
    p = SamplingParams(temperature=0, max_tokens=100)
    alone = [ev.token for step in engine.generate(ids, 1, p) for ev in step]
    want = engine.score(ids, 2)
    sched = Scheduler(engine, max_batch=2)
    sched.start()
    try:
        got, done, on_event = _collect(1)
        scored, score_done = [], threading.Event()
        sched.submit(ids, p, 1, on_event)
        while len(got) < 5:
            time.sleep(0.001)
        sched.submit_score(ids, 2, lambda r: (scored.append((time.monotonic(), r)), score_done.set()))
        assert score_done.wait(30) and done.wait(30)
        assert scored[0][1] == want
        assert scored[0][0] < got[-1][0]  # answered while the generation was still decoding
        assert [ev.token for _, ev in got] == alone and len(alone) > 50
    finally:
        sched.stop()


def test_scheduler_reports_its_dead_thread(tiny_tokenizer, model):
    """When the scheduler thread dies (here: its per-step callback raises, as the engine process's pipe does when the
    parent is gone), `dead` says why, the open request gets an error finish and new submits raise EngineDied."""
    tok = tiny_tokenizer
    ids = tok.encode("The", prepend=tok.bos_id)

    def broken_pipe():
        raise BrokenPipeError("the parent is gone")

    sched = Scheduler(Engine(model, tok), max_batch=2, on_step=broken_pipe)
    sched.start()
    assert sched.dead is None
    got, done, on_event = _collect(1)
    sched.submit(ids, SamplingParams(temperature=0, max_tokens=50), 1, on_event)
    assert done.wait(30)
    assert got[-1][1].finish_reason == "error"
    deadline = time.monotonic() + 10
    while sched.dead is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "BrokenPipeError" in sched.dead
    with pytest.raises(EngineDied):
        sched.submit(ids, SamplingParams(), 1, lambda ev: None)
    sched.stop()


def test_load_is_read_under_the_lock(tiny_tokenizer, model):
    """`load` while other threads queue requests: it once walked the queue unlocked ('deque mutated during
    iteration', a 500 from /health); each reading is a count that was true at some moment."""
    sched = Scheduler(Engine(model, tiny_tokenizer), max_batch=2, max_queue=10**6)  # not started: the queue grows
    ids = tiny_tokenizer.encode("The", prepend=tiny_tokenizer.bos_id)
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            sched.submit(ids, SamplingParams(), 2, lambda ev: None)

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        seen, t_end = [], time.monotonic() + 0.5
        while time.monotonic() < t_end:
            seen.append(sched.load)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(running == 0 and queued % 2 == 0 for running, queued in seen)
    assert seen[-1][1] > seen[0][1]


class _Slow(torch.nn.Module):
    """A scripted model (next token = table[last token]) that takes `delay` seconds per forward pass, so decoding
    is spread over time as a real model's is."""

    def __init__(self, scripted, delay):
        super().__init__()
        self.inner, self.delay, self.config = scripted, delay, scripted.config

    def forward(self, idx, **kw):
        time.sleep(self.delay)
        return self.inner(idx, **kw)


def test_a_slow_tool_call_does_not_stall_other_streams(tiny_tokenizer):
    """Tool calls run off the decode loop: while one request's tool sleeps for 1 s, another request's tokens keep
    arriving (they used to wait for the tool on the scheduler thread), and the first request then continues with
    the tool's output."""
    from test_engine import ScriptedModel

    tok = tiny_tokenizer
    sid = tok.special_id
    c, q = tok.encode("1")[0], tok.encode("q")[0]
    table = {sid("<|assistant_start|>"): sid("<|python_start|>"), sid("<|python_start|>"): c,
             c: sid("<|python_end|>"), sid("<|output_end|>"): sid("<|assistant_end|>")}
    model = _Slow(ScriptedModel(tok.vocab_size, table, default=q), delay=0.02)
    window = []

    def slow_tool(code):
        window.append(time.monotonic())
        time.sleep(1.0)
        window.append(time.monotonic())
        return "3"

    sched = Scheduler(Engine(model, tok, tool=slow_tool), max_batch=4)
    sched.start()
    try:
        a, a_done, on_a = _collect(1)
        b, b_done, on_b = _collect(1)
        sched.submit([tok.bos_id, q], SamplingParams(temperature=0, max_tokens=60), 1, on_b)
        sched.submit([tok.bos_id, sid("<|assistant_start|>")], SamplingParams(temperature=0, max_tokens=20), 1, on_a)
        assert a_done.wait(30) and b_done.wait(30)
    finally:
        sched.stop()
    start, end = window
    during = [t for t, ev in b if start < t < end]
    assert len(during) >= 10, (len(during), len(b))  # ~0.02 s per step: ~45 in that second
    assert "".join(ev.text for _, ev in a if ev.segment == "output") == "3"
    assert a[-1][1].finish_reason == "stop" and a[-1][0] >= end


class _Nudged(torch.nn.Module):
    """A real GPT whose next token is pushed to table[last token] where the table has it (a tool call scripted into
    a real model); elsewhere the GPT's own logits. Counts forward passes."""

    def __init__(self, gpt, table):
        super().__init__()
        self.gpt, self.table, self.config, self.calls = gpt, table, gpt.config, 0

    def forward(self, idx, kv_cache=None, last=False, **kw):
        self.calls += 1
        logits = self.gpt(idx, kv_cache=kv_cache, last=last, **kw)
        fed = idx[:, -1:] if last else idx  # the tokens whose next-token logits these are
        for b, t in (fed.view(-1)[:, None] == torch.tensor(list(self.table))).nonzero().tolist():
            row, col = divmod(b, fed.size(1))
            logits[row, col, self.table[list(self.table)[t]]] += 1000.0
        return logits


def _reference(model, tok, tool, prompt, max_tokens):
    """One token at a time, a full forward each (no cache): the tool's output block appended after <|python_end|>."""
    sid = tok.special_id
    seq, code = list(prompt), None
    while len(seq) - len(prompt) < max_tokens and len(seq) < model.config.sequence_len:
        with torch.no_grad():
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
        if t in (sid("<|assistant_end|>"), tok.bos_id):
            break
        seq.append(t)
        if t == sid("<|python_start|>"):
            code = []
        elif t == sid("<|python_end|>") and code is not None:
            seq += [sid("<|output_start|>"), *tok.encode(tool(tok.decode(code))), sid("<|output_end|>")]
            code = None
        elif code is not None:
            code.append(t)
    return seq[len(prompt): len(prompt) + max_tokens]


def test_forced_tool_output_is_fed_as_one_extend(tiny_tokenizer):
    """The tool's output block (k forced tokens) is fed to the model in one forward pass, not k decode steps; the
    tokens after it equal a one-token-at-a-time full-forward reference, alone and while another request decodes."""
    tok = tiny_tokenizer
    sid = tok.special_id
    c = tok.encode("1")[0]
    table = {sid("<|assistant_start|>"): sid("<|python_start|>"), sid("<|python_start|>"): c,
             c: sid("<|python_end|>")}
    gpt = randomize_outputs(make_tiny_model(tok.vocab_size, n_embd=64, head_dim=16, seed=4), seed=14).eval()
    model = _Nudged(gpt, table)

    def tool(code):
        return "the answer is 12345 and more text"

    engine = Engine(model, tok, tool=tool)
    prompt = [tok.bos_id, sid("<|user_start|>"), *tok.encode("To be"), sid("<|user_end|>"), sid("<|assistant_start|>")]
    want = _reference(model, tok, tool, prompt, 40)
    out_block = 2 + len(tok.encode(tool("")))
    assert want[3 : 3 + out_block][0] == sid("<|output_start|>") and len(want) == 40
    engine.chunk = 1  # one decode step per sampled token: the forward passes are easy to count
    model.calls = 0
    (got,), (mask,) = engine.generate_batch(prompt, 1, SamplingParams(temperature=0, max_tokens=40))
    assert got == want and mask == [1] * 3 + [0] * out_block + [1] * (40 - 3 - out_block)
    # one forward per sampled token (the prefill gives the first): the token after the output block comes from ONE
    # pass over <|python_end|> and the block, not from one decode step per forced token (40 passes before)
    sampled = 40 - out_block
    assert model.calls == sampled, model.calls
    # with another request decoding in the same batch, at other positions
    other = tok.encode("In the beginning God created", prepend=tok.bos_id)
    want_other = _reference(model, tok, tool, other, 30)
    sched = Scheduler(engine, max_batch=4)
    got_a, done_a, on_a = _collect(1)
    got_b, done_b, on_b = _collect(1)
    sched.submit(other, SamplingParams(temperature=0, max_tokens=30), 1, on_b)
    sched.submit(prompt, SamplingParams(temperature=0, max_tokens=40), 1, on_a)
    sched.start()
    try:
        assert done_a.wait(30) and done_b.wait(30)
    finally:
        sched.stop()
    assert [ev.token for _, ev in got_a] == want
    assert [ev.token for _, ev in got_b][: len(want_other)] == want_other


def test_prefill_batch_equals_one_prompt_at_a_time(tiny_tokenizer, model):
    """Several prompts of different lengths prefilled together (right-padded, then their last tokens at each row's
    own position) give each row the logits and cache entries of its own batch-1 prefill."""
    tok = tiny_tokenizer
    engine = Engine(model, tok)
    prompts = [tok.encode(t, prepend=tok.bos_id) for t in ["The", "To be, or not to be, that is", "def add(a, b):"]]
    prompts.append([tok.bos_id])  # a one-token prompt: nothing before its last token
    together = engine.new_cache(len(prompts))
    logits = engine.prefill_batch(prompts, together, 0)
    for i, p in enumerate(prompts):
        alone = engine.new_cache(1)
        want = engine.prefill(p, alone, 0)
        assert torch.allclose(logits[i], want[0], atol=1e-5), i
        assert torch.allclose(together.k[:, i, : len(p)], alone.k[:, 0, : len(p)], atol=1e-5)
        assert torch.allclose(together.v[:, i, : len(p)], alone.v[:, 0, : len(p)], atol=1e-5)


def test_a_burst_of_admissions_does_not_stall_decoding(tiny_tokenizer, model):
    """Twelve long prompts arriving at once while a stream decodes are prefilled a few per round (a padded-token
    budget per round), with decode steps between: the stream keeps getting tokens while they are admitted (all twelve
    used to be prefilled one by one before its next token)."""
    tok = tiny_tokenizer
    engine = Engine(model, tok)
    order = []  # (request, event) in the order the scheduler thread emitted them
    sched = Scheduler(engine, max_batch=16)
    sched.start()
    try:
        first = threading.Event()
        ids = tok.encode("In the beginning", prepend=tok.bos_id)
        sched.submit(ids, SamplingParams(temperature=0, max_tokens=100), 1,
                     lambda ev: (order.append(("stream", ev)), first.set()))
        assert first.wait(30)
        long = (tok.encode("To be, or not to be, that is the question. ", prepend=tok.bos_id) * 10)[:100]
        left, done = [12], threading.Event()

        def on_event(ev, i):
            order.append((i, ev))
            if ev.finish_reason:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        with sched._cv:  # all twelve queued at one instant
            for i in range(12):
                sched.submit(long, SamplingParams(temperature=0, max_tokens=2), 1, lambda ev, i=i: on_event(ev, i))
        assert done.wait(60)
    finally:
        sched.stop()
    firsts = [next(k for k, (who, _) in enumerate(order) if who == i) for i in range(12)]
    between = [who for who, _ in order[min(firsts) : max(firsts)]]
    assert between.count("stream") >= 2, between  # budget 512: at most 5 prompts of 100 tokens a round
