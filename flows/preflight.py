"""Every model file a run will use, its URL list, and its seed and evaluation sets, opened and checked before any
stage runs (``lvd run``, ``lvd resume``).

A wrong file otherwise fails only when its stage starts, after hours of download and filtering. Each model a run's
remaining stages will load is built here exactly as its stage builds it and run on one small image: the file exists,
loads, accepts the input its stage feeds, and gives an output of the configured size (SSCD: ``dedup.descriptor.dims``;
a CLIP-style NSFW head: the encoder's embedding size). The URL list's files are opened and their first row read
(:func:`curation.urls.url_list_problems`). Problems name the config key and the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from infra.config import PipelineConfig
from infra.run import RunDir


def probe_image(size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A small RGB image with some structure (a gradient and a disc), as a stage would decode one."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 3) ** 2) * 120
    arr = np.stack([xx * 255 // w, yy * 255 // h, disc + 60], -1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _file(key: str, path: Path | None, folder: bool = False) -> str | None:
    """A problem where ``path`` is not a file (``folder``: nor a folder, as transformers and timm publish models)."""
    if path is None:
        return f"{key}: required (a local model file)"
    if not (Path(path).is_file() or (folder and Path(path).is_dir())):
        return f"{key}: {path} does not exist"
    return None


def _attempt(key: str, path: Path | str | None, check: Callable[[], str | None]) -> list[str]:
    """Run ``check`` (which loads and probes a model); any error becomes a problem naming ``key`` and the file."""
    where = f"{key}: {path}" if path is not None else key
    try:
        problem = check()
    except Exception as err:  # the top-level check: every load failure is reported with its key, none raised
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return [f"{where} cannot be used: {type(err).__name__}: {first[:400]}"]
    return [f"{where}: {problem}"] if problem else []


def sscd_problems(cfg: PipelineConfig) -> list[str]:
    d = cfg.dedup.descriptor
    if not cfg.dedup.enabled or d.backend != "sscd":
        return []
    missing = _file("dedup.descriptor.path", d.path)
    if missing:
        return [missing]

    def check() -> str | None:
        from curation.descriptors import build_descriptor

        out = build_descriptor(d)([probe_image()])
        if out.shape != (1, d.dims):
            return f"gives {out.shape[-1]}-d descriptors, but dedup.descriptor.dims is {d.dims}"
        return None

    return _attempt("dedup.descriptor.path", d.path, check)


def nsfw_problems(cfg: PipelineConfig) -> list[str]:
    n = cfg.nsfw
    if not n.enabled:
        return []
    if n.backend == "clip_head":
        missing = [p for p in (_file("nsfw.encoder_path", n.encoder_path), _file("nsfw.head_path", n.head_path)) if p]
        if missing:
            return missing
    key, path = ("nsfw.encoder_path / nsfw.head_path", f"{n.encoder_path}, {n.head_path}") if n.backend == "clip_head" \
        else ("nsfw.backend", n.backend)  # fmt: skip

    def check() -> str | None:
        from curation.nsfw import scorer_for

        scores = scorer_for(n).score([probe_image()])  # the stage's own model, cached for this process
        if scores.shape != (1,) or not 0.0 <= float(scores[0]) <= 1.0:
            return f"scored the probe image {scores!r}; expected one probability"
        return None

    return _attempt(key, path, check)


def faces_problems(cfg: PipelineConfig) -> list[str]:
    f = cfg.faces
    if not f.enabled:
        return []
    if f.backend == "yunet":
        missing = _file("faces.model_path", f.model_path)
        if missing:
            return [missing]
    key, path = ("faces.model_path", f.model_path) if f.backend == "yunet" else ("faces.backend", f.backend)

    def check() -> str | None:
        from curation.faces import build_detector

        boxes = build_detector(f).detect(probe_image())
        return None if isinstance(boxes, list) else f"returned {type(boxes).__name__}, not a list of boxes"

    return _attempt(key, path, check)


def backbone_problems(key: str, backbone) -> list[str]:  # backbone: BackboneConfig
    if backbone.path is None:
        return [] if backbone.kind != "dinov2" else [f"{key}.path: required for kind=dinov2"]
    missing = _file(f"{key}.path", backbone.path, folder=True)  # (a transformers or timm folder, a hub cache's)
    if missing:
        return [missing]

    def check() -> str | None:
        import torch

        from flows.models import build_model

        model = build_model(backbone).eval()
        s = backbone.image_size
        arch = getattr(model, "dinov3_arch", None)
        if arch is not None and s < 4 * arch.patch_size:  # (the default 28 px is the demo ViT's)
            return (f"image_size {s} gives this DINOv3 (patch {arch.patch_size}) a {s // arch.patch_size}x"
                    f"{s // arch.patch_size} patch grid: set {key}.image_size (DINOv3 is evaluated at 224 px and more)")
        with torch.inference_mode():
            out = model(torch.zeros(1, 3, s, s))
        if out.ndim != 2 or out.shape[0] != 1:
            return f"gives an output of shape {tuple(out.shape)} for one {s}x{s} image; expected (1, dim)"
        return None

    return _attempt(f"{key}.path", backbone.path, check)


def _stages(cfg: PipelineConfig, stages: set[str] | None) -> set[str]:
    """``stages``, by default every stage this configuration runs."""
    if stages is not None:
        return stages
    from flows.stages import active_stages

    return {s.name for s in active_stages(cfg)}


def check_model_files(cfg: PipelineConfig, stages: set[str] | None = None) -> list[str]:
    """Problems with the model files of ``stages`` (default: every stage this configuration runs), each naming the
    config key and the file. Models are loaded and run once on a small image; nothing is written."""
    stages = _stages(cfg, stages)
    problems: list[str] = []
    if "nsfw" in stages:
        problems += nsfw_problems(cfg)
    if "faces" in stages:
        problems += faces_problems(cfg)
    if "dedup" in stages:
        problems += sscd_problems(cfg)
    if "embed" in stages:
        problems += backbone_problems("embed.backbone", cfg.embed.backbone)
    if "evaluate" in stages:
        for m in cfg.evaluate.models:
            problems += backbone_problems(f"evaluate.models[{m.name}].backbone", m.backbone)
    return problems


def image_set_problems(cfg: PipelineConfig, stages: set[str] | None = None, remember: bool = True) -> list[str]:
    """The seed and evaluation sets ``stages`` read, read here as they will be: every image decoded, every image of
    an evaluation split labelled (they are classification benchmarks), no split empty. A stage otherwise stops at the
    first bad file, after ingest and the filters (dedup reads the evaluation sets to remove their copies), with
    Pillow's message and no file name. A split that passed is remembered under ``<run root>/.cache/sets`` (once the
    runs folder exists, and not by a dry run: ``remember`` False) by its files' names, sizes and times, so a later
    start costs a walk of the folder."""
    import contextlib
    import json

    from infra.datasets import check_split, split_fingerprint
    from infra.storage import atomic_write_text, sha256_bytes

    stages = _stages(cfg, stages)
    splits: list[tuple[str, Path, str, bool]] = []  # (key, path, format, labels needed)
    if stages & {"dedup", "evaluate"}:
        for e in cfg.data.eval_sets:
            splits += [(f"data.eval_sets[{e.name}].{split}", p, e.format, True)
                       for split, p in (("train", e.train), ("test", e.test), ("val", e.val)) if p is not None]
    for s in cfg.data.seed_sets:
        queries, as_is = s.retrieval != "as_is", s.retrieval == "as_is" or s.include_as_is
        if (queries and "embed" in stages) or (as_is and "corpus" in stages):
            splits.append((f"data.seed_sets[{s.name}].path", s.path, s.format, False))
    cache = Path(cfg.run.root) / ".cache" / "sets"
    problems = []
    for key, path, fmt, labels in splits:
        if not Path(path).exists():
            continue  # reported with the configuration's other paths (infra.runs), or written by the demo run
        fingerprint = split_fingerprint(Path(path))
        passed = None
        if fingerprint is not None:
            passed = cache / f"{sha256_bytes(json.dumps([fingerprint, fmt, labels]).encode())[:32]}.json"
            if passed.is_file():
                continue
        check = check_split(Path(path), fmt, need_labels=labels)
        problems += [f"{key}: {p}" for p in check.problems]
        if remember and not check.problems and passed is not None and Path(cfg.run.root).is_dir():  # (no folder: refused)
            with contextlib.suppress(OSError):  # a cache: a runs folder that cannot be written is reported apart
                passed.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(passed, json.dumps({"path": str(path), "images": check.images,
                                                      "classes": check.classes}))
    return problems


def check_inputs(cfg: PipelineConfig, stages: set[str] | None = None, remember: bool = True) -> list[str]:
    """:func:`check_model_files`, :func:`image_set_problems`, the URL list's problems where the ingest stage is
    among ``stages`` (the demo's list is written by the run itself), and what the workers of a Dask or Ray cluster
    given by address see (:func:`flows.cluster.cluster_problems`)."""
    stages = _stages(cfg, stages)
    problems = []
    if "ingest" in stages and not cfg.demo.enabled:
        from curation.urls import url_list_problems

        problems += url_list_problems(cfg.data, local_roots=cfg.ingest.local_roots)
    problems += check_model_files(cfg, stages) + image_set_problems(cfg, stages, remember)
    from flows.cluster import cluster_problems

    run_path = Path(cfg.run.root) / cfg.run.run_id if cfg.run.run_id else Path(cfg.run.root)
    return problems + cluster_problems(cfg, run_path, stages)


def remaining_stages(run: RunDir, cfg: PipelineConfig) -> set[str]:
    """The stages a run may still compute (`flows.dry_run`): not complete, or after one that is not (complete ones,
    in this run or linked from another, load no model)."""
    from flows.dry_run import dry_run

    return {p.stage for p in dry_run(run, cfg) if p.action not in ("reuse", "link")}


def check_run_inputs(cfg: PipelineConfig, run: RunDir, remember: bool = True) -> list[str]:
    """:func:`check_inputs` for the stages ``run`` may still compute (every stage of a new run; a new run's missing
    list is reported with its other paths, `infra.runs.resolve`)."""
    if not run.exists():
        return check_inputs(cfg, remember=remember)
    stages = remaining_stages(run, cfg)
    url_list = cfg.data.url_list
    gone = "ingest" in stages and not cfg.demo.enabled and url_list is not None and not Path(url_list).exists()
    missing = [f"data.url_list: {url_list} does not exist (the run's ingest has to run)"] if gone else []
    return missing + check_inputs(cfg, stages, remember)


def preflight(cfg: PipelineConfig, stages: set[str] | None = None) -> None:
    """Raise a :class:`ConfigError` listing every problem of the URL list, model files and image sets (before any stage
    runs)."""
    from infra.config import ConfigError

    problems = check_inputs(cfg, stages)
    if problems:
        raise ConfigError(problems, "the run's inputs", "cannot be used")
