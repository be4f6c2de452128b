#!/usr/bin/env bash
# The whole pipeline on the embedded offline data, on whatever this machine has (~17 min on a 2-core laptop CPU):
# set up .venv, then `picochat speedrun --preset cpu`: corpus -> tokenizer -> pretrain the base model -> evaluate it
# (CORE-20, HellaSwag, bpb) -> midtrain -> SFT -> evaluate the chat model -> report card, ending with sample replies
# and the commands to chat with it and serve it. Run it again after an interruption: finished stages are skipped and
# the interrupted one resumes. Artifacts go to $PICOCHAT_BASE_DIR (default ~/.cache/picochat). Extra flags go to
# `picochat speedrun`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash runs/speedrun.sh --preset cpu "$@"
