"""One wall-clock deadline per URL (ingest.max_download_seconds): resolution, connect, TLS, every header line, every
redirect hop and the body, each timed here against scripted loopback servers; and generated server behaviours
(delays, trickles, resets at random offsets, redirect graphs with cycles and mixed schemes, wrong lengths) that
must keep the deadline and end every URL in exactly one reason of the table."""

from __future__ import annotations

import io
import socket
import threading
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from curation.ingest import download_reason, ingest
from curation.opener import guarded_opener
from curation.reasons import reason
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.lineage import Ledger
from infra.stage import ShardTracker
from tests.curation.hostile import HOST, Behaviour, HostileServer, Sandbox

DEADLINE = 1.5
CFG = IngestConfig(timeout=5.0, max_download_seconds=DEADLINE, allow_hosts=[HOST], retry_after_max=0)


def _png(seed: int = 0, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def fetch(url: str, cfg: IngestConfig = CFG) -> tuple[str, float]:
    """What img2dataset does with one URL (urlopen, read, str(error)), as (reason or "ok", seconds)."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=cfg.timeout) as r:
            r.read()
        outcome = "ok"
    except Exception as err:
        outcome = download_reason("failed_to_download", str(err))
    return outcome, time.monotonic() - start


def fetch_all(urls: list[str], cfg: IngestConfig = CFG) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = [("", 0.0)] * len(urls)

    def one(i: int) -> None:
        out[i] = fetch(urls[i], cfg)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@pytest.fixture
def server():
    with HostileServer() as s:
        yield s


@pytest.fixture
def backlogged():
    """A listener whose accept queue is full: a further connect hangs (SYNs dropped), as at an overloaded host."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = [socket.create_connection((HOST, port), timeout=1)]
    yield port
    for s in held:
        s.close()
    listener.close()


def test_each_phase_of_a_download_ends_at_the_deadline(server, backlogged, monkeypatch):
    """Header trickle, a slow redirect chain, a connect that hangs, a slow resolver, a silent TLS handshake: each
    ends as `timeout` within the deadline plus one second, although no single socket operation is slow."""
    Sandbox({"slow.test": HOST}, slow={"slow.test": 6.0}).install(monkeypatch)
    body = _png()
    trickle = server.url(Behaviour(body=body, headers=[("X-Pad", "a")] * 25, header_gap=0.25))
    chain = [Behaviour(body=body)]
    for _ in range(5):  # each hop answers after 0.6 s: 3 s in all
        chain.append(Behaviour(302, b"", None, [("Location", server.url(chain[-1]))], delay=0.6))
    urls = {
        "header trickle": trickle,
        "slow redirect chain": server.url(chain[-1]),
        "connect hangs": f"http://{HOST}:{backlogged}/a.png",
        "slow resolver": f"http://slow.test:{server.port}/s/0",
        "silent TLS handshake": server.url(Behaviour(silent=True), scheme="https"),
    }
    with guarded_opener(CFG):
        results = dict(zip(urls, fetch_all(list(urls.values())), strict=True))
    assert {k: r for k, (r, _) in results.items()} == {k: "timeout" for k in urls}
    slow = {k: round(s, 2) for k, (_, s) in results.items() if not DEADLINE - 0.1 <= s <= DEADLINE + 1.0}
    assert slow == {}, f"not within [deadline - 0.1, deadline + 1] s: {slow}"


def test_a_body_shorter_than_its_length_is_a_closed_connection(server):
    body = _png()
    urls = [server.url(Behaviour(body=body, length_delta=100)), server.url(Behaviour(body=body, length_delta=None))]
    with guarded_opener(CFG):
        assert [r for r, _ in fetch_all(urls)] == ["connection_closed", "ok"]


# --- generated server behaviours ---------------------------------------------------------------------------

BODY = _png(1)


@st.composite
def behaviours(draw: st.DrawFn, n: int) -> list[dict]:
    """n behaviours as plain data (redirects point at another behaviour's index: cycles, self-loops, https)."""
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["ok", "ok", "status", "redirect", "reset", "cut", "slow", "length"]))
        spec = {"kind": kind, "delay": draw(st.sampled_from([0.0, 0.0, 0.2, 0.6, 1.2])),
                "header_gap": draw(st.sampled_from([0.0, 0.0, 0.1, 0.3])),
                "body_gap": draw(st.sampled_from([0.0, 0.0, 0.05, 0.4])), "piece": draw(st.sampled_from([64, 4096]))}
        if kind == "status":
            spec["status"] = draw(st.sampled_from([404, 403, 408, 410, 429, 500, 502, 503, 504]))
        elif kind == "redirect":
            spec["target"] = draw(st.integers(0, n - 1))
            spec["scheme"] = draw(st.sampled_from(["http", "http", "https"]))
            spec["status"] = draw(st.sampled_from([301, 302, 303, 307, 308]))
        elif kind in ("reset", "cut"):
            spec["at"] = draw(st.integers(0, len(BODY) + 120))
        elif kind == "length":
            spec["delta"] = draw(st.sampled_from([None, -10, 40]))
        out.append(spec)
    return out


def _materialise(server: HostileServer, specs: list[dict]) -> list[str]:
    base = len(server.behaviours)
    urls = []
    for spec in specs:
        b = Behaviour(body=BODY, delay=spec["delay"], header_gap=spec["header_gap"], body_gap=spec["body_gap"],
                      piece=spec["piece"])  # fmt: skip
        if spec["kind"] == "status":
            b.status, b.body, b.ctype = spec["status"], b"error", "text/plain"
        elif spec["kind"] == "redirect":
            target = f"{spec['scheme']}://{HOST}:{server.port}/s/{base + spec['target']}"
            b.status, b.body, b.ctype, b.headers = spec["status"], b"", None, [("Location", target)]
        elif spec["kind"] in ("reset", "cut"):
            b.cut_at, b.reset = spec["at"], spec["kind"] == "reset"
        elif spec["kind"] == "length":
            b.length_delta = spec["delta"]
        urls.append(server.url(b))
    return urls


def _scripted_seconds(spec: dict) -> float:
    """A lower bound of the time the server takes to answer in full (header lines and body pieces)."""
    if spec["kind"] in ("redirect", "status"):
        return spec["delay"] + 4 * spec["header_gap"]
    pieces = -(-len(BODY) // spec["piece"])
    return spec["delay"] + 4 * spec["header_gap"] + (pieces - 1) * spec["body_gap"]


SERVER_SETTINGS = settings(max_examples=8, derandomize=True, deadline=None, database=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@SERVER_SETTINGS
@given(specs=behaviours(6))
def test_generated_servers_keep_the_deadline(server, specs):
    cfg = IngestConfig(timeout=5.0, max_download_seconds=1.0, allow_hosts=[HOST], retry_after_max=0)
    urls = _materialise(server, specs)
    with guarded_opener(cfg):
        results = fetch_all(urls, cfg)
    for spec, (outcome, seconds) in zip(specs, results, strict=True):
        assert seconds <= cfg.max_download_seconds + 1.0, (spec, outcome, seconds)
        assert outcome == "ok" or reason(outcome), (spec, outcome)
        if _scripted_seconds(spec) >= cfg.max_download_seconds + 0.3 and spec["kind"] in ("ok", "length", "status"):
            assert outcome == "timeout", (spec, outcome)
        if spec["kind"] == "ok" and _scripted_seconds(spec) <= cfg.max_download_seconds / 2:
            assert outcome == "ok", (spec, outcome)
        if spec["kind"] == "status" and outcome != "timeout":
            assert outcome == f"http_{spec['status']}", (spec, outcome)


@settings(SERVER_SETTINGS, max_examples=3)
@given(specs=behaviours(10))
def test_generated_servers_through_ingest_end_every_row_once(server, specs, tmp_path_factory):
    """The count invariant through img2dataset: every row of the list ends in exactly one outcome, and every drop
    reason is in the table; the shard takes the deadline and little more (threads fetch all rows at once)."""
    root = tmp_path_factory.mktemp("gen")
    urls = _materialise(server, specs)
    pd.DataFrame({"url": urls}).to_parquet(root / "urls.parquet")
    stage = root / "run" / "stages" / "ingest"
    cfg = IngestConfig(timeout=5.0, max_download_seconds=1.0, allow_hosts=[HOST], retry_after_max=0, threads=16,
                       phash_dedup=False, exact_dedup=False)  # fmt: skip
    ingest(DataConfig(url_list=root / "urls.parquet"), stage, cfg, ShardTracker("ingest", stage))
    ev = Ledger(root / "run").events()
    outcomes = ev[(ev["kind"] == "drop") | (ev["reason"] == "downloaded")]
    assert outcomes.groupby("row_id").size().to_dict() == {i: 1 for i in range(len(urls))}
    for why in outcomes.loc[outcomes["kind"] == "drop", "reason"]:
        assert reason(why).step in ("download", "decode", "dedup"), why
