"""The GPU paths that CPU CI cannot run: CUDA graphs of the decode step (eager and compiled), the compiled step's
Triton kernels, a bf16 training step. Skipped without a CUDA device; `bash runs/gpu_check.sh` runs them on a GPU."""

import pytest
import torch

from conftest import make_tiny_model, randomize_outputs
from picochat.engine import Engine, GraphedSteps, SamplingParams
from test_engine import _staggered, naive_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_model(tiny_tokenizer):
    m = make_tiny_model(tiny_tokenizer.vocab_size, n_kv_head=2, n_embd=64, head_dim=16, seed=2, sequence_len=256)
    return randomize_outputs(m, seed=12).cuda().eval()


def _prompts(tok):
    return [tok.encode(t, prepend=tok.bos_id) for t in ["The quick brown", "To be, or not to be, that", "def"]]


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_give_the_plain_engines_tokens(tiny_tokenizer, gpu_model, compile):
    """Replayed CUDA graphs (padded batch buckets, kv-length buckets; compiled or eager step inside) give the tokens
    of the plain eager engine in fp32: requests joining a running batch (greedy and seeded), and generate() with
    several samples; the plain engine itself matches a full-forward greedy loop."""
    tok = tiny_tokenizer
    plain = Engine(gpu_model, tok, dtype=torch.float32, cuda_graphs=False)
    graphed = Engine(gpu_model, tok, dtype=torch.float32, compile=compile, cuda_graphs=True)
    graphed.step.kv_step = 16  # cross several kv buckets within a short generation
    prompts = _prompts(tok)
    for p in (SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=1.0, max_tokens=40, seed=5)):
        want = _staggered(plain, prompts, p)
        assert _staggered(graphed, prompts, p) == want
        assert sum(len(t) for t in want.values()) > 60
    assert {nb for nb, _ in graphed.step.graphs} >= {1, 2, 4}
    p = SamplingParams(temperature=1.0, max_tokens=30, seed=3)
    assert graphed.generate_batch(prompts[1], 3, p) == plain.generate_batch(prompts[1], 3, p)
    seqs, _ = plain.generate_batch(prompts[0], 1, SamplingParams(temperature=0, max_tokens=20))
    assert seqs[0] == naive_greedy(gpu_model, prompts[0], 20)[: len(seqs[0])] and seqs[0]


def test_bf16_graphed_step_matches_fp32_logits(tiny_tokenizer, gpu_model):
    """The default GPU engine (compiled, bf16, CUDA graphs) computes the same next-token logits as the fp32 eager
    engine, to bf16 precision, at batch 1 and batch 3 (padded to 4)."""
    tok = tiny_tokenizer
    fast = Engine(gpu_model, tok, compile=True, dtype=torch.bfloat16)  # tests set PICOCHAT_DTYPE=fp32
    ref = Engine(gpu_model, tok, dtype=torch.float32)
    assert isinstance(fast.step, GraphedSteps)
    ids = _prompts(tok)[1]
    for n in (1, 3):
        logits = []
        for e in (fast, ref):
            cache = e.new_cache(4)
            with torch.inference_mode():
                first = e.prefill(ids, cache, 0)
                for i in range(1, n):
                    cache.copy_row(0, i, len(ids))
                toks = first.argmax(-1).expand(n)
                z = torch.zeros(n, device="cuda")
                logits.append(e.decode_one_token(toks, cache, [len(ids)] * n, z, z)[0].float())
        scale = logits[1].abs().max()
        assert torch.allclose(logits[0], logits[1], atol=0.05 * scale), (logits[0] - logits[1]).abs().max() / scale
        assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_bf16_training_steps_lower_the_loss(tiny_tokenizer):
    """The training forward/backward under bf16 autocast on CUDA with the project's optimizer: 30 steps on one batch
    take the loss well down, and it stays finite."""
    from picochat.common import autocast_ctx
    from picochat.optim import build_optimizer

    torch.manual_seed(0)
    model = make_tiny_model(tiny_tokenizer.vocab_size, n_embd=64, head_dim=16, sequence_len=64).cuda()
    opt = build_optimizer(model.param_kinds(), n_embd=64, distributed=False)
    x = torch.randint(0, tiny_tokenizer.vocab_size, (8, 65), device="cuda")
    losses = []
    for _ in range(30):
        with autocast_ctx(torch.device("cuda"), torch.bfloat16):
            loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(l == l and l < 100 for l in losses)
    assert losses[-1] < 0.5 * losses[0], losses
