"""`lvd export RUN --format hf|timm|pth|safetensors|onnx DEST`: a run's model (or any checkpoint) where its users load
it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("hf", "timm", "pth", "safetensors", "onnx")  # training.export.formats.FORMATS (import-free for --help)


def cmd_export(args: argparse.Namespace) -> int:
    from training.export.formats import export_model

    if args.image_size is not None and args.format != "onnx":
        print(f"error: --image-size is the resolution of an onnx graph; a {args.format} export works at any size",
              file=sys.stderr)
        return 2
    source = Path(args.source).expanduser()
    if source.exists():  # a checkpoint file or folder rather than a run id
        from flows.evaluate import released_eval_size
        from training.checkpoint import load_backbone, recorded_image_size

        backbone = load_backbone(source, arch=args.arch)
        # onnx: the resolution the checkpoint records, 224 px for a released one (as dinov2 evaluates it), else its
        # position grid's (export_model's default)
        size = args.image_size or (recorded_image_size(source) or released_eval_size(backbone.arch_kwargs["img_size"])
                                   if args.format == "onnx" else None)
        exported = export_model(backbone, args.format, Path(args.dest), image_size=size)
        where = str(source)
    else:
        exported, where = _export_run(args)
        if exported is None:
            return 2
    print(f"{args.format} export of {where} -> {exported.path}")
    for note in exported.notes:
        print(f"note: {note}")
    print(f"\nload it with:\n{exported.usage}")
    return 0


def _export_run(args: argparse.Namespace):
    from flows.export import evaluated_stage, export_stage, training_stages_done
    from infra.run import RunDir

    run = RunDir(Path(args.root), args.source)
    if not run.exists():
        raise FileNotFoundError(f"{args.source!r} is neither a checkpoint path nor a run under {args.root} "
                                f"(give --root, or the path of a .safetensors / .pth / transformers folder)")
    done = training_stages_done(run)
    stage = args.stage or evaluated_stage(run) or (done[-1] if done else None)
    if stage not in done:
        print(f"error: run {run.run_id} has no trained model" + (f" in stage {stage!r}" if stage else "")
              + (f" (trained stages: {', '.join(done)})" if done else ""), file=sys.stderr)
        return None, ""
    return export_stage(run, stage, args.format, Path(args.dest), image_size=args.image_size), \
        f"run {run.run_id}, stage {stage}"


def register(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="a run's model for transformers, timm, torch or onnxruntime (or any checkpoint "
                                       "converted)",
                        description="Write a run's trained backbone (or any DINOv2 checkpoint lvd reads) in the format "
                                    "its users load: hf (a folder for transformers' AutoModel.from_pretrained, with a "
                                    "model card), timm (a state dict for timm.create_model), pth (the official state "
                                    "dict, for torch.hub's DINOv2 builders), safetensors (this project's export) or "
                                    "onnx (a graph for onnxruntime, TensorRT or Triton at one resolution, checked "
                                    "against the model before it is kept).")
    ex.add_argument("source", help="a run id, or a checkpoint (.safetensors, .pth, transformers folder, timm file)")
    ex.add_argument("dest", help="the folder (hf) or file (timm, pth, safetensors, onnx) to write")
    ex.add_argument("--format", choices=FORMATS, required=True)
    ex.add_argument("--stage", default=None, help="training stage of the run (default: the evaluated one, else the last)")
    ex.add_argument("--arch", default=None, help="registry name pinning the head count of a checkpoint that records none")
    ex.add_argument("--image-size", type=int, default=None, metavar="N",
                    help="onnx: the resolution the graph takes (default: the model's training resolution; 224 for a "
                         "released official checkpoint)")
    ex.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    ex.set_defaults(fn=cmd_export)
