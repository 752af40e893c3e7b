#!/usr/bin/env bash
# One entry point for a fresh machine:  bash run.sh demo   |   bash run.sh test
# Creates .venv on first use (torch first, pinned to the CPU build that TORCH_SPEC names,
# then this project with its dev extra), then runs the chosen job.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EPLB_VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
fi
case "$VENV" in /*) VENV_BIN="$VENV/bin" ;; *) VENV_BIN="$PWD/$VENV/bin" ;; esac
export PATH="$VENV_BIN:$PATH"

case "${1:-}" in
    setup)
        ;;
    demo)
        shift
        eplb demo "$@"
        ;;
    test)
        shift
        export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
        [ $# -eq 0 ] && set -- -q   # quiet by default; any arguments go to pytest as given
        python -m pytest "$@"
        ;;
    *)
        echo "usage: bash run.sh setup   (only create the environment)" >&2
        echo "       bash run.sh demo [ARGS]   (the CPU demo)" >&2
        echo "       bash run.sh test [PYTEST ARGS]   (the test suite)" >&2
        exit 2
        ;;
esac
