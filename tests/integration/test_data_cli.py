"""`vitpipe shards write|inspect|verify` on a real folder of JPEGs, to the S3 test server and to a local dir, and the
Ray job entrypoint jobs.make_shards on a real local Ray."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.config import DataConfig
from pipeline.data.loader import build_loader
from pipeline.data.manifest import load_dataset_spec
from pipeline.data.storage import Storage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two real 427x640 photos shipped with scikit-learn
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["china", "flower"]):
        (root / name).mkdir()
        for i in range(9):
            y, x = rng.integers(0, 427 - 200), rng.integers(0, 640 - 300)
            buf = io.BytesIO()
            Image.fromarray(photos[c][y:y + 200, x:x + 300]).save(buf, format="JPEG", quality=90)
            (root / name / f"{name}_{i}.jpg").write_bytes(buf.getvalue())
    return root


@pytest.mark.parametrize("where", ["local", "s3"])
def test_shards_write_inspect_verify(where, image_folder, tmp_path, capsys, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_server")
        dest, storage_args = f"s3://{bucket}/photos/train", ["--endpoint-url", endpoint]
    else:
        dest, storage_args = str(tmp_path / "photos" / "train"), []
    rc = main(["shards", "write", str(image_folder), dest, "--name", "photos", "--samples-per-shard", "5",
               "--max-side", "128", "--no-progress", *storage_args])
    assert rc == 0
    manifest_url = capsys.readouterr().out.strip().splitlines()[-1]
    assert manifest_url == f"{dest}/manifest.json"
    storage = request.getfixturevalue("storage_config") if where == "s3" else None
    m = load_dataset_spec(manifest_url, Storage(storage))
    assert m.num_samples == 18 and m.samples_per_shard == [5, 5, 5, 3] and m.class_names == ["china", "flower"]
    assert m.raw["writer"]["encode"]["max_side"] == 128

    assert main(["shards", "inspect", manifest_url, "--samples", "2", *storage_args]) == 0
    out = capsys.readouterr().out
    assert '"samples": 18' in out and "'jpg':" in out
    assert main(["shards", "verify", manifest_url, *storage_args]) == 0
    assert "ok" in capsys.readouterr().out

    loader = build_loader(manifest_url, DataConfig(train=manifest_url, num_workers=0, shuffle_buffer=4), Storage(storage),
                          batch_size=6, image_size=32, train=False)
    batches = list(loader)
    assert len(batches) == 3 and batches[0]["image"].shape == (6, 3, 32, 32)


def test_shards_write_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main(["shards", "write", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["shards", "verify", str(tmp_path)]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_make_shards_ray_job(image_folder, tmp_path):
    """The Ray job entrypoint, as the cluster runs it: a separate process, a real local Ray, shards by Ray tasks."""
    job = tmp_path / "job.yaml"
    dest = tmp_path / "ray-out"
    job.write_text(json.dumps({"source": str(image_folder), "dest": str(dest), "name": "photos",
                               "samples_per_shard": 4, "no_progress": True, "ray_tasks": 2, "num_cpus": 2}))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.make_shards", str(job)], cwd=Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"{dest}/manifest.json"
    m = load_dataset_spec(str(dest))
    assert m.num_samples == 18 and m.num_shards == 5 and m.raw["writer"]["ray"] is True
    from pipeline.data.verify import verify_shards

    assert verify_shards(m) == []
