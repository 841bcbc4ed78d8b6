#!/usr/bin/env bash
# Create .venv (if missing) and install mmcl into it, editable (mmcl is not on PyPI).
#   bash pipelines/setup.sh          (the core: shards, train, fine-tune, eval, export)
#   bash pipelines/setup.sh --app    (+ the [app] extra, gradio and faiss: the app, the index and the demo)
#   bash pipelines/setup.sh --dev    (+ everything the tests use: [app], [wandb], test tools, Chromium)
# Idempotent: a second run only checks. torch comes from PyPI (or the local wheel cache where one exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
core="import mmcl, torch, timm, open_clip, webdataset, accelerate"
case "${1:-}" in
  "") extras=""; check="$core" ;;
  --app) extras="[app]"; check="$core, gradio, faiss" ;;
  --dev) extras="[dev]"; check="$core, pytest, playwright, clip_benchmark, pycocoevalcap, gradio, faiss, wandb" ;;
  *) echo "usage: bash pipelines/setup.sh [--app|--dev]" >&2; exit 2 ;;
esac
if ! .venv/bin/python -c "$check" 2>/dev/null; then
  echo "installing mmcl$extras into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q -e ".$extras"
fi
if [ "$extras" = "[dev]" ] && [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
