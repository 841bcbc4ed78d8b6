#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one command, at most 8 minutes on one GPU.
#   bash bench/gpu_check.sh OUT            -> OUT/gpu_check.json and a table on stdout
#   bash bench/gpu_check.sh --smoke OUT    -> the same on CPU with tiny models (seconds)
# Uses .venv/bin/python when the repository has one, else $PYTHON, else python.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the script stops starting rows past its own budget (450 s) and writes its JSON after every row;
# this is the hard stop (SIGINT first, so the rows finished so far stay written)
exec timeout --signal=INT --kill-after=20 480 "$py" -m bench.gpu_check "$@"
