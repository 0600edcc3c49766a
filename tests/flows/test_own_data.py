"""A user's own folder of photographs, end to end through `lvd run configs/own_folder.yaml`, in each curation mode:
with and without seed sets (retrieval around them, or balanced sampling of the whole pool), with and without
evaluation sets (evaluated, or "not run" with why). The ledger and the corpus hold the user's rows and nothing else,
`lvd lineage` finds an image by its file:// URL, every corpus image carries its metadata, and the report shows seed
images only through the run's face blurring."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flows.cli import main as cli
from infra.lineage import Ledger, check_terminal_outcomes
from infra.run import RunDir
from infra.shards import iter_tar, list_shards
from tests.flows.own_data import write_eval_set, write_pool, write_seeds

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "own_folder.yaml"
pytestmark = pytest.mark.slow

# The shipped configuration, made small enough for CI: no embedding weights offline (said explicitly), 2 training
# steps on 32 px crops, the kNN protocol only.
SMALL = ["ingest.image_size=64", "embed.backbone.kind=vit", "embed.backbone.path=null", "embed.backbone.image_size=32",
         "embed.allow_random_init=true", "train.max_steps=2", "train.batch_size_per_gpu=4",
         "train.crops.global_crops_size=32", "train.crops.local_crops_size=16", "train.crops.local_crops_number=2",
         "train.dino.head_n_prototypes=64", "train.ibot.head_n_prototypes=64", "evaluate.protocols=[knn]",
         "evaluate.knn.ks=[5]"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("own")
    pool = write_pool(root / "photos")
    seeds = write_seeds(root / "seeds")
    train, test = write_eval_set(root / "eval")
    assert cli(["folder-urls", str(root / "photos"), str(root / "photos.parquet")]) == 0
    return {"root": root, "pool": pool, "seeds": seeds, "train": train, "test": test}


def _run(data: dict, name: str, seeds: bool, evals: bool, capsys) -> tuple[RunDir, str]:
    root = data["root"]
    args = ["run", str(CONFIG), f"data.url_list={root / 'photos.parquet'}", f"ingest.local_roots=[{root / 'photos'}]",
            f"run.root={root / 'runs'}", f"run.run_id={name}", *SMALL]  # fmt: skip
    if seeds:
        args.append(f"data.seed_sets=[{{name: mine, path: {root / 'seeds'}, retrieval: sample, n_neighbors: 2, "
                    "include_as_is: true}]")
    if evals:
        args.append(f"data.eval_sets=[{{name: lfw, train: {data['train']}, test: {data['test']}}}]")
    capsys.readouterr()
    assert cli(args) == 0, capsys.readouterr().err
    return RunDir(root / "runs", name), capsys.readouterr().out


def _corpus_samples(run: RunDir) -> dict[str, dict]:
    """image id -> (its .json member, the sha256 of its image member), straight from the corpus tars."""
    out: dict[str, dict] = {}
    for shard in list_shards(run.stage_dir("corpus") / "shards"):
        for key, ext, data in iter_tar(shard.tar, sidecars=True):
            out.setdefault(key, {})[ext] = data
    return out


@pytest.mark.parametrize("seeds,evals", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["pool-noeval", "seeds-noeval", "pool-eval", "seeds-eval"])
def test_own_folder_end_to_end(data, prefect_server, capsys, seeds, evals):
    name = f"own-{'seeds' if seeds else 'pool'}-{'eval' if evals else 'noeval'}"
    run, out = _run(data, name, seeds, evals, capsys)
    root = data["root"]
    urls = sorted(p.resolve().as_uri() for p in data["pool"])

    # The ledger's input rows are the user's files, each with exactly one terminal outcome.
    ledger = Ledger(run.path)
    inputs = ledger.query(None, ["reason", "url"])
    assert sorted(inputs[inputs["reason"] == "input"]["url"]) == urls
    check = check_terminal_outcomes(ledger)
    assert check.ok and check.n_rows == len(urls)

    # The corpus: the user's pool images that retrieval returned (every one without seeds: no target size is set),
    # plus the seed images added as they are.
    table = pd.read_parquet(run.stage_dir("corpus") / "corpus.parquet")
    pool_rows = table[table["source"] == "pool"]
    retrieve = pd.read_parquet(run.stage_dir("retrieve") / "retrieved.parquet")
    assert sorted(pool_rows["image_id"]) == sorted(retrieve["image_id"]) and set(pool_rows["url"]) <= set(urls)
    samples = _corpus_samples(run)
    assert set(samples) == set(table["image_id"])
    for r in table.itertuples(index=False):
        meta = json.loads(samples[r.image_id]["json"])
        image = next(v for k, v in samples[r.image_id].items() if k != "json")
        assert meta["image_id"] == r.image_id and meta["seed_set"] == r.seed_set and meta["method"] == r.method
        assert meta["sha256"] == hashlib.sha256(image).hexdigest()
        if r.source == "pool":
            assert meta["url"] == r.url and meta["row_id"] == r.row_id and meta["source"] == "pool"
            assert meta["list_source"] == r.list_source == "photos"  # `lvd folder-urls`: the folder (no sub-folders)
            assert meta["original_width"] >= meta["width"] > 0  # stored at most 64 px, from up to 160
    if seeds:
        assert set(retrieve["method"]) == {"sample"} and set(pool_rows["seed_set"]) == {"mine"}
        assert 0 < len(pool_rows) <= 3 * 2  # 3 queries x 2 neighbours
        assert f"corpus: {len(table):,} images = {len(pool_rows):,} pool images selected + 3 seed images" in out
        assert sorted(table[table["method"] == "as_is"]["path"]) == sorted(p.name for p in data["seeds"])
        assert "seed images added as they are (mine 3)" in out
    else:
        assert set(retrieve["method"]) == {"pool"} and sorted(pool_rows["url"]) == urls  # the whole pool
        assert set(table["seed_set"]) == {"(pool)"}
        whole = ledger.query(None, ["stage", "reason"])
        assert (whole[whole["stage"] == "retrieve"]["reason"] == "whole_pool").sum() == len(urls)

    # `lvd lineage` by the file's URL: its chain from the input row to the corpus.
    capsys.readouterr()
    astronaut = (root / "photos" / "astronaut.jpg").resolve().as_uri()
    assert cli(["lineage", name, astronaut, "--root", str(root / "runs"), "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert {e["stage"] for e in chain} >= {"ingest", "nsfw", "faces", "dedup", "retrieve", "corpus"}
    assert chain[-1]["reason"] == "in_corpus"

    # Evaluated, or "not run" with why: in the summary, `lvd status` and the report; never "pending".
    status = {r["stage"]: r for r in _status(name, root, capsys)["stages"]}
    report = (run.path / "report.html").read_text()
    if evals:
        assert status["evaluate"]["state"] == "completed"
        metrics = json.loads((run.stage_dir("evaluate") / "metrics.json").read_text())
        assert set(metrics) == {"lfw"} and "knn_top1_k5" in metrics["lfw"]["pretrained"]
    else:
        why = "no evaluation sets (data.eval_sets and evaluate.benchmarks are empty)"
        assert (status["evaluate"]["state"], status["evaluate"]["why"]) == ("not run", why)
        assert "evaluate   not run" in out and why in out
        assert "Not evaluated: " + why in report
    assert not [r for r in status.values() if r["state"] == "pending"]
    assert "warning: the embedder (vit:vit_tiny) has no weights" in out
    if seeds:
        _assert_report_blurs_the_seed_face(report, data)


def _assert_same_outputs(a: RunDir, b: RunDir) -> None:
    """The curation stages' outputs of two runs are the same: shard files byte for byte, tables frame for frame."""
    for stage, pattern in [("ingest", "shards/*"), ("nsfw", "scores/*"), ("faces", "shards/*"), ("dedup", "kept.parquet"),
                           ("dedup", "descriptors/*"), ("embed", "pool/*"), ("corpus", "corpus.parquet")]:  # fmt: skip
        files = sorted(p.relative_to(a.stage_dir(stage)) for p in a.stage_dir(stage).glob(pattern))
        assert files and files == sorted(p.relative_to(b.stage_dir(stage)) for p in b.stage_dir(stage).glob(pattern))
        for f in files:
            if f.suffix == ".parquet":
                pd.testing.assert_frame_equal(pd.read_parquet(a.stage_dir(stage) / f), pd.read_parquet(b.stage_dir(stage) / f))
            else:
                assert (a.stage_dir(stage) / f).read_bytes() == (b.stage_dir(stage) / f).read_bytes(), (stage, f)


def _status(name: str, root: Path, capsys) -> dict:
    capsys.readouterr()
    assert cli(["status", name, "--root", str(root / "runs"), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _assert_report_blurs_the_seed_face(report: str, data: dict) -> None:
    """The astronaut seed image is shown only through the run's face blurring: its thumbnail is the blurred
    image's, and the unblurred thumbnail appears nowhere."""
    from evaluation.report.images import thumbnail
    from flows.pipeline import face_blur
    from infra.config import load_config

    seed = next(p for p in data["seeds"] if "astronaut" in p.name).read_bytes()
    blur = face_blur(load_config(CONFIG))
    assert blur(seed) != thumbnail_source(seed)  # the cascade finds the astronaut's face: blurring changes pixels
    uris = set(re.findall(r'src="(data:image/png;base64,[^"]+)"', report))
    assert thumbnail(blur(seed)).uri in uris
    assert thumbnail(seed).uri not in uris


def thumbnail_source(data: bytes) -> bytes:
    """The unblurred image as PNG bytes, as `face_blur` returns a blurred one."""
    import io

    from infra.images import decode

    buf = io.BytesIO()
    decode(data).save(buf, "PNG")
    return buf.getvalue()


def test_the_demo_config_still_refuses_a_users_list(tmp_path, capsys):
    """(issue 21: a list given beside the demo was silently replaced by the demo crawl)"""
    assert cli(["run", str(REPO / "configs" / "tiny.yaml"), f"data.url_list={tmp_path / 'mine.parquet'}",
                f"run.root={tmp_path / 'runs'}"]) == 2
    assert "data.url_list" in capsys.readouterr().err and not list((tmp_path / "runs").glob("*"))



def test_a_folder_that_grows_computes_only_its_new_images(tmp_path, prefect_server, capsys):
    """A user adds photographs to their folder (names that sort between the old ones), updates its list with `lvd
    folder-urls` and runs the same configuration again: the old files keep their rows, and every curation stage
    computes only the new shards, taking over those whose inputs are unchanged (ingest: the rows; NSFW, faces, the
    dedup descriptors and the embeddings: the upstream shard and the images it skips). What the run produces is what
    a fresh run of the updated list produces, and its audit passes. Then another run, with another dedup threshold:
    it takes whole stages and single shards from the runs beside it and computes only what the threshold reaches,
    with the outputs of a run that computes everything."""
    staged = write_pool(tmp_path / "all")  # 36 photographs and tiles, alternate ones added later
    photos, runs = tmp_path / "photos", tmp_path / "runs"
    photos.mkdir()
    first = sorted(staged)[::2]
    for p in first:
        (photos / p.name).write_bytes(p.read_bytes())
    listing = tmp_path / "photos.parquet"

    def args(name: str, *more: str) -> list[str]:
        return ["run", str(CONFIG), f"data.url_list={listing}", f"ingest.local_roots=[{photos}]", f"run.root={runs}",
                f"run.run_id={name}", "run.stop_after=corpus", "ingest.shard_size=6", "ingest.phash_dedup=false", *SMALL,
                *more]  # fmt: skip (the near-copy below reaches the dedup stage)

    def run(name: str, *more: str) -> list[dict]:
        n = len(RunDir(runs, name).events()) if (runs / name).exists() else 0
        capsys.readouterr()
        assert cli(args(name, *more)) == 0, capsys.readouterr().err
        return RunDir(runs, name).events()[n:]

    def dry_run(name: str, *more: str) -> dict[str, str]:  # `lvd run ... --dry-run`: stage -> what it would do
        capsys.readouterr()
        assert cli([*args(name, *more), "--dry-run"]) == 0, capsys.readouterr().err
        return dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])

    assert cli(["folder-urls", str(photos), str(listing)]) == 0
    run("grows")  # 18 rows: 3 shards
    for p in sorted(staged)[1::2]:
        (photos / p.name).write_bytes(p.read_bytes())
    Image.open(first[0]).save(photos / "zz_copy.jpg", quality=60)  # a near-copy of an old photograph, in a new shard
    capsys.readouterr()
    assert cli(["folder-urls", str(photos), str(listing)]) == 0
    assert "its 18 rows kept as they were, 19 new files added after them (rows 18-36)" in capsys.readouterr().out
    urls = pd.read_parquet(listing)["url"].tolist()
    assert urls[:18] == [p.resolve().as_uri() for p in [photos / q.name for q in first]]

    after = {s: f"after {u}: complete now; computed again only if the outputs of {u} change" for s, u in [
        ("nsfw", "ingest"), ("faces", "ingest, nsfw"), ("dedup", "faces"), ("embed", "dedup, faces"),
        ("retrieve", "embed"), ("rebalance", "retrieve, embed"), ("corpus", "rebalance, retrieve, faces, ingest")]}
    not_run = {"pretrain": "not run: run.stop_after is corpus",
               "evaluate": "not run: no evaluation sets (data.eval_sets and evaluate.benchmarks are empty)"}
    assert dry_run("grows") == {"ingest": "computed again: the files it reads from outside the run changed since it "
                                          "completed; its shards whose inputs are unchanged are taken over",
                                **after, **not_run}
    events = run("grows")
    assert dry_run("grows") == {s: "complete: reused" for s in [*after, "ingest"]} | not_run
    curation = ["ingest", "nsfw", "faces", "dedup", "embed"]
    computed = {s: sorted(e["shard"] for e in events if e["event"] == "shard_done" and e["stage"] == s) for s in curation}
    assert computed == {s: ["00003", "00004", "00005", "00006"] for s in curation}
    taken = {e["stage"]: e["shards"] for e in events if e["event"] == "shards_taken_over"}
    assert taken == {"nsfw": 3, "faces": 3, "dedup": 3, "embed": 3}

    run("fresh", "run.reuse_runs=false")  # the updated list, from nothing
    _assert_same_outputs(RunDir(runs, "grows"), RunDir(runs, "fresh"))
    capsys.readouterr()
    assert cli(["audit", "grows", "--root", str(runs)]) == 0
    assert "audit: OK" in capsys.readouterr().out

    # Another run that changes only the dedup threshold takes ingest, NSFW and faces from the runs that completed
    # them with the same keys (the first by id: "fresh"), and the copy descriptors shard by shard; it computes the
    # graph and what follows, as a run computing everything does.
    planned = dry_run("tuned", "dedup.threshold=0.99999")
    assert not (runs / "tuned").exists()  # a dry run writes nothing
    assert planned == {**{s: "completed by run fresh: its outputs are linked" for s in ("ingest", "nsfw", "faces")},
                       "dedup": "computed", "embed": "after dedup: computed", "retrieve": "after embed: computed",
                       "rebalance": "after retrieve, embed: computed", "corpus": "after rebalance, retrieve: computed",
                       **not_run}
    events = run("tuned", "dedup.threshold=0.99999")  # the near-copy is no longer merged with its original
    assert {e["stage"]: e.get("from_run") for e in events if e["event"] == "skipped"} == {
        "ingest": "fresh", "nsfw": "fresh", "faces": "fresh"}
    taken = {e["stage"]: (e["shards"], e["from_run"]) for e in events if e["event"] == "shards_taken_over"}
    assert taken == {"dedup": (7, "fresh"), "embed": (6, "fresh")}  # every descriptor; embeddings but the copy's
    assert [(e["stage"], e["shard"]) for e in events if e["event"] == "shard_done"] == [("embed", "00006")]
    run("tuned-all", "dedup.threshold=0.99999", "run.reuse_runs=false")
    _assert_same_outputs(RunDir(runs, "tuned"), RunDir(runs, "tuned-all"))
    capsys.readouterr()
    assert cli(["audit", "tuned", "--root", str(runs)]) == 0
    assert "audit: OK" in capsys.readouterr().out
    assert cli(["status", "tuned", "--root", str(runs)]) == 0
    assert "reused (completed before): ingest (from run fresh), nsfw (from run fresh), faces (from run fresh)" in \
        capsys.readouterr().out

    # After an upgrade that changed the downloader (here: the run's record of ingest says it ran other code),
    # `lvd status` tells, without importing a stage, that ingest is stale; the dry run finds it complete, with this
    # code, in the run beside it.
    from infra.manifest import read_manifest, write_manifest
    from infra.stage import KEY_FILE
    from infra.storage import atomic_write_json

    stage = RunDir(runs, "tuned").stage_dir("ingest")
    m = read_manifest(stage)
    code = {**m.key_detail["code"], "curation/netguard.py": "0" * 16}
    m = m.model_copy(update={"code_version": "0" * 16, "key_detail": {**m.key_detail, "code": code}})
    write_manifest(stage, m)
    atomic_write_json(stage / KEY_FILE, {"key": m.key, "base": "", "parts": [m.config_hash, m.code_version,
                                                                               m.inputs_digest]})
    assert cli(["status", "tuned", "--root", str(runs), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["stages"]}
    assert (rows["ingest"]["state"], rows["ingest"]["why"]) == (
        "stale", "its code changed since it completed (curation/netguard.py): a re-run computes it again")
    assert {r["state"] for n, r in rows.items() if n != "ingest"} == {"completed", "not run"}
    assert dry_run("tuned", "dedup.threshold=0.99999")["ingest"] == "completed by run fresh: its outputs are linked"


def test_a_list_that_gives_no_image_stops_at_the_corpus_with_where_the_images_went(tmp_path, prefect_server, capsys):
    """Every listed file gone by the time the run starts: ingest records each as file_missing, the stages after it
    see no image, and the corpus stage stops the run with what happened, instead of pandas' KeyError('seed_set').
    A list whose files lie outside ingest.local_roots, or a file:// list without roots, is refused at start-up."""
    photos = tmp_path / "photos"
    write_pool(photos)
    listing = tmp_path / "photos.parquet"
    assert cli(["folder-urls", str(photos), str(listing)]) == 0
    base = ["run", str(CONFIG), f"data.url_list={listing}", f"run.root={tmp_path / 'runs'}", *SMALL]
    capsys.readouterr()
    assert cli([*base, f"ingest.local_roots=[{tmp_path / 'elsewhere'}]"]) == 2
    assert "ingest.local_roots: ['" in capsys.readouterr().err
    assert cli(base) == 2
    assert "data.url_list: its rows are file:// URLs" in capsys.readouterr().err
    n = len(pd.read_parquet(listing))
    for f in photos.rglob("*"):
        if f.is_file():
            f.unlink()
    assert cli([*base, f"ingest.local_roots=[{photos}]", "run.run_id=gone"]) == 1
    err = capsys.readouterr().err
    assert (f"no image reached the corpus: ingest kept none of the list's {n} rows (file_missing {n}); every row's "
            "reason: lvd lineage gone row:N, per host: lvd domains gone") in err, err
    assert "KeyError" not in err and "Traceback" not in err  # the message, not a stack
