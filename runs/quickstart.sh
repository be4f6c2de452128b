#!/usr/bin/env bash
# The whole pipeline that exists today, on the embedded offline corpus, on whatever this machine has (~10 min on a
# 2-core laptop CPU): set up .venv, build the corpus, train the tokenizer, pretrain the base model (one pass over the
# embedded corpus' 2.15M training tokens with split packing, at most 10 minutes), then sample from it. Artifacts go to
# $PICOCHAT_BASE_DIR (default ~/.cache/picochat).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
PC=".venv/bin/picochat"
$PC data prepare
$PC tok-train
$PC tok-eval
$PC pretrain --preset cpu --max-minutes "${MAX_MINUTES:-10}" --overwrite  # a re-run starts over (use --resume to continue)
$PC chat --source base --temperature 0 -p "The king said"
echo "done: talk to it with  .venv/bin/picochat chat  or serve it with  .venv/bin/picochat serve"
