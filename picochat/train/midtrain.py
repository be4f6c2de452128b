"""`picochat midtrain`: base -> mid. Teaches a base model the conversation format, multiple choice, the calculator
tool, spelling and who it is, from a mixture of conversations (tasks.mixtures.midtrain_mixture), through the one
training loop; its hyperparameters are inherited from the base checkpoint (printed).

    picochat midtrain --preset cpu                      # after `picochat pretrain --preset cpu` (~3 min on 2 cores)
    picochat midtrain --data my_chats.jsonl             # your conversations added to the mixture
    picochat midtrain --tasks identity,spellingbee:2000 # another mixture
    picochat midtrain --num-steps 100 --stop-at 50 ... && picochat midtrain --num-steps 100 --resume
    torchrun --nproc_per_node=8 -m picochat.train.midtrain

By default one pass over the mixture (--num-epochs 1), the parent's LRs (--init-lr-frac 1) and a warmdown over the
last 20%. Checkpoints: checkpoints/mid/<run>/ (run: the parent's unless --run); metrics: logs/mid/<run>.jsonl.
"""

from __future__ import annotations

from picochat.common import run_main
from picochat.config import MIDTRAIN_PRESETS, MidtrainConfig
from picochat.train.chat_stage import ChatStage, run_stage

STAGE = ChatStage(name="mid", prog="picochat midtrain", description=__doc__.split("\n")[0],
                  config_cls=MidtrainConfig, presets=MIDTRAIN_PRESETS, mixture="midtrain_mixture")


def run(argv: list[str] | None = None) -> dict:
    return run_stage(STAGE, argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
