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
