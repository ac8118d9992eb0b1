#!/usr/bin/env bash
# Peer tools for bench/run.py, in their own venv (bench/.venv, git-ignored), so their pins never
# touch the dev venv. torch is pinned first: a bare `torch` requirement would pull a CUDA build.
#   bash bench/setup.sh            # then: .venv/bin/python bench/run.py --shape 70m
set -euo pipefail
cd "$(dirname "$0")"
TORCH="${TORCH:-torch==2.13.0}"
MERGEKIT="${MERGEKIT:-mergekit==0.1.5}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "$TORCH"
.venv/bin/pip install -q "$MERGEKIT" "$TORCH"
command -v /usr/bin/time >/dev/null || { apt-get update -q && apt-get install -y -q time; }
.venv/bin/python -c "import importlib.metadata as m; print('mergekit', m.version('mergekit'), 'torch', m.version('torch'))"
