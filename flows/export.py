"""A run's models where their users go: the training stages' exports (`train.exports`), `lvd export`, and the model
card built from the run's records (run id, corpus composition, recipe, the run's evaluation table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from evaluation.results import RESULTS
from infra.manifest import read_manifest
from infra.run import RunDir
from training.export.card import CardInputs, model_card
from training.export.formats import Export, export_model, export_notes, hf_usage

TEACHER_BACKBONE = "teacher_backbone.safetensors"  # a training stage's exported model (= flows.stages.TEACHER_BACKBONE)
EXPORT_DIRS = {"hf": Path("hf"), "timm": Path("timm") / "model.safetensors",  # inside a training stage's folder
               "onnx": Path("onnx") / "model.onnx"}


def training_stages_done(run: RunDir) -> list[str]:
    from flows.resume_points import TRAINING_STAGES

    return [s for s in TRAINING_STAGES if (run.stage_dir(s) / TEACHER_BACKBONE).is_file()]


def evaluated_stage(run: RunDir) -> str | None:
    """The training stage whose model the run's evaluation scored (its checkpoint in the evaluate manifest)."""
    manifest = read_manifest(run.stage_dir("evaluate"))
    if manifest is None:
        return None
    checkpoint = (manifest.extra.get("models", {}).get("pretrained") or {}).get("checkpoint")
    return Path(checkpoint).parent.name if checkpoint else None


def card_inputs(run: RunDir, stage: str, exported: Export, results: pd.DataFrame | None = None,
                evaluates: str | None = None) -> CardInputs:
    """`results`: the evaluation just computed for this stage's model; None reads the run's, if it scored this stage.
    `evaluates`: the stage the run will evaluate (a card written at training time: an earlier attempt's results do not
    describe this model); None: the one it evaluated, with its results."""
    from training.checkpoint import read_checkpoint

    corpus = read_manifest(run.stage_dir("corpus"))
    evaluated = stage if results is not None else evaluates or evaluated_stage(run)
    if results is None and evaluates is None and evaluated == stage and (run.stage_dir("evaluate") / RESULTS).is_file():
        results = pd.read_parquet(run.stage_dir("evaluate") / RESULTS)
    if evaluated == stage:
        note = "Not evaluated yet: the run's evaluate stage adds its table here."
    elif evaluated:
        note = f"The run evaluates the `{evaluated}` stage's model, which continues this one."
    else:
        note = f"Not evaluated in this run: `lvd evaluate CONFIG --model {stage}={exported.path}`."
    arch = read_checkpoint(run.stage_dir(stage) / TEACHER_BACKBONE).arch or {}
    return CardInputs(run.run_id, stage, arch, exported.usage, recipe(run, stage),
                      corpus.extra.get("composition", []) if corpus else [], results, note, exported.notes)


def recipe(run: RunDir, stage: str) -> dict[str, Any]:
    """The lines of the card's recipe table, from the stage's resolved `train_config.yaml` and `derived.json`."""
    d = run.stage_dir(stage)
    if not (d / "train_config.yaml").is_file():
        return {}
    t = yaml.safe_load((d / "train_config.yaml").read_text())
    derived = json.loads((d / "derived.json").read_text()) if (d / "derived.json").is_file() else {}
    manifest = read_manifest(d)
    s, o, c = t["student"], t["optim"], t["crops"]
    return {
        "mode": t["mode"], "architecture": f"{s['arch']}, patch {s['patch_size']}, {s['ffn_layer']} FFN, "
                                          f"{s['num_register_tokens']} registers, LayerScale {s['layerscale']}",
        "steps": manifest.counts.get("steps") if manifest else derived.get("run_iters"),
        "global batch": derived.get("global_batch"), "lr (scaled)": derived.get("lr"),
        "optimiser": f"AdamW, base lr {o['base_lr']} ({o['scaling_rule']}), warmup {o['warmup_epochs']} epochs, "
                     f"weight decay {o['weight_decay']} -> {o['weight_decay_end']}",
        "crops": f"2 x {c['global_crops_size']} px + {c['local_crops_number']} x {c['local_crops_size']} px",
        "losses": f"DINO {t['dino']['loss_weight']}, iBOT {t['ibot']['loss_weight']}, KoLeo "
                  f"{t['dino']['koleo_loss_weight']}; {t['centering']}",
        "initialised from": s.get("pretrained_weights") or t.get("teacher_weights") or "scratch",
        "full configuration": f"`{(d / 'train_config.yaml').relative_to(run.root)}`",
    }


def write_card(run: RunDir, stage: str, exported: Export, results: pd.DataFrame | None = None,
               evaluates: str | None = None) -> Path:
    from infra.storage import atomic_write_text

    path = exported.path / "README.md"
    atomic_write_text(path, model_card(card_inputs(run, stage, exported, results, evaluates)))
    return path


def export_stage(run: RunDir, stage: str, fmt: str, dest: Path, evaluates: str | None = None,
                 image_size: int | None = None) -> Export:
    """One training stage's model in `fmt` at `dest`; an `hf` folder gets the model card."""
    from training.checkpoint import load_backbone

    exported = export_model(load_backbone(run.stage_dir(stage) / TEACHER_BACKBONE), fmt, dest, image_size=image_size)
    if fmt == "hf":
        write_card(run, stage, exported, evaluates=evaluates)
    return exported


def write_stage_exports(run: RunDir, stage: str, formats: list[str], evaluates: str | None) -> list[Path]:
    """The configured exports of a training stage that has just trained (`train.exports`): the files its manifest
    lists. `evaluates`: the training stage the run's evaluation will score (None: it evaluates none). An `hf`
    folder's `README.md` is left out: the evaluate stage completes that stage's card with the run's table."""
    files = []
    for fmt in formats:
        exported = export_stage(run, stage, fmt, run.stage_dir(stage) / EXPORT_DIRS[fmt], evaluates)
        files += sorted(p for p in exported.path.iterdir() if p.name != "README.md") if fmt == "hf" else [
            exported.path, exported.path.with_name(exported.path.name + ".json")]
    return files


def complete_card(run: RunDir, stage: str, results: pd.DataFrame) -> Path | None:
    """After evaluation: the evaluated stage's `hf/README.md` rewritten with the run's evaluation table."""
    from training.checkpoint import read_checkpoint

    folder = run.stage_dir(stage) / EXPORT_DIRS["hf"]
    if not (folder / "config.json").is_file():
        return None
    arch = read_checkpoint(run.stage_dir(stage) / TEACHER_BACKBONE).arch or {}
    return write_card(run, stage, Export("hf", folder, hf_usage(folder), export_notes(arch, "hf")), results)
