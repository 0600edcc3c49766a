import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from evaluation.report import build_report
from evaluation.report.browser import _remove_profile, find_chromium, render
from evaluation.report.collect import Run, attempts, funnel
from evaluation.report.sections import SECTIONS
from tests.evaluation.run_fixture import build_run

SECTION_IDS = [s[0] for s in SECTIONS]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def report(run_dir):
    from flows.pipeline import face_blur
    from infra.run import RunDir

    # Seed and evaluation images are shown only through the run's face blurring, as `lvd report` and the flow do.
    return build_report(run_dir, blur=face_blur(RunDir(run_dir.parent, run_dir.name).load_config()))


def test_without_a_face_blur_no_seed_or_evaluation_image_is_shown(run_dir, report, tmp_path):
    bare = build_report(run_dir, tmp_path / "bare.html").read_text()
    # 2 retrieval queries and 1 evaluation image left out; every pool image still shown (as the faces stage stored it)
    assert bare.count('<div class="thumb') == report.read_text().count('<div class="thumb') - 3


def test_funnel_counts_every_row_once(run_dir):
    f = funnel(Run(run_dir))
    assert f[["stage", "in", "dropped", "out"]].values.tolist() == [
        ["ingest", 40, 3, 37], ["nsfw", 37, 1, 36], ["faces", 36, 0, 36], ["dedup", 36, 4, 32],
        ["retrieve", 32, 24, 8], ["rebalance", 8, 2, 6], ["corpus", 6, 0, 6]]
    assert f.loc[0, "reasons"] == {"http_404": 2, "decode_error": 1}
    assert f.loc[3, "reasons"] == {"near_duplicate": 3, "eval_contamination": 1}


def test_hosts_section_lists_downloads_failures_and_corpus_images_per_host(report):
    html = report.read_text()
    body = html[html.index('<section id="domains">'):]
    body = body[:body.index("</section>")]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", body)
    assert [cells[i:i + 6] for i in range(0, len(cells), 6)] == [
        ["img.a.example", "14", "13", "93%", "2", "http 404 1"],  # rows 0, 3, ..., 39; 15 and 18 in the corpus
        ["b.example", "13", "12", "92%", "2", "http 404 1"],
        ["c.example", "13", "12", "92%", "2", "decode error 1"],
    ]
    assert re.findall(r'<div class="kpi"><b>([^<]*)</b>', body) == ["3", "37 of 40 (92%)", "0", "3"]


def test_report_is_self_contained_and_has_every_section(report):
    html = report.read_text()
    assert re.findall(r'<section id="([a-z]+)"', html) == SECTION_IDS
    assert 'class="missing"' not in html  # the fixture has every input
    assert "http://" not in html and "https://" not in html  # nothing to fetch (SVG namespaces are inside base64)
    assert re.findall(r'<img src="(\w+):', html) == ["data"] * html.count("<img ")
    # thumbnails: 2 blurred faces, dedup groups (3 + 2 members) + contamination (pool + eval), 2 queries + 8 neighbours
    assert html.count('<div class="thumb') == 2 + 5 + 2 + 10
    # figures: funnel, NSFW histogram, component sizes, cluster sizes, training curves
    assert html.count("data:image/svg+xml;base64,") == 5


def test_overview_lists_every_attempt_with_what_it_reused_and_where_it_stopped(run_dir, report):
    history = attempts(Run(run_dir))
    assert [(a.by, a.changed, a.completed, a.stopped_in) for a in history] == [
        ("lvd run", [], False, "ingest"), ("lvd resume", ["run.shard_retries"], False, "pretrain"),
        ("lvd resume", [], True, None), ("lvd retry-failed", [], True, "ingest"),
        ("lvd retry-failed", [], False, "ingest")]
    ingest = history[1].stages["ingest"]
    assert (ingest.outcome, ingest.reused, ingest.done) == ("completed", 2, 1)
    assert history[2].stages["pretrain"].from_step == 4
    html = report.read_text()
    body = html[html.index('<section id="overview">'):]
    body = body[body.index("<h3>Attempts</h3>"):body.index("</section>")]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", body)
    rows = [cells[i:i + 6] for i in range(0, len(cells), 6)]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    # The highest peak memory its stages recorded, and where (the retries run no stage; events of a run made before
    # stages recorded it have none either).
    assert [r[4] for r in rows] == ["0.9 GiB (crawl)", "1.5 GiB (nsfw)", "2.0 GiB (pretrain)", "", ""]
    rows = [r[:4] + r[5:] for r in rows]
    middle = "nsfw, faces, dedup, embed, retrieve, rebalance, corpus"
    assert [r[2:] for r in rows] == [
        ["lvd run", "ran crawl, ingest (did not finish)", "stopped in ingest without recording why (killed, out of memory, or its machine lost)"],
        ["lvd resume (changed run.shard_retries)",
         f"ran ingest (2 shards reused), {middle}, pretrain (failed: RuntimeError: loss is NaN); reused (completed "
         "before): crawl", "failed in pretrain"],
        ["lvd resume", f"ran pretrain (resumed at step 4), evaluate; reused (completed before): crawl, ingest, {middle}",
         "completed"],
        ["lvd retry-failed", "ingest: 3 failed URLs downloaded again (retry 1), 0 recovered", "completed"],
        ["lvd retry-failed", "ingest: a retry of the failed URLs",
         "failed: ValueError: reasons [&#x27;url_*&#x27;] are decided without downloading"]]


def test_evaluation_table_puts_references_and_baselines_beside_the_model(report):
    html = report.read_text()
    head = re.search(r'<section id="evaluation">.*?<thead><tr>(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r"<th[^>]*>(.*?)</th>", head) == [
        "benchmark", "protocol", "metric", "pretrained<small>this run</small>", "dinov2-s14<small>reference</small>",
        "random-init<small>baseline</small>", "raw-pixels<small>baseline</small>",
        "setting<small>of pretrained</small>"]
    assert '<td class="num best">95.50</td>' in html and "n=4 + avgpool, lr 0.001" in html
    body = re.search(r'<section id="evaluation">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]
    # benchmarks in the order evaluated (classification first); the dense setting shown once per protocol
    assert [[c[0], c[1], c[2], c[-1]] for c in cells] == [
        ["toy", "kNN", "top-1 (k=20) %", ""], ["", "linear probe", "top-1 %", "n=4 + avgpool, lr 0.001"],
        ["strokes", "dense linear probe", "mIoU % †", "4×4 patches → 28×28 px, 200 it."],
        ["", "", "pixel accuracy %", ""]]


def test_dense_numbers_are_explained_next_to_them(report):
    html = report.read_text()
    notes = re.search(r'<section id="evaluation">.*?</table></div>(.*?)</section>', html, re.S).group(1)
    assert re.findall(r'<p class="note">(.*?)</p>', notes) == [
        "† strokes: with pretrained, the probe sees each image as 4×4 patch tokens and upsamples their class "
        "scores to the 28×28\u00a0px labels, so it cannot follow anything thinner than a patch. For scale: "
        "labelling each patch perfectly with its most frequent class scores 33.5 mIoU; labelling every pixel with "
        "the most frequent class scores 7.8 mIoU and 86.1 % pixel accuracy. The probe has not converged after 200 "
        "iterations: the pixel accuracy of pretrained, random-init and raw-pixels (59.1–64.7 %) is below that of "
        "labelling everything with the most frequent class, so these mIoU values show how far training got, not how "
        "good the features are, and their order does not rank the models.",
        "Run with a smaller budget than the reference protocols: linear probe 500 iterations (reference 12,500); "
        "dense probe 200 iterations (reference 40,000)."]


def test_report_of_a_run_stopped_early_says_what_is_missing(run_dir, tmp_path):
    partial = tmp_path / run_dir.name
    shutil.copytree(run_dir, partial)
    for stage in ("rebalance", "corpus", "pretrain", "evaluate"):
        shutil.rmtree(partial / "stages" / stage)
    html = build_report(partial).read_text()
    assert re.findall(r'<section id="([a-z]+)"', html) == SECTION_IDS
    assert html.count('class="missing"') == 4  # rebalancing, composition, training, evaluation
    assert "The training log (metrics.csv): not in this run (stages/pretrain/metrics.csv is missing)." in html


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None and not os.environ.get("LVD_REQUIRE_BROWSER"),
                    reason="chromium is not installed (apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium_without_errors(report, tmp_path, monkeypatch):
    scratch = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # a short TMPDIR: chromium's socket path is limited
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the profile
    monkeypatch.setenv("TMPDIR", str(scratch))  # the browser's own temporary files
    page = render(report, tmp_path / "report.png")
    leftovers = list(scratch.iterdir())
    shutil.rmtree(scratch)
    assert leftovers == []  # the profile and the browser's singleton-socket folder are removed
    assert page.console_errors == []
    assert [s["id"] for s in page.sections] == SECTION_IDS
    assert all(s["title"] and s["text"] > 40 and s["missing"] == 0 for s in page.sections), page.sections
    assert page.images == 2 + 5 + 2 + 10 + 5 and page.broken_images == []
    assert page.screenshot.stat().st_size > 50_000


def test_profile_removal_outlasts_a_process_still_writing_into_it(tmp_path):
    """The CI failure this guards: a browser helper still flushing into the profile while it is deleted made rmtree
    fail with 'Directory not empty'. Removal retries until the writer stops."""
    profile = tmp_path / "profile"
    (profile / "Default").mkdir(parents=True)
    stop_at = time.monotonic() + 0.6
    written = []

    def writer():
        i = 0
        while time.monotonic() < stop_at:
            d = profile / "Default"
            try:
                d.mkdir(exist_ok=True)  # not parents: once the profile is gone, it stays gone
                (d / f"f{i}").write_bytes(b"x")
                written.append(i)
            except OSError:
                pass
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    _remove_profile(profile)
    t.join()
    assert written and not profile.exists()


def test_profile_removal_gives_up_with_the_error_after_its_timeout(tmp_path, monkeypatch):
    calls = []

    def rmtree(path):
        calls.append(path)
        raise OSError(39, "Directory not empty", str(path))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(OSError, match="Directory not empty"):
        _remove_profile(tmp_path / "p", timeout=0.5)
    assert 2 <= len(calls) <= 5  # retried every 0.2 s, then the last error surfaces
