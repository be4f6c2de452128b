"""Conversation batches (picochat/data/conversations.py) and the shared Packer's mask: mask alignment through
packing and splitting, exact resume, rank sharding, long conversations, all-masked rows, the validation slice; and
the pretraining loader's batches pinned across the Packer change.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_conversations.py
"""

import hashlib
import json
import random
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picochat.common import UserError
from picochat.data.conversations import ConversationLoader, ConversationValidation, conversation_pieces
from picochat.data.corpus import write_corpus
from picochat.data.loader import Packer, PackingLoader, ValidationSlice
from picochat.tasks.chat import ChatTask

BOS = 256


class ByteTokenizer:
    """The two members PackingLoader uses: byte ids 0..255 and BOS 256 (independent of any trained tokenizer, so
    the pinned digest below depends on the loader alone)."""

    bos_id = BOS

    def encode(self, texts, prepend=None, num_threads=1):
        return [([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in texts]


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


# sha256 of the batches and the saved state below, computed on commit ae24ec9 (the Packer before it carried masks;
# `git archive ae24ec9 picochat` put first on PYTHONPATH): the generalised Packer must give pretraining exactly the
# rows and the state it gave before, under both policies, and the same validation slice
PINNED_PRETRAIN_DIGEST = "1c646167940635f0799fd138ed9b52110ed67b8a161e9973d4ec4e0f994b308b"


def pretrain_digest() -> str:
    rng = random.Random(7)
    docs = ["".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 70))) for _ in range(80)]
    write_corpus("pin", docs, rows_per_group=4, val_docs=10)
    h = hashlib.sha256()
    for packing in ("split", "crop"):
        loader = PackingLoader(ByteTokenizer(), "train", B=2, T=24, corpus="pin", buffer_docs=5,
                               tokenizer_threads=1, packing=packing)
        for i in range(60):
            for t in next(loader):
                h.update(t.numpy().tobytes())
            if i == 25:  # a resumed loader continues with the same rows, from a state in the same format
                state = loader.state_dict()
                h.update(json.dumps(state, sort_keys=True).encode())
                loader.close()
                loader = PackingLoader(ByteTokenizer(), "train", B=2, T=24, corpus="pin", buffer_docs=5,
                                       tokenizer_threads=1, packing=packing, state=state)
        assert loader.epoch >= 2, loader.epoch  # the pinned rows cross a pass boundary
        h.update(repr(loader.stats()).encode())
        loader.close()
    val = ValidationSlice(ByteTokenizer(), B=2, T=24, tokens=400, corpus="pin", tokenizer_threads=1)
    for x, y in val.batches():
        h.update(x.numpy().tobytes() + y.numpy().tobytes())
    return h.hexdigest()


def test_pretraining_batches_unchanged_by_the_mask_carrying_packer():
    assert pretrain_digest() == PINNED_PRETRAIN_DIGEST


# ---------------------------------------------------------------------------------------------------------------------
# conversation batches


def tool_conversation(i: int, exchanges: int = 1, words: int = 3) -> dict:
    """Conversation i (its number is in every message, so a piece names its conversation): each exchange is a user
    question and an assistant reply of text, a python call, the tool's output and more text."""
    messages = []
    for k in range(exchanges):
        messages.append({"role": "user", "content": f"q{i} turn {k}: " + "fox " * words})
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": f"a{i}.{k} the dog"},
            {"type": "python", "text": f"{i}+{k}"},
            {"type": "python_output", "text": f"{i + k}"},
            {"type": "text", "text": f"so {i + k}"}]})
    return {"messages": messages}


def expected(tok, conv: dict) -> tuple[list[int], list[int]]:
    """(ids, is_target) built here from the messages, not from the renderer's mask: assistant text, python calls with
    their markers and <|assistant_end|> are targets; BOS, user turns, <|assistant_start|> and tool output are not."""
    sp = tok.special_id
    ids, flags = [tok.bos_id], [0]

    def add(tokens, flag):
        ids.extend(tokens)
        flags.extend([flag] * len(tokens))

    for m in conv["messages"]:
        if m["role"] == "user":
            add([sp("<|user_start|>")] + tok.encode(m["content"]) + [sp("<|user_end|>")], 0)
            continue
        add([sp("<|assistant_start|>")], 0)
        for part in m["content"]:
            if part["type"] == "text":
                add(tok.encode(part["text"]), 1)
            elif part["type"] == "python":
                add([sp("<|python_start|>")] + tok.encode(part["text"]) + [sp("<|python_end|>")], 1)
            else:
                add([sp("<|output_start|>")] + tok.encode(part["text"]) + [sp("<|output_end|>")], 0)
        add([sp("<|assistant_end|>")], 1)
    return ids, flags


def check_batch(tok, x: torch.Tensor, y: torch.Tensor, refs: list[tuple[list[int], list[int]]]) -> set:
    """Assert that every row of (x, y) is BOS-led pieces of the reference conversations whose targets are exactly
    their expected targets (-1 elsewhere, and before every BOS). Returns the (conversation, token index) targets seen
    (of every place a piece matches)."""
    seen = set()
    T = x.shape[1]
    for xr, yr in zip(x.tolist(), y.tolist()):
        assert xr[0] == tok.bos_id
        starts = [j for j, t in enumerate(xr) if t == tok.bos_id] + [T]
        for s, e in zip(starts, starts[1:]):
            body = xr[s + 1:e]
            ok = []
            for c, (ids, flags) in enumerate(refs):
                for o in range(1, len(ids) - len(body) + 1):
                    if ids[o:o + len(body)] != body:
                        continue
                    want = []
                    for j in range(s, e):
                        k = o + j - s  # index in the conversation of the token after position j
                        after_piece = j == e - 1 and e < T  # a BOS comes next
                        want.append(-1 if after_piece or k >= len(ids) or not flags[k] else ids[k])
                    if want == yr[s:e]:
                        ok.append((c, o, len(body) + (e == T)))
            assert ok, f"row piece {body} matches no conversation with the right targets: y={yr[s:e]}"
            for c, o, n in ok if body else []:  # a short tail piece can match several places: all count
                seen |= {(c, k) for k in range(o, min(o + n, len(refs[c][0]))) if refs[c][1][k]}
    return seen


def all_targets(refs) -> set:
    return {(c, k) for c, (ids, flags) in enumerate(refs) for k in range(len(ids)) if flags[k]}


def test_mask_alignment_with_tool_parts_alone_packed_and_split(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = tool_conversation(3)
    ids, flags = expected(tok, conv)
    assert tok.render_conversation(conv)[0] == ids  # the hand-built reference is the same token sequence
    # alone in a row: targets are exactly the assistant tokens (python call and markers included) and assistant_end
    x, y = next(ConversationLoader(tok, ChatTask([conv]), B=1, T=len(ids) - 1))
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [t if f else -1 for t, f in zip(ids[1:], flags[1:])]
    assert tok.special_id("<|python_end|>") in y[0].tolist() and tok.special_id("<|output_end|>") not in y[0].tolist()
    # two conversations in one row: the position before the second BOS is not a target
    convs = [tool_conversation(1), tool_conversation(2)]
    refs = [expected(tok, c) for c in convs]
    row = len(refs[0][0]) + len(refs[1][0])
    x, y = next(ConversationLoader(tok, ChatTask(convs), B=1, T=row - 1))
    assert x[0].tolist().count(tok.bos_id) == 2
    assert check_batch(tok, x, y, refs) == all_targets(refs)
    # split pieces: rows shorter than a conversation, under both policies (turn-boundary pieces; under "split" also
    # the Packer's BOS-led tails, whose added BOS is no target)
    convs = [tool_conversation(i, exchanges=1 + i % 3) for i in range(6)]
    refs = [expected(tok, c) for c in convs]
    for packing in ("pad", "split"):
        loader = ConversationLoader(tok, ChatTask(convs), B=4, T=47, packing=packing, buffer_docs=4)
        seen = set()
        for _ in range(6):
            seen |= check_batch(tok, *next(loader), refs)
        assert seen == all_targets(refs), packing  # every target of every conversation was trained on


def test_packer_split_piece_carries_its_mask():
    p = Packer("split", 4, 100, bos=9)
    p.add(("a",), np.arange(1, 8), mask=np.array([0, 0, 1, 1, 0, 1, 1], dtype=np.int8))  # 7 tokens
    p.add(("b",), np.array([9, 5, 5]), mask=np.array([0, 1, 1], dtype=np.int8))
    rows, masks = np.zeros((2, 6), dtype=np.int64), np.zeros((2, 6), dtype=np.int8)
    assert p.fill(rows[0], lambda: None, masks[0]) == 6
    assert p.fill(rows[1], lambda: None, masks[1]) == 5
    # row 0: b (3) is the largest piece that fits; nothing fits the 3 left, so a (the shortest) fills them and its
    # tail goes back BOS-led; row 1: that tail, its added BOS masked 0
    assert rows[0].tolist() == [9, 5, 5, 1, 2, 3] and masks[0].tolist() == [0, 1, 1, 0, 0, 1]
    assert rows[1, :5].tolist() == [9, 4, 5, 6, 7] and masks[1, :5].tolist() == [0, 1, 0, 1, 1]


def mixed_task(n: int = 14, cropped: int = -1) -> ChatTask:
    """Short and multi-exchange conversations: rows of 48 split some at turn boundaries; conversation `cropped` has
    a question longer than such a row."""
    return ChatTask([tool_conversation(i, exchanges=1 + i % 3, words=40 if i == cropped else 1 + i % 4)
                     for i in range(n)])


@pytest.mark.parametrize("packing", ["pad", "split"])
def test_resume_is_exact_across_passes(tiny_tokenizer, packing):
    kw = dict(B=2, T=47, packing=packing, buffer_docs=5, seed=3)
    ref = ConversationLoader(tiny_tokenizer, mixed_task(9, cropped=4), **kw)
    states, batches, stats = [], [], []
    for _ in range(24):
        states.append(json.loads(json.dumps(ref.state_dict())))  # it goes into checkpoints as JSON
        batches.append(next(ref))
        stats.append(ref.stats())
    assert stats[-1]["epochs"] > 2, "the reference run must cross pass boundaries"
    assert stats[-1]["conv_used_frac"] < 1.0  # the crop is counted once, also across a resume
    # saved states that hold a later piece of a conversation, in the buffer and as the reader's next piece
    assert any(piece > 0 for s in states for _, piece, _, _ in s["buffer"])
    assert any(s["next"][1] > 0 for s in states)
    for i in range(24):  # k batches, a resume from the saved state, then the other 24 - k: the same 24 batches
        resumed = ConversationLoader(tiny_tokenizer, mixed_task(9, cropped=4), state=states[i], **kw)
        for j in range(i, 24):
            x, y = next(resumed)
            assert torch.equal(x, batches[j][0]) and torch.equal(y, batches[j][1]), (i, j)
            assert resumed.stats() == stats[j]
        resumed.close()
    with pytest.raises(UserError, match="seed 3 .this run: 4."):
        ConversationLoader(tiny_tokenizer, mixed_task(9, cropped=4), state=states[3], **{**kw, "seed": 4})
    with pytest.raises(UserError, match="malformed"):
        ConversationLoader(tiny_tokenizer, mixed_task(9, cropped=4), state={**states[3], "next": None}, **kw)
    with pytest.raises(UserError, match="piece 9 offset 0 of conversation"):
        bad = {**states[3], "buffer": [[0, 9, 0, 0]]}
        ConversationLoader(tiny_tokenizer, mixed_task(9, cropped=4), state=bad, **kw)
    with pytest.raises(UserError, match="does not match"):  # a different task of the same length
        ConversationLoader(tiny_tokenizer, ChatTask([tool_conversation(i + 1) for i in range(9)]),
                           state=states[3], **kw)


def test_ranks_take_disjoint_conversations_whose_union_is_the_pass(tiny_tokenizer):
    task, W = mixed_task(14), 3
    loaders = [ConversationLoader(tiny_tokenizer, task, B=2, T=47, rank=r, world_size=W, seed=1) for r in range(W)]
    for p in range(2):
        shares = [[ld.task_index(p * ld.per_pass + g) for g in range(ld.per_pass)] for ld in loaders]
        assert sorted(sum(shares, [])) == list(range(14)), p  # disjoint, and together the whole task
    one = ConversationLoader(tiny_tokenizer, task, B=2, T=47, seed=1)
    first, second = ([one.task_index(p * 14 + g) for g in range(14)] for p in range(2))
    assert sorted(first) == sorted(second) == list(range(14)) and first != second  # each pass reshuffled
    # and the batches hold only the rank's own conversations (each message names its conversation)
    refs = [expected(tiny_tokenizer, task[i]) for i in range(14)]
    for r, ld in enumerate(loaders):
        mine = {ld.task_index(g) for g in range(ld.per_pass)}
        seen = check_batch(tiny_tokenizer, *next(ld), [refs[i] if i in mine else ([], []) for i in range(14)])
        assert seen and {c for c, _ in seen} <= mine


def test_long_conversation_is_split_at_turns_and_not_lost(tiny_tokenizer):
    tok = tiny_tokenizer
    long = tool_conversation(7, exchanges=5)
    ids, flags = expected(tok, long)
    row = 48
    assert len(ids) > 3 * row
    pieces, cropped = conversation_pieces(tok, long, row)
    assert cropped == 0 and len(pieces) > 1
    user_start = tok.special_id("<|user_start|>")
    for p_ids, p_mask in pieces:  # each a valid rendered conversation: BOS, then whole exchanges
        assert len(p_ids) <= row and p_ids[0] == tok.bos_id and p_ids[1] == user_start and p_mask[0] == 0
    body = np.concatenate([p[1:] for p, _ in pieces])
    assert body.tolist() == ids[1:] and np.concatenate([m[1:] for _, m in pieces]).tolist() == flags[1:]
    # through the loader, every one of its targets is trained on
    loader = ConversationLoader(tok, ChatTask([long, tool_conversation(1)]), B=2, T=row - 1)
    seen = set()
    for _ in range(4):
        seen |= check_batch(tok, *next(loader), [(ids, flags), expected(tok, tool_conversation(1))])
    assert {k for c, k in seen if c == 0} == {k for k in range(len(ids)) if flags[k]}
    assert loader.stats()["conv_used_frac"] == 1.0
    # one exchange longer than the row is cropped to it, mask and all, and the crop is counted
    huge = tool_conversation(2, words=40)
    h_ids, h_flags = expected(tok, huge)
    (p_ids, p_mask), = conversation_pieces(tok, huge, row)[0]
    assert p_ids.tolist() == h_ids[:row] and p_mask.tolist() == h_flags[:row]
    assert conversation_pieces(tok, huge, row)[1] == len(h_ids) - row


def test_all_masked_rows_give_no_targets_and_a_zero_not_a_nan(tiny_tokenizer):
    # the question alone is longer than the row: the cropped piece has no assistant token
    task = ChatTask([{"messages": [{"role": "user", "content": "fox " * 60}, {"role": "assistant", "content": "ok"}]}])
    loader = ConversationLoader(tiny_tokenizer, task, B=3, T=31)
    x, y = next(loader)
    assert x.shape == y.shape == (3, 31) and bool((y == -1).all())
    assert loader.stats()["supervised_frac"] == 0.0 and loader.stats()["conv_used_frac"] < 0.5
    logits = torch.randn(3 * 31, tiny_tokenizer.vocab_size, requires_grad=True)
    loss = F.cross_entropy(logits, y.view(-1), ignore_index=-1, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and bool((logits.grad == 0).all())  # summed, then divided by the step's count


def test_validation_is_fixed_and_scores_each_conversation_once(tiny_tokenizer):
    tok, task = tiny_tokenizer, mixed_task(14)
    refs = [expected(tok, task[i]) for i in range(10)]  # max_conversations=10: the first 10, in order
    one = ConversationValidation(tok, task, B=2, T=47, max_conversations=10)
    a, b = list(one.batches()), list(one.batches())
    assert len(a) == one.steps and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    ys = torch.cat([y for _, y in a])
    assert int((ys != -1).sum()) == one.supervised == sum(sum(f[1:]) for _, f in refs)  # each target once
    seen = set().union(*(check_batch(tok, x, y, refs) for x, y in a))
    assert seen == all_targets(refs)
    ranks = [ConversationValidation(tok, task, B=2, T=47, max_conversations=10, rank=r, world_size=2)
             for r in range(2)]
    assert ranks[0].steps == ranks[1].steps
    targets = [int((y != -1).sum()) for v in ranks for _, y in v.batches()]
    assert sum(targets) == one.supervised  # the ranks' shares add up to the single-process slice
    assert "the first 10 of 14 conversations" in one.describe()


def test_bad_arguments_are_one_clear_error(tiny_tokenizer):
    with pytest.raises(UserError, match="fewer than world_size 4"):
        ConversationLoader(tiny_tokenizer, mixed_task(3), B=1, T=16, rank=0, world_size=4)
    with pytest.raises(UserError, match="packing 'crop' is not one of pad, split"):
        ConversationLoader(tiny_tokenizer, mixed_task(3), B=1, T=16, packing="crop")
    bad = ChatTask([{"messages": [{"role": "assistant", "content": "hi"}]}])
    loader = ConversationLoader(tiny_tokenizer, bad, B=1, T=16)
    with pytest.raises(UserError, match="ChatTask conversation 0: message 0"):  # raised in the rendering thread
        next(loader)
    loader.close()


def test_close_stops_the_rendering_thread(tiny_tokenizer):
    def running():  # loaders of earlier tests may still be stopping theirs
        return {t for t in threading.enumerate() if t.name == "picochat-conversations-r0"}

    before = running()
    loader = ConversationLoader(tiny_tokenizer, mixed_task(4), B=1, T=47)
    next(loader)
    (mine,) = running() - before
    loader.close()
    assert not mine.is_alive()
