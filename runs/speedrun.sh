#!/usr/bin/env bash
# Set up .venv and run the whole pipeline (picochat speedrun): data -> tokenizer -> pretrain -> eval -> midtrain ->
# SFT -> chat eval -> [RL] -> report. Resumable: run it again after an interruption. Flags go to `picochat speedrun`
# (default --preset cpu, offline; GPU tiers: --preset d12|d20|d26 [--nproc 8], which download FineWeb-Edu and the hub's
# chat datasets, so the hub stays online for them). GPU users: install the torch build you want into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
case " $* " in
    *" --preset d"* | *" --preset=d"*) ;;
    *) export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} ;;
esac
exec .venv/bin/picochat speedrun "$@"
