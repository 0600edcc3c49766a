"""Data for DINOv2 pretraining: sources (corpus shards, image folders), multi-crop, masking, collate, streams."""

from training.data.augmentations import MultiCropAugmentation
from training.data.collate import collate_data_and_cast
from training.data.datasets import FolderSource, ImageSource, TarShardSource, build_source, decode_rgb
from training.data.masking import MaskingGenerator
from training.data.stream import BatchStream

__all__ = [
    "BatchStream",
    "FolderSource",
    "ImageSource",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "TarShardSource",
    "build_source",
    "collate_data_and_cast",
    "decode_rgb",
]
