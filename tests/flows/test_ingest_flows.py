"""Ingest, NSFW and faces fanned out over shards by Prefect: thread pool vs a local Dask cluster of 2 workers give
the same shards and ledger; `lvd retry-failed` fetches only the failed URL and `lvd resume` redoes later stages."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from infra.demo.server import DemoServer, free_port

pytestmark = pytest.mark.slow


def _png(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).resize((48, 48)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows")
    (root / "images").mkdir()
    for i in range(10):
        (root / "images" / f"g{i}.png").write_bytes(_png(i))
    port = free_port()
    b = f"http://127.0.0.1:{port}"
    paths = [f"/img/g{i}.png" for i in range(9)] + ["/status/404/a.png", "/fail-first/1/g9.png", "/img/g0.png",
                                                     "http://169.254.169.254/latest/meta-data/"]  # fmt: skip
    urls = [p if p.startswith("http") else b + p for p in paths]
    pd.DataFrame({"url": urls}).to_parquet(root / "urls.parquet")
    return root, port


def _config(root, runner):
    cfg = {
        "run": {"root": str(root / "runs"), "run_id": f"ingest-{runner}", "stop_after": "faces", "task_runner": runner,
                "workers": 2},
        "data": {"url_list": str(root / "urls.parquet")},
        "ingest": {"shard_size": 4, "threads": 4, "timeout": 2.0, "allow_hosts": ["127.0.0.1"], "processes": 2},
        "nsfw": {"batch_size": 8},
    }  # fmt: skip
    path = root / f"{runner}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(root, runner, port):
    from infra.cli import main

    with DemoServer(root / "images", port) as server:
        assert main(["run", str(_config(root, runner))]) == 0
        return dict(server.hits)


def _snapshot(run_dir):
    from infra.lineage import Ledger

    files = {}
    for stage, sub in (("ingest", "shards"), ("nsfw", "scores"), ("faces", "shards")):
        for p in sorted((run_dir / "stages" / stage / sub).glob("*")):
            files[f"{stage}/{p.name}"] = p.read_bytes()
    ev = Ledger(run_dir).events().drop(columns=["detail"])
    return files, ev.sort_values(["stage", "row_id", "kind", "reason"]).reset_index(drop=True)


def test_dask_cluster_gives_the_same_shards_and_ledger(crawl, prefect_server):
    root, port = crawl
    _run(root, "thread", port)
    _run(root, "dask", port)
    files_t, ev_t = _snapshot(root / "runs" / "ingest-thread")
    files_d, ev_d = _snapshot(root / "runs" / "ingest-dask")
    assert sorted(files_t) == sorted(files_d) and len(files_t) == 4 * (2 + 1 + 2)  # 4 shards: tar + parquet, scores, tar + parquet
    assert [k for k in files_t if files_t[k] != files_d[k]] == []
    pd.testing.assert_frame_equal(ev_t, ev_d)
    from prefect import get_client

    async def shard_runs():
        async with get_client() as client:
            runs = await client.read_task_runs()
        return sorted(r.name for r in runs if ":" in r.name and r.state and r.state.is_completed())

    import asyncio

    names = asyncio.run(shard_runs())
    assert [n for n in names if n.startswith("ingest:")] == ["ingest:00000", "ingest:00000", "ingest:00001",
                                                             "ingest:00001", "ingest:00002", "ingest:00002",
                                                             "ingest:00003", "ingest:00003"]  # fmt: skip


def test_retry_failed_cli_then_resume(crawl, prefect_server):
    from infra.cli import main
    from infra.lineage import Ledger, check_terminal_outcomes
    from infra.manifest import read_manifest

    root, port = crawl
    run_dir = root / "runs" / "ingest-thread"
    if not (run_dir / "stages" / "faces" / "manifest.json").is_file():
        _run(root, "thread", port)
    nsfw_before = read_manifest(run_dir / "stages" / "nsfw")
    with DemoServer(root / "images", port) as server:
        server.hits["/fail-first/1/g9.png"] = 1  # a new server: it already failed once (in the run)
        assert main(["retry-failed", "ingest-thread", "--root", str(root / "runs")]) == 0
        hits = dict(server.hits)
    assert hits == {"/fail-first/1/g9.png": 2}  # only the failed URL was fetched again, and it succeeded
    assert (run_dir / "stages" / "ingest" / "shards" / "r1-00002.tar").is_file()
    assert main(["resume", "ingest-thread", "--root", str(root / "runs")]) == 0
    nsfw_after = read_manifest(run_dir / "stages" / "nsfw")
    assert nsfw_after.inputs_digest != nsfw_before.inputs_digest
    faces = pd.read_parquet(run_dir / "stages" / "faces" / "shards" / "r1-00002.parquet")
    assert faces["row_id"].tolist() == [10]
    check = check_terminal_outcomes(Ledger(run_dir))
    assert check.dropped == {"ingest:http_404": 1, "ingest:url_duplicate": 1, "ingest:url_private": 1}
    assert check.missing == list(range(9)) + [10]  # kept so far: their terminal event is the corpus stage's
