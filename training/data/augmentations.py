"""DINOv2 multi-crop augmentation (reference `DataAugmentationDINO`): 2 global + N local views.

| view      | geometry                                           | photometric                                        |
|-----------|----------------------------------------------------|----------------------------------------------------|
| global 1  | RandomResizedCrop(global size, scale, bicubic), flip | jitter(0.4, 0.4, 0.2, 0.1) p 0.8, gray p 0.2, blur |
| global 2  | same                                               | same, blur, solarize(128) p 0.2                    |
| local x N | RandomResizedCrop(local size, scale, bicubic), flip | same jitter and gray, blur                         |

Blur (kernel 9, sigma 0.1-2) probabilities per `blur_mode`:
- "reference" (default): 0.0 / 0.9 / 0.5, what the released code effectively does (its `GaussianBlur(p)` passes
  1 - p to `RandomApply`; dinov2 PR #411) and what the released checkpoints were trained with;
- "paper": 1.0 / 0.1 / 0.5, the intended BYOL-style values;
- "none": no blur (small or non-photographic images). `solarize_p` and `hflip_p` default to the reference's 0.2
  and 0.5.
Every view is converted to a tensor and normalised with the ImageNet mean / std.

Two implementations (`crops.augment_impl`):
- "pil": every transform per image with torchvision on PIL images, as the reference;
- "batched" (default): the geometric part per image on PIL (antialiased bicubic RandomResizedCrop and flip, as the
  reference), the photometric part on the stacked batch of crops (`photometric.py`), which is ~10x cheaper for
  the small images of CPU runs. Same distributions; values are not rounded to uint8 between photometric ops.
  Greyscale images (8-bit "L": digits, scans, X-rays) stay one channel through cropping and jitter and are
  replicated to RGB at the end: the same crops as their RGB conversion bit for bit, at about half the CPU time
  (`python bench/train_data.py`).
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from training.data.photometric import PhotometricParams, apply_photometric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_PROBABILITIES = {"reference": (0.0, 0.9, 0.5), "paper": (1.0, 0.1, 0.5), "none": (0.0, 0.0, 0.0)}


def _blur(p: float) -> T.RandomApply:
    return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


def normalize() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


class MultiCropAugmentation:
    """PIL RGB image -> {"global_crops": [2 x [3, G, G]], "local_crops": [N x [3, L, L]]}.

    The data stream passes a per-sample seed, so every view is a function of (seed, sample position).
    """

    def __init__(self, global_crops_scale: tuple[float, float] = (0.32, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.32), local_crops_number: int = 8,
                 global_crops_size: int = 224, local_crops_size: int = 98,
                 blur_mode: Literal["reference", "paper", "none"] = "reference",
                 impl: Literal["batched", "pil"] = "batched", solarize_p: float = 0.2, hflip_p: float = 0.5,
                 grey_path: bool = True):
        self.local_crops_number = local_crops_number
        self.impl = impl
        # batched: greyscale images cropped and jittered on one channel (bit for bit the RGB result; False: on three)
        self.grey_path = grey_path and impl == "batched"
        self.global_size, self.global_scale = global_crops_size, global_crops_scale
        self.local_size, self.local_scale = local_crops_size, local_crops_scale
        self.blur_probabilities = BLUR_PROBABILITIES[blur_mode]
        self.solarize_p, self.hflip_p = solarize_p, hflip_p
        bicubic = T.InterpolationMode.BICUBIC
        self.geometric_global = T.Compose([
            T.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=hflip_p),
        ])
        self.geometric_local = T.Compose([
            T.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=hflip_p),
        ])
        color = T.Compose([
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        p1, p2, p_local = BLUR_PROBABILITIES[blur_mode]
        self.global_transfo1 = T.Compose([color, _blur(p1), normalize()])
        self.global_transfo2 = T.Compose([color, _blur(p2), T.RandomSolarize(threshold=128, p=solarize_p), normalize()])
        self.local_transfo = T.Compose([color, _blur(p_local), normalize()])

    def __call__(self, image: Image.Image, seed: int) -> dict[str, Any]:
        """All views of one image (RGB, or greyscale "L"); a pure function of (image, seed)."""
        if self.impl == "batched":  # geometric only, uint8 [3, H, W]; `finish` does the rest on the batch
            rng = random.Random(seed)
            return {"global_crops": [self._crop(image, self.global_size, self.global_scale, rng) for _ in range(2)],
                    "local_crops": [self._crop(image, self.local_size, self.local_scale, rng)
                                    for _ in range(self.local_crops_number)]}
        if image.mode != "RGB":  # torchvision's jitter on a greyscale image would skip hue and saturation
            image = image.convert("RGB")
        torch.default_generator.manual_seed(seed)  # torchvision transforms draw from the global torch RNG
        g1 = self.global_transfo1(self.geometric_global(image))
        g2 = self.global_transfo2(self.geometric_global(image))
        local = [self.local_transfo(self.geometric_local(image)) for _ in range(self.local_crops_number)]
        return {"global_crops": [g1, g2], "local_crops": local}

    def _crop(self, image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
        """RandomResizedCrop (bicubic, antialiased like PIL) + horizontal flip p 0.5 -> uint8 [3, size, size].

        A greyscale ("L") image is cropped and resized on its one channel, then replicated: Pillow resamples each
        channel alike, so this is its RGB conversion's crop bit for bit, resampling one channel instead of three."""
        i, j, h, w = random_resized_crop_box(image.height, image.width, scale, rng)
        crop = image.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < self.hflip_p:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(crop, dtype=np.uint8))
        if pixels.ndim == 2:
            return pixels.expand(3, -1, -1).contiguous()  # three channels of its own, as an RGB crop
        return pixels.permute(2, 0, 1).contiguous()

    def finish(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Photometric part of the "batched" implementation on collated uint8 crops (in place); no-op for "pil".

        `collated_global_crops` is crop-major ([view 1 of every image, view 2 of every image]), so the first half
        gets the view-1 blur and the second half the view-2 blur and solarisation.
        """
        if self.impl != "batched":
            return batch
        g = batch["collated_global_crops"].float() / 255.0
        b = g.shape[0] // 2
        loc = batch["collated_local_crops"]
        p1, p2, p_local = self.photometric_params(b, 0 if loc is None else loc.shape[0], generator)
        grey = self.grey_path
        batch["collated_global_crops"] = _normalize(torch.cat([apply_photometric(g[:b], p1, grey),
                                                               apply_photometric(g[b:], p2, grey)]))
        if loc is not None:
            batch["collated_local_crops"] = _normalize(apply_photometric(loc.float() / 255.0, p_local, grey))
        return batch

    def photometric_params(self, n_images: int, n_local: int, generator: torch.Generator) -> tuple[
            PhotometricParams, PhotometricParams, PhotometricParams]:
        """The random decisions `finish` applies to global view 1, global view 2 and the local crops, in the order it
        draws them: blur with the `blur_mode` probabilities, solarisation on view 2 only."""
        p1, p2, p_local = self.blur_probabilities
        return (PhotometricParams.sample(n_images, p1, 0.0, generator),
                PhotometricParams.sample(n_images, p2, self.solarize_p, generator),
                PhotometricParams.sample(n_local, p_local, 0.0, generator))


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], rng: random.Random,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision's `RandomResizedCrop.get_params` algorithm, from a `random.Random`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
