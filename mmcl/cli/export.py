"""`mmcl export {open_clip,hf} RUN_OR_CKPT OUT`: write a trained CLIP as an open_clip or transformers model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained model to another library's format (open_clip, transformers)",
        description="Export a run folder or checkpoint folder to another library's format.",
    )
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    oc = sub.add_parser(
        "open_clip",
        help="open_clip model config + safetensors weights",
        description=(
            "Write OUT/open_clip_model.safetensors, OUT/open_clip_config.json (load with "
            "open_clip.create_model_and_transforms('local-dir:OUT')) and OUT/NAME.json (for "
            "open_clip.add_model_config). Needs a CLIP with a ViT image tower, CLIP's text transformer and BPE, or "
            "towers imported from a transformers CLIPModel."
        ),
    )
    oc.add_argument("run", help="run folder (runs/NAME), its final/ folder or a checkpoints/step_* folder")
    oc.add_argument("out", help="output folder")
    oc.add_argument("--name", help="open_clip model name (default: the output folder's name)")
    oc.set_defaults(func=run)
    hf = sub.add_parser(
        "hf",
        help="transformers CLIPModel / SiglipModel folder + tokenizer + image processor",
        description=(
            "Write OUT as a transformers folder (save_pretrained) with a model card: "
            "transformers.pipeline('zero-shot-image-classification', model=OUT) runs it. Needs a CLIP with a ViT "
            "image tower, CLIP's text transformer and BPE, or towers imported from transformers."
        ),
    )
    hf.add_argument("run", help="run folder (runs/NAME), its final/ folder or a checkpoints/step_* folder")
    hf.add_argument("out", help="output folder")
    hf.add_argument("--license", default="other", help="license id for the model card (default: %(default)s)")
    hf.set_defaults(func=run_hf)


def run(args: argparse.Namespace) -> int:
    from mmcl.export import export_open_clip_run

    config_path, weights_path = export_open_clip_run(args.run, args.out, args.name)
    print(f"wrote {weights_path}")
    print(f"wrote {config_path} (open_clip.add_model_config) and {config_path.parent / 'open_clip_config.json'}")
    print(f"load: open_clip.create_model_and_transforms('local-dir:{config_path.parent}')")
    return 0


def run_hf(args: argparse.Namespace) -> int:
    from mmcl.export import export_hf_run

    out = export_hf_run(args.run, args.out, license=args.license)
    print(f"wrote {out} (transformers model, tokenizer, image processor, README.md)")
    print(f'load: transformers.pipeline("zero-shot-image-classification", model="{out}")')
    return 0
