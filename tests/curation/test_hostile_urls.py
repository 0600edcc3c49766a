"""Hostile URLs: the defects found by the hostile crawl (credentials reaching the resolver, a raw UTF-8 path lost,
empty URLs as duplicates, redirects to other schemes or malformed locations), then generated URLs whose fate is
known from how they were built: the guard's decision matches that classification, nothing but a validated host
name is resolved, a refused destination never gets a connect(), and every row ends in exactly one reason.

The resolver and connect() are replaced by :class:`tests.curation.hostile.Sandbox`: names resolve only through its
table, and nothing but 127.0.0.1 is ever connected to.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
import urllib.request

import hypothesis
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from curation.ingest import download_reason, ingest
from curation.netguard import DestinationPolicy, UrlGuard
from curation.opener import guarded_opener
from curation.reasons import reason
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.lineage import Ledger
from infra.stage import ShardTracker
from tests.curation.hostile import HOST, Behaviour, HostileServer, Sandbox

NAMES = {"img.test": HOST, "xn--bcher-kva.test": HOST, "rebind.test": "10.0.0.7", "meta.test": "169.254.169.254"}
VALIDATED = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?|[0-9.]+|[0-9a-f:.]+")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _ingest(root, urls, **cfg):
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"url": urls}).to_parquet(root / "urls.parquet")
    stage = root / "run" / "stages" / "ingest"
    config = IngestConfig(**{"threads": 8, "timeout": 3, "max_download_seconds": 3, "allow_hosts": [HOST], **cfg})
    ingest(DataConfig(url_list=root / "urls.parquet"), stage, config, ShardTracker("ingest", stage))
    ev = Ledger(root / "run").events()
    outcome = ev[(ev["kind"] == "drop") | (ev["reason"] == "downloaded")].set_index("row_id")
    assert outcome.index.value_counts().max() == 1 and sorted(outcome.index) == list(range(len(urls)))
    return ev, outcome.sort_index()["reason"].tolist()


@pytest.fixture
def sandbox(monkeypatch):
    return Sandbox(NAMES).install(monkeypatch)


@pytest.fixture
def server():
    with HostileServer() as s:
        yield s


def test_credentials_never_reach_the_resolver(tmp_path, sandbox, server):
    """Defect 1: `user:pass@HOST` went to getaddrinfo (dns_error, transient: every retry leaked it again)."""
    url = server.url(Behaviour(body=_png(0)))
    with_creds = url.replace("http://", "http://user:pass@")
    ev, reasons = _ingest(tmp_path / "refuse", [with_creds, with_creds.replace(HOST, "img.test")])
    assert reasons == ["url_credentials", "url_credentials"]
    assert reason("url_credentials").cls == "policy"
    assert [h for h in sandbox.lookups if "@" in h or "pass" in h] == [] and server.hits == {}
    ev, reasons = _ingest(tmp_path / "strip", [with_creds], url_credentials="strip")
    assert reasons == ["downloaded"] and server.hits[server.path_of(0)] == 1
    detail = json.loads(ev.loc[ev["reason"] == "input", "detail"].iloc[0])
    assert (detail["fetch_url"], detail["credentials"]) == (url, "stripped")
    assert ev.loc[ev["reason"] == "input", "url"].tolist() == [with_creds]  # lineage keeps the list's string
    assert [h for h in sandbox.lookups if "@" in h or "pass" in h] == []


def test_a_raw_utf8_path_is_fetched_percent_encoded(tmp_path, sandbox, server):
    """Defect 2: an IRI went to http.client unchanged and failed with UnicodeEncodeError (download_error)."""
    base = server.url(Behaviour(body=_png(1)))
    server.url(Behaviour(body=_png(4)))
    iri = f"  {base}/bilder/über größe.png?q=ä  "
    ev, reasons = _ingest(tmp_path, [iri, f"http://Img.TEST:{server.port}/s/1/ü.png"])
    assert reasons == ["downloaded", "downloaded"]
    assert set(server.hits) == {"/s/0/bilder/%C3%BCber%20gr%C3%B6%C3%9Fe.png?q=%C3%A4", "/s/1/%C3%BC.png"}
    inputs = ev[ev["reason"] == "input"].sort_values("row_id")
    assert inputs["url"].tolist()[0] == iri  # the original string, whitespace and all
    assert json.loads(inputs["detail"].iloc[0])["fetch_url"] == f"{base}/bilder/%C3%BCber%20gr%C3%B6%C3%9Fe.png?q=%C3%A4"
    assert [h for h in sandbox.lookups if h != HOST] == ["img.test"]


def test_empty_and_null_urls_are_malformed_not_duplicates(tmp_path, sandbox, server):
    ok = server.url(Behaviour(body=_png(2)))
    _ev, reasons = _ingest(tmp_path, ["", ok, None, "   ", "\t", ok, " " + ok.upper().replace("/S/", "/s/")])
    assert reasons == ["url_malformed", "downloaded", "url_malformed", "url_malformed", "url_malformed",
                       "url_duplicate", "url_duplicate"]  # fmt: skip (a URL that normalises alike is a duplicate)


def test_redirects_to_other_schemes_and_malformed_locations(tmp_path, sandbox, server):
    targets = ["file:///etc/passwd", "javascript:alert(1)", "data:image/png;base64,iVBORw0KGgo=", "gopher://x/1",
               "http://[bad", "http://user:pw@img.test/", "//rebind.test/x", "ht\ttp://[::1%25lo]/"]  # fmt: skip
    urls = [server.url(Behaviour(302, b"", None, [("Location", t)])) for t in targets]
    _ev, reasons = _ingest(tmp_path, urls)
    # A name is checked when it is resolved (rebind.test -> 10.0.0.7): url_private, with no connect().
    assert reasons == ["redirect_refused"] * 4 + ["redirect_malformed", "redirect_refused", "url_private",
                                                  "redirect_malformed"]  # fmt: skip
    assert all(reason(r).cls != "transient" for r in reasons)
    assert [h for h in sandbox.lookups if h != HOST] == ["rebind.test"]
    assert [c for c in sandbox.connects if c != HOST] == []


def test_a_redirect_to_a_private_name_is_refused_at_resolution(sandbox, server):
    url = server.url(Behaviour(302, b"", None, [("Location", "http://rebind.test/x.png")]))
    with guarded_opener(IngestConfig(allow_hosts=[HOST])), pytest.raises(OSError) as err:
        urllib.request.urlopen(url, timeout=3)
    assert download_reason("failed_to_download", str(err.value)) == "url_private"
    assert sandbox.lookups == [HOST, "rebind.test"] and sandbox.connects == [HOST]


# --- generated URLs ----------------------------------------------------------------------------------------

V4 = [0x7F000001, 0xA9FEA9FE, 0x0A000001, 0xC0A80101, 0x08080808, 0x00000000, 0x646464C8,
      0x5DB8D822, 0xE0000001, 0xFFFFFFFF, 0x64400001]  # fmt: skip
V6 = ["::1", "::", "fd00:ec2::254", "fe80::1", "2001:4860:4860::8888", "2606:4700::1111", "ff02::1"]


def _v4_spellings(value: int) -> list[str]:
    b = value.to_bytes(4, "big")
    dotted = ".".join(str(x) for x in b)
    return [dotted, str(value), hex(value), ".".join(f"0{x:o}" for x in b), ".".join(hex(x) for x in b),
            f"{b[0]}.{int.from_bytes(b[1:], 'big')}", f"{b[0]}.{b[1]}.{int.from_bytes(b[2:], 'big')}", dotted + ".",
            dotted.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"}),  # fullwidth digits
            "%" + f"{ord(dotted[0]):02X}" + dotted[1:]]  # fmt: skip


def _v6_spellings(text: str) -> list[str]:
    addr = ipaddress.IPv6Address(text)
    out = [addr.compressed, addr.exploded, addr.exploded.upper()]
    if addr.ipv4_mapped is None:
        out.append(str(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed[-4:])))  # v4-mapped form
    return [f"[{s}]" for s in out]


@st.composite
def destination(draw: st.DrawFn) -> tuple[str, str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """(host as written in the URL, its kind: ip | name | malformed | not_dns, the address it names)."""
    kind = draw(st.sampled_from(["v4", "v4", "v6", "name", "name", "malformed", "not_dns"]))
    if kind == "v4":
        value = draw(st.one_of(st.sampled_from(V4), st.integers(0, 2**32 - 1)))
        return draw(st.sampled_from(_v4_spellings(value))), "ip", ipaddress.IPv4Address(value)
    if kind == "v6":
        text = draw(st.sampled_from(V6))
        spelt = draw(st.sampled_from(_v6_spellings(text)))
        return spelt, "ip", ipaddress.IPv6Address(spelt.strip("[]"))
    if kind == "name":
        label = draw(st.text(st.sampled_from("abcxyz019-_éüßσ日本☃"), min_size=1, max_size=10))
        tld = draw(st.sampled_from(["test", "TEST", "com", "de", "рф"]))
        return f"{label}.{tld}", "name", None
    if kind == "not_dns":
        return draw(st.sampled_from(["a!b.com", "a$b.test", "a*b.de", "x=y.test", "a'b.com", "a..b.com"])), kind, None
    bad = ["exa mple.com", "a<b.com", "[::1%25eth0]", "1.2.3.09", "[fe80::1", "xn--.com", "a%00b.com", "1.2.3.4.5",
           "0x100000000", "a\x01b.com", "[1::2::3]", "", "a%zz.com"]  # fmt: skip
    return draw(st.sampled_from(bad)), "malformed", None


@st.composite
def hostile_url(draw: st.DrawFn) -> tuple[str, str | None]:
    """A URL and the reason the guard must give it (None: fetch), decided from how it was built."""
    scheme = draw(st.sampled_from(["http", "http", "https", "HTTP", "ftp", "gopher"]))
    host, kind, addr = draw(destination())
    creds = draw(st.sampled_from(["", "", "user@", "user:pass@", "ü:p%40ss@"]))
    port = draw(st.sampled_from(["", "", ":8080", ":80", ":65536"]))
    path = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=8))
    pad = draw(st.sampled_from(["", " ", "\t\n", "\x00 "]))
    url = f"{pad}{scheme}://{creds}{host}{port}/{path.replace('#', '')}{pad}"
    if scheme == "gopher":  # not parsed beyond the scheme: only whitespace inside makes it malformed
        return url, "url_malformed" if any(c.isspace() or c < " " for c in host) else "url_scheme"
    if kind == "malformed" or port == ":65536":
        return url, "url_malformed"
    if scheme == "ftp":
        return url, "url_scheme"
    if creds:
        return url, "url_credentials"
    if kind == "not_dns":
        return url, "url_malformed"
    if addr is None:
        return url, None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    refused = (not addr.is_global or addr.is_multicast) and addr != ipaddress.ip_address(HOST)
    return url, "url_private" if refused else None


GUARD_CFG = IngestConfig(allow_hosts=[HOST])


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(case=hostile_url())
def test_the_guard_decides_as_the_destination_was_built(case):
    url, expected = case
    assert UrlGuard(GUARD_CFG).check(url) == expected
    if expected is not None:
        assert reason(expected).cls in ("permanent", "policy")  # retrying cannot help


@settings(max_examples=60, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=hostile_url(), name=st.sampled_from([None, "img.test", "rebind.test", "meta.test", "nx.test", "Bücher.test"]))
def test_only_validated_hosts_are_resolved_and_refused_ones_never_connected(case, name, monkeypatch):
    """Through the opener: the URL's host (or a name the sandbox maps to a private or the loopback address) is
    resolved only when validated, and a connect() goes only to an address the policy allows."""
    url, _expected = case
    if name is not None:
        url = re.sub(r"://[^/]*/", f"://{name}:9/", url.strip(), count=1)
    sandbox = Sandbox(NAMES).install(monkeypatch)
    guard = UrlGuard(GUARD_CFG)
    verdict = guard.decide(url)
    outcome = verdict.reason
    if verdict.reason is None:
        with guarded_opener(GUARD_CFG):
            try:
                urllib.request.urlopen(verdict.url, timeout=2).close()
                outcome = "ok"
            except Exception as err:
                outcome = download_reason("failed_to_download", str(err))
    assert outcome == "ok" or reason(outcome)
    assert all(VALIDATED.fullmatch(h) for h in sandbox.lookups), sandbox.lookups
    policy = DestinationPolicy.from_config(GUARD_CFG)
    assert all(policy.refusal(ipaddress.ip_address(c)) is None for c in sandbox.connects), sandbox.connects
    if name in ("rebind.test", "meta.test") and verdict.reason is None:
        assert (outcome, sandbox.connects) == ("url_private", [])
    if verdict.reason is not None:
        assert sandbox.lookups == [] and sandbox.connects == []


def test_generated_urls_through_ingest_end_in_one_reason_each(tmp_path, sandbox, server):
    """A fixed sample of generated URLs, two served for real, through img2dataset: one outcome per row; every
    URL the guard must refuse ends in that reason, and never in a transient one."""
    cases = _sample(hostile_url(), 40, seed=23)
    urls = [u for u, _ in cases] + [server.url(Behaviour(body=_png(3))), f"http://img.test:{server.port}/s/0"]
    _ev, reasons = _ingest(tmp_path, urls)
    for (url, expected), got in zip(cases, reasons, strict=False):
        if expected is not None:
            assert got == expected, url
        assert reason(got).cls in ("transient", "permanent", "policy") if got != "downloaded" else True
    assert reasons[-2:] == ["downloaded", "exact_duplicate"]
    assert all(VALIDATED.fullmatch(h) for h in sandbox.lookups)


def _sample(strategy: st.SearchStrategy, n: int, seed: int) -> list:
    """n draws of a strategy, reproducible (hypothesis's own engine, a fixed seed)."""
    out: list = []

    @hypothesis.seed(seed)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[hypothesis.Phase.generate])  # fmt: skip
    @given(case=strategy)
    def collect(case):
        out.append(case)

    collect()
    return out[:n]
