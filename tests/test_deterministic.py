"""`--deterministic`: two tiny pretraining runs with the same seed log bit-identical losses at every step, and the
mode is on while they run."""

import os

import pytest
import torch

from picochat.common import set_deterministic
from test_train import base, pretrain, train_losses  # noqa: F401  (base is the tiny corpus + tokenizer fixture)

STEPS = 4


@pytest.fixture
def restore_determinism():
    """--deterministic is process-wide (set_deterministic): put torch's defaults back for the tests that follow."""
    had_env = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    yield
    set_deterministic(False)
    if not had_env:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_same_seed_gives_identical_losses(base, tmp_path, restore_determinism):  # noqa: F811
    flags = ["--deterministic", "--num-steps", str(STEPS), "--eval-every", "0", "--save-every", "0"]
    losses = {}
    for name in ("a", "b"):
        pretrain(flags + ["--seed", "3", "--run", f"det-{name}"], tmp_path / f"{name}.jsonl")
        assert torch.are_deterministic_algorithms_enabled(), "--deterministic did not reach setup_runtime"
        losses[name] = train_losses(tmp_path / f"{name}.jsonl")
    assert len(losses["a"]) == STEPS and losses["a"][-1] < losses["a"][0]  # it trained: the losses move
    assert losses["a"] == losses["b"]  # exact: the same floats, not approximately
