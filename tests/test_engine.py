import threading

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny_model, randomize_outputs
from picochat.common import UserError
from picochat.engine import Engine, GraphedSteps, SamplingParams, penalize, sample_rows
from picochat.serve.scheduler import Scheduler
from picochat.config import ModelConfig, derive_model_config


def naive_greedy(model, ids, n):
    """Reference: full forward over the whole sequence for every new token (no cache)."""
    seq = list(ids)
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq], device=device))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    out = {}
    for n_kv in (0, 2):
        m = randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, n_kv_head=n_kv, n_embd=64, head_dim=16,
                                              seed=n_kv), seed=10 + n_kv)
        out[n_kv] = m.eval()
    return out


@pytest.mark.parametrize("n_kv", [0, 2])
def test_greedy_matches_naive_loop(tiny_tokenizer, models, n_kv):
    model = models[n_kv]
    engine = Engine(model, tiny_tokenizer)
    for prompt in ["The quick brown", "To be, or not", "def add(a, b):"]:
        ids = tiny_tokenizer.encode(prompt, prepend=tiny_tokenizer.bos_id)
        seqs, masks = engine.generate_batch(ids, 1, SamplingParams(temperature=0, max_tokens=20))
        ref = naive_greedy(model, ids, 20)
        # the engine stops early at <|bos|>/<|assistant_end|>; compare up to its length
        assert seqs[0] == ref[: len(seqs[0])] and len(seqs[0]) > 0
        assert all(m == 1 for m in masks[0])


def test_sampling_rows_differ_and_seed_reproduces(tiny_tokenizer, models):
    engine = Engine(models[0], tiny_tokenizer)
    ids = tiny_tokenizer.encode("Once upon", prepend=tiny_tokenizer.bos_id)
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=123)
    a, _ = engine.generate_batch(ids, 8, p)
    b, _ = engine.generate_batch(ids, 8, p)
    assert a == b
    assert len({tuple(s) for s in a}) > 1
    c, _ = engine.generate_batch(ids, 8, SamplingParams(temperature=1.0, max_tokens=16, seed=124))
    assert c != a


def _sample(logits, temperature, top_k, top_p, g):
    """Every row with the same settings through the engine's per-row sampler."""
    n = logits.size(0)
    u = torch.rand(n, generator=g) if g is not None else torch.zeros(n)
    return sample_rows(logits, torch.full((n,), float(temperature)), [top_k] * n, [top_p] * n, u)


def test_sample_rows_top_k_top_p():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]] * 200)
    g = torch.Generator().manual_seed(0)
    toks = _sample(logits, 1.0, 2, None, g)
    assert set(toks.tolist()) <= {0, 1} and len(set(toks.tolist())) == 2
    toks = _sample(logits, 1.0, None, 0.5, g)  # p(0) = 0.71 > 0.5: nucleus is token 0 alone
    assert set(toks.tolist()) == {0}
    assert _sample(logits[:1], 0.0, None, None, None).item() == 0


def test_sampling_frequencies_match_the_distribution():
    """The inverse-CDF sampler draws each token with its softmax probability and never a zero-probability one."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.0, 0.05])
    logits = probs.clamp(min=1e-30).log().expand(20000, -1).clone()
    logits[:, probs == 0] = float("-inf")
    g = torch.Generator().manual_seed(0)
    toks = _sample(logits, 1.0, None, None, g)
    freq = torch.bincount(toks, minlength=6).float() / toks.numel()
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.012), freq  # ~3.5 standard errors at n = 20000
    again = _sample(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    assert torch.equal(toks, again)


def _flat_search(probs, u):
    """Reference inverse CDF in float64: the first token whose cumulative mass exceeds u * total."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:], right=True).squeeze(-1)


def test_two_level_inverse_cdf_picks_the_flat_searchs_token():
    """The compiled step's inverse CDF (block sums, then a search within one block) picks the same token as one
    cumsum + searchsorted over the vocabulary: zero-mass tokens and whole zero-mass blocks, u exactly on a cell
    boundary, vocabularies that are not a multiple of the block (zero padded) or smaller than one block. Integer
    masses and u = m / 4096 keep every sum and u * total exact, so both must agree token for token."""
    from picochat.engine.sampling import _inverse_cdf

    g = torch.Generator().manual_seed(0)
    for V in (1000, 384, 50):
        n = 40
        probs = torch.randint(0, 4, (n, V), generator=g).float()  # masses 0..3: a quarter of the tokens are zero
        probs[:8, : V // 2] = 0  # the first half empty: whole zero blocks before the mass
        probs[8:16, V // 2 :] = 0  # ... and after it
        probs[16] = 0
        probs[16, V - 1] = 3  # all mass on the last token (in the padded block when V % 128)
        probs[17] = 0
        probs[17, 0] = 1  # all mass on the first
        for _ in range(30):
            u = torch.randint(0, 4096, (n,), generator=g).float() / 4096
            ref = _flat_search(probs, u)
            assert torch.equal(_inverse_cdf(probs, u), ref)
            two = _inverse_cdf(probs, u, block=128)
            assert torch.equal(two, ref), (V, (two != ref).nonzero()[:3])
            assert bool((probs.gather(1, two[:, None]) > 0).all())
        # u on the boundaries: mass 1 on 4 tokens (the middle two across a block edge when V > 128), t = u * 4 lands
        # exactly on a cumulative mass and the draw is the next token with mass (right=True)
        at = [0, V // 4, V // 4 + 1, V // 2] if V <= 128 else [0, 127, 128, 300]
        probs = torch.zeros(4, V)
        probs[:, at] = 1
        u = torch.tensor([0.0, 0.25, 0.5, 0.75])
        assert _inverse_cdf(probs, u, block=128).tolist() == at == _flat_search(probs, u).tolist()


def test_two_level_inverse_cdf_float_masses():
    """Softmax-like float masses with exact zeros: the two-level draw agrees with a float64 flat search (away from
    cell boundaries, where float32 sums may round either way) and never returns a zero-mass or out-of-range token,
    u just below 1 included (where float32 rounding can step past the row's mass)."""
    from picochat.engine.sampling import _inverse_cdf

    g = torch.Generator().manual_seed(1)
    n, V = 64, 1000
    probs = torch.softmax(torch.randn(n, V, generator=g) * 3, -1)
    probs[torch.rand(n, V, generator=g) < 0.5] = 0
    probs[:, V - 37 :] = 0  # the tail (and the padded block) empty
    cdf = probs.double().cumsum(-1) / probs.double().sum(-1, keepdim=True)
    for i in range(50):
        u = torch.rand(n, generator=g) if i else torch.full((n,), 1 - 2**-24)
        got = _inverse_cdf(probs, u, block=128)
        ref = _flat_search(probs, u)
        near = ((cdf - u.double()[:, None]).abs() < 1e-5).any(-1)  # u within rounding of a cell edge
        assert torch.equal(got[~near], ref[~near])
        assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_compiled_sample_plain_greedy_rows_and_draws():
    """sample_plain as compiled (unnormalised exp, greedy rows as a u = 0 draw from the indicator of the maxima, the
    two-level inverse CDF): greedy rows return argmax, the first of tied maxima included; sampled rows return the
    token of a float64 softmax + flat search (away from cell boundaries)."""
    from picochat.engine import sample_plain

    g = torch.Generator().manual_seed(2)
    n, V = 12, 1000
    logits = torch.randn(n, V, generator=g) * 4
    logits[0, [17, 700]] = 50.0  # a tie: argmax is the first
    logits[1, 999] = 50.0  # the maximum in the padded last block
    logits[2, : V // 2] = float("-inf")
    temperature = torch.tensor([0.0, -1.0, 0.0, 1.0, 0.7, 1.3, 1.0, 2.0, 0.0, 0.5, 1.0, 1.0])
    greedy = temperature <= 0
    step = torch.compile(sample_plain, fullgraph=True, dynamic=True)
    for _ in range(40):
        u = torch.rand(n, generator=g)
        tok = step(logits, temperature, u)
        assert torch.equal(tok[greedy], logits[greedy].argmax(-1))
        z = logits[~greedy].double() / temperature[~greedy].double()[:, None]
        p = torch.softmax(z, -1)
        ref = _flat_search(p, u[~greedy])
        cdf = p.cumsum(-1)
        near = ((cdf - u[~greedy].double()[:, None]).abs() < 1e-5).any(-1)
        assert torch.equal(tok[~greedy][~near], ref[~near])
    assert tok[0].item() == 17 and tok[1].item() == 999


def test_bf16_cache_with_per_row_positions(tiny_tokenizer, models):
    """Rows of different prompt lengths in one bf16 batch (the server's case on GPUs): the per-row cache write must
    cast k/v (fp32 after the rotary) to the cache dtype (it once raised in index_put), and each row gets the tokens
    its request gets alone."""
    from picochat.engine import Batch, Request

    tok = tiny_tokenizer
    engine = Engine(models[2], tok, dtype=torch.bfloat16)
    prompts = [tok.encode(t, prepend=tok.bos_id) for t in ["The", "To be, or not to be"]]
    p = SamplingParams(temperature=0, max_tokens=10)
    alone = [[ev.token for step in engine.generate(ids, 1, p) for ev in step] for ids in prompts]
    batch = Batch(engine, 4)
    got = {0: [], 1: []}
    for rid, ids in enumerate(prompts):  # one after the other: the second joins at another position
        batch.add([Request(rid, ids, 1, p, lambda ev, rid=rid: got[rid].append(ev.token))])
        batch.step()
    while batch.rows:
        batch.step()
    assert engine.dtype == torch.bfloat16 and batch.cache.k.dtype == torch.bfloat16
    assert [got[0], got[1]] == alone and len(alone[1]) == 10


def test_prompt_too_long(tiny_tokenizer, models):
    engine = Engine(models[0], tiny_tokenizer)
    with pytest.raises(UserError, match="context"):
        list(engine.generate([1] * 500))


def test_max_tokens_and_context_limit(tiny_tokenizer):
    """A model that never ends its reply: max_tokens binds exactly, and a prompt near the context's end stops with
    "length" at the context's last position (each new token's position must exist), whatever max_tokens says."""
    tok = tiny_tokenizer
    q = tok.encode("q")[0]
    engine = Engine(ScriptedModel(tok.vocab_size, {}, default=q), tok)  # context 64
    events = _events(engine, [tok.bos_id], temperature=1, seed=0, max_tokens=5)
    assert [ev.token for ev in events] == [q] * 5 and events[-1].finish_reason == "length"
    assert [ev.finish_reason for ev in events[:-1]] == [None] * 4
    events = _events(engine, [tok.bos_id] * 60, temperature=1, seed=0, max_tokens=100)
    assert len(events) == engine.context - 60 == 4 and events[-1].finish_reason == "length"


class ScriptedModel(nn.Module):
    """Next token = table[last token]: a deterministic 'model' to test the engine's state machine."""

    def __init__(self, vocab_size, table, default):
        super().__init__()
        self.config = derive_model_config(ModelConfig(depth=1, head_dim=8, n_embd=8, vocab_size=vocab_size,
                                                      sequence_len=64))
        self.dummy = nn.Parameter(torch.zeros(1))
        self.table = table
        self.default = default
        self.calls = 0

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last=False):
        self.calls += 1
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.table.get(int(idx[b, t]), self.default)] = 10.0
        return logits


def test_forced_tool_output(tiny_tokenizer):
    tok = tiny_tokenizer
    sid = tok.special_id
    code = tok.encode("1+2")
    done_tok = tok.encode("x")[0]
    chain = [sid("<|assistant_start|>"), sid("<|python_start|>"), *code, sid("<|python_end|>")]
    table = {a: b for a, b in zip(chain, chain[1:])}
    table[sid("<|output_end|>")] = done_tok
    table[done_tok] = sid("<|assistant_end|>")
    model = ScriptedModel(tok.vocab_size, table, default=tok.encode("q")[0])
    calls = []

    def tool(src):
        calls.append(src)
        return str(eval(src))  # the test's own trusted tool

    engine = Engine(model, tok, tool=tool)
    prompt = [tok.bos_id, sid("<|user_start|>"), *tok.encode("add"), sid("<|user_end|>"), sid("<|assistant_start|>")]
    seqs, masks = engine.generate_batch(prompt, 2, SamplingParams(temperature=0, max_tokens=30))
    out = [sid("<|output_start|>"), *tok.encode("3"), sid("<|output_end|>")]
    expected = [sid("<|python_start|>"), *code, sid("<|python_end|>"), *out, done_tok]
    assert calls == ["1+2", "1+2"]
    for s, m in zip(seqs, masks):
        assert s == expected
        assert m == [1] * (len(code) + 2) + [0] * len(out) + [1]
    # streaming view: the output block is marked forced and its own segment
    events = [e for step in engine.generate(prompt, 1, SamplingParams(temperature=0, max_tokens=30)) for e in step]
    segs = [(e.segment, e.forced) for e in events]
    assert segs[: len(code) + 2] == [("python", False)] * (len(code) + 2)
    assert segs[len(code) + 2 : len(code) + 2 + len(out)] == [("output", True)] * len(out)
    assert "".join(e.text for e in events if e.segment == "output") == "3"
    assert events[-1].finish_reason == "stop"


def test_tool_exception_becomes_text(tiny_tokenizer):
    tok = tiny_tokenizer
    sid = tok.special_id
    table = {sid("<|assistant_start|>"): sid("<|python_start|>"), sid("<|python_start|>"): sid("<|python_end|>"),
             sid("<|output_end|>"): sid("<|assistant_end|>")}
    model = ScriptedModel(tok.vocab_size, table, default=sid("<|assistant_end|>"))

    def bad_tool(src):
        raise RuntimeError("boom")

    engine = Engine(model, tok, tool=bad_tool)
    seqs, _ = engine.generate_batch([tok.bos_id, sid("<|assistant_start|>")], 1, SamplingParams(temperature=0))
    assert "Error: RuntimeError: boom" in tok.decode(seqs[0])


def test_stop_strings_are_cut(tiny_tokenizer, models):
    engine = Engine(models[0], tiny_tokenizer)
    ids = tiny_tokenizer.encode("The quick", prepend=tiny_tokenizer.bos_id)
    full = "".join(e.text for s in engine.generate(ids, 1, SamplingParams(temperature=0, max_tokens=30)) for e in s)
    assert len(full) > 6
    stop = full[3:6]
    cut_events = [e for s in engine.generate(ids, 1, SamplingParams(temperature=0, max_tokens=30, stop=(stop,)))
                  for e in s]
    text = "".join(e.text for e in cut_events)
    assert text == full[: full.find(stop)] and cut_events[-1].finish_reason == "stop"


def test_scheduler_matches_independent_generation(tiny_tokenizer, models):
    """Requests of different prompt lengths sharing decode steps give the same tokens as run alone."""
    import threading

    engine = Engine(models[2], tiny_tokenizer)
    prompts = ["The", "To be, or not to be", "In the beginning God", "def add(a, b):\n    return"]
    params = SamplingParams(temperature=0, max_tokens=12)
    alone = [engine.generate_batch(tiny_tokenizer.encode(p, prepend=tiny_tokenizer.bos_id), 1, params)[0][0]
             for p in prompts]
    sched = Scheduler(engine, max_batch=3)
    results = {i: [] for i in range(len(prompts))}
    done = threading.Event()
    finished = []

    terminal = {tiny_tokenizer.bos_id, tiny_tokenizer.special_id("<|assistant_end|>")}

    def cb(i):
        def on_event(ev):
            if ev.token >= 0 and not (ev.finish_reason == "stop" and ev.token in terminal):
                results[i].append(ev.token)
            if ev.finish_reason:
                finished.append(i)
                if len(finished) == len(prompts):
                    done.set()
        return on_event

    sched.start()
    try:
        for i, p in enumerate(prompts):  # 4 requests, 3 rows: the last waits for a free row
            sched.submit(tiny_tokenizer.encode(p, prepend=tiny_tokenizer.bos_id), params, 1, cb(i))
        assert done.wait(30)
    finally:
        sched.stop()
    for i in range(len(prompts)):
        assert results[i] == alone[i], i


class PolicyModel(nn.Module):
    """Next token = policy(every token fed so far): a scripted 'model' whose script may repeat tokens (a bigram
    table cannot script real code, whose tokens repeat). Batch 1 only; prefill (cache position 0) restarts it."""

    def __init__(self, vocab_size, policy, sequence_len=2048):
        super().__init__()
        self.config = derive_model_config(ModelConfig(depth=1, head_dim=8, n_embd=8, vocab_size=vocab_size,
                                                      sequence_len=sequence_len))
        self.dummy = nn.Parameter(torch.zeros(1))
        self.policy = policy
        self.history: list[int] = []

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last=False):
        assert idx.size(0) == 1
        if kv_cache is None or (isinstance(kv_cache.pos, int) and kv_cache.pos == 0):
            self.history = []
        self.history += idx[0].tolist()
        logits = torch.zeros(1, idx.size(1), self.config.vocab_size)
        logits[0, -1, self.policy(self.history)] = 10.0
        return logits


@pytest.mark.parametrize("code,expect", [
    ("while True: pass", "timed out"),
    ("x = bytearray(2*1024**3)", "memory limit"),
    ("print('ab'*500000)", "abab"),
    ("import subprocess; subprocess.run(['echo', 'hi'])", "Error"),
])
def test_python_tool_failures_never_break_generation(tiny_tokenizer, code, expect):
    """Real sandbox behind the engine: each failure becomes output text and the row keeps generating after it."""
    from picochat.tools import make_tool

    tok = tiny_tokenizer
    sid = tok.special_id
    prompt = [tok.bos_id, sid("<|assistant_start|>")]
    script = [sid("<|python_start|>"), *tok.encode(code), sid("<|python_end|>")]
    done_tok, out_end = tok.encode("x")[0], sid("<|output_end|>")

    def policy(h):
        gen = h[len(prompt):]
        if len(gen) < len(script):
            return script[len(gen)]
        return done_tok if gen[-1] == out_end else sid("<|assistant_end|>")

    engine = Engine(PolicyModel(tok.vocab_size, policy), tok, tool=make_tool("python", timeout_s=1.0))
    seqs, masks = engine.generate_batch(prompt, 1, SamplingParams(temperature=0, max_tokens=1500))
    s = seqs[0]
    assert s[: len(script)] == script
    o0, o1 = s.index(sid("<|output_start|>")), s.index(out_end)
    out_text = tok.decode(s[o0 + 1 : o1])
    assert expect in out_text and len(out_text) <= 1100, out_text[:300]  # tool output is capped
    assert masks[0][o0 : o1 + 1] == [0] * (o1 + 1 - o0)  # the output block is forced
    assert s[o1 + 1 :] == [done_tok] and masks[0][o1 + 1 :] == [1]  # generation continued after the tool


# ---------------------------------------------------------------------------------------------------------------------
# the compiled decode step


def _tokens_by_request(engine, prompts, params):
    """Greedy tokens of each prompt, all sharing one batch at different positions (the server's case)."""
    from picochat.engine import Batch, Request

    out = {i: [] for i in range(len(prompts))}
    batch = Batch(engine, len(prompts) + 1)
    for rid, ids in enumerate(prompts):
        batch.add([Request(rid, ids, 1, params, lambda ev, rid=rid: out[rid].append(ev.token))])
    while batch.rows:
        batch.step()
    return out


@pytest.mark.parametrize("aot", [True, False])
def test_compiled_engine_matches_eager(tiny_tokenizer, models, aot):
    """The compiled step (frozen weights, C++ GEMMs at batch 1, dynamic batch and kv length, one-query attention as
    reductions) gives the eager engine's greedy tokens alone, with several samples, and with rows of different
    requests at different positions; and two graphs (batch 1, batch >= 2) serve all of it: no recompiles. The batch-1
    graph is built ahead of time (AOTInductor, the fp32 CPU default) or by torch.compile (as in bf16): both run."""
    from torch._dynamo.utils import counters

    tok = tiny_tokenizer
    model = models[2]  # GQA: 4 query heads share 2 kv heads
    eager = Engine(model, tok, dtype=torch.float32)
    compiled = Engine(model, tok, dtype=torch.float32, compile=True)
    assert compiled.step.aot_batch1  # fp32 on CPU
    compiled.step.aot_batch1 = aot
    torch._dynamo.reset()  # dynamo caches graphs per code object: the other parametrization's would be reused
    graphs = counters["stats"]["unique_graphs"]
    prompts = [tok.encode(t, prepend=tok.bos_id) for t in ["The quick brown", "To be, or not to be, that", "def"]]
    p = SamplingParams(temperature=0, max_tokens=12)
    for ids in prompts:
        assert compiled.generate_batch(ids, 1, p) == eager.generate_batch(ids, 1, p)
        assert compiled.generate_batch(ids, 3, p) == eager.generate_batch(ids, 3, p)
    assert _tokens_by_request(compiled, prompts, p) == _tokens_by_request(eager, prompts, p)
    # up to the last position of the context (the kv length's largest value): stops there with "length"
    ids = (prompts[1] * 20)[: compiled.context - 8]
    long = SamplingParams(temperature=0, max_tokens=50)
    events = [ev for step in compiled.generate(ids, 1, long) for ev in step]
    assert [ev.token for ev in events] == [ev.token for step in eager.generate(ids, 1, long) for ev in step]
    assert events[-1].finish_reason == "length" and len(events) == 8  # the last step attends to all 128 positions
    # the server's path: a warm-up on its own small cache, then the scheduler's batch built outside inference mode
    compiled.warmup(4)
    scheduler = Scheduler(compiled, max_batch=4)
    scheduler.start()
    done, got = threading.Event(), []
    scheduler.submit(prompts[1], p, 2, lambda ev: (got.append(ev), ev.finish_reason and len(
        [e for e in got if e.finish_reason]) == 2 and done.set()))
    assert done.wait(60)
    scheduler.stop()
    # dynamo's graphs: batch >= 2, plus batch 1 unless that one was built ahead of time (once, by export)
    assert counters["stats"]["unique_graphs"] - graphs == (1 if aot else 2)
    assert (compiled.step.aot is not None) == aot


def test_generate_reuses_its_cache_without_leaking_earlier_calls(tiny_tokenizer):
    """generate() keeps its cache for the next call (no zeroing per call); what a call returns never depends on what
    ran before it: a long 4-sample call, then a shorter prompt with 2 samples equals the same call on a new engine."""
    tok = tiny_tokenizer
    model = randomize_outputs(make_tiny_model(tok.vocab_size, n_embd=64, head_dim=16, seed=7), seed=8).eval()
    p = SamplingParams(temperature=1.0, max_tokens=20, seed=11)
    long_ids = tok.encode("a much longer prompt that fills more of the cache than the next", prepend=tok.bos_id)
    short_ids = tok.encode("hi", prepend=tok.bos_id)
    used = Engine(model, tok)
    used.generate_batch(long_ids, 4, p)
    spare = used._spare
    assert spare is not None and spare.k.abs().sum() > 0  # the stale entries are there
    assert used.generate_batch(short_ids, 2, p) == Engine(model, tok).generate_batch(short_ids, 2, p)
    assert used._spare is spare  # reused, not reallocated


def test_batch1_kernel_choice_follows_the_weights_size():
    """max_autotune (inductor's C++ GEMVs) for the batch-1 graph: always in fp32 on CPU; in bf16 only while the
    weights fit in half the last-level cache (from memory its bf16 GEMV is slower than oneDNN's); never on CUDA."""
    from picochat.engine.steps import autotune_batch1 as _autotune_batch1, compile_options as _compile_options

    cpu, mb = torch.device("cpu"), 2**20
    assert _autotune_batch1(cpu, torch.float32, 55 * mb, 32 * mb)
    assert _autotune_batch1(cpu, torch.bfloat16, 10 * mb, 32 * mb)  # depth 4: in cache
    assert not _autotune_batch1(cpu, torch.bfloat16, 27 * mb, 32 * mb)  # depth 6: from memory
    assert not _autotune_batch1(cpu, torch.bfloat16, 10 * mb, 0)  # cache size unknown: oneDNN
    assert not _autotune_batch1(torch.device("cuda"), torch.float32, mb, 32 * mb)
    assert _compile_options(cpu, True, True)["max_autotune"]
    assert "max_autotune" not in _compile_options(cpu, True, False)
    assert "max_autotune" not in _compile_options(cpu, False, True)


def test_compiled_bf16_prefill_reads_cast_weights_with_the_same_result(tiny_tokenizer):
    """A compiled bf16 engine prefills with bf16 copies of the linear weights (cast once, not by autocast at every
    prefill): the logits and the cache are exactly those of autocast over the fp32 weights."""
    tok = tiny_tokenizer
    model = randomize_outputs(make_tiny_model(tok.vocab_size, n_embd=64, head_dim=16, seed=3), seed=4).eval()
    ids = tok.encode("The quick brown fox", prepend=tok.bos_id)
    compiled = Engine(model, tok, dtype=torch.bfloat16, compile=True)  # prefill is eager: nothing compiles here
    plain = Engine(model, tok, dtype=torch.bfloat16)
    assert compiled.cast_weights and not plain.cast_weights
    a, b = compiled.new_cache(1), plain.new_cache(1)
    assert torch.equal(compiled.prefill(ids, a, 0), plain.prefill(ids, b, 0))
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_bf16_batch1_step_built_ahead_of_time_matches_compiled(tiny_tokenizer):
    """In bf16 (weights small enough for the C++ GEMVs) the batch-1 step is built ahead of time from the cast weight
    copies; its next-token logits over several steps match the torch.compile build of the same step to bf16
    rounding, with the same greedy tokens, and the kv length reaches the whole context (no specialisation on it)."""
    tok = tiny_tokenizer
    model = randomize_outputs(make_tiny_model(tok.vocab_size, n_embd=64, head_dim=16, seed=3), seed=4).eval()
    aot = Engine(model, tok, dtype=torch.bfloat16, compile=True)
    dyn = Engine(model, tok, dtype=torch.bfloat16, compile=True)
    assert aot.step.aot_batch1
    dyn.step.aot_batch1 = False
    ids = (tok.encode("The quick brown fox", prepend=tok.bos_id) * 20)[: aot.context - 6]
    steps = []
    for e in (aot, dyn):
        cache, out = e.new_cache(1), []
        with torch.inference_mode():
            t = e.prefill(ids, cache, 0).argmax(-1)
            for i in range(6):  # positions context-6 .. context-1: the last step attends to every position
                z = torch.zeros(1)
                logits, t = e.decode_one_token(t, cache, [len(ids) + i], z, z)
                out.append(logits.float())
        steps.append(torch.cat(out))
    assert aot.step.aot is not None and dyn.step.aot is None
    scale = steps[1].abs().max()
    assert torch.allclose(steps[0], steps[1], atol=0.02 * scale), (steps[0] - steps[1]).abs().max() / scale
    assert torch.equal(steps[0].argmax(-1), steps[1].argmax(-1))


def test_aot_step_comes_from_the_cache_and_a_corrupt_entry_is_rebuilt(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """The batch-1 library is kept under a key of the weights (and the rest it depends on): a second engine over the
    same weights loads it without building, different weights build their own, a corrupt file is replaced by a
    fresh build rather than crashing, and a cache folder that cannot be written costs a warning, not the engine;
    every engine generates the same tokens as a fresh build would."""
    import torch._inductor

    monkeypatch.setenv("PICOCHAT_AOT_CACHE", str(tmp_path))
    builds = []
    real = torch._inductor.aoti_compile_and_package
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: builds.append(1) or real(*a, **k))
    tok = tiny_tokenizer
    model = randomize_outputs(make_tiny_model(tok.vocab_size, n_embd=64, head_dim=16, seed=5), seed=6).eval()
    ids = tok.encode("To be, or not", prepend=tok.bos_id)
    p = SamplingParams(temperature=0, max_tokens=10)
    want = Engine(model, tok, dtype=torch.float32).generate_batch(ids, 1, p)

    def run():
        return Engine(model, tok, dtype=torch.float32, compile=True).generate_batch(ids, 1, p)

    assert run() == want and len(builds) == 1
    entries = list(tmp_path.glob("decode_batch1-*.pt2"))
    assert len(entries) == 1
    assert run() == want and len(builds) == 1  # loaded, not built
    entries[0].write_bytes(b"not a package")
    assert run() == want and len(builds) == 2  # rebuilt over the corrupt entry
    assert list(tmp_path.glob("decode_batch1-*.pt2")) == entries and entries[0].stat().st_size > 1000
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # other weights: another key, another build
    want = Engine(model, tok, dtype=torch.float32).generate_batch(ids, 1, p)
    assert run() == want and len(builds) == 3 and len(list(tmp_path.glob("decode_batch1-*.pt2"))) == 2
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("PICOCHAT_AOT_CACHE", str(tmp_path / "a_file" / "aot"))  # cannot be created
    capsys.readouterr()
    assert run() == want and len(builds) == 4
    assert "could not keep the built decode step" in capsys.readouterr().err


def test_compiled_engine_refuses_changed_weights(tiny_tokenizer):
    """Compiling freezes the weights into the graph; sampling after they changed would silently use stale ones."""
    tok = tiny_tokenizer
    model = randomize_outputs(make_tiny_model(tok.vocab_size, n_embd=64, head_dim=16, seed=5), seed=6).eval()
    engine = Engine(model, tok, dtype=torch.float32, compile=True)
    ids = tok.encode("Hello", prepend=tok.bos_id)
    p = SamplingParams(temperature=0, max_tokens=2)
    assert len(engine.generate_batch(ids, 1, p)[0][0]) > 0
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="weights changed"):
        engine.generate_batch(ids, 1, p)


def test_sample_rows_each_row_its_own_settings():
    """One call samples rows of different requests: greedy, top-k 1, a tight nucleus and plain temperature 1."""
    from picochat.engine import inference_dtype, sample_rows

    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]]).expand(4, -1).clone()
    temps = torch.tensor([0.0, 1.0, 1.0, 1.0])
    for u in (0.0, 0.5, 0.999):
        toks = sample_rows(logits, temps, [None, 1, None, None], [None, None, 0.5, None], torch.full((4,), u))
        assert toks[:3].tolist() == [1, 1, 1]  # argmax, the single top-k token, the nucleus's only token
    # the last row follows the full distribution: the inverse CDF maps u to tokens 0..3 in order
    probs = torch.softmax(logits[0], -1)
    cdf = probs.cumsum(0)
    for token in range(4):
        u = float(cdf[token] - probs[token] / 2)  # the middle of that token's CDF interval
        assert sample_rows(logits[:1], temps[3:], [None], [None], torch.tensor([u])).item() == token
    assert inference_dtype(torch.device("cpu"), compile=False) == torch.float32  # eager CPU autocast re-casts weights


def test_penalties_subtract_from_the_logits_of_sampled_tokens():
    logits = torch.zeros(3, 5)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), SamplingParams(),
              SamplingParams(frequency_penalty=-1.0)]
    out = penalize(logits, [{1: 2, 3: 1}, {1: 5}, {4: 3}], params)
    assert out.tolist() == [[0, -2.0, 0, -1.5, 0], [0] * 5, [0, 0, 0, 0, 3.0]]
    assert logits.eq(0).all()  # a new tensor: the step's logits are left as they were


def test_penalties_count_the_replys_text_not_its_tool_calls(tiny_tokenizer):
    """Code repeats tokens by nature (12*12) and a second tool call must not be discouraged: only text tokens the
    row sampled are counted, and a row inside a python block is not penalized (batch.py)."""
    from picochat.engine import Request, Row, TextStream
    from picochat.engine.rows import Specials, Uniforms

    tok = tiny_tokenizer
    sid = tok.special_id
    specials = Specials(tok.bos_id, sid("<|assistant_end|>"), sid("<|python_start|>"), sid("<|python_end|>"),
                        sid("<|output_start|>"), sid("<|output_end|>"))
    params = SamplingParams(frequency_penalty=1.0)
    row = Row(Request(0, [tok.bos_id], 1, params, lambda ev: None), 0, 1, TextStream(()), Uniforms(None, 0, 0.0))
    x, one, plus = tok.encode("x")[0], tok.encode("1")[0], tok.encode("+")[0]
    for t, forced in [(x, False), (specials.python_start, False), (one, False), (plus, False), (one, False),
                      (specials.python_end, False), (specials.output_start, True), (one, True),
                      (specials.output_end, True), (x, False), (one, False)]:
        row.accept(t, forced, specials, tok.decode_bytes([t]), context=64)
    assert row.sampled == {x: 2, one: 1}  # the text's x, x and 1; not the code's 1 + 1, the markers or the output
    assert row.segment == "text" and not row.done


def test_a_row_inside_a_tool_call_is_not_penalized(tiny_tokenizer, monkeypatch):
    """The batch hands `penalize` the row's text counts while it writes text and nothing while it writes code."""
    import picochat.engine.batch as batch

    tok = tiny_tokenizer
    sid = tok.special_id
    x, y = tok.encode("x")[0], tok.encode("y")[0]
    chain = [sid("<|assistant_start|>"), x, sid("<|python_start|>"), y, sid("<|python_end|>")]
    table = {a: b for a, b in zip(chain, chain[1:])}
    table[sid("<|output_end|>")] = sid("<|assistant_end|>")
    seen = []
    monkeypatch.setattr(batch, "penalize", lambda logits, sampled, params: seen.append(dict(sampled[0])) or logits)
    engine = Engine(ScriptedModel(tok.vocab_size, table, default=sid("<|assistant_end|>")), tok, tool=lambda c: "3")
    prompt = [tok.bos_id, sid("<|assistant_start|>")]
    (seq,), _ = engine.generate_batch(prompt, 1, SamplingParams(temperature=0, max_tokens=20, frequency_penalty=1.0))
    assert seq[:4] == [x, sid("<|python_start|>"), y, sid("<|python_end|>")]
    # picking x (nothing written yet), python_start (x written), y and python_end (inside the call: nothing), then
    # assistant_end (text again: x)
    assert seen == [{}, {x: 1}, {}, {}, {x: 1}]


def test_greedy_with_a_presence_penalty_stops_repeating(tiny_tokenizer, models):
    engine = Engine(models[0], tiny_tokenizer)
    ids = tiny_tokenizer.encode("The quick brown", prepend=tiny_tokenizer.bos_id)
    (plain,), _ = engine.generate_batch(ids, 1, SamplingParams(temperature=0, max_tokens=24))
    assert len(set(plain)) < len(plain)  # a random model's greedy reply repeats tokens: the case to fix
    (once,), _ = engine.generate_batch(ids, 1, SamplingParams(temperature=0, max_tokens=24, presence_penalty=1e4))
    assert len(set(once)) == len(once) == 24 and once[0] == plain[0]  # the first token has nothing to avoid yet
    # sampled rows too, and a seed still reproduces them
    p = SamplingParams(temperature=1.0, max_tokens=24, seed=5, frequency_penalty=1e4)
    (a,), _ = engine.generate_batch(ids, 1, p)
    (b,), _ = engine.generate_batch(ids, 1, p)
    assert a == b and len(set(a)) == len(a)


def test_decode_n_chunks_match_single_steps(tiny_tokenizer, models):
    """generate() decodes up to `chunk` tokens per Python round trip (decode_n) and keeps each row's tokens up to its
    first event; the result equals stepping one token at a time: greedy with several rows (which stop at different
    points), and seeded sampling of one row (the same uniforms are drawn in the same order)."""
    tok = tiny_tokenizer
    engine = Engine(models[0], tok)
    ids = tok.encode("To be, or not", prepend=tok.bos_id)
    results = {}
    for chunk in (1, 8):
        engine.chunk = chunk
        results[chunk] = (engine.generate_batch(ids, 4, SamplingParams(temperature=0, max_tokens=21)),
                          engine.generate_batch(ids, 1, SamplingParams(temperature=1.0, max_tokens=21, seed=7)))
    assert results[1] == results[8]
    assert len(results[8][1][0][0]) > 8  # the sampled row ran past one chunk


def test_row_finished_at_first_token_gets_one_event(tiny_tokenizer, models):
    """A request that ends at its first token (max_tokens=1) while another keeps the batch stepping emits exactly one
    event; it used to be stepped once more before leaving the batch and emitted a second, duplicate finish."""
    from picochat.engine import Batch, Request

    tok = tiny_tokenizer
    batch = Batch(Engine(models[0], tok), 4)
    events = {0: [], 1: []}
    ids = tok.encode("The", prepend=tok.bos_id)
    batch.add([Request(0, ids, 1, SamplingParams(temperature=0, max_tokens=6), events[0].append)])
    batch.add([Request(1, ids, 1, SamplingParams(temperature=0, max_tokens=1), events[1].append)])
    while batch.rows:
        batch.step()
    assert [e.finish_reason for e in events[1]] == ["length"]
    assert sum(e.finish_reason is not None for e in events[0]) == 1


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs: the padding and bucketing logic, checked on CPU with a capture that re-runs the step eagerly (the real
# capture runs in tests/test_gpu.py when a GPU is present)


def _replay_eagerly(fn, pool):
    """A stand-in for cuda_graph with its semantics: fn runs once at capture (like the warm-up), and each replay
    recomputes the outputs into the tensors the capture returned."""
    out = fn()

    def replay():
        for a, b in zip(out, fn()):
            a.copy_(b)
    return replay, out


def _staggered(engine, prompts, params, steps_between=4):
    """Tokens of each request when they join one batch one after another, `steps_between` decode steps apart."""
    from picochat.engine import Batch, Request

    out = {i: [] for i in range(len(prompts))}
    batch = Batch(engine, 4)
    for rid, ids in enumerate(prompts):
        batch.add([Request(rid, ids, 1, params, lambda ev, rid=rid: out[rid].append(ev.token))])
        for _ in range(steps_between):
            batch.step()
    while batch.rows:
        batch.step()
    return out


def test_graphed_steps_pad_and_bucket_without_changing_tokens(tiny_tokenizer, models):
    """GraphedSteps pads the live rows to a power of two and the attended length to a multiple of kv_step, and its
    capture's warm-up writes into the cache. With requests joining a running batch (1 -> 2 -> 3 live rows, so 3 rows
    run in a bucket of 4 with one padding row) and positions crossing many kv buckets, every request gets the same
    tokens as the plain engine: greedy, and seeded sampling (the same uniforms reach the same rows)."""
    tok = tiny_tokenizer
    model = models[2]
    prompts = [tok.encode(t, prepend=tok.bos_id) for t in ["The quick brown", "To be, or not to be, that", "def"]]
    plain = Engine(model, tok, dtype=torch.float32)
    graphed = Engine(model, tok, dtype=torch.float32)
    graphed.step = GraphedSteps(graphed.step, graphed.device, graphed.context, capture=_replay_eagerly, kv_step=8)
    for p in (SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=1.0, max_tokens=24, seed=5)):
        want = _staggered(plain, prompts, p)
        assert _staggered(graphed, prompts, p) == want
        assert sum(len(t) for t in want.values()) > 40  # ran long enough to cross several kv buckets
    assert {nb for nb, _ in graphed.step.graphs} == {1, 2, 4}
    assert len({S for _, S in graphed.step.graphs}) >= 4
    # generate() with decode_n chunks through the graphs: the same tokens too
    ids = prompts[1]
    p = SamplingParams(temperature=1.0, max_tokens=20, seed=3)
    assert graphed.generate_batch(ids, 3, p) == plain.generate_batch(ids, 3, p)


def test_cuda_graphs_need_cuda(tiny_tokenizer, models):
    with pytest.raises(UserError, match="needs a CUDA device"):
        Engine(models[0], tiny_tokenizer, cuda_graphs=True)
    assert not isinstance(Engine(models[0], tiny_tokenizer, compile=True).step, GraphedSteps)  # default: CUDA only


# ---------------------------------------------------------------------------------------------------------------------
# wrong results found in review (issue 13): each of these failed before the fix


def _events(engine, ids, n=1, **kw):
    return [ev for step in engine.generate(ids, n, SamplingParams(**kw)) for ev in step]


def test_held_back_text_is_flushed_at_every_finish(tiny_tokenizer, models):
    """Text held back because it could begin a stop string is emitted when the row ends on length or on
    <|assistant_end|>; an incomplete UTF-8 tail is flushed (as U+FFFD, what decode gives) instead of dropped."""
    tok = tiny_tokenizer
    sid = tok.special_id
    engine = Engine(models[0], tok)
    ids = tok.encode("The quick", prepend=tok.bos_id)
    events = _events(engine, ids, temperature=0, max_tokens=12)
    full = "".join(ev.text for ev in events)
    assert events[-1].finish_reason == "length" and full
    held = _events(engine, ids, temperature=0, max_tokens=12, stop=(full[-1] + "☃",))
    assert "".join(ev.text for ev in held) == full and held[-1].finish_reason == "length"
    # ends on <|assistant_end|> right after a character that could begin the stop string
    x = tok.encode("x")[0]
    scripted = Engine(ScriptedModel(tok.vocab_size, {sid("<|assistant_start|>"): x, x: sid("<|assistant_end|>")},
                                    default=x), tok)
    prompt = [tok.bos_id, sid("<|assistant_start|>")]
    ended = _events(scripted, prompt, temperature=0, stop=("x☃",))
    assert "".join(ev.text for ev in ended) == "x" and ended[-1].finish_reason == "stop"
    # the first byte of a two-byte character, then the length limit
    lead = next(i for i in range(tok.vocab_size) if not tok.is_special(i) and tok.decode_bytes([i]) == b"\xc3")
    cut = Engine(ScriptedModel(tok.vocab_size, {}, default=lead), tok)
    tail = _events(cut, prompt, temperature=0, max_tokens=3)
    assert "".join(ev.text for ev in tail) == tok.decode([lead] * 3) == "\ufffd" * 3


def test_generate_batch_drops_the_stop_strings_tokens(tiny_tokenizer, models):
    """generate_batch returns the tokens before the stop string (the streamed text never holds it): every token from
    the one in which the stop string begins is dropped, with its mask."""
    tok = tiny_tokenizer
    engine = Engine(models[0], tok)
    ids = tok.encode("The quick", prepend=tok.bos_id)
    p = SamplingParams(temperature=0, max_tokens=30)
    (toks,), _ = engine.generate_batch(ids, 1, p)
    full = tok.decode(toks)
    stop = full[4:7]
    cut = full.find(stop)
    keep = max(k for k in range(len(toks) + 1) if len(tok.decode(toks[:k])) <= cut)
    (got,), (mask,) = engine.generate_batch(ids, 1, SamplingParams(temperature=0, max_tokens=30, stop=(stop,)))
    assert got == toks[:keep] and len(mask) == keep
    assert stop not in tok.decode(got) and full.startswith(tok.decode(got))


def test_seeded_request_gives_the_same_tokens_alone_and_mixed(tiny_tokenizer, models):
    """A seeded n > 1 request gets the same tokens alone and sharing the Scheduler's batch with other requests that
    finish early (their rows' holes are filled by moving this request's rows), and as generate_batch gives them."""
    tok = tiny_tokenizer
    engine = Engine(models[2], tok)
    ids = tok.encode("Once upon", prepend=tok.bos_id)
    other = tok.encode("To be, or not", prepend=tok.bos_id)
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=9)

    def run(requests):
        sched = Scheduler(engine, max_batch=8)
        outs = []
        for prompt, n, params in requests:  # queued before start: admitted together in one round
            out = {"rows": [[] for _ in range(n)], "done": threading.Event(), "left": n}

            def on_event(ev, out=out):
                if ev.token >= 0:
                    out["rows"][ev.row].append(ev.token)
                if ev.finish_reason:
                    out["left"] -= 1
                    if out["left"] == 0:
                        out["done"].set()
            sched.submit(prompt, params, n, on_event)
            outs.append(out)
        sched.start()
        try:
            assert all(o["done"].wait(30) for o in outs)
        finally:
            sched.stop()
        return [o["rows"] for o in outs]

    alone = run([(ids, 3, p)])[0]
    early = SamplingParams(temperature=1.0, max_tokens=2, seed=1)
    mixed = run([(other, 2, early), (ids, 3, p), (other, 1, SamplingParams(temperature=1.0, max_tokens=5))])[1]
    assert mixed == alone
    assert len({tuple(r) for r in alone}) == 3  # the rows differ from each other
    seqs, _ = engine.generate_batch(ids, 3, p)
    assert [s == r[: len(s)] for s, r in zip(seqs, alone)] == [True] * 3


_KEY_SCRIPT = r"""
import json, sys
import torch
keys = []
for tree in sys.argv[1:]:
    sys.path.insert(0, tree)
    from picochat.config import ModelConfig
    from picochat.engine.aot import aot_key
    from picochat.model import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=1, head_dim=16, n_embd=32, vocab_size=64, sequence_len=32))
    model.init_weights(0)
    keys.append(aot_key(model, 32, torch.float32, {"freezing": True}))
    sys.path.pop(0)
    for name in [m for m in sys.modules if m == "picochat" or m.startswith("picochat.")]:
        del sys.modules[name]
print(json.dumps(keys))
"""


def test_aot_cache_key_follows_the_code_that_feeds_the_graph(tmp_path):
    """The ahead-of-time library's cache key changes when the model, attention or sampler source changes, or the
    package version: after such an edit the cached library would give the old code's tokens."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import picochat

    src = Path(picochat.__file__).parent
    trees = [str(src.parent)]
    for name, edit in [("model.py", "\n# edited\n"), ("attention.py", "\n# edited\n"),
                       ("engine/sampling.py", "\n# edited\n"), ("__init__.py", "\n__version__ = '9.9'\n")]:
        tree = tmp_path / name.replace("/", "_")
        shutil.copytree(src, tree / "picochat", ignore=shutil.ignore_patterns("__pycache__"))
        with open(tree / "picochat" / name, "a") as f:
            f.write(edit)
        trees.append(str(tree))
    out = subprocess.run([sys.executable, "-c", _KEY_SCRIPT, trees[0], *trees], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys[0] == keys[1]  # the same tree twice: the same key
    assert len(set(keys[1:])) == len(keys) - 1, keys
