"""Raw img2dataset vs this project's full ingestion on the same loopback URLs, measured in one run.

    python bench/ingest.py [--n 2000] [--threads 16] [--processes 2] [--rounds 2]

Both download the same N distinct JPEGs (96-160 px, served by the demo server on 127.0.0.1) with the same
threads, processes (shards in flight), resize and encode settings. "raw" is ``img2dataset.download`` (webdataset
output, sha256); "full" is this stage's cores: plan + URL guard + guarded download + perceptual hash + cross-shard
dedup (ingest), open_nsfw on every image (nsfw), face detection (``faces.backend``, MTCNN by default) and blurring
(faces), shards fanned out over a thread pool of ``--processes`` (the cores the Prefect flow drives, without the
Prefect API server). Throughput is successfully stored images per second of wall time (img2dataset's own logs count
attempted URLs). Each stage's wall and CPU seconds are printed under the full side.

The HTTP server runs in a process of its own (``--server process``, the default): img2dataset's worker processes
never share an interpreter with it, while the full side's downloads run in threads of this process (as the Prefect
flow's thread pool runs them), so a server in this process (``--server thread``, how this bench ran before
2026-12-07) made the full side's downloader threads wait for the server's request handling on the GIL. A user's
server is on another machine. The server's CPU time is counted on neither side.

Both sides are timed the same way, work only, in this process: img2dataset is imported and the full side's models
(the NSFW scorer ``nsfw.backend`` resolves to, the face detector) are built before the clocks start, as a worker holds
them across shards; each clock covers the calls that download and process the URLs. Rounds alternate raw and full;
the ratio of medians is printed, with the CPU seconds (this process and its children) of each side, a measure less
disturbed by other jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from curation.faces import blur_faces, detector_for
from curation.ingest import excluded, ingest
from curation.nsfw import dropped_ids, nsfw_filter, resolve_backend, scorer_for
from infra.config.data import DataConfig
from infra.config.ingest import FacesConfig, IngestConfig, NsfwConfig
from infra.cpus import cpus
from infra.demo.server import DemoServer, free_port
from infra.shards import list_shards
from infra.stage import ShardTracker

PUBLISHED_PER_CORE = 100  # img2dataset's README: ~1,350 images/s on one 16-core machine


def make_images(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    names = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(96, 161, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.02, 0.3, 4)
        img = np.stack([127 + 120 * np.sin(xx * f[0] + yy * f[1] + i), 127 + 120 * np.cos(yy * f[2] + i),
                        127 + 120 * np.sin((xx - yy) * f[3])], -1) + rng.normal(0, 8, (h, w, 3))  # fmt: skip
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        names.append(f"b{i:05d}.jpg")
        (root / names[-1]).write_bytes(buf.getvalue())
    return names


def thread_mapper(width: int):
    def mapper(fn, items):
        with ThreadPoolExecutor(width) as pool:
            for fut in as_completed([pool.submit(fn, *a) for a in items]):
                yield fut.result()

    return mapper


def _serve(images_dir: str, port: int, stop: multiprocessing.synchronize.Event) -> None:
    with DemoServer(Path(images_dir), port):
        stop.wait()


@contextmanager
def served(images_dir: Path, port: int, mode: str) -> Iterator[None]:
    """The demo server on ``port``: in a process of its own (``process``) or in a thread of this one (``thread``)."""
    if mode == "thread":
        with DemoServer(images_dir, port):
            yield
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_serve, args=(str(images_dir), port, stop), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the demo server did not start on port {port}") from None
                time.sleep(0.1)
        yield
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (img2dataset's worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_raw(urls: Path, out: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    """img2dataset's own ``download`` (imported beforehand), with this stage's resize, encode and header settings."""
    from img2dataset import download

    c, t = cpu_seconds(), time.perf_counter()
    download(url_list=str(urls), input_format="parquet", url_col="url", output_format="webdataset",
             output_folder=str(out), processes_count=args.processes, thread_count=args.threads, image_size=128,
             resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg", encode_quality=95,
             number_sample_per_shard=args.shard_size, timeout=10, retries=0, compute_hash="sha256",
             disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
             distributor="multiprocessing", enable_wandb=False)  # fmt: skip
    dt, cpu = time.perf_counter() - t, cpu_seconds() - c
    ok = sum(int((pd.read_parquet(p)["status"] == "success").sum()) for p in out.glob("*.parquet"))
    return dt, cpu, ok


def warm_models(nsfw: NsfwConfig, faces: FacesConfig) -> str:
    """Build the full side's models before the clock (the NSFW scorer is cached per process, as in a worker)."""
    scorer_for(nsfw)
    detector_for(faces)
    return f"nsfw.backend={nsfw.backend} -> {resolve_backend(nsfw)}, faces.backend={faces.backend}"


def run_full(urls: Path, run: Path, args: argparse.Namespace, nsfw: NsfwConfig,
             faces_cfg: FacesConfig) -> tuple[dict[str, tuple[float, float]], float, int]:  # fmt: skip
    """Ingest, NSFW and faces, one after the other as the flow runs them: (wall s, CPU s) per stage, CPU s, kept."""
    cfg = IngestConfig(shard_size=args.shard_size, threads=args.threads, processes=args.processes, image_size=128,
                       allow_hosts=["127.0.0.1"])  # fmt: skip
    mapper = thread_mapper(args.processes)
    times: dict[str, tuple[float, float]] = {}
    c0 = cpu_seconds()

    def clock(name: str, fn):
        c, t = cpu_seconds(), time.perf_counter()
        out = fn()
        times[name] = (time.perf_counter() - t, cpu_seconds() - c)
        return out

    ing = run / "ingest"
    res = clock("ingest (download+guard+hash)",
                lambda: ingest(DataConfig(url_list=urls), ing, cfg, ShardTracker("ingest", ing), mapper))
    shards = list_shards(ing / "shards")
    clock("nsfw", lambda: nsfw_filter(shards, excluded(ing), run / "nsfw", nsfw, ShardTracker("nsfw", run / "nsfw"),
                                      mapper, args.processes))  # fmt: skip
    dup, bad = excluded(ing), dropped_ids(run / "nsfw")
    skip = {s.name: dup.get(s.name, set()) | bad for s in shards}
    faces = clock("faces", lambda: blur_faces(shards, skip, run / "faces", faces_cfg,
                                              ShardTracker("faces", run / "faces"), mapper, args.processes))  # fmt: skip
    assert res.counts["kept"] >= faces.counts["kept"]
    return times, cpu_seconds() - c0, int(faces.counts["kept"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2, help="alternating raw / full rounds (medians are compared)")
    p.add_argument("--nsfw", default="auto", help="nsfw.backend (auto, opennsfw, opennsfw-int8, opennsfw-torch)")
    p.add_argument("--faces", default=FacesConfig().backend, help="faces.backend (mtcnn, retinaface, haar)")
    p.add_argument("--skip-raw", action="store_true", help="time the full ingestion only")
    p.add_argument("--server", choices=("process", "thread"), default="process",
                   help="where the demo HTTP server runs (see above)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lvd-bench-"))
    try:
        names = make_images(tmp / "images", args.n)
        port = free_port()
        urls = tmp / "urls.parquet"
        pd.DataFrame({"url": [f"http://127.0.0.1:{port}/img/{n}" for n in names]}).to_parquet(urls)
        nsfw, faces = NsfwConfig(backend=args.nsfw), FacesConfig(backend=args.faces)
        models = warm_models(nsfw, faces)
        raws, fulls = [], []
        with served(tmp / "images", port, args.server):
            for r in range(args.rounds):
                if not args.skip_raw:
                    raws.append(run_raw(urls, tmp / f"raw{r}", args))
                fulls.append(run_full(urls, tmp / f"full{r}", args, nsfw, faces))
        report(args, models, raws, fulls)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args: argparse.Namespace, models: str, raws: list, fulls: list) -> None:
    cores = cpus()
    raw_s = float(np.median([r[0] for r in raws])) if raws else float("nan")
    raw_cpu = float(np.median([r[1] for r in raws])) if raws else float("nan")
    raw_n = raws[0][2] if raws else 0
    times = {k: [float(np.median([f[0][k][i] for f in fulls])) for i in (0, 1)] for k in fulls[0][0]}
    full_s = float(np.median([sum(v[0] for v in f[0].values()) for f in fulls]))
    full_cpu, full_n = float(np.median([f[1] for f in fulls])), fulls[0][2]
    raw_rate, full_rate = raw_n / raw_s, full_n / full_s
    print(f"\n{args.n} loopback URLs, {args.threads} threads x {args.processes} processes, {cores} cores (the HTTP "
          f"server shares them, in a {args.server} of its own), {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}; {models}\n")  # fmt: skip
    print(f"{'pipeline (medians)':<34}{'images':>8}{'seconds':>9}{'images/s':>10}{'per core':>10}{'CPU s':>8}")
    print(f"{'raw img2dataset':<34}{raw_n:>8}{raw_s:>9.1f}{raw_rate:>10.1f}{raw_rate / cores:>10.1f}{raw_cpu:>8.1f}")
    for name, (s, cpu) in times.items():
        print(f"{'  ' + name:<34}{'':>8}{s:>9.1f}{'':>20}{cpu:>8.1f}")
    print(f"{'full ingestion':<34}{full_n:>8}{full_s:>9.1f}{full_rate:>10.1f}{full_rate / cores:>10.1f}{full_cpu:>8.1f}")
    print(f"\nratio full / raw: {full_rate / raw_rate:.2f}x wall, {raw_cpu / full_cpu * full_n / max(1, raw_n):.2f}x "
          "CPU   (goal >= 0.6x)")  # fmt: skip
    for i, (r, f) in enumerate(zip(raws, fulls, strict=False)):
        print(f"  round {i}: raw {r[0]:.1f} s, full {sum(v[0] for v in f[0].values()):.1f} s "
              f"({', '.join(f'{k.split()[0]} {v[0]:.1f}' for k, v in f[0].items())})")  # fmt: skip
    print(f"img2dataset published: ~{PUBLISHED_PER_CORE} samples/s per core (web, attempted URLs)")


if __name__ == "__main__":
    main()
