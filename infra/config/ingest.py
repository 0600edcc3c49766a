"""Ingestion and safety: download (img2dataset), URL guard, NSFW filter, face blurring."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infra.config.base import Section


class IngestConfig(Section):
    # Rows per shard. The shard of a row is row_id // shard_size and never changes between reruns.
    shard_size: int = Field(default=1000, ge=1)
    # img2dataset resize settings.
    image_size: int = Field(default=256, ge=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(default=95, ge=1, le=100)
    timeout: float = Field(default=10.0, gt=0)
    retries: int = Field(default=0, ge=0)
    threads: int = Field(default=32, ge=1)
    processes: int = Field(default=1, ge=1)
    # Size guards (img2dataset): smallest side, largest area, largest aspect ratio.
    min_image_size: int = Field(default=0, ge=0)
    max_image_area: float = Field(default=float("inf"), gt=0)
    max_aspect_ratio: float = Field(default=float("inf"), gt=0)
    # Decoders refuse images with more pixels than this (decompression-bomb guard).
    max_decode_pixels: int = Field(default=89_478_485, ge=1)
    # Robots opt-out: X-Robots-Tag directives that forbid use (img2dataset's defaults).
    user_agent_token: str | None = "lvd"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    # URL guard: private, loopback and link-local destinations are refused unless allow-listed.
    allow_private: bool = False
    allow_hosts: list[str] = Field(default_factory=list)
    # Exact dedup across the whole pool by content hash (sha256 of the downloaded bytes).
    exact_dedup: bool = True


class NsfwConfig(Section):
    enabled: bool = True
    backend: Literal["opennsfw"] = "opennsfw"
    # Yahoo open_nsfw: scores below 0.2 are safe, above 0.8 are NSFW.
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    action: Literal["drop", "flag"] = "drop"
    batch_size: int = Field(default=64, ge=1)


class FacesConfig(Section):
    enabled: bool = True
    backend: Literal["haar"] = "haar"
    scale_factor: float = Field(default=1.1, gt=1.0)
    min_neighbors: int = Field(default=5, ge=0)
    min_size: int = Field(default=20, ge=1)
    # Box margin as a fraction of the box size, on each side.
    margin: float = Field(default=0.2, ge=0.0)
    blur: Literal["gaussian", "pixelate"] = "gaussian"
    encode_quality: int = Field(default=95, ge=1, le=100)
