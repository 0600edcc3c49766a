"""`lvd models fetch`: the registry, checksum verification and the trust-on-first-use lock file (no network)."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace

import pytest

from curation.models import registry
from curation.models.registry import REGISTRY, ChecksumError, fetch, resolve
from flows.cli import main


class FakeOpener:
    def __init__(self, payload: bytes):
        self.payload, self.urls = payload, []

    def __call__(self, url: str) -> io.BytesIO:
        self.urls.append(url)
        return io.BytesIO(self.payload)


def test_registry_urls() -> None:
    assert resolve("sscd_disc_mixup").url == "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
    assert REGISTRY["sscd_disc_mixup.torchvision"].filename == "sscd_disc_mixup.torchvision.pt"
    assert "sscd_disc_large.torchvision" not in REGISTRY  # not released upstream
    assert REGISTRY["dinov2_vitl14_reg4"].url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
    with pytest.raises(KeyError) as err:
        resolve("nope")
    assert str(err.value).startswith("unknown model 'nope'; known: dinov2_vitb14, ")  # (not KeyError's quoted repr)
    # DINOv3 is gated by its licence: the name says where to accept it and how to give the download to a run.
    with pytest.raises(KeyError) as err:
        resolve("dinov3_vits16plus")
    assert str(err.value) == (
        "dinov3_vits16plus: DINOv3 weights are gated by Meta's licence and lvd does not download them: accept the "
        "licence on https://huggingface.co/facebook/dinov3-vits16plus-pretrain-lvd1689m, download it once "
        "(`huggingface-cli download facebook/dinov3-vits16plus-pretrain-lvd1689m`), then give the folder: "
        "embed.backbone={kind: dinov3, path: <the folder>, image_size: 224} (docs/models.md, DINOv3)")


def test_first_fetch_records_the_digest_and_later_fetches_must_match(tmp_path) -> None:
    opener = FakeOpener(b"weights v1")
    path, digest, verified = fetch("sscd_disc_mixup", tmp_path, opener)
    assert path.read_bytes() == b"weights v1" and digest == hashlib.sha256(b"weights v1").hexdigest() and not verified
    lock = json.loads((tmp_path / "checksums.json").read_text())
    assert lock["sscd_disc_mixup.torchscript"]["sha256"] == digest and lock["sscd_disc_mixup.torchscript"]["verified"] == "first-use"
    fetch("sscd_disc_mixup", tmp_path, opener)
    assert len(opener.urls) == 1  # present with the recorded digest: not downloaded again
    path.write_bytes(b"tampered")
    with pytest.raises(ChecksumError):
        fetch("sscd_disc_mixup", tmp_path, FakeOpener(b"weights v2"))
    assert path.read_bytes() == b"tampered"  # a bad download never replaces the file


def test_pinned_checksum_is_enforced(tmp_path, monkeypatch) -> None:
    entry = REGISTRY["sscd_disc_blur.torchscript"]
    monkeypatch.setitem(registry.REGISTRY, entry.name, replace(entry, sha256=hashlib.sha256(b"good").hexdigest()))
    assert fetch(entry.name, tmp_path, FakeOpener(b"good"))[2] is True
    with pytest.raises(ChecksumError):
        fetch(entry.name, tmp_path / "other", FakeOpener(b"evil"))
    assert not (tmp_path / "other" / entry.filename).exists()


def test_cli_lists_the_registry(capsys) -> None:
    assert main(["models", "fetch", "--list"]) == 0
    out = capsys.readouterr().out
    assert "sscd_disc_mixup.torchscript" in out and "dinov2_vitg14" in out
    assert main(["models", "fetch"]) == 2
