"""Building blocks of the DINOv2 vision transformer, one concept per module."""

from training.layers.attention import Attention
from training.layers.block import Block, BlockChunk
from training.layers.dino_head import DINOHead, WeightNormLinear
from training.layers.drop_path import DropPath
from training.layers.layer_scale import LayerScale
from training.layers.mlp import Mlp
from training.layers.patch_embed import PatchEmbed
from training.layers.swiglu_ffn import SwiGLUFFNFused, swiglu_hidden_dim

__all__ = [
    "Attention",
    "Block",
    "BlockChunk",
    "DINOHead",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFNFused",
    "WeightNormLinear",
    "swiglu_hidden_dim",
]
