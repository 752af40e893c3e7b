#!/usr/bin/env bash
# One entry point for a fresh machine:  bash run.sh demo   |   bash run.sh test   |   bash run.sh quick
# Creates .venv on first use (torch first, as TORCH_SPEC names it, then this project with its dev
# extra), marks the finished install, and repairs an unfinished one (an interrupted first run) on
# the next run. Then runs the chosen job. Says what it does and how long each part took.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EPLB_VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
case "$VENV" in /*) VENV_BIN="$VENV/bin" ;; *) VENV_BIN="$PWD/$VENV/bin" ;; esac
MARK="$VENV/.eplb-install-complete"
# The mark records what was installed: a new TORCH_SPEC, a changed pyproject.toml or another
# checkout (the editable install points at one) reinstalls.
WANT="torch: $TORCH_SPEC; pyproject: $(cksum < pyproject.toml | cut -d' ' -f1); checkout: $PWD"

say() { echo "run.sh: $*" >&2; }

step() {  # step "what" command...: run it, then say how long it took
    local what="$1" start=$SECONDS
    shift
    say "$what ..."
    if ! "$@"; then
        say "failed: $what. Nothing is marked as installed, so the next 'bash run.sh $JOB' retries;"
        say "delete $VENV to start from scratch."
        exit 1
    fi
    say "  done in $((SECONDS - start)) s"
}

install() {
    local start=$SECONDS
    if [ ! -x "$VENV_BIN/python" ]; then
        say "first run: installing into $VENV (torch CPU wheels and the dev tools: a few minutes, once)"
        step "creating the virtual environment $VENV" "$PYTHON" -m venv "$VENV"
    elif [ -f "$MARK" ]; then
        say "the install in $VENV is out of date ($(cat "$MARK") -> $WANT); updating it"
    else
        say "the install in $VENV was not finished (interrupted?); repairing it"
    fi
    rm -f "$MARK"
    step "upgrading pip" "$VENV_BIN/python" -m pip install -q --upgrade pip
    step "installing $TORCH_SPEC (the largest download)" "$VENV_BIN/python" -m pip install -q "$TORCH_SPEC"
    step "installing eplb with its dev extra (tests, docs, plots)" "$VENV_BIN/python" -m pip install -q -e ".[dev]"
    echo "$WANT" > "$MARK"
    say "installed in $((SECONDS - start)) s; later runs skip this"
}

JOB="${1:-}"
case "$JOB" in
    setup | demo | test | quick) ;;
    *)
        echo "usage: bash run.sh setup            only create (or repair) the environment in $VENV" >&2
        echo "       bash run.sh demo [ARGS]      the CPU demo (about 10 s after the install)" >&2
        echo "       bash run.sh quick [ARGS]     a quick subset of the tests (unit tests without the" >&2
        echo "                                    multi-process and slow ones: a few minutes)" >&2
        echo "       bash run.sh test [ARGS]      the whole test suite, as CI runs it (about 10 minutes" >&2
        echo "                                    on 2 CPU cores); ARGS go to pytest" >&2
        exit 2
        ;;
esac
shift
if [ ! -f "$MARK" ] || [ "$(cat "$MARK")" != "$WANT" ]; then
    install
fi
export PATH="$VENV_BIN:$PATH"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"

start=$SECONDS
case "$JOB" in
    setup)
        say "the environment is ready: $VENV (activate it with: source $VENV/bin/activate)"
        exit 0
        ;;
    demo)
        "$VENV_BIN/python" -m eplb.cli demo "$@"
        ;;
    quick)
        say "quick subset: unit tests without the multi-process and slow ones (the whole suite: bash run.sh test)"
        [ $# -eq 0 ] && set -- -q
        "$VENV_BIN/python" -m pytest tests/unit -m "not distributed and not slow" "$@"
        ;;
    test)
        if [ $# -eq 0 ]; then
            say "the whole suite: about 10 minutes on 2 CPU cores. A quick subset: bash run.sh quick;"
            say "one file: bash run.sh test -q tests/unit/test_cli.py"
            set -- -q  # quiet by default; any arguments go to pytest as given
        fi
        "$VENV_BIN/python" -m pytest "$@"
        ;;
esac
say "$JOB finished in $((SECONDS - start)) s"
