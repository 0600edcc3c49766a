"""URL lists, the shard plan, duplicate URLs, and the URL/destination guard."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ingest import download_reason
from curation.netguard import DestinationPolicy, UrlGuard, literal_address
from curation.opener import guarded_opener
from curation.urls import (
    UrlListError,
    first_occurrences,
    iter_url_rows,
    plan_shards,
    url_duplicates,
    url_list_fingerprint,
)
from infra.config import load_config
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.demo.server import DemoServer, free_port

URLS = [f"http://h/{i % 7}.jpg" for i in range(23)]  # every URL comes back every 7 rows


def _write(path, fmt, urls=URLS):
    df = pd.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]})
    if fmt == "parquet":
        df.to_parquet(path, row_group_size=5)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_plan_fixes_shards_and_finds_duplicate_urls_across_chunks_and_buckets(tmp_path, fmt):
    data = DataConfig(url_list=_write(tmp_path / f"urls.{fmt}", fmt))
    cfg = IngestConfig(shard_size=10, chunk_rows=4, url_dedup_buckets=3)
    plan = plan_shards(data, cfg, tmp_path / "plan")
    assert (plan.n_rows, plan.shards) == (23, ["00000", "00001", "00002"])
    rows = pd.read_parquet(plan.inputs("00001"))
    assert rows["row_id"].tolist() == list(range(10, 20))
    assert rows["url"].tolist() == URLS[10:20] and rows["caption"].tolist() == [f"c{i}" for i in range(10, 20)]
    assert url_duplicates(tmp_path / "plan", 0, 23) == {i: i % 7 for i in range(7, 23)}
    assert url_duplicates(tmp_path / "plan", 10, 12) == {10: 3, 11: 4}
    again = plan_shards(data, cfg.model_copy(update={"shard_size": 5}), tmp_path / "plan")
    assert again.shards == plan.shards  # a finished plan is reused as is: the assignment never moves


def test_first_occurrences_is_exact():
    h1 = np.array([5, 1, 5, 5, 2, 1], np.uint64)
    h2 = np.array([0, 0, 1, 0, 0, 0], np.uint64)
    rows = np.array([10, 11, 12, 13, 14, 15])
    assert first_occurrences(h1, h2, rows).tolist() == [[13, 10], [15, 11]]


def test_truncated_csv_and_jsonl_end_in_a_malformed_row(tmp_path):
    csv_text = _write(tmp_path / "u.csv", "csv").read_text()
    (tmp_path / "cut.csv").write_text(csv_text[: csv_text.rindex("http://h/") + 12])  # cut inside the last URL
    rows = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / "cut.csv"), chunk_rows=8))
    assert len(rows) == 23 and rows["list_error"].notna().tolist() == [False] * 22 + [True]
    assert rows["list_error"].iloc[-1] == "expected 2 fields, got 1: http://h/1.j"
    jl = _write(tmp_path / "u.jsonl", "jsonl").read_text()
    (tmp_path / "cut.jsonl").write_text(jl[: len(jl) - 9])
    rows = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / "cut.jsonl"), chunk_rows=8))
    assert len(rows) == 23 and rows["list_error"].notna().sum() == 1
    assert rows["list_error"].iloc[-1].startswith("not valid JSON") and rows["url"].iloc[-1] == ""


def test_truncated_parquet_stops_before_any_download(tmp_path):
    data = _write(tmp_path / "u.parquet", "parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(UrlListError, match=r"cut.parquet \(parquet; truncated or corrupt\? re-copy it\)"):
        plan_shards(DataConfig(url_list=tmp_path / "cut.parquet"), IngestConfig(), tmp_path / "plan")


def _long_url_list(root: Path, n: int) -> tuple[dict[str, Path], int]:
    """n rows of 4 kB URLs (every URL twice) as parquet (row groups of 250), CSV, JSONL, a JSON array and gzipped
    TSV; and the URL bytes."""
    import gzip

    pad = "p" * 4000
    urls = [f"http://example.com/{pad}/{i % (n // 2)}.jpg" for i in range(n)]
    paths = {fmt: root / f"{n}.{fmt}" for fmt in ("parquet", "csv", "jsonl", "json", "tsv.gz")}
    pq.write_table(pa.table({"url": urls}), paths["parquet"], row_group_size=250)
    paths["csv"].write_text("url\n" + "".join(u + "\n" for u in urls))
    paths["jsonl"].write_text("".join(json.dumps({"url": u}) + "\n" for u in urls))
    paths["json"].write_text(json.dumps([{"url": u} for u in urls]))  # one line: read in 1 MB parts all the same
    paths["tsv.gz"].write_bytes(gzip.compress(("caption\turl\n" + "".join(f"c\t{u}\n" for u in urls)).encode(), 1))
    return paths, sum(map(len, urls))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_planning_memory_does_not_grow_with_the_list(tmp_path):
    """Peaks while planning 1,500 vs 6,000 rows (6 vs 24 MB of URLs; chunks of 250 rows, shards of 500), measured in
    a fresh process (tests/curation/plan_memory.py): Arrow's memory pool (where the rows wait for their shard file:
    tracemalloc does not see it), the Python heap and the peak RSS, for parquet, CSV, JSONL, JSON-array and gzipped
    TSV lists.

    The control plans with shards larger than the list, so the whole list waits in Arrow memory: its Arrow peak grows
    with the list while its Python-heap peak does not, which is why the Python heap alone proved nothing. The RSS
    bound is coarse: allocator slack moves a single run's RSS peak by up to ~30 MB at this size, hence the least of
    three runs, each in its own forked child.
    """
    (short, short_bytes), (long, long_bytes) = _long_url_list(tmp_path, 1500), _long_url_list(tmp_path, 6000)
    specs = [{"short": str(short[fmt]), "long": str(long[fmt]), "shard_size": shard, "chunk_rows": 250,
              "plan": str(tmp_path / f"plan-{fmt}-{shard}")}
             for fmt, shard in (("parquet", 500), ("csv", 500), ("jsonl", 500), ("json", 500), ("tsv.gz", 500),
                                ("parquet", 10**6))]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "tests.curation.plan_memory", json.dumps(specs)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[2], timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    *bounded, control = json.loads(proc.stdout)
    for fmt, peaks in zip(("parquet", "csv", "jsonl", "json", "tsv.gz"), bounded, strict=True):
        s, lg = peaks["short"], peaks["long"]
        assert (s["rows"], s["duplicates"], lg["rows"], lg["duplicates"]) == (1500, 750, 6000, 3000), fmt
        assert lg["arrow_peak"] <= 1.05 * s["arrow_peak"], (fmt, peaks)
        assert lg["python_peak"] <= 1.25 * s["python_peak"], (fmt, peaks)
        # Holding the list would add at least the difference of the two lists' sizes to the RSS peak (the control
        # below shows it does). Each peak is the least of three forked runs: a single run's RSS peak jumped by ~30 MB
        # of allocator slack about one time in six, which failed CI once.
        assert lg["rss_peak"] - s["rss_peak"] < 0.5 * (long_bytes - short_bytes), (fmt, peaks)
    s, lg = control["short"], control["long"]
    assert lg["arrow_peak"] > 3 * s["arrow_peak"] and lg["arrow_peak"] > long_bytes, control
    assert lg["python_peak"] <= 1.25 * s["python_peak"], control
    assert lg["rss_peak"] - s["rss_peak"] > 0.5 * (long_bytes - short_bytes), control


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/a.jpg", None),
        ("https://8.8.8.8/a.jpg", None),
        ("ftp://example.com/a.jpg", "url_scheme"),
        ("file:///etc/passwd", "url_scheme"),
        ("htp:/not a url", "url_malformed"),
        ("http://exa mple.com/a.jpg", "url_malformed"),
        ("http://[::1/a.jpg", "url_malformed"),
        ("http://example.com:99999/a.jpg", "url_malformed"),
        ("", "url_malformed"),
        ("http://169.254.169.254/latest/meta-data/", "url_private"),
        ("http://0251.0376.0251.0376/", "url_private"),  # octal spelling of the metadata address
        ("http://2852039166/", "url_private"),  # decimal spelling of the metadata address
        ("http://[::ffff:169.254.169.254]/", "url_private"),
        ("http://10.0.0.1/a.jpg", "url_private"),
        ("http://192.168.1.1/a.jpg", "url_private"),
        ("http://100.100.100.200/", "url_private"),
        ("http://127.0.0.1:8000/a.jpg", "url_private"),
        ("http://[::1]/a.jpg", "url_private"),
        ("http://0.0.0.0/a.jpg", "url_private"),
    ],
)
def test_url_guard(url, reason):
    assert UrlGuard(IngestConfig()).check(url) == reason


def test_allow_list_and_allow_private_never_open_metadata():
    guard = UrlGuard(IngestConfig(allow_hosts=["127.0.0.1", "10.1.0.0/16", "cdn.internal"]))
    assert [guard.check(u) for u in ("http://127.0.0.1:1/a", "http://10.1.2.3/a", "http://10.2.0.1/a")] == [
        None, None, "url_private"]  # fmt: skip
    private = DestinationPolicy.from_config(IngestConfig(allow_private=True))
    assert private.refusal(literal_address("10.0.0.1")) is None
    assert private.refusal(literal_address("169.254.169.254")) == "metadata"
    assert private.refusal(literal_address("fd00:ec2::254")) == "metadata"
    assert DestinationPolicy.from_config(IngestConfig()).refusal(literal_address("10.0.0.1"), "cdn.internal") == "private"
    allowed = DestinationPolicy.from_config(IngestConfig(allow_hosts=["cdn.internal"]))
    assert allowed.refusal(literal_address("10.0.0.1"), "cdn.internal") is None


def test_names_resolving_to_refused_addresses_are_refused_before_connecting(tmp_path, loopback_only):
    port = free_port()
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    with guarded_opener(IngestConfig(allow_hosts=[])), DemoServer(tmp_path, port), \
            pytest.raises(urllib.error.URLError, match="destination refused: localhost"):
        urllib.request.urlopen(f"http://localhost:{port}/img/a.png", timeout=2)
    assert loopback_only == []  # refused at resolution time: no connect() at all
    with guarded_opener(IngestConfig(allow_hosts=["127.0.0.1"])), DemoServer(tmp_path, port), \
            urllib.request.urlopen(f"http://localhost:{port}/img/a.png", timeout=2) as r:
        assert r.read() == b"\x89PNG"
    assert loopback_only == ["127.0.0.1"]
    assert urllib.request._opener is None  # the scope ended: urllib's default opener again, for other code


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
        ("failed_to_download", "<urlopen error timed out>", "timeout"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("failed_to_download", "<urlopen error destination refused: a.b resolves to 10.0.0.1 (private address)>",
         "url_private"),
        ("failed_to_download", "HTTP Error 302: redirect to a refused URL (url_private): http://10.0.0.1/", "redirect_refused"),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "robots_disallowed"),
        ("failed_to_download", "something new", "download_error"),
        ("failed_to_resize", "image too small", "image_too_small"),
        ("failed_to_resize", "Image decoding error", "decode_error"),
        ("failed_to_resize", "decode error: Truncated File Read", "truncated_image"),
    ],
)  # fmt: skip
def test_download_reason(status, message, reason):
    assert download_reason(status, message) == reason


def test_detail_is_json():
    assert json.loads(json.dumps({"error": download_reason("failed_to_download", "x")})) == {"error": "download_error"}


def test_url_list_fingerprint_follows_contents_not_copies(tmp_path):
    """The ingest stage's key: an edited or appended list makes the stage stale; a copy (new mtime) does not."""
    import os
    import shutil

    from flows.stages import SPECS
    from infra.run import RunDir
    from infra.stage import stage_key

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.csv").write_text("url\nhttp://127.0.0.1/1.png\n")
    big = "url\n" + "".join(f"http://127.0.0.1/{i:07d}.png\n" for i in range(120_000))  # ~3.4 MB: head and tail read
    (lists / "b.csv").write_text(big)
    data = DataConfig(url_list=lists)
    first = url_list_fingerprint(data)
    assert first == url_list_fingerprint(data) and first.endswith(":csv,csv")
    copy = tmp_path / "copy"
    shutil.copytree(lists, copy)
    os.utime(copy / "b.csv", (1, 1))
    assert url_list_fingerprint(DataConfig(url_list=copy)) == first
    (copy / "b.csv").write_text(big.replace("0119999", "0119998"))  # same size, last line edited
    assert url_list_fingerprint(DataConfig(url_list=copy)) != first
    (lists / "a.csv").write_text("url\nhttp://127.0.0.1/1.png\nhttp://127.0.0.1/2.png\n")  # appended
    assert url_list_fingerprint(data) != first
    assert url_list_fingerprint(DataConfig(url_list=tmp_path / "nope")) == "missing"
    assert url_list_fingerprint(DataConfig()) == "missing"

    cfg = load_config(None, [f"data.url_list={lists / 'a.csv'}"])
    run = RunDir(tmp_path / "runs", "r")
    key = stage_key(SPECS["ingest"], run, cfg)
    assert stage_key(SPECS["ingest"], run, cfg) == key
    (lists / "a.csv").write_text("url\nhttp://127.0.0.1/3.png\n")
    assert stage_key(SPECS["ingest"], run, cfg) != key


def _img2dataset_lists(root: Path, urls: list[str], captions: list[str]) -> dict[str, Path]:
    """The same rows in every input format img2dataset reads (and bzip2 / xz besides gzip), as such files come."""
    import bz2
    import gzip
    import lzma

    tsv = "caption\turl\n" + "".join(f"{c}\t{u}\n" for c, u in zip(captions, urls, strict=True))
    csv_text = pd.DataFrame({"url": urls, "caption": captions}).to_csv(index=False)
    jsonl = "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(urls, captions, strict=True))
    array = json.dumps([{"caption": c, "url": u, "w": 10**12 + i} for i, (u, c) in enumerate(zip(urls, captions, strict=True))], indent=2)  # fmt: skip
    texts = {"urls.txt": "\r\n".join(urls) + "\n\n", "urls.csv": csv_text, "excel.csv": "\ufeff" + csv_text,
             "urls.tsv": tsv, "urls.jsonl": jsonl, "array.json": array, "strings.json": json.dumps(urls)}  # fmt: skip
    paths = {}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
        paths[name] = root / name
    for name, opener, suffix in (("urls.txt", gzip.open, ".gz"), ("urls.tsv", gzip.open, ".gz"),
                                 ("urls.csv", bz2.open, ".bz2"), ("urls.jsonl", lzma.open, ".xz"),
                                 ("array.json", gzip.open, ".gz")):  # fmt: skip
        with opener(root / (name + suffix), "wt", encoding="utf-8") as f:
            f.write(texts[name])
        paths[name + suffix] = root / (name + suffix)
    return paths


def test_every_img2dataset_input_format_gives_the_same_rows(tmp_path):
    """txt, csv, tsv, jsonl, json (an array of rows or of URL strings) and parquet, compressed or not, in chunks
    smaller than the list: the rows, their order and captions are the parquet list's."""
    urls = [f"http://example.com/{i}/a,b.jpg?q=[{i}]" for i in range(11)]
    captions = [f'cap "{i}", with ] and {{' for i in range(11)]
    paths = _img2dataset_lists(tmp_path, urls, captions)
    pd.DataFrame({"url": urls, "caption": captions}).to_parquet(tmp_path / "ref.parquet")
    ref = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / "ref.parquet")))
    for name, path in paths.items():
        rows = pd.concat(iter_url_rows(DataConfig(url_list=path), chunk_rows=4))
        assert rows["row_id"].tolist() == list(range(11)), name
        assert rows["url"].tolist() == urls and rows["list_error"].isna().all(), name
        with_captions = not name.startswith(("urls.txt", "strings"))
        assert rows["caption"].tolist() == (captions if with_captions else [None] * 11), name
    assert ref["url"].tolist() == urls
    # img2dataset's own input_format values name a file whose name does not
    (tmp_path / "list.data").write_bytes(paths["urls.tsv.gz"].read_bytes())
    rows = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / "list.data", input_format="tsv.gz")))
    assert rows["url"].tolist() == urls
    # a folder of lists: every file whose name says a format, in name order, numbered across files
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, name in enumerate(["urls.txt.gz", "array.json", "urls.tsv"]):
        (folder / f"{i}-{name}").write_bytes(paths[name].read_bytes())
    (folder / "_SUCCESS").write_text("")
    rows = pd.concat(iter_url_rows(DataConfig(url_list=folder), chunk_rows=5))
    assert rows["url"].tolist() == urls * 3 and rows["row_id"].tolist() == list(range(33))


@pytest.mark.parametrize("chunk_chars", [1, 2, 7, 64, 1 << 20])
def test_a_json_array_is_parsed_element_by_element_across_reads(chunk_chars):
    """Elements (objects, URL strings, numbers that go on past a read) split at every position of the buffer."""
    import io

    from curation.urls import _json_array

    items = [{"url": "http://h/a", "n": 1234567, "deep": {"x": [1, {"y": "]"}]}}, "http://h/b", 12345, {}]
    text = "  [ " + ",\n ".join(json.dumps(x) for x in items) + " ]  "
    got = list(_json_array(io.StringIO(text), Path("t.json"), "url", chunk_chars=chunk_chars))
    assert got == [items[0], {"url": "http://h/b"}, {"__error__": "not a JSON object or URL string: 12345"}, {}]


def test_a_cut_json_array_or_compressed_list_stops_before_any_download(tmp_path):
    import gzip

    urls = [f"http://example.com/{i}.jpg" for i in range(2000)]
    cut = json.dumps([{"url": u} for u in urls])[:-30]  # inside the last URL (`{"url": "h`), its quote at `start`
    (tmp_path / "cut.json").write_text(cut)
    start = cut.rindex('"')
    with pytest.raises(UrlListError, match=rf"cut.json: not a valid JSON array at element 1999 \(character {start}\): "
                                           r"Unterminated string starting \(is the file cut short\?\); the stage stopped"):
        plan_shards(DataConfig(url_list=tmp_path / "cut.json"), IngestConfig(), tmp_path / "plan1")
    (tmp_path / "bad.json").write_text('[{"url": "http://h/1"} {"url": "http://h/2"}]')
    with pytest.raises(UrlListError, match=r"at element 1 \(character 23\): expected ',' or '\]'; "):
        plan_shards(DataConfig(url_list=tmp_path / "bad.json"), IngestConfig(), tmp_path / "plan2")
    data = gzip.compress(("url\n" + "\n".join(urls)).encode())
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UrlListError, match=r"cut.csv.gz \(gzip; truncated or corrupt\? re-copy it\)"):
        plan_shards(DataConfig(url_list=tmp_path / "cut.csv.gz"), IngestConfig(), tmp_path / "plan3")
    for plan in ("plan1", "plan2", "plan3"):
        assert not list((tmp_path / plan).glob("inputs/*.parquet"))  # no shard planned, so none downloaded


def test_a_list_that_cannot_be_read_is_named_with_its_fix_before_the_run_starts(tmp_path):
    """Each file's first row is read at start-up (url_list_problems): a TSV without its header line (CC3M's, as
    published), LAION's upper-case URL column, a damaged parquet file, a file whose format its name does not say."""
    from curation.urls import url_list_problems

    (tmp_path / "cc3m.tsv").write_text("a cat on a mat\thttp://example.com/cat.jpg\na dog\thttp://example.com/dog.jpg\n")
    pd.DataFrame({"URL": ["http://h/1"], "TEXT": ["t"]}).to_parquet(tmp_path / "laion.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "laion.parquet").read_bytes()[:100])
    (tmp_path / "good.txt").write_text("http://h/1\n")
    problems = url_list_problems(DataConfig(url_list=tmp_path))
    names = ["cc3m.tsv", "cut.parquet", "laion.parquet"]  # in file-name order
    assert [[n for n in names if f"{tmp_path}/{n}" in p] for p in problems] == [[n] for n in names]
    assert problems[0].endswith("Its first line is data, not a header: the file has no header line. Add one naming "
                                f"the columns (for caption\\turl rows: sed -i '1s/^/caption\\turl\\n/' {tmp_path}/cc3m.tsv)")
    assert "(parquet; truncated or corrupt? re-copy it)" in problems[1]
    assert problems[2].endswith("no column 'url' (columns: ['URL', 'TEXT']): set data.url_col=URL")
    assert url_list_problems(DataConfig(url_list=tmp_path / "good.txt")) == []
    assert url_list_problems(DataConfig(url_list=tmp_path / "laion.parquet", url_col="URL")) == []
    (tmp_path / "urls.list").write_text("http://h/1\n")
    assert url_list_problems(DataConfig(url_list=tmp_path / "urls.list")) == [
        f"data.url_list: cannot tell the format of {tmp_path}/urls.list from its name; set data.input_format (parquet, "
        "csv, tsv, jsonl, json or txt)"]
    assert url_list_problems(DataConfig(url_list=tmp_path / "urls.list", input_format="txt")) == []


def test_a_url_list_that_is_images_says_how_to_curate_a_folder(tmp_path):
    """data.url_list given a folder of photographs (or one of them) instead of a list of URLs: the README's two
    commands for one's own folder, with its path."""
    from curation.urls import url_list_problems

    (tmp_path / "photos" / "2024").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "2024" / "a.jpg")
    fix = (f". For a folder of your own images, write its list first: lvd folder-urls {tmp_path / 'photos'} "
           f"photos.parquet, then lvd run configs/own_folder.yaml data.url_list=photos.parquet "
           f"\"ingest.local_roots=[{tmp_path / 'photos'}]\"")
    assert url_list_problems(DataConfig(url_list=tmp_path / "photos")) == [
        f"data.url_list: no URL lists in {tmp_path / 'photos'} (.parquet, .csv, .tsv, .jsonl, .json or .txt, text ones "
        f"optionally .gz, .bz2 or .xz): it holds images ({tmp_path / 'photos' / '2024' / 'a.jpg'}), not lists of "
        f"their URLs" + fix]
    [problem] = url_list_problems(DataConfig(url_list=tmp_path / "photos" / "2024" / "a.jpg"))
    assert problem.startswith(f"data.url_list: {tmp_path / 'photos' / '2024' / 'a.jpg'} is an image, not a list of "
                              f"image URLs. For a folder of your own images, write its list first: lvd folder-urls "
                              f"{tmp_path / 'photos' / '2024'} 2024.parquet")
    (tmp_path / "empty").mkdir()
    assert url_list_problems(DataConfig(url_list=tmp_path / "empty")) == [
        f"data.url_list: no URL lists in {tmp_path / 'empty'} (.parquet, .csv, .tsv, .jsonl, .json or .txt, text ones "
        "optionally .gz, .bz2 or .xz)"]


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_a_stray_quote_costs_its_own_row_only(tmp_path, delimiter):
    """A caption that opens a quote and never closes it on its line: before, the rows after it vanished into that
    caption (until a later quote closed it) or the list stopped with csv's 'field larger than field limit'. Now its
    line is one malformed row and every other line is its own row; quoted captions holding newlines (as pandas
    writes them) still read as one row."""
    ext = "csv" if delimiter == "," else "tsv"
    lines = [f"url{delimiter}caption"] + [f"http://h/{i}.jpg{delimiter}cap {i}" for i in range(3000)]
    lines[5] = f'http://h/4.jpg{delimiter}"a stray quote'  # never closed: csv would read 131,072 characters on
    lines[2005] = f'http://h/2004.jpg{delimiter}"5 inch screen'  # closed by the stray quote 10 lines below
    lines[2015] = f'http://h/2014.jpg{delimiter}another" quote'
    (tmp_path / f"q.{ext}").write_text("\n".join(lines) + "\n")
    rows = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / f"q.{ext}"), chunk_rows=700))
    assert len(rows) == 3000 and rows["row_id"].tolist() == list(range(3000))
    bad = rows[rows["list_error"].notna()]
    assert bad["row_id"].tolist() == [4, 2004]
    assert bad["list_error"].tolist() == [
        "a quote opened on this line does not close on it (the lines after it are read as rows of their own): "
        + lines[i + 1] for i in (4, 2004)]  # fmt: skip
    good = rows[rows["list_error"].isna()]
    assert good["url"].tolist() == [f"http://h/{i}.jpg" for i in range(3000) if i not in (4, 2004)]
    assert good.set_index("row_id").loc[2014, "caption"] == 'another" quote'
    captions = ["two\nlines", 'a "quoted", word\nand more', "plain", "ends with newline\n"]
    pd.DataFrame({"url": [f"http://h/{i}" for i in range(4)], "caption": captions}).to_csv(
        tmp_path / f"ok.{ext}", index=False, sep=delimiter)
    rows = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / f"ok.{ext}")))
    assert rows["caption"].tolist() == captions and rows["list_error"].isna().all()
