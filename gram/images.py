"""CLIP's image preprocessing, shared by the backbone, the dataset decoders and the meta corpus. [ours]

`ImageSpec` is a saved model's preprocessing (`preprocessor_config.json`, read by `image_spec`):
shortest side to `size`, centre crop `crop`, normalise by `mean`/`std`. `preprocess` applies it to
uint8 images on any device. A module of its own below `gram.backbone` and `gram.data`, because both
need it and the backbone reads the corpus shards through `gram.data`.

torch is imported inside the two tensor functions: the data tools (`gram fetch-data`, `check-data`)
and Snakemake's resource functions (`gram.data.datasets.decoded_mb`) read an `ImageSpec` without
paying for importing torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the functions import torch when called
    import torch


@dataclass
class ImageSpec:
    """CLIP image preprocessing: shortest side to `size`, centre crop `crop`, normalise."""

    size: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"


def image_spec(model_dir: str | Path) -> ImageSpec:
    """Read the preprocessing of a saved model (`preprocessor_config.json`)."""
    path = Path(model_dir) / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    size = cfg.get("size", 224)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = cfg.get("crop_size", size)
    crop = crop.get("height") if isinstance(crop, dict) else crop
    resample = {2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 3), "bicubic")
    return ImageSpec(int(size), int(crop), tuple(cfg["image_mean"]), tuple(cfg["image_std"]), resample)


def preprocess(images: np.ndarray | "torch.Tensor", spec: ImageSpec, normalize: bool = True) -> "torch.Tensor":
    """uint8 images [N, H, W, 3] -> float pixel values [N, 3, crop, crop] as CLIP expects."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2).float() / 255.0  # [N, H, W, 3] -> [N, 3, H, W]
    h, w = x.shape[-2:]
    # the long side is truncated, as CLIP's torchvision Resize and transformers' image processor do
    # (rounding it instead shifts the centre crop by a pixel on some aspect ratios)
    long = int(spec.size * max(h, w) / min(h, w))
    size = (spec.size, long) if h <= w else (long, spec.size)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode=spec.resample, antialias=True, align_corners=False).clamp_(0, 1)
    h, w = x.shape[-2:]
    top, left = (h - spec.crop) // 2, (w - spec.crop) // 2
    x = x[..., top:top + spec.crop, left:left + spec.crop]
    return normalize_pixels(x, spec) if normalize else x


def normalize_pixels(x: "torch.Tensor", spec: ImageSpec) -> "torch.Tensor":
    """Pixel values in [0, 1], [N, 3, H, W] -> normalised by the spec's per-channel mean and std."""
    import torch

    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
