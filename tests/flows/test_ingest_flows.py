"""Ingest, NSFW and faces fanned out over shards by Prefect: thread pool vs a local Dask cluster of 2 workers give
the same shards and ledger (and the Dask run's downloads really come from worker processes); `lvd retry-failed`
fetches only the failed URL (or only those of the given reasons) and `lvd resume` redoes later stages; a truncated
parquet list stops the run with the file and the fix named, in the run's events too."""

from __future__ import annotations

import contextlib
import io
import json
import os
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

import infra.demo.server
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
        # Each runner computes its own stages (the runs compare them), none taken from another run.
        "run": {"root": str(root / "runs"), "run_id": f"ingest-{runner}", "stop_after": "faces", "task_runner": runner,
                "workers": 2, "reuse_runs": False},
        "data": {"url_list": str(root / "urls.parquet")},
        "ingest": {"shard_size": 4, "threads": 4, "timeout": 2.0, "allow_hosts": ["127.0.0.1"], "processes": 2},
        "nsfw": {"batch_size": 8},
    }  # fmt: skip
    path = root / f"{runner}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _owner_pid(client_port: int, server_port: int) -> int | None:
    """The process (this one or a descendant) that holds the client end of a loopback connection. Both ends are
    matched: the kernel reuses an ephemeral port number for connections to other destinations (this process's
    connection to the Prefect API could have the same local port as a worker's download)."""
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if any(c.laddr and c.raddr and (c.laddr.port, c.raddr.port) == (client_port, server_port)
                   for c in proc.net_connections("tcp")):  # fmt: skip
                return proc.pid
    return None


def _recording_handler(peers: dict[str, set]):
    """The demo server's request handler, also noting which process sent each request (looked up while it waits)."""
    make_handler = infra.demo.server._handler

    def make(*args):
        class Handler(make_handler(*args)):
            def do_GET(self):
                peers.setdefault(self.path, set()).add(_owner_pid(self.client_address[1], self.server.server_address[1]))
                super().do_GET()

        return Handler

    return make


def _run(root, runner, port, peers=None):
    from flows.cli import main

    with pytest.MonkeyPatch.context() as mp:
        if peers is not None:
            mp.setattr(infra.demo.server, "_handler", _recording_handler(peers))
        with DemoServer(root / "images", port) as server:
            assert main(["run", str(_config(root, runner))]) == 0
            return dict(server.hits)


def _snapshot(run_dir):
    from infra.lineage import Ledger

    files = {}
    for stage, sub in (("ingest", "shards"), ("nsfw", "scores"), ("faces", "shards")):
        for p in sorted((run_dir / "stages" / stage / sub).glob("*")):
            files[f"{stage}/{p.name}"] = p.read_bytes()
    ev = Ledger(run_dir).events()
    ev["detail"] = ev["detail"].map(lambda d: None if d is None else json.loads(d))  # compared as values
    return files, ev.sort_values(["stage", "row_id", "kind", "reason"]).reset_index(drop=True)


def _completed_ingest_shard_runs(since) -> list[str]:
    """Names of the completed ingest shard task runs that started after `since` on the session's Prefect server (other
    tests share it, in an order that depends on the scheduling)."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="ingest["), start_time=TaskRunFilterStartTime(after_=since)))

    return sorted(r.name for r in asyncio.run(read()) if r.state and r.state.is_completed())


def test_dask_cluster_gives_the_same_shards_and_ledger(crawl, prefect_server):
    root, port = crawl
    since = datetime.now(UTC)
    thread_peers: dict[str, set] = {}
    dask_peers: dict[str, set] = {}
    _run(root, "thread", port, thread_peers)
    _run(root, "dask", port, dask_peers)
    files_t, ev_t = _snapshot(root / "runs" / "ingest-thread")
    files_d, ev_d = _snapshot(root / "runs" / "ingest-dask")
    assert sorted(files_t) == sorted(files_d) and len(files_t) == 4 * (2 + 1 + 2)  # 4 shards: tar + parquet, scores, tar + parquet
    assert [k for k in files_t if files_t[k] != files_d[k]] == []
    pd.testing.assert_frame_equal(ev_t, ev_d)  # details included: no field of them depends on where a shard ran
    # Thread runner: every download from this process. Dask: every download from a worker process of the local
    # cluster (run.workers = 2), none from this one.
    assert sorted(thread_peers) == sorted(dask_peers) and len(dask_peers) == 11  # 13 rows: a duplicate, a refusal
    assert set().union(*thread_peers.values()) == {os.getpid()}
    workers = set().union(*dask_peers.values())
    assert None not in workers and os.getpid() not in workers and 1 <= len(workers) <= 2, (workers, dask_peers)
    assert _completed_ingest_shard_runs(since) == ["ingest[00000]", "ingest[00000]", "ingest[00001]", "ingest[00001]",
                                                   "ingest[00002]", "ingest[00002]", "ingest[00003]", "ingest[00003]"]


def test_retry_failed_cli_then_resume(crawl, prefect_server, capsys):
    from evaluation.report.collect import Run, attempts
    from flows.cli import main
    from infra.lineage import Ledger, check_terminal_outcomes
    from infra.manifest import read_manifest
    from infra.run import RunDir

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
    with DemoServer(root / "images", port) as server:  # only the rows whose latest failure matches --reason
        capsys.readouterr()
        args = ["retry-failed", "ingest-thread", "--root", str(root / "runs"), "--reason", "http_4*", "--json"]
        assert main(args) == 0
        hits = dict(server.hits)
    assert hits == {"/status/404/a.png": 1}
    assert json.loads(capsys.readouterr().out) == {"attempt": 2, "retried": 1, "recovered": 0,
                                                   "by_reason": {"http_404": 1}, "shards": ["r2-00002"]}  # fmt: skip
    assert main(["retry-failed", "ingest-thread", "--root", str(root / "runs"), "--reason", "url_*"]) == 1
    assert "reasons ['url_*'] are decided without downloading" in capsys.readouterr().err
    assert main(["resume", "ingest-thread", "--root", str(root / "runs")]) == 0
    # The run's history (the report's attempts): the two retries, the refused one, then the resume, which redid the
    # stages after ingest and reused the rest.
    history = attempts(Run(run_dir))[-4:]
    assert [(a.by, a.completed, a.retried, a.error) for a in history[:3]] == [
        ("lvd retry-failed", True, {"attempt": 1, "rows": 1, "recovered": 1}, None),
        ("lvd retry-failed", True, {"attempt": 2, "rows": 1, "recovered": 0}, None),
        ("lvd retry-failed", False, {}, "ValueError: reasons ['url_*'] are decided without downloading; a retry "
                                        "cannot change them")]
    assert history[3].by == "lvd resume" and history[3].completed
    assert {n: s.outcome for n, s in history[3].stages.items()} == {
        "ingest": "cached", "nsfw": "completed", "faces": "completed"}
    capsys.readouterr()
    assert main(["status", "ingest-thread", "--root", str(root / "runs"), "--json"]) == 0  # the same, in words
    rows = json.loads(capsys.readouterr().out)["attempts"][-4:]
    assert [(r["by"], r["what"], r["ended"]) for r in rows] == [
        ("lvd retry-failed", "ingest: 1 failed URLs downloaded again (retry 1), 1 recovered", "completed"),
        ("lvd retry-failed", "ingest: 1 failed URLs downloaded again (retry 2), 0 recovered", "completed"),
        ("lvd retry-failed", "ingest: a retry of the failed URLs", "failed: ValueError: reasons ['url_*'] are "
                                                                   "decided without downloading; a retry cannot change them"),
        ("lvd resume", "ran nsfw (upstream stage ingest changed; 4 shards reused), faces (upstream stages ingest, nsfw "
                       "changed; 4 shards reused); reused (completed before): ingest", "completed")]  # fmt: skip
    # The resume scored and blurred only the retries' shards: the others' inputs are unchanged, so they were taken over.
    resumed = [e for e in RunDir(root / "runs", "ingest-thread").events()
               if e["event"] == "shard_done" and e["stage"] in ("nsfw", "faces")][-4:]
    assert sorted((e["stage"], e["shard"]) for e in resumed) == [
        ("faces", "r1-00002"), ("faces", "r2-00002"), ("nsfw", "r1-00002"), ("nsfw", "r2-00002")]
    nsfw_after = read_manifest(run_dir / "stages" / "nsfw")
    assert nsfw_after.inputs_digest != nsfw_before.inputs_digest
    faces = pd.read_parquet(run_dir / "stages" / "faces" / "shards" / "r1-00002.parquet")
    assert faces["row_id"].tolist() == [10]
    check = check_terminal_outcomes(Ledger(run_dir))
    assert check.dropped == {"ingest:http_404": 1, "ingest:url_duplicate": 1, "ingest:url_private": 1}
    assert check.missing == [*range(9), 10]  # kept so far: their terminal event is the corpus stage's
    # per host, at each row's latest attempt: g9 counts as downloaded (its retry), the 404 once (retried, failed again)
    capsys.readouterr()
    assert main(["domains", "ingest-thread", "--root", str(root / "runs"), "--json", "--csv", str(root / "d.csv")]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"host": "127.0.0.1", "urls": 12, "requested": 11, "downloaded": 10, "download_rate": 10 / 11, "in_corpus": 0,
         "failures": {"http_404": 1}},
        {"host": "169.254.169.254", "urls": 1, "requested": 1, "downloaded": 0, "download_rate": 0.0, "in_corpus": 0,
         "failures": {"url_private": 1}},
    ]  # fmt: skip
    assert pd.read_csv(root / "d.csv")["failures"].tolist() == ['{"http_404": 1}', '{"url_private": 1}']


def test_a_truncated_list_stops_the_run_with_the_fix(crawl, prefect_server, capsys):
    """A parquet file cut short has lost its footer: `lvd run` refuses it at start-up (exit 2, no run folder). A
    gzipped CSV cut short reads until its end: the plan stops the ingest stage before any download (exit 1), and the
    run's failed event carries the fix."""
    import gzip

    from flows.cli import main

    root, port = crawl
    data = (root / "urls.parquet").read_bytes()
    (root / "cut.parquet").write_bytes(data[: len(data) // 2])
    csv_gz = gzip.compress(pd.read_parquet(root / "urls.parquet").to_csv(index=False).encode())
    (root / "cut.csv.gz").write_bytes(csv_gz[: len(csv_gz) * 3 // 4])
    config = yaml.safe_load(_config(root, "thread").read_text())
    for name in ("cut.parquet", "cut.csv.gz"):
        config["run"]["run_id"] = f"ingest-{name.replace('.', '-')}"
        config["data"]["url_list"] = str(root / name)
        (root / "cut.yaml").write_text(yaml.safe_dump(config))
        with DemoServer(root / "images", port) as server:
            assert main(["run", str(root / "cut.yaml")]) == (2 if name == "cut.parquet" else 1)
            assert dict(server.hits) == {}  # stopped before any download
        err = capsys.readouterr().err
        kind = "parquet" if name == "cut.parquet" else "gzip"
        fix = f"cannot read URL list {root / name} ({kind}; truncated or corrupt? re-copy it)"
        assert fix in err
        run_dir = root / "runs" / config["run"]["run_id"]
        if name == "cut.parquet":
            assert err.startswith("configuration is invalid (1 problem):") and not run_dir.exists()
            continue
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        (failed,) = [e for e in events if e["event"] == "failed"]
        assert failed["stage"] == "ingest" and failed["error"].startswith(f"UrlListError: {fix}")
        assert "Copy the file again from its source" in failed["error"]


def test_a_list_that_grows_downloads_only_its_new_rows(crawl, prefect_server, capsys):
    """`lvd run` again after rows were added at the end of the URL list: the ingest stage is stale (its key covers
    the list), but its completed shards whose rows are unchanged are taken over, not downloaded again; the run's
    lineage is complete and its audit passes. An edited row makes every shard from its own on new."""
    from flows.cli import main

    root, port = crawl
    urls = pd.read_parquet(root / "urls.parquet")["url"].tolist()
    config = yaml.safe_load(_config(root, "thread").read_text())
    config["run"].update(run_id="ingest-grows", stop_after="ingest")
    config["data"]["url_list"] = str(root / "growing.parquet")
    (root / "grows.yaml").write_text(yaml.safe_dump(config))
    paths = [u.split(str(port), 1)[1] if str(port) in u else u for u in urls]

    def run(rows: list[str]) -> dict[str, int]:
        pd.DataFrame({"url": rows}).to_parquet(root / "growing.parquet")
        with DemoServer(root / "images", port) as server:
            assert main(["run", str(root / "grows.yaml")]) == 0
            return dict(server.hits)

    stage = root / "runs" / "ingest-grows" / "stages" / "ingest"
    assert run(urls[:8]) == {p: 1 for p in paths[:8]}  # 2 shards of 4
    before = {p.name: p.read_bytes() for p in sorted((stage / "shards").glob("0000[01].*"))}
    assert run(urls) == {p: 1 for p in paths[8:11]}  # rows 8-12 only (11: a duplicate URL, 12: refused)
    assert {p.name: p.read_bytes() for p in sorted((stage / "shards").glob("0000[01].*"))} == before
    assert not (root / "runs" / "ingest-grows" / "previous").exists()  # what was not taken over is gone
    capsys.readouterr()
    assert main(["audit", "ingest-grows", "--root", str(root / "runs")]) == 0
    assert "audit: OK" in capsys.readouterr().out
    assert run([urls[0], urls[2], *urls[2:]]) == {p: 1 for p in [paths[0], *paths[2:11]]}  # row 1 edited: all anew
