"""The report's sections, each a function of the run directory returning HTML (or a note when inputs are absent)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluation.report import collect, plots
from evaluation.report.collect import Missing, Run
from evaluation.report.html import Raw, esc, figure, grid, kpis, missing, page, section, table, thumb
from evaluation.report.images import Thumb, read_set_images, read_shard_images, thumbnail
from infra import plan
from infra.history import Attempt, describe
from infra.lineage import STAGE_ORDER
from infra.run import now
from infra.run_lock import Holder, holder
from infra.summary import warnings

N_BLURRED, N_GROUPS, N_QUERIES, N_NEIGHBOURS, N_HOSTS = 8, 6, 5, 8, 15


def _pool_images(run: Run, ids: list[str]) -> dict[str, Thumb]:
    """Thumbnails of pool images as later stages saw them (after face blurring)."""
    return {k: thumbnail(v) for k, v in read_shard_images(run.stage("faces") / "shards", ids).items()}


def _when(iso: str) -> str:
    return pd.Timestamp(iso).strftime("%Y-%m-%d %H:%M UTC") if iso else ""


# --- overview --------------------------------------------------------------------------------------------------
def _unpooled(run: Run, data: bytes) -> Thumb | None:
    """A thumbnail of an image that did not pass the pool's faces stage, blurred by the run's detector first (None:
    no detector was given, so it is not shown)."""
    return None if run.blur is None else thumbnail(run.blur(data))


def overview(run: Run) -> str:
    rows = []
    cfg = run.pipeline_config()
    stages, skipped = (plan.listed(cfg), plan.not_run(cfg)) if cfg is not None else (STAGE_ORDER, {})
    for stage in stages:
        m = run.manifest(stage)
        if m is None:
            state = "partial" if run.stage(stage).exists() else "not run"
            why = f": {skipped[stage]}" if stage in skipped else ""
            rows.append([stage, Raw(f'<span class="state-pending">{esc(state + why)}</span>'), "", None, None])
            continue
        secs = (pd.Timestamp(m.finished_at) - pd.Timestamp(m.started_at)).total_seconds()
        kept = m.counts.get("kept")
        dropped = m.counts.get("dropped")
        n_drop = sum(dropped.values()) if isinstance(dropped, dict) else None
        rows.append([stage, Raw('<span class="state-completed">completed</span>'), f"{secs:,.1f} s", kept, n_drop])
    info = run.path / "run.json"
    created = json.loads(info.read_text()).get("created", "") if info.is_file() else ""
    lead = f"Run {run.run_id}" + (f", created {_when(created)}" if created else "") + ". Stages in order, with wall time and counts."
    stage_table = table(["stage", "state", "time", "kept", "dropped"], rows, [False, False, True, True, True])
    try:
        history = attempts_table(collect.attempts(run), holder(run.path))
    except Missing as err:
        history = missing(str(err))
    warn = "".join(f'<p class="note warn">{esc("Warning: " + w)}</p>' for w in (warnings(cfg) if cfg else []))
    return f'<p class="lead">{esc(lead)}</p>' + warn + stage_table + "<h3>Attempts</h3>" + history


def attempts_table(history: list[Attempt], live: Holder | None = None) -> str:
    """Every process that worked on the run, from its events: what it ran, what it reused, where it stopped."""
    if not history:
        return missing("The run's events.jsonl records no attempt (its flow never started).")
    rows = [[r["attempt"], _when(r["started"]), r["by"] + (f" on {r['on']}" if r["on"] else ""), r["what"],
             r["peak"] or "", r["ended"]] for r in describe(history, live)]  # fmt: skip
    n = len(history)
    lead = (f"{n} attempt{'s' if n != 1 else ''}, from the run's events.jsonl: a resumed attempt reuses the stages and "
            "shards finished before it, and training continues from its last checkpoint. Peak memory: the highest of "
            "its stages (the run's processes, resident), and where.")
    return f"<p>{esc(lead)}</p>" + table(["#", "started", "by", "what it did", "peak memory", "ended"], rows,
                                         [True, False, False, False, False, False])  # fmt: skip


# --- funnel ----------------------------------------------------------------------------------------------------
def funnel(run: Run) -> str:
    f = collect.funnel(run)
    chart = plots.funnel(list(f["stage"]), list(f["out"]), list(f["dropped"]))
    rows = []
    for r in f.to_dict("records"):
        reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in r["reasons"].items()) or "–"
        rows.append([r["stage"], r["in"], r["dropped"], r["out"], reasons])
    tbl = table(["stage", "in", "dropped", "out", "drop reasons"], rows, [False, True, True, True, False])
    cap = "Input rows of the URL list that reach each stage (blue) and leave there (red); every row ends in exactly one place."
    corpus = run.manifest("corpus")
    extra = (corpus.counts.get("kept", 0) - int(f["out"].iloc[-1])) if corpus is not None and len(f) else 0
    if extra > 0:
        cap += f" The corpus also holds {extra:,} images of curated sets added as is (not from the crawl)."
    return f'<div class="row">{figure(chart, "funnel of counts per stage", cap, 640)}<div>{tbl}</div></div>'


# --- domains ---------------------------------------------------------------------------------------------------
def domains(run: Run) -> str:
    d = collect.domains(run)
    req, got = int(d["requested"].sum()), int(d["downloaded"].sum())
    dead = d[(d["requested"] > 0) & (d["downloaded"] == 0)]
    stats = kpis([("hosts", f"{len(d):,}"), ("downloaded", f"{got:,} of {req:,}" + (f" ({got / req:.0%})" if req else "")),
                  ("hosts with no download", f"{len(dead):,}"), ("hosts in the corpus", f"{int((d['in_corpus'] > 0).sum()):,}")])  # fmt: skip
    rows = []
    for r in d.head(N_HOSTS).itertuples(index=False):
        failures = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in list(r.failures.items())[:3]) or "–"
        rate = "–" if r.requested == 0 else f"{r.download_rate:.0%}"
        rows.append([r.host, r.urls, r.downloaded, rate, r.in_corpus, failures])
    tbl = table(["host", "URLs", "downloaded", "rate", "in corpus", "top failure reasons"], rows,
                [False, True, True, False, True, False])  # fmt: skip
    rest = d.iloc[N_HOSTS:]
    note = (f"{len(rest):,} more hosts with {int(rest['urls'].sum()):,} URLs; " if len(rest) else "") + \
        "every host: `lvd domains RUN_ID --top 0` (or `--csv FILE`). Rate: downloaded / requested (repeated URLs " \
        "and malformed rows are not requested); a retried row counts once, at its latest attempt."
    return stats + tbl + f'<p class="note">{esc(note)}</p>'


# --- safety ----------------------------------------------------------------------------------------------------
def safety(run: Run) -> str:
    out = []
    try:
        scores, threshold, n_drop = collect.nsfw_scores(run)
        hist = plots.histogram(scores, np.linspace(0, 1, 41), "NSFW score (open_nsfw)", threshold)
        cap = f"{len(scores):,} images scored; {n_drop:,} dropped at or above the threshold (flagged images are never shown)."
        out.append(f"<h3>NSFW scores</h3>{figure(hist, 'histogram of NSFW scores', cap, 540)}")
    except Missing as err:
        out.append("<h3>NSFW scores</h3>" + missing(str(err)))
    try:
        fc = collect.faces(run)
        with_faces = fc[fc["n_faces"] > 0]
        examples = with_faces.sort_values(["n_faces", "image_id"], ascending=[False, True]).head(N_BLURRED)
        thumbs = _pool_images(run, list(examples["image_id"]))
        items = [thumb(thumbs[i].uri, f"{n} face{'s' * (n > 1)}", i[:12], thumbs[i].css)
                 for i, n in zip(examples["image_id"], examples["n_faces"], strict=True) if i in thumbs]  # fmt: skip
        out.append("<h3>Face blurring</h3>" + kpis([("images with faces blurred", f"{len(with_faces):,}"),
                                                     ("faces blurred", f"{int(fc['n_faces'].sum()):,}"),
                                                     ("images checked", f"{len(fc):,}")]))  # fmt: skip
        note = "A few blurred images as the rest of the pipeline stores them (originals are never shown)."
        out.append(f'<p class="note">{esc(note)}</p>' + (grid(items) if items else missing("No image had a face.")))
    except Missing as err:
        out.append("<h3>Face blurring</h3>" + missing(str(err)))
    return "".join(out)


# --- dedup -----------------------------------------------------------------------------------------------------
def _eval_image(cfg: dict[str, Any], ref: str) -> bytes | None:
    """``set/split/name`` of a relative-dedup match -> its bytes (folder-format evaluation sets)."""
    name, split, rel = [*ref.split("/", 2), "", ""][:3]
    for ev in (cfg.get("data") or {}).get("eval_sets", []):
        if ev.get("name") == name and ev.get(split):
            p = Path(ev[split]) / rel
            return p.read_bytes() if p.is_file() else None
    return None


def dedup(run: Run) -> str:
    comp = collect.dedup_components(run)
    sizes = comp.groupby("component").size()
    multi = sizes[sizes > 1].sort_values(ascending=False, kind="stable")
    chart = plots.component_sizes(sizes.to_numpy())
    m = run.manifest("dedup")
    thr = f" (cosine > {m.extra.get('threshold')}, {m.extra.get('descriptor')} descriptor)" if m else ""
    stats = kpis([("images", f"{len(comp):,}"), ("duplicate groups", f"{len(multi):,}"),
                  ("copies removed", f"{int((multi - 1).sum()):,}"), ("largest group", f"{int(sizes.max()):,}")])  # fmt: skip
    groups = comp[comp["component"].isin(multi.index[:N_GROUPS])]
    contam = collect.contaminations(run).head(4)
    thumbs = _pool_images(run, list(groups["image_id"]) + list(contam["image_id"]))
    blocks = []
    for c in multi.index[:N_GROUPS]:
        members = groups[groups["component"] == c].sort_values("row_id")
        rep = members["representative"].iloc[0] if "representative" in members else members["image_id"].iloc[0]
        items = [thumb(thumbs[i].uri, "kept" if i == rep else "removed", f"row {r}, {i[:12]}",
                       ("mark " if i == rep else "") + thumbs[i].css)
                 for i, r in zip(members["image_id"], members["row_id"], strict=True) if i in thumbs]  # fmt: skip
        blocks.append(f'<div class="group"><div class="title">group of {len(members)}</div>{grid(items)}</div>')
    cfg = run.config()
    for r in contam.itertuples(index=False):
        t = thumbs.get(r.image_id)
        items = [thumb(t.uri, "pool image", r.image_id[:12], "warn " + t.css)] if t else []
        data = _eval_image(cfg, r.eval_image)
        e = _unpooled(run, data) if data is not None else None
        if e is not None:
            items.append(thumb(e.uri, "eval image", r.eval_image, e.css))
        blocks.append(f'<div class="group"><div class="title">removed: copy of eval image<br>{esc(r.eval_image)}</div>'
                      f"{grid(items)}</div>")
    cap = "Near-duplicate components of the sanitized pool" + thr + "; size 1 = no duplicate."
    legend = "Blue frame: the member kept (first seen in the crawl); red frame: removed for matching an evaluation image."
    return (stats + f'<div class="row">{figure(chart, "component size histogram", cap, 520)}</div>'
            + f'<h3>Example groups</h3><p class="note">{esc(legend)}</p>'
            + (f'<div class="groups">{"".join(blocks)}</div>' if blocks else missing("No duplicate groups.")))


# --- retrieval -------------------------------------------------------------------------------------------------
def retrieval(run: Run) -> str:
    hits = collect.retrievals(run)
    if len(hits) and (hits["method"] == "pool").all():
        return missing(f"No seed set retrieves, so nothing was searched: all {len(hits):,} deduplicated pool images "
                       "went to rebalancing, which samples them by cluster (Vo et al. 2024; retrieve.mode).")
    counts = hits.groupby("query").size().sort_values(ascending=False, kind="stable")
    queries = list(counts.index[:N_QUERIES])
    cfg = run.config()
    seeds = {s["name"]: s for s in (cfg.get("data") or {}).get("seed_sets", [])}
    qthumbs: dict[str, str] = {}
    for name in hits[hits["query"].isin(queries)]["seed_set"].unique():
        s = seeds.get(name, {})
        found = read_set_images(s.get("path", ""), queries, s.get("format", "auto"))
        qthumbs |= {k: t for k, v in found.items() if (t := _unpooled(run, v)) is not None}
    shown = hits[hits["query"].isin(queries)].sort_values(["query", "similarity"], ascending=[True, False])
    shown = shown.groupby("query").head(N_NEIGHBOURS)
    nthumbs = _pool_images(run, list(shown["image_id"]))
    rows = []
    for q in queries:
        qt = thumb(qthumbs[q].uri, "query", q[:12], "mark " + qthumbs[q].css) if q in qthumbs else ""
        nb = [thumb(nthumbs[i].uri, f"{s:.3f}", i[:12], nthumbs[i].css)
              for i, s in zip(shown[shown["query"] == q]["image_id"], shown[shown["query"] == q]["similarity"], strict=True)
              if i in nthumbs]  # fmt: skip
        rows.append(f'<div class="group"><div class="title">query {esc(q[:12])} ({counts[q]} retrieved)</div>{grid([qt, *nb])}</div>')
    emb = (cfg.get("embed") or {}).get("backbone") or {}
    embedder = f"{emb.get('kind', '?')}:{emb.get('arch', '?')}" + ("" if emb.get("path") else " at random initialisation")
    lead = (f"{len(hits):,} retrievals by {hits['query'].nunique():,} seed queries (embedder {embedder}); "
            "a few queries (blue frame) with their nearest pool images, labelled by cosine similarity. Seed images "
            "pass the run's face blurring before they are shown, as the pool's do.")
    return f'<p class="note">{esc(lead)}</p><div class="groups">{"".join(rows)}</div>'



# --- rebalancing -----------------------------------------------------------------------------------------------
def rebalance(run: Run) -> str:
    t, levels = collect.cluster_levels(run)
    sel = t[t["selected"]]
    data, rows = {}, []
    for i, lv in enumerate(levels):
        before = t.groupby(lv).size().to_numpy()
        after = sel.groupby(lv).size().reindex(t[lv].unique(), fill_value=0).to_numpy()
        data[f"level {i + 1} ({len(before)} clusters)"] = (before, after)
        rows.append([f"level {i + 1}", len(before), int(before.max()), float(np.median(before)), int(after.max()),
                     float(np.median(after)), int((after == 0).sum())])  # fmt: skip
    note = ""
    if len(sel) == len(t):
        target = (run.config().get("rebalance") or {}).get("target_size")
        why = "rebalance.target_size is not set" if target is None else f"rebalance.target_size {target:,} >= {len(t):,} images"
        note = f"Every retrieved image was kept ({why}), so the two distributions coincide."
    tbl = table(["level", "clusters", "largest before", "median before", "largest after", "median after", "emptied"], rows,
                [False, True, True, True, True, True, True])  # fmt: skip
    cap = f"{len(t):,} retrieved images, {len(sel):,} selected; cluster sizes sorted, log scale."
    return (figure(plots.cluster_sizes(data), "cluster sizes before and after rebalancing", cap)
            + (f'<p class="note">{esc(note)}</p>' if note else "") + tbl)


# --- composition -----------------------------------------------------------------------------------------------
def composition(run: Run) -> str:
    c = collect.composition(run)
    rows, classes = [], []
    for r in c.to_dict("records"):
        rows.append([r.get("dataset"), r.get("images"), r.get("retrieval") or "", r.get("retrieved"), r.get("final")])
        classes.append("total" if r.get("dataset") == "total" else "")
    clean = [[None if isinstance(v, float) and np.isnan(v) else v for v in row] for row in rows]
    clean = [[int(v) if isinstance(v, float) and v.is_integer() else v for v in row] for row in clean]
    lead = "Paper Table 15 style: each seed dataset, its size, how it was used for retrieval, and its share of the corpus."
    return f'<p class="note">{esc(lead)}</p>' + table(
        ["dataset", "images", "retrieval", "retrieved", "final"], clean, [False, True, False, True, True], classes)


# --- training --------------------------------------------------------------------------------------------------
# Legend text for panels with several curves (metrics.csv column names mean little to a reader).
CURVE_LABELS = {"lr": "backbone", "last_layer_lr": "head's last layer", "proto_entropy": "batch-mean target (usage)",
                "target_entropy": "per-image target"}  # fmt: skip


STAGE_TITLES = {"pretrain": "pretraining", "pretrain_highres": "high-resolution finishing stage",
                "distill": "distillation into the smaller student"}


def training(run: Run) -> str:
    stages = collect.training_stages(run)
    return "".join(_training_stage(run, s, titled=len(stages) > 1) for s in stages)


def _training_stage(run: Run, stage: str, titled: bool) -> str:
    m = collect.training_metrics(run, stage)
    losses = [c for c in m.columns if c.endswith("_loss") and c != "total_loss"]
    panels = [(c.replace("_", " "), [c]) for c in (["total_loss"] if "total_loss" in m else []) + losses]
    for title, cols in (("learning rate", ["lr", "last_layer_lr"]), ("weight decay", ["wd"]),
                        ("teacher momentum", ["momentum"]), ("teacher temperature", ["teacher_temp"]),
                        ("prototype entropy (nats)", ["proto_entropy", "target_entropy"])):  # fmt: skip
        present = [c for c in cols if c in m]
        if present:
            panels.append((title, present))
    man = run.manifest(stage)
    facts = [("steps", f"{len(m):,}")]
    if man and man.extra.get("arch"):
        facts.append(("student", f"{man.extra['arch']} at {man.extra.get('image_size', '?')} px"))
    if man and man.extra.get("images_per_second"):
        facts.append(("images / s", f"{man.extra['images_per_second']:.1f}"))
    if "total_loss" in m:
        facts.append(("final total loss", f"{m['total_loss'].iloc[-1]:.3f}"))
    head = f"<h3>{STAGE_TITLES[stage]} ({stage})</h3>" if titled else ""
    return head + kpis(facts) + figure(plots.curves(m, panels, CURVE_LABELS), f"training curves: {stage}",
                                       f"Per-step values from stages/{stage}/metrics.csv.")  # fmt: skip


# --- evaluation ------------------------------------------------------------------------------------------------
PROTOCOL_ORDER = {"knn": 0, "linear": 1, "logreg": 2, "copy_detection": 3, "retrieval": 4, "dense_linear": 5}
LABELS = {"knn": "kNN", "linear": "linear probe", "logreg": "log. regression", "copy_detection": "copy detection",
          "retrieval": "retrieval", "dense_linear": "dense linear probe"}  # fmt: skip
ROLE_ORDER = {"pretrained": 0, "reference": 1, "model": 2, "baseline": 3}


def _metric_label(metric: str) -> str:
    if metric.startswith(("top1_k", "top5_k")):
        return f"top-{metric[3]} (k={metric.split('_k')[1]}) %"
    return {"top1": "top-1 %", "top5": "top-5 %", "micro_ap": "micro-AP %", "recall_at_1": "recall@1 %",
            "miou": "mIoU %", "pixel_accuracy": "pixel accuracy %", "map_easy": "mAP Easy %",
            "map_medium": "mAP Medium %", "map_hard": "mAP Hard %"}.get(metric, metric)  # fmt: skip


def _metric_order(metric: str) -> tuple[int, int, str]:
    """top-1 before top-5, then k in increasing order (top1_k20 before top1_k100), then the name."""
    kind = 5 if metric.startswith("top5") else 1 if metric.startswith("top1") else 9
    k = int(metric.split("_k")[1]) if "_k" in metric and metric.split("_k")[1].isdigit() else 0
    return kind, k, metric


def _selection(detail: str) -> str:
    d = json.loads(detail) if detail else {}
    if "grid" in d and "label_size" in d:  # dense probe: the resolution its numbers are bounded by
        (h, w), (lh, lw) = d["grid"], d["label_size"]
        return f"{h}×{w} patches → {lh}×{lw} px" + (f", {d['iterations']:,} it." if "iterations" in d else "")
    if "best" in d:
        return f"n={d['n_last']}{' + avgpool' if d['avgpool'] else ''}, lr {d['lr']:g}"
    return f"C = {d['C']:.3g}" if "C" in d else ""


def _budget_note(r: pd.DataFrame, model: str) -> str:
    """Protocols run with less than the reference budget (e.g. the CPU demo), from the recorded details."""
    from infra.config.evaluate import DenseConfig, LinearConfig, LogRegConfig

    wanted = {"linear": ("iterations", LinearConfig().iterations, "linear probe {:,} iterations (reference {:,})"),
              "logreg": ("n_c", LogRegConfig().n_c, "logistic regression {:,} values of C (reference {:,})"),
              "dense_linear": ("iterations", DenseConfig().iterations, "dense probe {:,} iterations (reference {:,})")}
    short = []
    for protocol, (key, reference, text) in wanted.items():
        rows = r[(r["protocol"] == protocol) & (r["model"] == model)]
        used = {json.loads(d).get(key) for d in rows["detail"] if d} - {None}
        short += [text.format(int(v), reference) for v in sorted(used) if v < reference]
    return "Run with a smaller budget than the reference protocols: " + "; ".join(short) + "." if short else ""


def _dense_notes(r: pd.DataFrame, models: list[str]) -> list[str]:
    """Plain words next to each dense probe's numbers: what the patch grid allows, the floor, and whether the probe
    converged (a pixel accuracy below labelling everything with the most frequent class says it did not)."""
    notes = []
    dense = r[r["protocol"] == "dense_linear"]
    for bench in dict.fromkeys(dense["benchmark"]):
        b = dense[dense["benchmark"] == bench]
        first = b[(b["model"] == models[0]) & (b["metric"] == "miou")]["detail"]
        d = json.loads(first.iloc[0]) if len(first) and first.iloc[0] else {}
        if "patch_majority_miou" not in d:
            continue
        (h, w), (lh, lw) = d["grid"], d["label_size"]
        text = (f"† {bench}: with {models[0]}, the probe sees each image as {h}×{w} patch tokens and upsamples "
                f"their class scores to the {lh}×{lw}\u00a0px labels, so it cannot follow anything thinner than a "
                "patch. For scale: labelling each patch perfectly with its most frequent class scores "
                f"{d['patch_majority_miou']:.1f} mIoU; labelling every pixel with the most frequent class scores "
                f"{d['majority_miou']:.1f} mIoU and {d['majority_pixel_accuracy']:.1f} % pixel accuracy.")  # fmt: skip
        acc = b[b["metric"] == "pixel_accuracy"].set_index("model")["value"]
        behind = [m for m in models if m in acc and acc[m] < d["majority_pixel_accuracy"]]
        if behind:
            names = ", ".join(behind[:-1]) + " and " + behind[-1] if len(behind) > 1 else behind[0]
            who = "every model's pixel accuracy" if len(behind) == len(acc) else f"the pixel accuracy of {names}"
            lo, hi = acc[behind].min(), acc[behind].max()
            span = f"{lo:.1f} %" if lo == hi else f"{lo:.1f}–{hi:.1f} %"
            iters = f" after {d['iterations']:,} iterations" if "iterations" in d else ""
            text += (f" The probe has not converged{iters}: {who} ({span}) is below that of labelling everything "
                     "with the most frequent class, so these mIoU values show how far training got, not how good the "
                     "features are, and their order does not rank the models.")  # fmt: skip
        notes.append(text)
    return notes


def evaluation(run: Run) -> str:
    cfg = run.pipeline_config()
    why = plan.not_run(cfg).get("evaluate") if cfg is not None else None
    if why is not None and run.manifest("evaluate") is None:
        return missing(f"Not evaluated: {why}. Declare data.eval_sets (folders of class subfolders, WebDataset "
                       "tars or parquet manifests) or evaluate.benchmarks, then `lvd evaluate` or a new run.")
    r = collect.eval_results(run)
    if r.empty:
        raise Missing("The evaluation stage recorded no results (no benchmark produced a value).")
    roles = r.drop_duplicates("model").set_index("model")["role"] if "role" in r else pd.Series(dtype=str)
    models = sorted(r["model"].unique(), key=lambda m: (ROLE_ORDER.get(roles.get(m, "model"), 2), list(r["model"]).index(m)))
    wide = r.pivot_table(index=["benchmark", "protocol", "metric"], columns="model", values="value", aggfunc="first")
    first = r[r["model"] == models[0]].set_index(["benchmark", "protocol", "metric"])["detail"]
    # benchmarks in the order evaluated (classification sets first), then protocol and metric
    bench_order = {b: i for i, b in enumerate(dict.fromkeys(r["benchmark"]))}
    keys = sorted(wide.index, key=lambda k: (bench_order[k[0]], PROTOCOL_ORDER.get(k[1], 9), *_metric_order(k[2])))
    rows, cells, groups, previous, last_setting = [], [], [], (None, None), ""
    for k in keys:
        vals = [wide.loc[k].get(m) for m in models]
        best = np.nanmax([v for v in vals if v is not None and not np.isnan(v)] or [np.nan])
        # benchmark and protocol only where they change: rows read as groups
        bench = k[0] if k[0] != previous[0] else ""
        groups.append("grp" if bench else "")
        proto = LABELS.get(k[1], k[1]) if (k[0], k[1]) != previous else ""
        setting = _selection(first.get(k, ""))
        # the setting too only where it changes within a protocol (top-1 and top-5 share one classifier)
        shown = "" if not proto and setting == last_setting else setting
        previous, last_setting = (k[0], k[1]), setting
        label = _metric_label(k[2]) + (" †" if k[1] == "dense_linear" and k[2] == "miou" else "")
        rows.append([bench, proto, label, *vals, shown])
        cells.append(["nowrap", "nowrap", "nowrap", *["best" if v == best and not np.isnan(best) else "" for v in vals], ""])
    role_names = {"pretrained": "this run", "reference": "reference", "baseline": "baseline"}
    header = ["benchmark", "protocol", "metric",
              *[Raw(f"{esc(m)}<small>{esc(role_names.get(roles.get(m, ''), ''))}</small>") for m in models],
              Raw(f"setting<small>of {esc(models[0])}</small>")]  # fmt: skip
    tbl = table(header, rows, [False, False, False, *[True] * len(models), False], row_classes=groups, cell_classes=cells)
    man = run.manifest("evaluate")
    cache = man.extra.get("feature_cache", {}) if man else {}
    note = ("The best value of each row in bold blue. Random-init is the same architecture untrained; raw pixels is "
            "the normalised image as a vector.")  # fmt: skip
    if cache:
        note += f" Features: {cache.get('misses', 0)} extracted, {cache.get('hits', 0)} reused from the cache."
    budget = _budget_note(r, models[0])
    after = "".join(f'<p class="note">{esc(n)}</p>' for n in [*_dense_notes(r, models), budget] if n)
    return f'<p class="note">{esc(note)}</p>' + tbl + after


SECTIONS: list[tuple[str, str, str, Callable[[Run], str]]] = [
    ("overview", "Run overview", "", overview),
    ("funnel", "Funnel", "How many input rows each stage kept and dropped, and why.", funnel),
    ("domains", "Hosts", "Where the crawl's images came from: downloads and failures per host, most URLs first.",
     domains),
    ("safety", "Safety", "NSFW filtering and face blurring.", safety),
    ("dedup", "Duplicates", "Copy detection within the pool and against the evaluation sets (paper §A.3).", dedup),
    ("retrieval", "Retrieval", "Pool images retrieved by the curated seed sets (paper §3).", retrieval),
    ("rebalance", "Rebalancing", "Hierarchical k-means cluster sizes before and after balanced sampling.", rebalance),
    ("composition", "Corpus composition", "", composition),
    ("training", "Training curves", "Every loss term and schedule of the DINOv2 run.", training),
    ("evaluation", "Evaluation", "Frozen-feature benchmarks, the run's model beside its baselines and references.", evaluation),
]


def build_html(run_dir: Path, blur: Callable[[bytes], bytes] | None = None) -> str:
    run = Run(Path(run_dir), blur)
    run.config()  # fail early if this is not a run directory
    body = []
    for sid, title, lead, fn in SECTIONS:
        try:
            content = fn(run)
        except Missing as err:
            content = missing(str(err))
        body.append(section(sid, title, lead, content))
    return page(f"lvd run report: {run.run_id}", str(run.path.resolve()), [(s, t) for s, t, _, _ in SECTIONS],
                "".join(body), f"Generated by `lvd report` at {_when(now())} from the run directory alone; no network needed.",
                header_kpis(run))  # fmt: skip


def header_kpis(run: Run) -> str:
    items = []
    ingest, corpus, pre = run.manifest("ingest"), run.manifest("corpus"), run.manifest("pretrain")
    n_rows = (ingest.counts.get("rows") or ingest.counts.get("input")) if ingest else None
    if n_rows is not None:
        items.append(("input URLs", f"{n_rows:,}"))
    if corpus:
        items.append(("corpus images", f"{corpus.counts.get('kept', 0):,}"))
    if pre:
        items.append(("training steps", f"{pre.counts.get('steps', 0):,}"))
    ev = run.stage("evaluate") / "metrics.json"
    if ev.is_file():
        for bench, models in json.loads(ev.read_text()).items():
            for model in ("pretrained", "random-init"):
                v = models.get(model, {}).get("knn_top1_k20")
                if v is not None:
                    items.append((f"{bench} kNN top-1, {model}", f"{v:.1f} %"))
            break
    return kpis(items) if items else ""
