"""`picochat sft`: mid (or base) -> sft, supervised fine-tuning on conversations (tasks.mixtures.sft_mixture) with
the loss on the assistant's tokens only (its text, its python calls and <|assistant_end|>), through the one training
loop; hyperparameters are inherited from the parent checkpoint (printed), the LRs at --init-lr-frac 0.02 of the
parent's, decaying linearly to 0 over one pass.

    picochat sft --preset cpu                     # after `picochat midtrain --preset cpu` (~3 min on 2 cores)
    picochat sft --parent-run d4 --parent-step 260
    picochat sft --data my_chats.jsonl
    torchrun --nproc_per_node=8 -m picochat.train.sft

The loss of a step is normalised by the supervised tokens of the whole step, across micro-batches and ranks, so a
row (or a rank) with none adds zero gradient, and a step with none at all is logged with "supervised": 0 and skips
the optimizer. Checkpoints: checkpoints/sft/<run>/; metrics: logs/sft/<run>.jsonl.
"""

from __future__ import annotations

from picochat.common import run_main
from picochat.config import SFT_PRESETS, SFTConfig
from picochat.train.chat_stage import ChatStage, run_stage

STAGE = ChatStage(name="sft", prog="picochat sft", description=__doc__.split("\n")[0], config_cls=SFTConfig,
                  presets=SFT_PRESETS, mixture="sft_mixture")


def run(argv: list[str] | None = None) -> dict:
    return run_stage(STAGE, argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
