"""The optional training stages in the flow, on the tiny demo crawl (configs/tiny_highres_distill.yaml): pretrain a
ViT-nano, finish it at a higher resolution (pretrain_highres), distill it into a ViT-pico (distill), and evaluate the
student. Each is a normal stage: a manifest, a key chained to its upstream, cached on a re-run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from infra.config import load_config
from infra.manifest import inputs_digest, read_manifest
from infra.runs import amend_run, prepare_run
from infra.stage import stage_key

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_highres_distill.yaml"
TRAINING = ["pretrain", "pretrain_highres", "distill"]
# What this test does not read is switched off or made small: NSFW scoring, the embedding model of retrieval (a
# ViT-pico/7 instead of ViT-tiny/4), evaluation beyond kNN and the report.
FAST = ["nsfw.enabled=false", "embed.backbone.arch=vit_pico", "embed.backbone.patch_size=7",
        "evaluate.protocols=[knn]", "evaluate.raw_pixel_baseline=false", "evaluate.dense.iterations=10",
        "evaluate.report=false"]


@pytest.mark.parametrize(("changes", "chain"), [
    ([], {"pretrain": ("corpus",), "evaluate": ("pretrain",)}),
    (["train.highres.enabled=true"], {"pretrain": ("corpus",), "pretrain_highres": ("corpus", "pretrain"),
                                      "evaluate": ("pretrain_highres",)}),
    (["train.distill.enabled=true"], {"pretrain": ("corpus",), "distill": ("corpus", "pretrain"),
                                      "evaluate": ("distill",)}),
    (["train.highres.enabled=true", "train.distill.enabled=true"], {
        "pretrain": ("corpus",), "pretrain_highres": ("corpus", "pretrain"), "distill": ("corpus", "pretrain_highres"),
        "evaluate": ("distill",)}),
    (["train.distill.enabled=true", "run.stop_after=pretrain"], {"pretrain": ("corpus",)}),
    (["train.distill.enabled=true", "train.enabled=false"], {}),
])
def test_active_stages_chain_the_enabled_training_stages(changes, chain):
    from flows.stages import active_stages
    from infra.plan import listed

    cfg = load_config(CONFIG.parent / "tiny.yaml", changes)
    specs = active_stages(cfg)
    after_corpus = [s.name for s in specs][[s.name for s in specs].index("corpus") + 1:]
    assert after_corpus == list(chain)
    assert {s.name: s.upstream for s in specs if s.name in chain} == chain
    # The summary lists an optional stage when it is enabled (pending after a stop_after, like any later stage).
    enabled = [n for n, key in (("pretrain_highres", "highres"), ("distill", "distill"))
               if f"train.{key}.enabled=true" in changes and "train.enabled=false" not in changes]
    assert [n for n in listed(cfg) if n in ("pretrain", "pretrain_highres", "distill")] == ["pretrain", *enabled]


@pytest.fixture(scope="module")
def flow_run(prefect_server, tmp_path_factory):
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("runs")
    run, cfg = prepare_run(CONFIG, [f"run.root={root}", *FAST])
    first = pipeline(str(root), run.run_id, return_state=True)
    n_events = len(run.events())
    again = pipeline(str(root), run.run_id, return_state=True)
    return run, cfg, first, again, run.events()[n_events:]


def _train_config(run, stage: str) -> dict:
    return yaml.safe_load((run.stage_dir(stage) / "train_config.yaml").read_text())


@pytest.mark.slow
def test_the_training_stages_run_after_pretrain_with_manifests_chained_to_their_upstream(flow_run):
    from flows.stages import SPECS

    run, cfg, first, again, rerun_events = flow_run
    assert first.is_completed(), first.message
    started = [e["stage"] for e in run.events() if e["event"] == "started"]
    assert started[-4:] == [*TRAINING, "evaluate"]
    manifests = {s: read_manifest(run.stage_dir(s)) for s in ["corpus", *TRAINING, "evaluate"]}
    assert {s: m.counts["steps"] for s, m in manifests.items() if s in TRAINING} == {
        "pretrain": 3, "pretrain_highres": 3, "distill": 2}
    for stage in TRAINING:
        outputs = {o["path"] for o in manifests[stage].outputs}
        assert {f"stages/{stage}/{f}" for f in ("teacher_backbone.safetensors", "teacher_checkpoint.safetensors",
                                                "metrics.csv")} <= outputs
    # Each key covers the previous training stage's manifest (and the corpus): a change upstream redoes it.
    chain = {"pretrain": ["corpus"], "pretrain_highres": ["corpus", "pretrain"],
             "distill": ["corpus", "pretrain_highres"], "evaluate": ["distill"]}
    for stage, upstream in chain.items():
        up = {u: manifests[u] for u in upstream}
        assert manifests[stage].inputs_digest == SPECS[stage].inputs_digest(cfg, up), stage
        assert (manifests[stage].inputs_digest == inputs_digest(up)) == (SPECS[stage].external is None), stage
    assert again.is_completed() and [e for e in rerun_events if e["event"] == "started"] == []  # all cached


@pytest.mark.slow
def test_a_distill_change_redoes_only_distill_and_evaluate(flow_run):
    from flows.stages import active_stages

    run, cfg, *_ = flow_run
    changed = cfg.model_copy(deep=True)
    changed.train.distill.overrides = {**cfg.train.distill.overrides, "optim": {"base_lr": 1e-3}}
    keys = {s.name: (stage_key(s, run, cfg), stage_key(s, run, changed)) for s in active_stages(cfg)}
    assert [name for name, (a, b) in keys.items() if a != b] == ["distill", "evaluate"]


@pytest.mark.slow
def test_highres_continues_the_pretrain_teacher_at_42_px(flow_run):
    from training.checkpoint import load_backbone
    from training.metrics import read_csv

    run, *_ = flow_run
    hr = _train_config(run, "pretrain_highres")
    assert (hr["mode"], hr["max_steps"], hr["crops"]["global_crops_size"], hr["student"]["arch"]) == (
        "highres", 3, 42, "vit_nano")
    assert hr["student"]["pretrained_weights"] == str(run.stage_dir("pretrain") / "teacher_checkpoint.safetensors")
    assert load_backbone(run.stage_dir("pretrain") / "teacher_backbone.safetensors").pos_embed.shape == (1, 17, 128)
    assert load_backbone(run.stage_dir("pretrain_highres") / "teacher_backbone.safetensors").pos_embed.shape == (
        1, 1 + 6 * 6, 128)
    rows = read_csv(run.stage_dir("pretrain_highres") / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 1, 2]
    # Every schedule compressed into the 3 steps (no warmup left): the lr's whole cosine, 4e-3 x sqrt(16 / 1024) down
    # to the demo recipe's min_lr (which tiny.yaml inherits).
    assert hr["optim"]["min_lr"] == 2e-4
    peak, low = 4e-3 * (16 / 1024) ** 0.5, 2e-4
    assert [r["lr"] for r in rows] == pytest.approx([peak, low + (peak - low) * 0.75, low + (peak - low) * 0.25])


@pytest.mark.slow
def test_the_distilled_student_has_the_configured_smaller_architecture(flow_run):
    from training.checkpoint import load_backbone
    from training.metrics import read_csv

    run, *_ = flow_run
    d = _train_config(run, "distill")
    assert (d["mode"], d["student"]["arch"], d["student"]["patch_size"], d["crops"]["global_crops_size"]) == (
        "distill", "vit_pico", 7, 28)
    assert d["teacher_weights"] == str(run.stage_dir("pretrain_highres") / "teacher_checkpoint.safetensors")
    student = load_backbone(run.stage_dir("distill") / "teacher_backbone.safetensors")  # the student's EMA
    teacher = load_backbone(run.stage_dir("pretrain_highres") / "teacher_backbone.safetensors")
    assert (student.embed_dim, len(student.blocks), student.patch_size) == (96, 4, 7)
    assert (teacher.embed_dim, len(teacher.blocks)) == (128, 6)
    rows = read_csv(run.stage_dir("distill") / "metrics.csv")
    assert {r["n_masked_patches"] for r in rows} == {2 * 16 * 16}  # iBOT on every patch of both global crops


@pytest.mark.slow
def test_evaluation_scores_the_last_training_stage(flow_run):
    run, *_ = flow_run
    models = read_manifest(run.stage_dir("evaluate")).extra["models"]
    assert set(models) == {"pretrained", "random-init"}
    assert models["pretrained"]["checkpoint"] == str(run.stage_dir("distill") / "teacher_backbone.safetensors")
    assert models["random-init"]["fingerprint"].startswith("vit:vit_pico:random:seed=0:")
    assert '"image_size": 28' in models["random-init"]["fingerprint"]


@pytest.mark.slow
def test_each_training_stage_reports_its_progress_to_prefect(flow_run):
    """The Prefect UI shows each training stage's progress artifact, at 100 % once the stage has trained."""
    import asyncio
    import json
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run, _, first, *_ = flow_run

    async def read():
        async with get_client() as client:
            flow_run_id = ArtifactFilterFlowRunId(any_=[first.state_details.flow_run_id])
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=flow_run_id))

    artifacts = {a.key: a for a in asyncio.run(read()) if a.type == "progress"}
    assert set(artifacts) == {"pretrain-progress", "pretrain-highres-progress", "distill-progress"}
    for stage in ("pretrain", "pretrain_highres", "distill"):
        artifact = artifacts[f"{stage.replace('_', '-')}-progress"]
        progress = json.loads((run.stage_dir(stage) / "progress.json").read_text())
        assert progress["step"] == progress["total"] and float(artifact.data) == 100.0
        want = rf"run {run.run_id}, stage {stage}: step {progress['total']} of {progress['total']}, [0-9.]+ images/s"
        assert re.fullmatch(want, artifact.description), artifact.description


@pytest.mark.slow
def test_each_stage_result_and_the_run_summary_are_artifacts_in_prefect(flow_run):
    """The Prefect UI shows, per stage task run, what the stage kept and dropped and how it came about, and per flow
    run the `lvd status` table (key `lvd-<run id>`: a version per attempt; the second attempt reused every stage)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.artifacts import prefect_name
    from flows.stages import active_stages
    from infra.summary import run_summary

    run, cfg, first, again, _ = flow_run

    async def read(state):
        async with get_client() as client:
            flow_run_id = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=flow_run_id))

    artifacts = [a for a in asyncio.run(read(first)) if a.type == "markdown"]
    stages = {a.description.split(" of run ")[0]: a.data for a in artifacts if a.key is None}
    assert set(stages) == {s.name for s in active_stages(cfg)}
    ingest = read_manifest(run.stage_dir("ingest"))
    reasons = {k: v for k, v in sorted(ingest.counts["dropped"].items()) if v}
    dropped = f"{sum(reasons.values()):,} (" + ", ".join(f"{k} {v:,}" for k, v in reasons.items()) + ")"
    assert reasons, "the tiny crawl drops images (its hostile URLs): the artifact names why"
    assert re.match(rf"\*\*ingest\*\* of run `{run.run_id}`: computed in 0:00:\d\d, peak memory \d+\.\d GiB\.",
                    stages["ingest"])  # fmt: skip
    assert f"| kept | {ingest.counts['kept']:,} |" in stages["ingest"] and f"| dropped | {dropped} |" in stages["ingest"]
    assert f"| output files | {len(ingest.outputs)} |" in stages["ingest"]
    assert f"`lvd lineage {run.run_id} IMAGE_ID`" in stages["ingest"]
    [summary] = [a for a in artifacts if a.key == prefect_name(run.run_id)]
    table = run_summary(run, cfg)["stages"]
    for r in table:  # the same rows as `lvd status`
        kept = "" if r["kept"] is None else f"{r['kept']:,}"
        assert f"| {r['stage']} | {r['state']} | {kept} | {r['dropped']:,} |" in summary.data
    assert summary.description == f"run {run.run_id}, attempt 1"
    [second] = [a for a in asyncio.run(read(again)) if a.type == "markdown"]  # cached stages: no task body ran
    assert (second.key, second.description) == (prefect_name(run.run_id), f"run {run.run_id}, attempt 2")


@pytest.mark.slow
def test_each_training_stage_writes_a_transformers_export_with_its_model_card(flow_run, tmp_path, capsys):
    """`train.exports` (default [hf]): every training stage's folder loads in transformers with the stage's features;
    its card names the run and its corpus; the evaluated stage's card holds the run's evaluation table (completed
    by the evaluate stage, whose manifest lists it: the audit stays clean). `lvd export` writes the other formats."""
    import pandas as pd
    import torch
    import transformers

    from flows.cli import main as cli
    from training.checkpoint import load_backbone, read_sidecar

    run, *_ = flow_run
    composition = read_manifest(run.stage_dir("corpus")).extra["composition"]
    for stage in TRAINING:
        folder = run.stage_dir(stage) / "hf"
        hf = transformers.AutoModel.from_pretrained(folder).eval()
        ours = load_backbone(run.stage_dir(stage) / "teacher_backbone.safetensors")
        x = torch.randn(2, 3, ours.arch_kwargs["img_size"], ours.arch_kwargs["img_size"])
        with torch.no_grad():
            torch.testing.assert_close(hf(pixel_values=x).pooler_output, ours(x), atol=1e-5, rtol=1e-5)
        listed = {o["path"] for o in read_manifest(run.stage_dir(stage)).outputs}
        assert {f"stages/{stage}/hf/{f}" for f in ("config.json", "model.safetensors", "preprocessor_config.json")} <= listed
        card = (folder / "README.md").read_text()
        assert f"run `{run.run_id}`, stage `{stage}`" in card and "library_name: transformers" in card
        assert all(f"| {row['dataset']} |" in card for row in composition)
        total = next(r["final"] for r in composition if r["dataset"] == "total")
        assert f"{total:,} images in the corpus." in card
        if stage != "distill":
            assert "The run evaluates the `distill` stage's model" in card
    results = pd.read_parquet(run.stage_dir("evaluate") / "results.parquet")
    card = (run.stage_dir("distill") / "hf" / "README.md").read_text()
    models = list(dict.fromkeys(results["model"]))
    for (bench, protocol, metric), rows in results.groupby(["benchmark", "protocol", "metric"]):
        values = rows.set_index("model")["value"]
        assert f"| {bench} | {protocol} | {metric} | " + " | ".join(f"{values[m]:.2f}" for m in models) + " |" in card
    assert "stages/distill/hf/README.md" in {o["path"] for o in read_manifest(run.stage_dir("evaluate")).outputs}
    assert cli(["audit", run.run_id, "--root", str(run.root)]) == 0

    assert cli(["export", run.run_id[:-3], "--format", "timm", str(tmp_path / "m.safetensors"),  # (an id's prefix)
                "--root", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert f"timm export of run {run.run_id}, stage distill ->" in out and "timm.create_model(" in out
    assert read_sidecar(tmp_path / "m.safetensors")["image_size"] == 28
    assert cli(["export", run.run_id, "--format", "pth", str(tmp_path / "p.pth"), "--stage", "pretrain",
                "--root", str(run.root)]) == 0
    assert load_backbone(tmp_path / "p.pth").arch_kwargs == load_backbone(
        run.stage_dir("pretrain") / "teacher_backbone.safetensors").arch_kwargs
    assert cli(["export", run.run_id, "--format", "hf", str(tmp_path / "hf"), "--stage", "nope",
                "--root", str(run.root)]) == 2
    assert "trained stages: pretrain, pretrain_highres, distill" in capsys.readouterr().err

    # `lvd resume RUN train.exports=[hf, timm]` (how the run executes, not what it learns: in no stage's key): every
    # stage stays complete, and each training stage gets the export it lacked (before: nothing was written).
    n = len(run.events())
    amend_run(run, ["train.exports=[hf, timm, onnx]"])  # as the resume below does first; its dry run says what follows
    assert cli(["resume", run.run_id, "--dry-run", "--root", str(run.root)]) == 0
    assert "pretrain_highres  complete: reused (timm, onnx exports to write)" in capsys.readouterr().out
    assert cli(["resume", run.run_id, "train.exports=[hf, timm, onnx]", "--root", str(run.root)]) == 0
    assert [e["stage"] for e in run.events()[n:] if e["event"] == "started"] == []
    for stage in TRAINING:
        teacher = load_backbone(run.stage_dir(stage) / "teacher_backbone.safetensors")
        size = teacher.arch_kwargs["img_size"]
        assert read_sidecar(run.stage_dir(stage) / "timm" / "model.safetensors")["image_size"] == size
        onnx = json.loads((run.stage_dir(stage) / "onnx" / "model.onnx.json").read_text())
        assert (onnx["image_size"], onnx["lvd_backbone"]) == (size, teacher.arch_kwargs)
    assert "pretrain: timm, onnx exports written (the stage was exported without)" in capsys.readouterr().err
    assert cli(["audit", run.run_id, "--root", str(run.root)]) == 0
