#!/usr/bin/env bash
# Create .venv (if missing) and install mmcl into it. `--dev` adds the test tools, the [app] and [wandb]
# extras (everything the tests use) and Chromium.
# Idempotent: a second run only checks. torch comes from PyPI (or the local wheel cache where one exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
if ! .venv/bin/python -c "import mmcl, torch, timm, open_clip, webdataset, accelerate" 2>/dev/null \
   || { [ -n "$extras" ] && ! .venv/bin/python -c "import pytest, playwright, clip_benchmark, pycocoevalcap, gradio, faiss, wandb" 2>/dev/null; }; then
  echo "installing mmcl$extras into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q -e ".$extras"
fi
if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
