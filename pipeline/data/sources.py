"""Where shard writers read samples from: an ImageFolder tree, MNIST-style IDX files, a CSV/Parquet/JSONL manifest of
image paths or URLs, or in-memory uint8 arrays. Every source is indexable (so shard ranges can be written in
parallel) and picklable (arrays and listings load lazily in the process that reads them)."""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.config import StorageConfig
from pipeline.data.storage import get_filesystem, parent_url, url_join

__all__ = ["SourceItem", "Source", "ImageFolderSource", "IdxSource", "TableSource", "ArraySource", "SliceSource",
           "open_source", "read_idx"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class SourceItem:
    key: str
    data: bytes | None  # encoded image bytes (passed through or re-encoded by the writer)
    ext: str  # "jpg", "png", ...
    label: int | list[int] | None
    meta: dict[str, Any] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # raw uint8 pixels when the source has no encoded bytes (IDX, arrays)


def _safe_key(text: str) -> str:
    # WebDataset splits a member name at the first dot of its basename: keys must not contain dots or slashes.
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:80]


class Source:
    kind = "source"
    class_names: list[str] | None = None
    label_type = "single"

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, i: int) -> SourceItem:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class ImageFolderSource(Source):
    """root/CLASS_NAME/IMAGE: one class per folder (sorted names -> label 0..K-1)."""

    kind = "imagefolder"

    def __init__(self, root: str, storage: StorageConfig | None = None):
        self.root, self.storage = root.rstrip("/"), storage or StorageConfig()
        fs, path = get_filesystem(self.root, self.storage)
        if not fs.isdir(path):
            raise ValueError(f"ImageFolder source {root!r} is not a directory")
        classes = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))
        if not classes:
            raise ValueError(f"ImageFolder source {root!r} has no class folders (expected ROOT/CLASS/IMAGE files)")
        self.class_names = classes
        files: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            for f in sorted(fs.find(f"{path}/{name}")):
                if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    files.append((f"{self.root}/{name}/{f.split(f'/{name}/', 1)[1]}", label))
        if not files:
            raise ValueError(f"ImageFolder source {root!r}: no image files ({', '.join(IMAGE_EXTS)}) in its folders")
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def item(self, i: int) -> SourceItem:
        url, label = self.files[i]
        fs, path = get_filesystem(url, self.storage)
        ext = url.rsplit(".", 1)[-1].lower()
        rel = url[len(self.root) + 1:]
        return SourceItem(key=f"{i:08d}_{_safe_key(rel.rsplit('.', 1)[0])}", data=fs.cat_file(path),
                          ext="jpg" if ext == "jpeg" else ext, label=label,
                          meta={"source": rel, "class_name": self.class_names[label]})

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": self.root, "files": len(self.files)}


def read_idx(url: str, storage: StorageConfig | None = None) -> np.ndarray:
    """Reads an IDX file (MNIST format; gzipped or not) into a numpy array."""
    fs, path = get_filesystem(url, storage)
    blob = fs.cat_file(path)
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0:
        raise ValueError(f"{url}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if blob[2] not in dtypes:
        raise ValueError(f"{url}: unknown IDX element type 0x{blob[2]:02x}")
    ndim = blob[3]
    dims = np.frombuffer(blob, ">u4", count=ndim, offset=4).astype(int)
    arr = np.frombuffer(blob, dtypes[blob[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{url}: IDX header says {tuple(dims)} but holds {arr.size} values (truncated?)")
    return arr.reshape(tuple(dims))


class ArraySource(Source):
    """In-memory uint8 images [N,H,W] or [N,H,W,C] with int labels [N] or multi-hot/label lists."""

    kind = "arrays"

    def __init__(self, images: np.ndarray, labels: Any, class_names: list[str] | None = None,
                 label_type: str | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise ValueError(f"images must be uint8 [N,H,W] or [N,H,W,1|3], got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        lab = [l.tolist() if isinstance(l, np.ndarray) else l for l in labels]
        multi = label_type == "multi" or (label_type is None and any(isinstance(l, (list, tuple)) for l in lab))
        self.label_type = "multi" if multi else "single"
        self.labels = [list(map(int, l)) for l in lab] if multi else [int(l) for l in lab]
        if class_names is None:
            top = max((max(l) if multi and l else (l if not multi else -1)) for l in self.labels)
            class_names = [str(i) for i in range(int(top) + 1)]
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int) -> SourceItem:
        label = self.labels[i]
        meta: dict[str, Any] = {"index": i}
        if self.label_type == "single":
            meta["class_name"] = self.class_names[label] if 0 <= label < len(self.class_names) else None
        return SourceItem(key=f"{i:08d}", data=None, ext="png", label=label, meta=meta, pixels=self.images[i])


class IdxSource(ArraySource):
    """MNIST-style IDX image + label files (e.g. Fashion-MNIST's *-images-idx3-ubyte.gz / *-labels-idx1-ubyte.gz)."""

    kind = "idx"

    def __init__(self, images_url: str, labels_url: str, class_names: list[str] | None = None,
                 storage: StorageConfig | None = None):
        self.images_url, self.labels_url, self.storage = images_url, labels_url, storage or StorageConfig()
        images, labels = read_idx(images_url, self.storage), read_idx(labels_url, self.storage)
        if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1:
            raise ValueError(f"IDX source: expected uint8 images [N,H,W] and labels [N], got {images.shape} "
                             f"{images.dtype} and {labels.shape}")
        super().__init__(images, labels.astype(np.int64), class_names, "single")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "images": self.images_url, "labels": self.labels_url}


class SliceSource(Source):
    """Samples [start, stop) of another source (e.g. a validation split cut from one IDX file)."""

    def __init__(self, source: Source, start: int, stop: int):
        if not 0 <= start < stop <= len(source):
            raise ValueError(f"slice [{start}, {stop}) outside a source of {len(source)} samples")
        self.source, self.start, self.stop = source, start, stop
        self.kind, self.class_names, self.label_type = source.kind, source.class_names, source.label_type

    def __len__(self) -> int:
        return self.stop - self.start

    def item(self, i: int) -> SourceItem:
        return self.source.item(self.start + i)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "range": [self.start, self.stop]}


class TableSource(Source):
    """A CSV / Parquet / JSONL table with a `path` (or `url`/`image`) column and a `label` (int or class name) or
    `labels` column (a list, or a string separated by ';' / '|') for multi-label. Relative paths are resolved
    against the table's folder."""

    kind = "table"

    def __init__(self, url: str, storage: StorageConfig | None = None, class_names: list[str] | None = None):
        self.url, self.storage = url, storage or StorageConfig()
        fs, path = get_filesystem(url, self.storage)
        blob = fs.cat_file(path)
        suffix = url.rsplit(".", 1)[-1].lower()
        # pyarrow only for tables: a machine that writes or reads image shards may not have it
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.json as pajson
        import pyarrow.parquet as pq

        readers = {"csv": pacsv.read_csv, "parquet": pq.read_table, "pq": pq.read_table,
                   "jsonl": pajson.read_json, "ndjson": pajson.read_json}
        if suffix not in readers:
            raise ValueError(f"table source {url!r}: unknown format .{suffix} (use .csv, .parquet or .jsonl)")
        table = readers[suffix](pa.BufferReader(blob))
        rows = table.to_pylist()
        cols = set(table.column_names)
        path_col = next((c for c in ("path", "url", "image", "file") if c in cols), None)
        if path_col is None:
            raise ValueError(f"table source {url!r}: needs a 'path' (or 'url'/'image') column; has {sorted(cols)}")
        label_col = "labels" if "labels" in cols else "label" if "label" in cols else None
        if label_col is None:
            raise ValueError(f"table source {url!r}: needs a 'label' or 'labels' column; has {sorted(cols)}")
        self.label_type = "multi" if label_col == "labels" else "single"
        base = parent_url(url)
        raw_labels = []
        for r, row in enumerate(rows):
            v = row[label_col]
            if self.label_type == "multi":
                if isinstance(v, str):
                    v = [s.strip() for s in re.split(r"[;|]", v) if s.strip()]
                elif v is None:
                    v = []
            elif v is None:
                raise ValueError(f"table source {url!r}: row {r} has no label")
            raw_labels.append(v)
        flat = [x for v in raw_labels for x in (v if self.label_type == "multi" else [v])]
        numeric = all(isinstance(x, int) or (isinstance(x, str) and x.lstrip("-").isdigit()) for x in flat)
        if class_names is None:
            if numeric:
                top = max((int(x) for x in flat), default=-1)
                class_names = [str(i) for i in range(top + 1)]
            else:
                class_names = sorted({str(x) for x in flat})
        self.class_names = list(class_names)
        index = {n: i for i, n in enumerate(self.class_names)}

        def to_id(x: Any, r: int) -> int:
            if numeric:
                return int(x)
            if str(x) not in index:
                raise ValueError(f"table source {url!r}: row {r} label {x!r} is not one of the class names")
            return index[str(x)]

        self.items = []
        for r, (row, v) in enumerate(zip(rows, raw_labels)):
            label = [to_id(x, r) for x in v] if self.label_type == "multi" else to_id(v, r)
            self.items.append((url_join(base, str(row[path_col])), label))

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int) -> SourceItem:
        url, label = self.items[i]
        fs, path = get_filesystem(url, self.storage)
        name = url.rsplit("/", 1)[-1]
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else "jpg"
        return SourceItem(key=f"{i:08d}_{_safe_key(name.rsplit('.', 1)[0])}", data=fs.cat_file(path),
                          ext="jpg" if ext == "jpeg" else ext, label=label, meta={"source": url})

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "table": self.url, "rows": len(self.items)}


def open_source(spec: str, *, labels: str | None = None, kind: str = "auto", class_names: list[str] | None = None,
                storage: StorageConfig | None = None) -> Source:
    """Builds a Source from a path/URL: a folder = ImageFolder, .csv/.parquet/.jsonl = table, IDX images (+ labels)."""
    storage = storage or StorageConfig()
    if kind == "auto":
        low = spec.lower()
        if labels is not None or "idx" in low.rsplit("/", 1)[-1]:
            kind = "idx"
        elif low.rsplit(".", 1)[-1] in ("csv", "parquet", "pq", "jsonl", "ndjson"):
            kind = "table"
        else:
            kind = "imagefolder"
    if kind == "idx":
        if labels is None:
            raise ValueError(f"IDX source {spec!r}: give the label file too (--labels ...-labels-idx1-ubyte.gz)")
        return IdxSource(spec, labels, class_names, storage)
    if kind == "table":
        return TableSource(spec, storage, class_names)
    if kind == "imagefolder":
        return ImageFolderSource(spec, storage)
    raise ValueError(f"unknown source kind {kind!r}: use auto, imagefolder, idx or table")


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def png_bytes(pixels: np.ndarray) -> bytes:
    arr = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
