"""Named backbone architectures. Tests parametrize over `ARCHS`, so every entry gets forward/backward coverage.

The four reference sizes (S/B/L/g) plus small variants for tests and the CPU demo. Names describe the variant;
patch size, image size and training options (drop path, LayerScale, registers) are build arguments.
"""

from __future__ import annotations

from typing import Any

from training.vision_transformer import DinoVisionTransformer

ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4},
    # ViT-H/16: the self-supervised retrieval backbone of the paper's curation (§3; 1280 dim, 32 blocks, 16 heads).
    "vit_huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 4},
    # ViT-g/14 of the paper (1536 dim, 40 blocks, 24 heads of 64); released with a SwiGLU FFN.
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "mlp_ratio": 4, "ffn_layer": "swiglufused"},
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4},
    # Small variants for CPU demos and tests.
    "vit_nano": {"embed_dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 4},
    "vit_pico": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4},
    "vit_pico_reg4_swiglu": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4, "ffn_layer": "swiglufused",
                             "num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True},
}


# Architectural options a config (`train.student`) may set; a registry entry may fix some of them.
ARCH_OPTIONS = ("ffn_layer", "qkv_bias", "proj_bias", "ffn_bias", "num_register_tokens", "interpolate_antialias",
                "interpolate_offset")


def build_backbone(arch: str, patch_size: int = 14, img_size: int = 224, **kwargs: Any) -> DinoVisionTransformer:
    """Build a registered architecture; keyword arguments override the registry entry (e.g. `block_chunks`,
    `drop_path_rate`, `init_values` for LayerScale, `num_register_tokens`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; registered: {sorted(ARCHS)}")
    return DinoVisionTransformer(img_size=img_size, patch_size=patch_size, **{**ARCHS[arch], **kwargs})
