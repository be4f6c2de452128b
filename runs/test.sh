#!/usr/bin/env bash
# Set up .venv and run the test suite (tiny CPU configs; ~7.5-13 min of tests on 2 cores from a cold compiler cache). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
