"""An image file of a user's folder gives the same pixels whichever way it enters, and every reader of folders sees
the same files.

The readers: ingest (`curation.imageguard.prepare`, then OpenCV as img2dataset decodes), the stages and evaluation
(`infra.images.decode`), and `python -m training.pretrain --data FOLDER` (`training.data.decode_rgb`); the folder
listers: `lvd folder-urls`, the seed and evaluation set reader, and the training folder source. Each case has exact
expected pixels where the format is lossless (HEIC is lossy: close to its source).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from curation.imageguard import prepare
from curation.urls import folder_url_list
from infra.datasets import DatasetError, iter_images
from infra.images import decode, is_image_name
from training.data import FolderSource, decode_rgb

RGB = (np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13 + 7)  # 2 rows, 3 columns


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_png() -> bytes:
    """A PNG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6)."""
    img = Image.fromarray(RGB)
    exif = img.getexif()
    exif[0x0112] = 6
    return _save(img, "PNG", exif=exif)


def _grey16() -> bytes:
    return _save(Image.fromarray(np.array([[0x0000, 0x12FF, 0x8000], [0xFFFF, 0x7FFF, 0x0100]], np.uint16)), "PNG")


def _alpha() -> bytes:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = RGB
    rgba[0, :, 3] = 255  # first row opaque, second fully transparent
    return _save(Image.fromarray(rgba, "RGBA"), "PNG")


def _gif() -> bytes:
    frames = [Image.fromarray(RGB).quantize(8), Image.fromarray(255 - RGB).quantize(8)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _heic() -> bytes:
    from skimage import data

    pillow_heif = pytest.importorskip("pillow_heif")  # a dev dependency: it writes what pi-heif decodes
    buf = io.BytesIO()
    pillow_heif.from_pillow(Image.fromarray(data.chelsea()[:64, :96])).save(buf, quality=95)
    return buf.getvalue()


ON_WHITE = np.concatenate([RGB[:1], np.full((1, 3, 3), 255, np.uint8)])
CASES = {  # name: (bytes, expected RGB pixels, or None for a lossy format)
    "exif_rotated.png": (_exif_png, np.rot90(RGB, -1)),
    "xray16.png": (_grey16, np.repeat(np.array([[0x00, 0x12, 0x80], [0xFF, 0x7F, 0x01]], np.uint8)[..., None], 3, 2)),
    "transparent.png": (_alpha, ON_WHITE),
    "animated.gif": (_gif, None),  # the first frame (compared with its own decode below)
    "photo.HEIC": (_heic, None),
}


def _ingest_pixels(data: bytes) -> np.ndarray:
    """What img2dataset decodes from the bytes ingest hands it (BGR or grey, as OpenCV reads them), as RGB."""
    out, why = prepare(data, 10**8)
    assert why is None, why
    arr = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    return np.repeat(arr[..., None], 3, 2) if arr.ndim == 2 else arr[..., ::-1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reader_gives_the_same_pixels(name):
    make, expected = CASES[name]
    data = make()
    stages = np.asarray(decode(data))
    training = np.asarray(decode_rgb(data))
    ingest = _ingest_pixels(data)
    assert stages.shape == training.shape == ingest.shape
    assert (stages == training).all() and (stages == ingest).all()
    if expected is not None:
        assert stages.tolist() == expected.tolist()
    if name == "animated.gif":
        assert stages.tolist() == np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tolist()
    if name == "photo.HEIC":
        from skimage import data as skdata

        assert np.abs(stages.astype(int) - skdata.chelsea()[:64, :96]).mean() < 3


def test_training_keeps_a_16_bit_scan_grey_with_its_top_byte():
    """Before, training converted a 16-bit PNG with Pillow's clipping conversion: every value above 255 became 255, a
    white image."""
    grey = decode_rgb(_grey16(), keep_grey=True)
    assert grey.mode == "L" and np.asarray(grey).tolist() == [[0x00, 0x12, 0x80], [0xFF, 0x7F, 0x01]]
    assert decode_rgb(b"not an image") is None


def test_every_folder_reader_lists_the_same_images(tmp_path):
    """The folder lister of `lvd folder-urls`, the seed/evaluation set reader and the training source agree on
    which files are images: phone and browser formats in any case, not hidden files (macOS resource forks with an
    image suffix, thumbnail folders) nor files of other kinds, which `lvd folder-urls` counts by suffix."""
    root = tmp_path / "photos"
    (root / "@eaDir" / "IMG_1.HEIC").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    png = _save(Image.fromarray(RGB), "PNG")
    images = ["IMG_1.HEIC", "a.jpe", "b.AVIF", "c.jfif", "d.heif", "e.png", "f.TIF", "g.jp2", "h.pgm"]
    for name in images:
        (root / name).write_bytes(png)
    for name in ["._e.png", ".DS_Store", ".thumbnails/e.png", "@eaDir/IMG_1.HEIC/SYNOPHOTO_THUMB_XL.jpg"]:
        (root / name).write_bytes(png)
    for name in ["IMG_2.CR2", "IMG_3.CR2", "clip.MOV", "notes"]:
        (root / name).write_bytes(b"x")
    assert all(is_image_name(n) for n in images)

    listing = folder_url_list(root, tmp_path / "list.parquet")
    listed = sorted(Path(u).name for u in __import__("pandas").read_parquet(tmp_path / "list.parquet")["url"])
    assert listed == sorted(images) and listing.listed == len(images)
    assert (listing.hidden, listing.skipped, listing.skipped_suffixes) == (4, 4, ((".cr2", 2), (".mov", 1),
                                                                              ("(none)", 1)))  # fmt: skip
    assert sorted(Path(f).name for f in FolderSource.from_root(root).files) == sorted(images)
    assert sorted(img.name for img in iter_images(root)) == sorted(images)
    every = folder_url_list(root, tmp_path / "all.parquet", all_files=True)  # every file, each with its reason later
    assert (every.listed, every.hidden, every.skipped) == (len(images) + 8, 0, 0)


def test_a_set_image_that_does_not_decode_is_named(tmp_path):
    """A stage that decodes an evaluation or seed image changed since the start-up check names the set and file."""
    from infra.datasets import DatasetError, LabeledImage, decode_item

    with pytest.raises(DatasetError, match=r"^data.eval_sets\[pets\].test \(/x\): dogs/1.jpg cannot be decoded "
                                           r"\(UnidentifiedImageError: "):  # fmt: skip
        decode_item(LabeledImage("id", b"not an image", 1, "dogs/1.jpg"), "data.eval_sets[pets].test (/x)")


def test_a_class_folder_is_read_with_its_sub_folders_as_imagefolder_does(tmp_path):
    """Tiny-ImageNet's layout (`train/<wnid>/images/*.JPEG` beside `<wnid>_boxes.txt`); before, only files directly
    in a class folder were read, so each class of it had no images. An archive given as a set is named as one."""
    from infra.datasets import check_split

    png = _save(Image.fromarray(RGB), "PNG")
    for wnid, n in (("n01443537", 2), ("n01629819", 1)):
        (tmp_path / "train" / wnid / "images").mkdir(parents=True)
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("x")
        for i in range(n):
            (tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG").write_bytes(png)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter's: not a class
    items = list(iter_images(tmp_path / "train"))
    assert [(it.name, it.label) for it in items] == [("n01443537/images/n01443537_0.JPEG", 0),
                                                     ("n01443537/images/n01443537_1.JPEG", 0),
                                                     ("n01629819/images/n01629819_0.JPEG", 1)]  # fmt: skip
    check = check_split(tmp_path / "train", need_labels=True)
    assert (check.images, check.classes, check.problems) == (3, 2, ())
    (tmp_path / "val.zip").write_bytes(b"PK")
    assert check_split(tmp_path / "val.zip").problems == (
        f"cannot be read: {tmp_path / 'val.zip'} is an archive: unpack it into a folder first (images are read from a "
        "folder, an uncompressed .tar, or a .parquet / .csv manifest)",)



def test_a_users_tar_with_folders_is_read_sample_by_sample(tmp_path):
    """A tar of a folder (`tar cf val.tar val/`) holds folder members and nested names: read, never extracted, with
    WebDataset's keys (`val/n01/a` for `val/n01/a.jpg` and its `.cls`), one sample held at a time. Before, the set
    reader refused the folder member as not a regular file and held a whole tar's members in memory."""
    from tests.tars import tar_with

    png = _save(Image.fromarray(RGB), "PNG")
    path = tar_with(tmp_path / "val.tar", [("val", None), ("val/n01", None), ("val/n01/a.jpg", png),
                                          ("val/n01/a.cls", b"3"), ("val/n01/._a.jpg", b"resource fork"),
                                          ("val/n02/b.png", png), ("val/n02/b.json", b'{"label": 5}')])  # fmt: skip
    items = list(iter_images(path))
    assert [(it.name, it.label) for it in items] == [("val.tar:val/n01/a", 3), ("val.tar:val/n02/b", 5)]
    import gzip

    (tmp_path / "gz.tar").write_bytes(gzip.compress(path.read_bytes()))  # a .tar.gz renamed .tar
    with pytest.raises(DatasetError, match=r"gz.tar: not a readable uncompressed tar .*gunzip -k"):
        list(iter_images(tmp_path / "gz.tar"))
