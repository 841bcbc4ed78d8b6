#!/usr/bin/env bash
# Install (if needed) and run the end-to-end demo on the built-in data:
# synthetic shards -> tiny CLIP trained on CPU -> zero-shot + retrieval eval -> report in runs/demo/.
# The demo indexes the held-out images for the app, so it installs mmcl with the [app] extra (gradio, faiss).
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh --app
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/mmcl demo "$@"
