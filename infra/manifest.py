"""Stage manifests: written once a stage is complete, after all of its shards; the stage's proof of completion."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from infra.storage import atomic_write_json, read_json

MANIFEST = "manifest.json"


class StageManifest(BaseModel):
    stage: str
    run_id: str
    # The cache key parts: the hash of the config sections the stage reads, the hash of its code,
    # and the digest of the upstream manifests it consumed.
    config_hash: str
    code_version: str
    inputs_digest: str
    started_at: str
    finished_at: str
    # Items that left the stage kept, and dropped per reason; ``info`` counts per decision topic.
    counts: dict[str, Any] = Field(default_factory=dict)
    # Output files relative to the run directory, each with bytes and sha256.
    outputs: list[dict[str, Any]] = Field(default_factory=list)
    # Stage-specific facts (models and their checksums, thresholds used, metrics, ...).
    extra: dict[str, Any] = Field(default_factory=dict)
    # What the key's code and inputs parts were made of (`StageSpec.key_detail`): a later attempt under another key
    # says which code files, upstream stages or outside files changed.
    key_detail: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return cache_key(self.stage, self.config_hash, self.code_version, self.inputs_digest)

    def digest(self) -> str:
        """What downstream stages key on: the stage's outputs, path and sha256 of each, and nothing of how they were
        made. A stage computed again (its code or an outside file changed) whose outputs come out byte for byte the
        same leaves every later stage complete; stages read nothing of an upstream stage but its listed outputs and
        the configuration sections in their own keys."""
        h = hashlib.sha256(self.stage.encode())
        for out in sorted(self.outputs, key=lambda o: o["path"]):
            h.update(f"{out['path']}:{out['sha256']}".encode())
        return h.hexdigest()


def cache_key(stage: str, config_hash: str, code_version: str, inputs_digest: str) -> str:
    return f"{stage}-{hashlib.sha256(f'{config_hash}:{code_version}:{inputs_digest}'.encode()).hexdigest()[:32]}"


def inputs_digest(upstream: dict[str, StageManifest]) -> str:
    h = hashlib.sha256()
    for name in sorted(upstream):
        h.update(f"{name}:{upstream[name].digest()}".encode())
    return h.hexdigest()


def manifest_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / MANIFEST


def write_manifest(stage_dir: Path, manifest: StageManifest) -> None:
    atomic_write_json(manifest_path(stage_dir), manifest.model_dump(mode="json"))


def read_manifest(stage_dir: Path) -> StageManifest | None:
    path = manifest_path(stage_dir)
    if not path.is_file():
        return None
    return StageManifest.model_validate(read_json(path))
