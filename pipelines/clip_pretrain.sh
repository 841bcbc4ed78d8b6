#!/usr/bin/env bash
# CLIP pretraining on img2dataset shards, one machine with several GPUs.
#   bash pipelines/clip_pretrain.sh "/data/laion/{00000..41407}.tar" [more key=value overrides]  (quoted: mmcl expands it)
# Hardware lives in configs/accelerate/*.yaml; the experiment in configs/clip/*.yaml.
# Re-running the same command resumes from the newest checkpoint in train.output_dir.
set -euo pipefail
shards=$1; shift
accelerate launch --config_file "${ACCELERATE_CONFIG:-configs/accelerate/multi-gpu.yaml}" \
  -m mmcl.cli train configs/clip/vit-b-32.yaml "data.train_shards=[$shards]" "$@"
