"""GRPO (picochat/train/grpo.py, picochat/train/rl.py): advantages of a hand-made group, a zero-variance group gives
zero loss and no update, the clipped objective against a direct computation inside and outside the clip range, the
k3 KL against the exact KL; rollouts keep the terminal token and mask the tool's forced output;
one update on a tiny model raises the rewarded completion's log-probability and lowers the others'; a resumed run
gives the same rewards and losses as an uninterrupted one; two gloo ranks equal one process; no parent checkpoint
gives one clear line."""

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from conftest import make_tiny_model, randomize_outputs
from picochat.common import Runtime, UserError, read_jsonl
from picochat.engine import Engine, SamplingParams
from picochat.tasks.base import Task
from picochat.train import grpo
from picochat.train.rl import RLConfig, build_batch, micro_batches, sample_groups, token_logprobs, update

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32)


# -- the math --------------------------------------------------------------------------------------------------------


def test_group_advantages_on_a_hand_made_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv, keep = grpo.group_advantages(rewards, eps=1e-4)
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735; group 1: mean 0.25, std sqrt((3 * 0.0625 +
    # 0.5625) / 3) = 0.5
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a])
    assert adv[1].tolist() == pytest.approx([-0.25 / 0.5001] * 3 + [0.75 / 0.5001])
    assert adv[2].tolist() == [0.0] * 4 and keep.tolist() == [True, True, False]
    dr, _ = grpo.group_advantages(rewards, scale=False)  # Dr. GRPO: centred only
    assert dr[1].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])


def test_zero_variance_group_gives_zero_loss_and_no_update(tiny_tokenizer):
    # the loss itself: zero advantages make every token's objective 0, whatever the ratios
    logp = torch.randn(2, 5, requires_grad=True)
    adv, keep = grpo.group_advantages(torch.tensor([[1.0, 1.0]]))
    loss, st = grpo.policy_loss(logp, logp.detach() - 0.3, adv[0], torch.ones(2, 5), total_tokens=10)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logp.grad.abs().max() == 0 and not keep.any()
    # and the loop: such a group leaves the batch, and a step with nothing left takes no optimizer step
    from picochat.train.loop import make_optimizer

    model = make_tiny_model(tiny_tokenizer.vocab_size)
    cfg = RLConfig(group_size=2, device_batch_size=4)
    groups = [grpo_group([1, 2, 3], [[4, 5], [6]], [[1, 1], [1]], [0.0, 0.0])]
    micro, adv, keep, n_tokens, n_seqs, rows = build_batch(groups, cfg, CPU)
    assert (micro, rows, n_tokens, n_seqs) == ([], [], 0.0, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, cfg, CPU)
    assert update(model, opt, None, micro, cfg, CPU, n_tokens, n_seqs) == (0.0, 0.0, 0.0, 0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def grpo_group(prompt, seqs, masks, rewards):
    from picochat.train.rl import Group

    return Group(prompt, seqs, masks, rewards)


@pytest.mark.parametrize("clip_high", [0.2, 0.28])
def test_clipped_objective_equals_a_direct_computation(clip_high):
    ratios = [0.5, 0.79, 0.9, 1.0, 1.1, 1.25, 1.5]
    old = torch.zeros(2, len(ratios))
    logp = torch.log(torch.tensor([ratios, ratios])).requires_grad_(True)
    adv = torch.tensor([2.0, -3.0])
    obj, clipped = grpo.clipped_objective(logp, old, adv, clip_low=0.2, clip_high=clip_high)
    lo, hi = 0.8, 1 + clip_high
    for b, a in enumerate(adv.tolist()):
        for t, rho in enumerate(ratios):
            want = min(rho * a, min(max(rho, lo), hi) * a)
            assert float(obj[b, t].detach()) == pytest.approx(want, rel=1e-6)
            assert bool(clipped[b, t]) == ((a > 0 and rho > hi) or (a < 0 and rho < lo))
    obj.sum().backward()
    # d(rho A)/d log pi = rho A where the clip is inactive, 0 where it is active
    want_grad = torch.where(clipped, 0.0, torch.exp(logp.detach()) * adv[:, None])
    assert torch.allclose(logp.grad, want_grad, rtol=1e-6)
    # policy_loss: token norm divides the summed -objective by the tokens of the step, sequence norm per sequence
    mask = torch.ones(2, len(ratios))
    mask[1, 4:] = 0
    obj = obj.detach()
    tok_loss, st = grpo.policy_loss(logp, old, adv, mask, clip_high=clip_high, total_tokens=20.0, total_seqs=2.0)
    assert float(tok_loss.detach()) == pytest.approx(float(-(obj * mask).sum() / 20), rel=1e-6)
    seq_loss, _ = grpo.policy_loss(logp, old, adv, mask, clip_high=clip_high, norm="sequence", total_seqs=2.0)
    per_seq = (-(obj * mask).sum(1) / mask.sum(1)).sum() / 2
    assert float(seq_loss.detach()) == pytest.approx(float(per_seq), rel=1e-6)
    assert st.tokens == float(mask.sum()) and st.clipped == float((clipped * mask.bool()).sum())


def test_k3_kl_is_the_kl_in_expectation():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.4, 0.4])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k3 = grpo.kl_k3(p.log()[x], q.log()[x])
    assert (k3 >= 0).all() and float(k3.mean()) == pytest.approx(exact, rel=0.03)
    assert float(grpo.kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0]))) == 0.0


# -- rollouts and the update on a tiny model --------------------------------------------------------------------------


def test_rollouts_keep_the_terminal_token_and_mask_the_tool_output(tiny_tokenizer):
    from test_engine import ScriptedModel

    tok = tiny_tokenizer
    sid = tok.special_id
    code = tok.encode("1+2")
    chain = [sid("<|assistant_start|>"), sid("<|python_start|>"), *code, sid("<|python_end|>")]
    table = {a: b for a, b in zip(chain, chain[1:])}
    table[sid("<|output_end|>")] = sid("<|assistant_end|>")
    engine = Engine(ScriptedModel(tok.vocab_size, table, default=tok.encode("q")[0]), tok, tool=lambda s: "3")
    prompts = [[tok.bos_id, sid("<|assistant_start|>")], [tok.bos_id, *tok.encode("hi"), sid("<|assistant_start|>")]]
    long = [tok.bos_id] * engine.context  # no room for a reply: no completions, not an error that ends the run
    groups = sample_groups(engine, prompts + [long], 2, [SamplingParams(temperature=0, max_tokens=30)] * 3)
    assert groups.pop().seqs == [[], []]
    out = [sid("<|output_start|>"), *tok.encode("3"), sid("<|output_end|>")]
    want = [sid("<|python_start|>"), *code, sid("<|python_end|>"), *out, sid("<|assistant_end|>")]
    for g, p in zip(groups, prompts):
        assert g.prompt == p and g.seqs == [want, want]
        assert g.masks == [[1] * (len(code) + 2) + [0] * len(out) + [1]] * 2
    # micro-batches: y = ids[1:], the mask on y is 1 exactly where y was sampled, padding is ignored
    rows = [(prompts[0] + want, [0, 0] + groups[0].masks[0], 1.0), (prompts[1] + [7], [0] * len(prompts[1]) + [1],
                                                                     -1.0)]
    mb = micro_batches(rows, 2, "cpu")[0]
    ids0 = rows[0][0]
    assert mb["x"][0].tolist() == ids0[:-1] and mb["y"][0].tolist() == ids0[1:]
    assert mb["mask"][0].tolist() == [0.0] + [float(m) for m in groups[0].masks[0]]
    L1 = len(rows[1][0]) - 1
    assert mb["y"][1, L1:].tolist() == [-1] * (len(ids0) - 1 - L1) and mb["mask"][1].sum() == 1
    assert mb["adv"].tolist() == [1.0, -1.0]


def seq_logprobs(model, rows) -> list[float]:
    mb = micro_batches(rows, len(rows), "cpu")[0]
    with torch.no_grad():
        return (token_logprobs(model, mb["x"], mb["y"], CPU) * mb["mask"]).sum(1).tolist()


def test_one_update_raises_the_rewarded_completion_and_lowers_the_others(tiny_tokenizer):
    from picochat.train.loop import make_optimizer

    tok = tiny_tokenizer
    model = randomize_outputs(make_tiny_model(tok.vocab_size, sequence_len=64), seed=1)
    engine = Engine(model, tok)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "Say something."}]})
    (group,) = sample_groups(engine, [prompt], 4, [SamplingParams(temperature=1.0, max_tokens=12, seed=3)])
    assert len({tuple(s) for s in group.seqs}) == 4  # four different completions
    group.rewards = [0.0, 1.0, 0.0, 0.0]
    cfg = RLConfig(group_size=4, device_batch_size=2, matrix_lr=0.002, embedding_lr=0.01, unembedding_lr=0.001,
                   scalar_lr=0.01)
    micro, adv, keep, n_tokens, n_seqs, rows = build_batch([group], cfg, CPU)
    assert len(micro) == 2 and n_seqs == 4 and adv[0, 1] > 0 > adv[0, 0]
    before = seq_logprobs(model, rows)
    loss, tokens, clipped, _ = update(model, make_optimizer(model, cfg, CPU), None, micro, cfg, CPU, n_tokens, n_seqs)
    after = seq_logprobs(model, rows)
    assert tokens == n_tokens and clipped == 0.0  # one update: the ratio is 1 everywhere
    assert after[1] > before[1]
    assert all(after[i] < before[i] for i in (0, 2, 3)), (before, after)


# -- the command: resume, parent -------------------------------------------------------------------------------------


class EvenLength(Task):
    """A real Task whose reward a random tiny model earns about half the time: the reply has an even length."""

    def __init__(self, n: int, **kw):
        super().__init__(**kw)
        self.n = n

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say {index}."}, {"role": "assistant", "content": "ok"}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return len(completion) % 2 == 0


@pytest.fixture()
def base(tmp_path, tiny_tokenizer, monkeypatch):
    """A base dir with the tiny tokenizer and a tiny base checkpoint (run "tiny") as RL's parent."""
    from picochat.checkpoint import build_meta, save_checkpoint
    from picochat.config import TrainConfig

    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    tiny_tokenizer.save(tmp_path / "tokenizer")
    model = randomize_outputs(make_tiny_model(tiny_tokenizer.vocab_size, depth=1, n_embd=32, sequence_len=64), seed=2)
    meta = build_meta(model.config, replace(TrainConfig(), matrix_lr=0.04), tiny_tokenizer.hash(), 5, 1,
                      stage="base")
    save_checkpoint(tmp_path / "checkpoints" / "base" / "tiny", 5, model.state_dict(), None, meta, None)
    return tmp_path


RL_TINY = ["--device", "cpu", "--dtype", "fp32", "--prompts-per-step", "3", "--group-size", "4",
           "--max-new-tokens", "10", "--device-batch-size", "6", "--eval-every", "0", "--eval-size", "3",
           "--eval-samples", "2", "--init-lr-frac", "0.1", "--updates-per-batch", "2", "--kl-coef", "0.1"]


def test_resume_gives_the_same_rewards_and_losses(base, capsys):
    from picochat.train.rl import run

    tasks = (EvenLength(30), EvenLength(3))

    def steps(metrics, *extra):
        run(RL_TINY + ["--num-steps", "4", "--metrics", str(metrics), *extra], tasks=tasks)
        return [r for r in read_jsonl(metrics) if r["kind"] == "train"]

    whole = steps(base / "whole.jsonl", "--run", "whole")
    out = capsys.readouterr().out
    assert "rl.matrix_lr: inherited 0.04" in out and "no sft checkpoint; starting from base run 'tiny'" in out
    first = steps(base / "split.jsonl", "--run", "split", "--stop-at", "2")
    second = steps(base / "split2.jsonl", "--run", "split", "--resume")
    assert [r["step"] for r in first + second] == [1, 2, 3, 4]
    keys = ("reward_mean", "reward_std", "adv_mean", "adv_std", "skipped_groups_frac", "loss", "kl", "clip_frac",
            "completion_len")
    assert [[r[k] for k in keys] for r in whole] == [[r[k] for k in keys] for r in first + second]
    assert any(r["loss"] != 0 for r in whole) and any(r["clip_frac"] > 0 or r["kl"] > 0 for r in whole[1:])
    assert all(0 < r["gen_frac"] < 1 and r["rollout_tok_per_s"] > 0 for r in whole)
    evals = [r for r in read_jsonl(base / "whole.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [4] and 0 <= evals[0]["pass@1"] <= evals[0]["pass@2"] <= 1
    # the speedrun skips a finished stage: only the schedule's end says so, not --stop-at
    meta = lambda run, step: json.loads((base / "checkpoints" / "rl" / run / f"step_{step:06d}" / "meta.json")
                                        .read_text())
    assert meta("whole", 4)["finished"] is True and meta("split", 4)["finished"] is True
    assert meta("split", 2)["finished"] is False


def test_no_parent_checkpoint_and_unsupported_flags_are_one_clear_line(tmp_path, monkeypatch, capsys):
    from picochat.train.rl import main

    monkeypatch.setenv("PICOCHAT_BASE_DIR", str(tmp_path))
    assert main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rl starts from a parent checkpoint" in err and "picochat sft" in err
    assert main(["--device", "cpu", "--compile"]) == 2
    assert capsys.readouterr().err.strip() == ("picochat: error: rl does not support --compile yet (every batch has "
                                               "other shapes); drop it")


def _rl_worker(rank, world, port, base_dir, argv):
    from picochat.train.rl import run

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PICOCHAT_BASE_DIR=str(base_dir))
    run(argv, tasks=(EvenLength(30), EvenLength(4)))


def test_two_processes_equal_one(base):
    """Rollouts split across 2 gloo ranks (prompt slots 0, 2 on rank 0; 1, 3 on rank 1), gradients reduced by the
    optimizer: the same rewards, losses and pass@k as one process doing all four prompts."""
    from conftest import spawn_gloo
    from test_train import _free_port

    argv = RL_TINY + ["--prompts-per-step", "4", "--num-steps", "3", "--eval-size", "4"]
    _rl_worker(0, 1, _free_port(), base, argv + ["--run", "one", "--metrics", str(base / "one.jsonl")])
    os.environ.pop("RANK"), os.environ.pop("WORLD_SIZE")
    spawn_gloo(_rl_worker, (2, _free_port(), base, argv + ["--run", "two", "--metrics", str(base / "two.jsonl")]), 2)
    one, two = read_jsonl(base / "one.jsonl"), read_jsonl(base / "two.jsonl")
    assert [r["kind"] for r in one] == [r["kind"] for r in two] == ["train"] * 3 + ["eval", "summary"]
    exact = ("reward_mean", "reward_std", "skipped_groups_frac", "completion_len")
    for a, b in zip(one[:3], two[:3]):
        assert [a[k] for k in exact] == [b[k] for k in exact]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7) and b["kl"] == pytest.approx(a["kl"], rel=1e-5)
    assert (one[3]["pass@1"], one[3]["pass@2"], one[3]["eval_problems"]) == (two[3]["pass@1"], two[3]["pass@2"], 4)
