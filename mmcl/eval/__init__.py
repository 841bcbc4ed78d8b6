"""Evaluation: zero-shot classification, image-text retrieval, captioning metrics, reports.

templates.py        prompt template sets and class-name files
zeroshot.py         classifier from prompts; top-1/top-5, mean per-class recall, confusion
retrieval.py        recall@k / median rank, chunked (no N x N matrix)
caption_metrics.py  BLEU, ROUGE-L, CIDEr-D in plain Python
datasets.py         eval readers: labelled/captioned shards, image folders, CLIP_benchmark layout
runner.py           run encoders / a captioner over a dataset in batches -> result dicts
report.py           eval.json, eval.md, confusion.png, examples.png
compositional.py    caption vs hard negative pairs: SugarCrepe's files or generated (compositional_shapes.py)
"""

from mmcl.eval.caption_metrics import caption_scores, tokenize
from mmcl.eval.compositional import evaluate_compositional, generated_pairs, run_compositional, sugarcrepe_pairs
from mmcl.eval.datasets import EvalSample, ImageFolderDataset, ShardDataset, open_eval_dataset
from mmcl.eval.report import write_report
from mmcl.eval.retrieval import retrieval_eval
from mmcl.eval.runner import (
    evaluate_captions,
    evaluate_retrieval,
    evaluate_zero_shot,
    run_captioning,
    run_retrieval,
    run_zero_shot,
    zero_shot_from_config,
)
from mmcl.eval.templates import load_classnames, load_templates
from mmcl.eval.zeroshot import build_classifier, zero_shot_eval

__all__ = [
    "EvalSample",
    "ImageFolderDataset",
    "ShardDataset",
    "build_classifier",
    "caption_scores",
    "evaluate_captions",
    "evaluate_compositional",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "generated_pairs",
    "load_classnames",
    "load_templates",
    "open_eval_dataset",
    "retrieval_eval",
    "run_captioning",
    "run_compositional",
    "run_retrieval",
    "run_zero_shot",
    "sugarcrepe_pairs",
    "tokenize",
    "write_report",
    "zero_shot_eval",
    "zero_shot_from_config",
]
