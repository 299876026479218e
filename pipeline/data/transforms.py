"""Image decoding and augmentation on uint8 tensors (torchvision.io decoders + transforms v2), normalisation last.

Workers decode and augment to uint8 [C,S,S] (cheap to pass between processes); the main process turns a batch
into float32 with `normalize` ("inception": values in [-1, 1], the paper's; "imagenet": ImageNet mean/std).
"""

from __future__ import annotations

import io
from typing import Callable

import torch

from pipeline.data.config import AugmentConfig

__all__ = ["decode_image", "build_transform", "normalize", "IMAGE_KEYS"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, in_chans: int = 3) -> torch.Tensor:
    """Encoded bytes -> uint8 [in_chans, H, W]; grayscale becomes in_chans channels. Raises on undecodable data."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
    try:
        return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except RuntimeError:
        # Formats torchvision does not decode (BMP, TIFF, ...): PIL, still to uint8 CHW.
        import numpy as np
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB" if in_chans == 3 else "L")
        arr = torch.from_numpy(np.asarray(img).copy())
        return arr.permute(2, 0, 1).contiguous() if arr.ndim == 3 else arr.unsqueeze(0)


def build_transform(image_size: int, train: bool, augment: AugmentConfig | None = None) -> Callable:
    """uint8 [C,H,W] -> uint8 [C,S,S]. Train: Inception-style RandomResizedCrop + horizontal flip.
    Eval: resize the short side to S / crop_fraction, centre crop S."""
    from torchvision.transforms import v2

    augment = augment or AugmentConfig()
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if train:
        ops = [v2.RandomResizedCrop(image_size, scale=tuple(augment.scale), ratio=tuple(augment.ratio),
                                    antialias=True)]
        if augment.hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops = [v2.Resize(max(image_size, round(image_size / augment.eval_crop_fraction)), antialias=True),
               v2.CenterCrop(image_size)]
    return v2.Compose(ops)


def normalize(images: torch.Tensor, augment: AugmentConfig | None = None) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32, normalised per `augment.normalize`."""
    augment = augment or AugmentConfig()
    x = images.float()
    if augment.normalize == "inception":
        return x.div_(127.5).sub_(1.0)
    c = x.shape[1]
    mean = torch.tensor(_IMAGENET_MEAN[:c] if c == 3 else (sum(_IMAGENET_MEAN) / 3,)).view(1, c, 1, 1) * 255
    std = torch.tensor(_IMAGENET_STD[:c] if c == 3 else (sum(_IMAGENET_STD) / 3,)).view(1, c, 1, 1) * 255
    return x.sub_(mean).div_(std)
