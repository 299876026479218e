"""A `vitpipe shards write` killed (SIGKILL) half-way and run again: on the S3 test server and on a local dir, the
shards finished before the kill are verified and kept (not rewritten), a damaged one is redone, the rest written,
and the manifest is that of an uninterrupted write; other arguments are refused. The resumed write with `--ray`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
IMAGES = 60
PER_SHARD = 3  # 20 shards of ~0.1 s each (a 2560 px JPEG decoded and shrunk per sample): time to kill in between
SHARDS = IMAGES // PER_SHARD


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("big")
    for c, photo in zip(("china", "flower"), load_sample_images().images):
        buf = io.BytesIO()
        Image.fromarray(photo).resize((2560, 1708)).save(buf, format="JPEG", quality=90)
        (root / c).mkdir()
        for i in range(IMAGES // 2):
            (root / c / f"{c}_{i:02d}.jpg").write_bytes(buf.getvalue())
    return root


def _args(folder: Path, dest: str, *extra: str, per_shard: int = PER_SHARD) -> list[str]:
    return ["shards", "write", str(folder), dest, "--name", "photos", "--samples-per-shard", str(per_shard),
            "--max-side", "64", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(big_folder, tmp_path_factory) -> dict:
    """The manifest of an uninterrupted write of the same source (to another folder), less its timestamp."""
    dest = tmp_path_factory.mktemp("reference") / "train"
    assert main(_args(big_folder, str(dest))) == 0
    return _content(json.loads((dest / "manifest.json").read_text()))


def _content(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=dict(os.environ),
                                stdout=f, stderr=subprocess.STDOUT)


def _run(args: list[str], log: Path) -> tuple[int, str]:
    proc = _cli(args, log)
    rc = proc.wait(timeout=120)
    return rc, log.read_text()


def _write_and_kill(args: list[str], records, log: Path, at_least: int = 3) -> list[str]:
    """Starts the writer, SIGKILLs it once `at_least` shards have their progress record; returns those recorded."""
    proc = _cli(args, log)
    deadline = time.monotonic() + 60
    try:
        while len(records()) < at_least:
            assert proc.poll() is None, f"the writer ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no shard finished within 60 s"
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    done = records()
    assert at_least <= len(done) < SHARDS, f"{len(done)} of {SHARDS} shards done at the kill: expected some, not all"
    return done


class _Local:
    def __init__(self, dest: Path):
        self.dest, self.url, self.storage_args = dest, str(dest), []

    def records(self) -> list[str]:
        progress = self.dest / ".progress"
        return sorted(p.name[: -len(".json")] for p in progress.glob("*.tar.json")) if progress.is_dir() else []

    def stamps(self, names) -> dict:  # a rewrite through fsspec replaces the file: a new mtime (and maybe inode)
        return {n: ((self.dest / n).stat().st_mtime_ns, (self.dest / n).stat().st_ino) for n in names}

    def listing(self) -> dict:
        return {str(p.relative_to(self.dest)): p.stat().st_mtime_ns for p in self.dest.rglob("*") if p.is_file()}

    def damage(self, name: str) -> None:
        blob = bytearray((self.dest / name).read_bytes())
        blob[len(blob) // 2] ^= 0xFF  # same size: only the sha256 tells
        (self.dest / name).write_bytes(bytes(blob))


class _S3:
    """A versioned bucket: every PUT of a key makes a new version, so 'not rewritten' is one version, the same."""

    def __init__(self, endpoint: str, bucket: str):
        import boto3

        self.s3, self.bucket, self.key = boto3.client("s3", endpoint_url=endpoint), bucket, "photos/train"
        self.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        self.url, self.storage_args = f"s3://{bucket}/{self.key}", ["--endpoint-url", endpoint]

    def _keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def records(self) -> list[str]:
        return sorted(k.rsplit("/", 1)[-1][: -len(".json")] for k in self._keys(f"{self.key}/.progress/")
                      if k.endswith(".tar.json"))

    def stamps(self, names) -> dict:
        out = {}
        for n in names:
            versions = self.s3.list_object_versions(Bucket=self.bucket, Prefix=f"{self.key}/{n}")["Versions"]
            out[n] = sorted(v["VersionId"] for v in versions)
        return out

    def listing(self) -> dict:
        versions = self.s3.list_object_versions(Bucket=self.bucket, Prefix=self.key).get("Versions", [])
        return {(v["Key"], v["VersionId"]): v["ETag"] for v in versions}

    def damage(self, name: str) -> None:
        key = f"{self.key}/{name}"
        blob = bytearray(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        blob[len(blob) // 2] ^= 0xFF
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(blob))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_write_resumes_reusing_finished_shards(where, big_folder, reference, tmp_path, request):
    if where == "s3":
        store = _S3(request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket"))
    else:
        store = _Local(tmp_path / "photos" / "train")
    args = _args(big_folder, store.url, *store.storage_args)
    done = _write_and_kill(args, store.records, tmp_path / "killed.log")

    before = store.listing()
    rc, out = _run(_args(big_folder, store.url, *store.storage_args, per_shard=4), tmp_path / "other.log")
    assert rc == 2 and "interrupted write with other arguments (--samples-per-shard: recorded 3, now 4)" in out, out
    assert "--overwrite" in out and store.listing() == before  # refused before writing anything

    damaged, kept = done[-1], done[:-1]
    store.damage(damaged)
    stamps = store.stamps(kept)
    rc, out = _run(args, tmp_path / "resumed.log")
    assert rc == 0, out[-3000:]
    assert out.strip().splitlines()[-1] == f"{store.url}/manifest.json"
    assert f"{len(kept)} recorded shards verified and kept, 1 rewritten (damaged), {SHARDS - len(kept)} to write" \
        in out, out
    assert f"{damaged}: sha256" in out and f"{len(kept)} shards reused, {SHARDS - len(kept)} written" in out
    assert store.stamps(kept) == stamps  # the finished shards were read back, not written again
    assert store.records() == []  # the progress records go once the manifest is there

    storage = request.getfixturevalue("storage_config") if where == "s3" else None
    from pipeline.data.storage import get_filesystem

    fs, path = get_filesystem(f"{store.url}/manifest.json", storage)
    assert _content(json.loads(fs.cat_file(path))) == reference
    assert main(["shards", "verify", f"{store.url}/manifest.json", *store.storage_args]) == 0

    manifest = store.stamps(["manifest.json"])
    rc, out = _run(args, tmp_path / "again.log")  # complete and written with these arguments: left alone
    assert rc == 0 and "nothing to do" in out and store.stamps(["manifest.json"]) == manifest


def test_killed_write_resumed_as_ray_tasks(fault_ray, big_folder, reference, tmp_path, caplog):
    """Only the missing shards go to Ray tasks; the recorded ones are verified by tasks and kept."""
    store = _Local(tmp_path / "photos" / "train")
    done = _write_and_kill(_args(big_folder, store.url), store.records, tmp_path / "killed.log")
    stamps = store.stamps(done)
    with caplog.at_level("INFO", logger="pipeline.data"):
        assert main(_args(big_folder, store.url, "--ray", "--ray-tasks", "2")) == 0
    assert f"{len(done)} recorded shards verified and kept, 0 rewritten (damaged), {SHARDS - len(done)} to write" \
        in caplog.text
    assert store.stamps(done) == stamps
    manifest = _content(json.loads((store.dest / "manifest.json").read_text()))
    assert manifest["writer"].pop("ray") is True
    assert manifest == {**reference, "writer": {k: v for k, v in reference["writer"].items() if k != "ray"}}
    assert main(["shards", "verify", str(store.dest)]) == 0
