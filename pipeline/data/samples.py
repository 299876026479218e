"""The WebDataset layout of one sample in a tar shard: how a source item is encoded into its members, and how a tar
stream is read back as samples (what the loader's read path uses; this module never imports the writer).

Members of one sample share the key before the first dot of their name: `KEY.jpg|png|...` (the image: original
bytes passed through, or re-encoded as JPEG when `max_side`/`reencode` ask for it; raw uint8 pixels such as IDX
digits become lossless PNG), `KEY.cls` (single label, decimal text) or `KEY.labels.json` (multi-label list of ints),
`KEY.json` (metadata). Consecutive members with the same key form one sample; members whose key's last part starts
with `__` (WebDataset's own `__meta__` and the like) are not samples.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image

from pipeline.data.sources import SourceItem, json_bytes, png_bytes
from pipeline.data.tar import iter_members

__all__ = ["EncodeOptions", "encode_item", "sample_dict", "tar_bytes", "member_key", "iter_tar_samples"]


@dataclass
class EncodeOptions:
    """How images are stored: passed through unless `reencode` or the image is larger than `max_side`."""

    max_side: int | None = None
    quality: int = 90
    reencode: bool = False
    raw_format: str = "png"  # for raw pixels (IDX, arrays): "png" (lossless) or "jpg"

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.raw_format not in ("png", "jpg"):
            raise ValueError(f"raw_format must be 'png' or 'jpg', got {self.raw_format!r}")


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_item(item: SourceItem, opts: EncodeOptions) -> tuple[bytes, str, dict[str, Any]]:
    """Returns (image bytes, extension, extra metadata) for one source item."""
    if item.pixels is not None:
        if opts.raw_format == "png":
            return png_bytes(item.pixels), "png", {}
        arr = item.pixels[..., 0] if item.pixels.ndim == 3 and item.pixels.shape[2] == 1 else item.pixels
        return _jpeg(Image.fromarray(arr), opts.quality), "jpg", {}
    assert item.data is not None
    if not opts.reencode and opts.max_side is None:
        return item.data, item.ext, {}
    img = Image.open(io.BytesIO(item.data))
    img.load()
    too_big = opts.max_side is not None and max(img.size) > opts.max_side
    if not (too_big or opts.reencode):
        return item.data, item.ext, {"width": img.width, "height": img.height}
    img = img.convert("L" if img.mode in ("L", "1", "I;16") else "RGB")
    if too_big:
        img.thumbnail((opts.max_side, opts.max_side), Image.Resampling.BICUBIC)
    return _jpeg(img, opts.quality), "jpg", {"width": img.width, "height": img.height}


def sample_dict(item: SourceItem, opts: EncodeOptions, label_type: str) -> dict[str, Any]:
    """One source item as the members of its sample: `{"__key__": KEY, EXT: bytes, ...}` (what a tar writer takes)."""
    data, ext, extra = encode_item(item, opts)
    sample: dict[str, Any] = {"__key__": item.key, ext: data, "json": json_bytes({**item.meta, **extra})}
    if label_type == "multi":
        sample["labels.json"] = json_bytes(sorted(set(int(x) for x in item.label or [])))
    else:
        sample["cls"] = str(int(item.label)).encode()
    return sample


def tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")


def member_key(name: str) -> tuple[str, str] | None:
    """A member's name -> (sample key, extension): split at the first dot of its last path part; None without one."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1:]


def iter_tar_samples(fileobj, *, skip: int = 0, take: int | None = None) -> Iterator[dict[str, Any]]:
    """Yields samples `{"__key__": KEY, EXT: bytes, ...}` from a tar stream in WebDataset layout (consecutive members
    sharing a key form a sample). The first `skip` samples are passed over without keeping their data; at most
    `take` samples are yielded. A truncated or corrupt tar raises tarfile.TarError (or EOFError/OSError)."""
    if take is not None and take <= 0:
        return
    state = {"key": None, "index": -1}

    def wanted(name: str) -> bool:
        parts = member_key(name)
        if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
            return False
        if parts[0] != state["key"]:
            state["key"], state["index"] = parts[0], state["index"] + 1
        return state["index"] >= skip

    yielded = 0
    current: dict[str, Any] | None = None
    for name, body in iter_members(fileobj, wanted):
        if body is None:
            continue
        key, ext = member_key(name)
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
                yielded += 1
                if take is not None and yielded >= take:
                    return
            current = {"__key__": key}
        current[ext.lower()] = body
    if current is not None:
        yield current
