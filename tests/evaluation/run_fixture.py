"""A small but complete run directory, written with the project's own writers (ledger, shards, manifests), so the
report can be built and checked without running the pipeline. 40 input rows:

- rows come from 3 hosts in turn; ingest drops rows 0-1 (http_404) and 2 (decode_error); 37 images go on;
- nsfw drops row 3 (score 0.95); faces blurs 2 images (rows 4, 5: one face each);
- dedup: rows 6-8 are one component (6 kept), rows 9-10 another (9 kept), row 11 copies an eval image -> 4 drops;
- retrieve: 2 seed queries retrieve 4 images each (rows 12-19); the other 12 images are not retrieved;
- rebalance keeps 6 of the 8; the corpus holds those 6.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from infra.lineage import LedgerWriter
from infra.manifest import StageManifest, write_manifest
from infra.run import RunDir
from infra.shards import ShardWriter

N_ROWS = 40
HOSTS = ("img.a.example", "B.Example:8080", "c.example")  # row r comes from HOSTS[r % 3]
STAGES = ["crawl", "ingest", "nsfw", "faces", "dedup", "embed", "retrieve", "rebalance", "corpus", "pretrain", "evaluate"]


def _png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _manifest(run: Path, stage: str, counts: dict, extra: dict | None = None) -> None:
    write_manifest(run / "stages" / stage, StageManifest(
        stage=stage, run_id=run.name, config_hash="c", code_version="v", inputs_digest="d",
        started_at="2026-11-22T10:00:00+00:00", finished_at="2026-11-22T10:00:02.500000+00:00", counts=counts,
        extra=extra or {}))  # fmt: skip


def build_run(root: Path, run_id: str = "fixture-run") -> Path:
    run = root / run_id
    stages = run / "stages"
    images = {r: _png(r) for r in range(N_ROWS)}
    ids = {r: hashlib.sha256(b).hexdigest() for r, b in images.items()}
    # Inputs the config points at: a seed set and an evaluation set (folder format).
    seeds = root / "inputs" / "seeds" / "0"
    seeds.mkdir(parents=True)
    queries = []
    for q in range(2):
        data = _png(1000 + q)
        (seeds / f"q{q}.png").write_bytes(data)
        queries.append(hashlib.sha256(data).hexdigest())
    evaldir = root / "inputs" / "eval" / "test" / "0"
    evaldir.mkdir(parents=True)
    (evaldir / "e0.png").write_bytes(images[11])
    cfg = {"data": {"seed_sets": [{"name": "seeds", "path": str(seeds.parent)}],
                    "eval_sets": [{"name": "toy", "train": str(evaldir.parent), "test": str(evaldir.parent)}]},
           "embed": {"backbone": {"kind": "vit", "arch": "vit_tiny", "path": None}}}  # fmt: skip
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "run.json").write_text(json.dumps({"run_id": run_id, "created": "2026-11-22T10:00:00+00:00"}))

    ingest = LedgerWriter("ingest")
    for r in range(N_ROWS):
        ingest.info("input", row_id=r, url=f"http://{HOSTS[r % 3]}/img/{r}.png")
    for r, reason in ((0, "http_404"), (1, "http_404"), (2, "decode_error")):
        ingest.drop(reason, row_id=r)
    for r in range(3, N_ROWS):
        ingest.info("downloaded", row_id=r, image_id=ids[r])
    ingest.write(stages / "ingest" / "ledger" / "00000.parquet")
    _manifest(run, "ingest", {"rows": N_ROWS, "kept": 37, "dropped": {"http_404": 2, "decode_error": 1}})

    nsfw = LedgerWriter("nsfw")
    scores = []
    for r in range(3, N_ROWS):
        s = 0.95 if r == 3 else r / 200
        nsfw.info("nsfw_score", row_id=r, image_id=ids[r], detail={"score": s})
        scores.append({"row_id": r, "image_id": ids[r], "nsfw_score": s, "flagged": r == 3, "dropped": r == 3})
    nsfw.drop("nsfw", row_id=3, image_id=ids[3], detail={"score": 0.95})
    nsfw.write(stages / "nsfw" / "ledger" / "00000.parquet")
    (stages / "nsfw" / "scores").mkdir(parents=True)
    pd.DataFrame(scores).to_parquet(stages / "nsfw" / "scores" / "00000.parquet")
    _manifest(run, "nsfw", {"kept": 36, "dropped": {"nsfw": 1}}, {"threshold": 0.8})

    faces = LedgerWriter("faces")
    with ShardWriter(stages / "faces" / "shards", "00000") as shard:
        for r in range(4, N_ROWS):
            n = int(r in (4, 5))
            faces.info("faces", row_id=r, image_id=ids[r], detail={"n_faces": n, "boxes": [[1, 1, 8, 8]] * n})
            shard.add(ids[r], images[r], "png", row_id=r)
    faces.write(stages / "faces" / "ledger" / "00000.parquet")
    _manifest(run, "faces", {"kept": 36, "blurred": 2, "dropped": {}})

    dedup = LedgerWriter("dedup")
    comp = []
    groups = {6: 6, 7: 6, 8: 6, 9: 9, 10: 9}
    for r in range(4, N_ROWS):
        rep = groups.get(r, r)
        comp.append({"image_id": ids[r], "row_id": r, "shard": "00000", "component": rep,
                     "component_size": sum(1 for v in groups.values() if v == rep) or 1, "representative": ids[rep],
                     "eval_match": "toy/test/0/e0.png" if r == 11 else None})  # fmt: skip
        if rep != r:
            dedup.drop("near_duplicate", row_id=r, image_id=ids[r])
    dedup.drop("eval_contamination", row_id=11, image_id=ids[11], detail={"eval_image": "toy/test/0/e0.png"})
    dedup.write(stages / "dedup" / "ledger" / "dedup.parquet")
    pd.DataFrame(comp).to_parquet(stages / "dedup" / "components.parquet")
    _manifest(run, "dedup", {"kept": 32, "dropped": {"near_duplicate": 3, "eval_contamination": 1}},
              {"threshold": 0.6, "descriptor": "pixel16"})  # fmt: skip
    _manifest(run, "embed", {"kept": 32})

    retrieve = LedgerWriter("retrieve")
    retrieved = list(range(12, 20))
    for r in retrieved:
        q = queries[(r - 12) // 4]
        retrieve.info("retrieved", row_id=r, image_id=ids[r],
                      detail={"seed_set": "seeds", "method": "sample", "query": q, "similarity": 0.9 - (r % 4) / 10})
    for r in [4, 5, 6, 9, *range(20, N_ROWS)]:
        retrieve.drop("not_retrieved", row_id=r, image_id=ids[r])
    retrieve.write(stages / "retrieve" / "ledger" / "retrieve.parquet")
    _manifest(run, "retrieve", {"kept": 8, "dropped": {"not_retrieved": 24}})

    rebalance = LedgerWriter("rebalance")
    selected = [r not in (12, 13) for r in retrieved]
    for r, keep in zip(retrieved, selected, strict=True):
        if not keep:
            rebalance.drop("not_sampled", row_id=r, image_id=ids[r])
    rebalance.write(stages / "rebalance" / "ledger" / "rebalance.parquet")
    pd.DataFrame({"image_id": [ids[r] for r in retrieved], "row_id": retrieved, "selected": selected,
                  "cluster_l1": [0, 0, 0, 0, 1, 1, 2, 3], "cluster_l2": [0, 0, 0, 0, 0, 0, 1, 1]}).to_parquet(
        stages / "rebalance" / "selected.parquet")  # fmt: skip
    _manifest(run, "rebalance", {"kept": 6, "dropped": {"not_sampled": 2}})

    corpus = LedgerWriter("corpus")
    for r, keep in zip(retrieved, selected, strict=True):
        if keep:
            corpus.keep("in_corpus", row_id=r, image_id=ids[r])
    corpus.write(stages / "corpus" / "ledger" / "corpus.parquet")
    pd.DataFrame([{"dataset": "seeds", "images": 2, "retrieval": "sample", "retrieved": 8, "final": 6},
                  {"dataset": "total", "images": None, "retrieval": "", "retrieved": None, "final": 6}]).to_parquet(
        stages / "corpus" / "composition.parquet")  # fmt: skip
    _manifest(run, "corpus", {"kept": 6})

    steps = np.arange(30)
    (stages / "pretrain").mkdir(parents=True)
    pd.DataFrame({"step": steps, "total_loss": 10 - steps / 10, "dino_local_crops_loss": 5 - steps / 20,
                  "dino_global_crops_loss": 2 - steps / 50, "koleo_loss": -0.1 - steps / 300, "ibot_loss": 3 - steps / 40,
                  "lr": np.minimum(steps, 10) * 1e-4, "last_layer_lr": np.minimum(steps, 10) * 1e-4,
                  "wd": 0.04 + steps / 100, "momentum": 0.99 + steps / 3000, "teacher_temp": 0.04 + steps / 1000,
                  "proto_entropy": 7 - steps / 30, "target_entropy": 3 - steps / 30}).to_csv(
        stages / "pretrain" / "metrics.csv", index=False)  # fmt: skip
    _manifest(run, "pretrain", {"steps": 30}, {"images_per_second": 123.4})

    rows = []
    for model, role, knn in (("pretrained", "pretrained", 80.0), ("dinov2-s14", "reference", 95.5),
                             ("random-init", "baseline", 30.25), ("raw-pixels", "baseline", 70.0)):  # fmt: skip
        rows += [{"benchmark": "toy", "kind": "classification", "protocol": "knn", "model": model, "metric": "top1_k20",
                  "value": knn, "detail": "{}", "role": role},
                 {"benchmark": "toy", "kind": "classification", "protocol": "linear", "model": model, "metric": "top1",
                  "value": knn + 1, "role": role, "detail": json.dumps({"best": "n4_avgpool_lr0.001", "n_last": 4,
                                                                        "avgpool": True, "lr": 0.001,
                                                                        "iterations": 500})}]  # fmt: skip
    # A dense probe stopped early (the demo's 200 iterations): every model but the reference below the floor's
    # pixel accuracy (86.06 %), on a 4 x 4 patch grid for 28 x 28 px labels.
    dense = {"n_classes": 11, "iterations": 200, "grid": [4, 4], "label_size": [28, 28], "majority_miou": 7.82,
             "majority_pixel_accuracy": 86.06, "patch_majority_miou": 33.54}  # fmt: skip
    for model, role, miou, acc in (("pretrained", "pretrained", 10.18, 59.08), ("dinov2-s14", "reference", 30.5, 90.25),
                                   ("random-init", "baseline", 11.26, 64.5), ("raw-pixels", "baseline", 11.17, 64.71)):
        rows += [{"benchmark": "strokes", "kind": "segmentation", "protocol": "dense_linear", "model": model,
                  "metric": metric, "value": v, "role": role, "detail": json.dumps(dense)}
                 for metric, v in (("miou", miou), ("pixel_accuracy", acc))]  # fmt: skip
    results = pd.DataFrame(rows)
    (stages / "evaluate").mkdir(parents=True)
    results.to_parquet(stages / "evaluate" / "results.parquet")
    metrics: dict = {"toy": {}, "strokes": {}}
    for r in rows:
        metrics[r["benchmark"]].setdefault(r["model"], {})[f"{r['protocol']}_{r['metric']}"] = r["value"]
    (stages / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    _manifest(run, "evaluate", {"results": len(rows)}, {"feature_cache": {"hits": 2, "misses": 6}})
    (stages / "crawl").mkdir(parents=True)
    _manifest(run, "crawl", {"rows": N_ROWS})
    _history(RunDir(root, run_id))
    return run


def _history(run: RunDir) -> None:
    """events.jsonl of a run that took three processes and a retry: killed inside ingest after 2 shards; resumed
    with one key changed, ingest then finishes and pretraining fails; resumed again from pretraining's step-4
    checkpoint to the end; then `lvd retry-failed` downloads the 3 failed URLs again (none recovered), and once more
    with reasons it refuses."""
    run.log_event("flow_started")
    run.log_event("started", "crawl", key="k")
    run.log_event("completed", "crawl", key="k", counts={}, peak_memory=900 * 2**20)
    run.log_event("started", "ingest", key="k")
    run.log_event("shard_done", "ingest", shard="00000")
    run.log_event("shard_done", "ingest", shard="00001")
    run.log_event("config_amended", changed={"run.shard_retries": {"old": 0, "new": 2}})
    run.log_event("resumed")
    run.log_event("flow_started")
    run.log_event("skipped", "crawl", key="k")
    run.log_event("started", "ingest", key="k")
    run.log_event("shard_skipped", "ingest", shard="00000")
    run.log_event("shard_skipped", "ingest", shard="00001")
    run.log_event("shard_done", "ingest", shard="00002")
    run.log_event("completed", "ingest", key="k", counts={})
    for stage in STAGES[2:9]:
        run.log_event("started", stage, key="k")
        run.log_event("completed", stage, key="k", counts={}, peak_memory=(1_500 if stage == "nsfw" else 1_000) * 2**20)
    run.log_event("started", "pretrain", key="k")
    run.log_event("failed", "pretrain", key="k", error="RuntimeError: loss is NaN", peak_memory=1_200 * 2**20)
    run.log_event("resumed")
    run.log_event("flow_started")
    for stage in STAGES[:9]:
        run.log_event("reused", stage)
    run.log_event("started", "pretrain", key="k")
    run.log_event("training_resumed", "pretrain", step=4)
    run.log_event("completed", "pretrain", key="k", counts={}, peak_memory=2_000 * 2**20)
    run.log_event("started", "evaluate", key="k")
    run.log_event("completed", "evaluate", key="k", counts={})
    run.log_event("stages_completed")
    run.log_event("report_written", path="report.html")
    run.log_event("flow_completed")
    run.log_event("retry_started", "ingest", reasons=None)
    run.log_event("shard_done", "ingest", shard="r1-00000")
    run.log_event("retried", "ingest", attempt=1, rows=3, recovered=0)
    run.log_event("retry_started", "ingest", reasons=["url_*"])
    run.log_event("retry_failed", "ingest", error="ValueError: reasons ['url_*'] are decided without downloading")
