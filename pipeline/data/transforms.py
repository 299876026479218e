"""Image decoding and augmentation on uint8 tensors (torchvision.io decoders + transforms v2), normalisation last.

Workers decode and augment to uint8 [C,S,S]; batches stay uint8 until they reach the model's device (a quarter of
the bytes of float32 through shared memory and over PCIe), where `to_model_input` normalises them ("inception":
values in [-1, 1], the paper's; "imagenet": ImageNet mean/std) in the compute dtype.
"""

from __future__ import annotations

import io
from typing import Callable

import torch
from PIL import Image

from pipeline.data.config import AugmentConfig

__all__ = ["decode_image", "check_image", "decode_batch", "build_transform", "normalize", "to_model_input",
           "IMAGE_KEYS"]

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


def check_image(data: bytes) -> None:
    """Raises unless `data` starts like an image PIL can open (its header only: the cheap check a DataLoader
    worker makes when decoding is left to the GPU)."""
    with Image.open(io.BytesIO(data)) as img:
        img.size  # noqa: B018 - reading the header is the check


def _is_jpeg(encoded: torch.Tensor) -> bool:
    return encoded.numel() > 3 and encoded[:3].tolist() == [0xFF, 0xD8, 0xFF]


def decode_batch(encoded: list[torch.Tensor], device: torch.device | str, in_chans: int = 3
                 ) -> list[torch.Tensor | None]:
    """Encoded images (uint8 1-D tensors) -> uint8 [in_chans, H, W] on `device`: the JPEGs in one batched
    `torchvision.io.decode_jpeg` call (nvJPEG on CUDA), other formats one by one on the CPU, then moved. An image
    that does not decode comes back as None."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, e in enumerate(encoded) if _is_jpeg(e)]
    if jpegs:
        try:
            for i, image in zip(jpegs, decode_jpeg([encoded[i] for i in jpegs], mode=mode, device=device)):
                out[i] = image
        except RuntimeError:  # one bad JPEG fails the batch call: the rest one by one below
            pass
    for i, e in enumerate(encoded):
        if out[i] is None:
            try:
                out[i] = decode_image(e.numpy().tobytes(), in_chans).to(device)
            except Exception:  # noqa: BLE001 - undecodable: the caller counts and masks it
                out[i] = None
    return out


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
    """uint8 [B,C,H,W] -> float32 on the same device, normalised per `augment.normalize`."""
    augment = augment or AugmentConfig()
    x = images.float()
    if augment.normalize == "inception":
        return x.div_(127.5).sub_(1.0)
    c = x.shape[1]
    mean = torch.tensor(_IMAGENET_MEAN[:c] if c == 3 else (sum(_IMAGENET_MEAN) / 3,), device=x.device)
    std = torch.tensor(_IMAGENET_STD[:c] if c == 3 else (sum(_IMAGENET_STD) / 3,), device=x.device)
    return x.sub_(mean.view(1, c, 1, 1) * 255).div_(std.view(1, c, 1, 1) * 255)


def to_model_input(images: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   augment: AugmentConfig | None = None) -> torch.Tensor:
    """A loader's uint8 batch, moved to `device` as uint8 (asynchronously when it is pinned), then normalised
    there and cast to the compute dtype."""
    x = images.to(device, non_blocking=True)
    return normalize(x, augment).to(dtype)
