import math

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.report.collect import Run, funnel
from infra.domains import CACHE_NAME, LOCAL, NO_HOST, domain_stats, domains, format_domains, host_of, hosts_of
from infra.lineage import LedgerWriter


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://a.example/x.jpg", "a.example"),
        ("https://User:pw@IMG.Example.COM:8443/x?y=1", "img.example.com"),
        ("  http://a.example/x.jpg  ", "a.example"),
        ("http://[::1]:80/x", "::1"),
        ("http://[::1/x", NO_HOST),  # unbalanced bracket: urlsplit raises
        ("http://0x7f.1/x", "127.0.0.1"),  # IPv4 in any notation, as the URL guard and a browser read it
        ("http://0177.0.0.1:80/x", "127.0.0.1"),
        ("http://[0:0::1]/x", "::1"),
        ("HTTP://Bücher.Example/x", "xn--bcher-kva.example"),  # IDNA: the host the request goes to
        ("http://%41.example/x", "a.example"),
        ("http://a.example\\b.example/x", "a.example"),  # a backslash ends a special URL's host
        ("not a url", NO_HOST),
        (None, NO_HOST),
    ],
)
def test_host_of(url, host):
    assert host_of(url) == host


def test_file_urls_are_local_files_only_where_the_run_has_local_roots(tmp_path):
    assert host_of("file:///data/a.png") == NO_HOST and host_of("file://nas/data/a.png") == "nas"
    assert host_of("file:///data/a.png", local=True) == LOCAL
    run = tmp_path / "run"
    w = LedgerWriter("ingest")
    for r, u in enumerate(["file:///data/a.png", "file:///data/b.png", "http://a.example/c.png"]):
        w.info("input", row_id=r, url=u)
        w.info("downloaded", row_id=r, image_id=f"i{r}")
    w.write(run / "stages" / "ingest" / "ledger" / "00000.parquet")
    assert domain_stats(run)[["host", "urls"]].values.tolist() == [[NO_HOST, 2], ["a.example", 1]]
    assert domain_stats(run, local=True)[["host", "urls"]].values.tolist() == [[LOCAL, 2], ["a.example", 1]]


_PARTS = st.sampled_from(["http", "HTTPS", "file", "ftp", "x-y+z.1", "1bad", "", " http", "http\t"])
_NETLOCS = st.sampled_from(["a.example", "A.Example:8080", "u:p@h.example", "[::1]", "[::1]:80", "[::1", "h]",
                            "", ":80", "a@b@c", "xn--bcher-kva.example", "bücher.example", "a b", "a\tb", "%41.x",
                            "a.example\u3000", "a.example\x1c", "a.example "])  # str.strip() takes these off an end
_TAILS = st.sampled_from(["", "/", "/x.jpg", "?q=1", "#f", "/a b", " ", "\n", "/ü"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.tuples(_PARTS, st.sampled_from(["://", ":", ":/", "//"]), _NETLOCS, _TAILS)
                          .map("".join), st.text(max_size=30), st.none()), max_size=20),
       st.booleans())  # fmt: skip
def test_vectorised_hosts_are_those_of_host_of(urls, local):
    import pyarrow as pa

    assert hosts_of(pa.array(urls, pa.string()), local).tolist() == [host_of(u, local) for u in urls]


def _run_with_a_retry(tmp_path):
    """8 rows on 3 hosts (+ 2 rows without a host); rows 1 and 6 are retried: 1 succeeds, 6 times out again;
    row 2 is a perceptual duplicate found across shards after its download."""
    run = tmp_path / "run"
    first = LedgerWriter("ingest")
    urls = {0: "http://a.example/0.jpg", 1: "http://a.example/1.jpg", 2: "https://B.example:8443/2.jpg",
            3: "http://b.example/3.jpg", 4: "not a url", 5: "http://a.example/0.jpg", 6: "http://c.example/6.jpg",
            7: "http://[::1/7.jpg"}  # fmt: skip
    for r, u in urls.items():
        first.info("input", row_id=r, url=u)
    first.info("downloaded", row_id=0, image_id="i0")
    first.drop("http_404", row_id=1)
    first.info("downloaded", row_id=2, image_id="i2")
    first.drop("exact_duplicate", row_id=3, image_id="i2")  # served, same bytes as row 2
    first.drop("list_row_malformed", row_id=4)
    first.drop("url_duplicate", row_id=5)
    first.drop("timeout", row_id=6)
    first.drop("url_malformed", row_id=7)  # refused by the URL guard
    first.write(run / "stages" / "ingest" / "ledger" / "00000.parquet")
    retry = LedgerWriter("ingest", attempt=1)
    for r in (1, 6):
        retry.info("retry", row_id=r, url=urls[r])
    retry.info("downloaded", row_id=1, image_id="i1")
    retry.drop("timeout", row_id=6)
    retry.write(run / "stages" / "ingest" / "ledger" / "r1-00000.parquet")
    cross = LedgerWriter("ingest")  # ingest's cross-shard duplicates, decided after the download (_dedup.parquet)
    cross.drop("phash_duplicate", row_id=2, image_id="i2")
    cross.write(run / "stages" / "ingest" / "ledger" / "_dedup.parquet")
    corpus = LedgerWriter("corpus")
    for r, i in ((0, "i0"), (1, "i1")):
        corpus.keep("in_corpus", row_id=r, image_id=i)
    corpus.keep("in_corpus", image_id="curated", source="seeds")  # a curated image: no row, no host
    corpus.write(run / "stages" / "corpus" / "ledger" / "corpus.parquet")
    return run


def test_domain_stats_count_each_row_once_at_its_latest_attempt(tmp_path):
    frame = domain_stats(_run_with_a_retry(tmp_path))
    got = frame.drop(columns="download_rate").to_dict("records")
    assert got == [
        # row 1's first 404 is superseded by its successful retry; row 5 (a repeated URL) was never requested
        {"host": "a.example", "urls": 3, "requested": 2, "downloaded": 2, "in_corpus": 2, "failures": {}},
        {"host": NO_HOST, "urls": 2, "requested": 1, "downloaded": 0, "in_corpus": 0, "failures": {"url_malformed": 1}},
        {"host": "b.example", "urls": 2, "requested": 2, "downloaded": 2, "in_corpus": 0, "failures": {}},
        {"host": "c.example", "urls": 1, "requested": 1, "downloaded": 0, "in_corpus": 0, "failures": {"timeout": 1}},
    ]
    assert list(frame["download_rate"]) == [1.0, 0.0, 1.0, 0.0]
    assert frame["urls"].sum() == 8


def test_the_stored_table_is_read_while_the_ledger_is_unchanged_and_recomputed_when_it_changes(tmp_path):
    import os

    import pyarrow.parquet as pq

    run = _run_with_a_retry(tmp_path)
    pd.testing.assert_frame_equal(domains(run), domain_stats(run))  # computed, then stored
    stored = run / "stages" / "ingest" / CACHE_NAME
    urls = domain_stats(run)["urls"].tolist()

    def edit() -> None:  # the same key, other numbers
        table = pq.read_table(stored)
        edited = table.set_column(table.schema.get_field_index("urls"), "urls", pa.array([u + 100 for u in urls]))
        pq.write_table(edited.replace_schema_metadata(table.schema.metadata), stored)

    edit()
    assert domains(run)["urls"].tolist() == [u + 100 for u in urls]  # read, not recomputed
    corpus_file = run / "stages" / "corpus" / "ledger" / "corpus.parquet"
    os.utime(corpus_file, ns=(corpus_file.stat().st_atime_ns, corpus_file.stat().st_mtime_ns + 1))
    assert domains(run)["urls"].tolist() == urls  # a ledger file changed: the stored table is stale
    edit()
    assert domains(run, local=True)["urls"].tolist() == urls  # another key: recomputed
    stored.write_bytes(b"not parquet")
    pd.testing.assert_frame_equal(domains(run), domain_stats(run))  # unreadable: recomputed


def test_domain_stats_without_ingest_is_empty_and_rate_is_nan_when_nothing_was_requested(tmp_path):
    assert domain_stats(tmp_path).empty
    run = tmp_path / "run"
    w = LedgerWriter("ingest")
    w.info("input", row_id=0, url="http://a.example/x")
    w.drop("url_duplicate", row_id=0)
    w.write(run / "stages" / "ingest" / "ledger" / "00000.parquet")
    frame = domain_stats(run)
    assert frame[["host", "urls", "requested", "downloaded"]].values.tolist() == [["a.example", 1, 0, 0]]
    assert math.isnan(frame.loc[0, "download_rate"])
    assert "-" in format_domains(frame).splitlines()[1].split()  # the rate column


def test_format_domains_lists_the_top_hosts_then_the_rest(tmp_path):
    text = format_domains(domain_stats(_run_with_a_retry(tmp_path)), top=2).splitlines()
    assert text[1].split() == ["a.example", "3", "2", "100%", "2"]
    assert text[2].split() == [NO_HOST.split()[0], NO_HOST.split()[1], "2", "0", "0%", "0", "url_malformed", "1"]
    assert text[3] == "... 2 more hosts with 3 URLs"
    assert text[4] == "4 hosts, 8 URLs, 4 of 6 requested downloaded (66.7%), 2 in the corpus"


def test_report_funnel_ignores_ingest_drops_superseded_by_a_retry(tmp_path):
    f = funnel(Run(_run_with_a_retry(tmp_path)))
    assert f[["stage", "in", "dropped", "out"]].values.tolist() == [["ingest", 8, 6, 2], ["corpus", 2, 0, 2]]
    # row 1 (404, then downloaded) is not dropped; row 6 timed out twice and is dropped once
    assert f.loc[0, "reasons"] == {"exact_duplicate": 1, "list_row_malformed": 1, "timeout": 1, "url_duplicate": 1,
                                   "url_malformed": 1, "phash_duplicate": 1}


def test_domains_cli_json_has_null_for_a_rate_of_nothing_requested(tmp_path, capsys):
    import json

    from flows.cli import main

    run = tmp_path / "run"
    w = LedgerWriter("ingest")
    for r, (url, outcome) in enumerate([("http://a.example/x", "url_duplicate"), ("http://b.example/y", "http_403")]):
        w.info("input", row_id=r, url=url)
        w.drop(outcome, row_id=r)
    w.write(run / "stages" / "ingest" / "ledger" / "00000.parquet")
    (run / "config.yaml").write_text("{}\n")
    assert main(["domains", "run", "--root", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"host": "a.example", "urls": 1, "requested": 0, "downloaded": 0, "download_rate": None, "in_corpus": 0,
         "failures": {}},
        {"host": "b.example", "urls": 1, "requested": 1, "downloaded": 0, "download_rate": 0.0, "in_corpus": 0,
         "failures": {"http_403": 1}},
    ]  # fmt: skip
    assert main(["domains", "run", "--root", str(tmp_path), "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "... 1 more hosts with 1 URLs", "2 hosts, 2 URLs, 0 of 1 requested downloaded (0.0%), 0 in the corpus"]
