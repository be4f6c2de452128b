"""Shared test setup: offline hub settings, a private base dir per session, tiny tokenizer/model fixtures."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PICOCHAT_DTYPE", "fp32")  # tests compare numbers; bf16 would need looser tolerances
# built decode libraries (engine._aot_step) go to a folder of this test session, not the user's cache
if "PICOCHAT_AOT_CACHE" not in os.environ:
    os.environ["PICOCHAT_AOT_CACHE"] = tempfile.mkdtemp(prefix="picochat-test-aot-")
    atexit.register(shutil.rmtree, os.environ["PICOCHAT_AOT_CACHE"], ignore_errors=True)

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question. "
    "In the beginning God created the heaven and the earth. def add(a, b):\n    return a + b\n"
    "Numbers 12345 and 3.14159; emoji \U0001f600 and accents café naïve. "
) * 40


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from picochat.tokenizer import Tokenizer

    return Tokenizer.train([TINY_TEXT], vocab_size=320)


def make_tiny_model(vocab_size: int, depth: int = 2, head_dim: int = 16, n_embd: int = 64, n_kv_head: int = 0,
                    sequence_len: int = 128, seed: int = 0, **kw):
    from picochat.config import ModelConfig
    from picochat.model import GPT

    cfg = ModelConfig(depth=depth, head_dim=head_dim, n_embd=n_embd, n_kv_head=n_kv_head, vocab_size=vocab_size,
                      sequence_len=sequence_len, **kw)
    model = GPT(cfg)
    model.init_weights(seed)
    return model


def randomize_outputs(model, seed: int = 0, std: float = 0.05):
    """Zero-initialised projections and a tiny lm_head make a fresh model nearly constant; tests that compare code
    paths need a model whose outputs depend on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and p is not model.wte.weight:
                p.copy_(torch.randn(p.shape, generator=g) * (std if p is not model.lm_head.weight else 0.5))
    return model


def spawn_gloo(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn for gloo process groups, tolerating a rank that aborts with SIGABRT: gloo can abort
    a process at teardown ("terminate called without an active exception", gloo issue 155) after its work is done;
    `teardown_runtime` makes that rare, not impossible. The callers assert on every rank's saved outputs, so a rank
    that really died mid-run still fails the test."""
    import signal
    import warnings

    import torch.multiprocessing as mp

    try:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name != signal.Signals.SIGABRT.name:
            raise
        warnings.warn(f"a gloo rank aborted at exit ({e}); checking its outputs instead")
