"""The stop request of a run (pipeline.launch.stop.StopSignal) crosses from the driver to the workers through the
run's storage: a local folder and the S3 test server."""

from __future__ import annotations

import pickle
import subprocess
import sys
import uuid

import pytest

from pipeline.data.storage import Storage

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stop_request_reaches_the_workers_through_the_runs_storage(where, tmp_path, s3_bucket, storage_config):
    from pipeline.data.config import StorageConfig
    from pipeline.data.storage import get_filesystem
    from pipeline.launch.stop import StopSignal

    run, storage = (str(tmp_path / "runs" / "r1"), StorageConfig()) if where == "local" else (
        f"s3://{s3_bucket}/runs/r-{uuid.uuid4().hex[:6]}", storage_config)
    driver = StopSignal.create(run, Storage(storage))
    worker = pickle.loads(pickle.dumps(driver))  # what Ray hands each worker: the URL, no polling state
    worker._poll_s = 3600.0  # (the second look below must fall inside one poll interval however slow the machine)
    fs, root = get_filesystem(run, storage)
    fs.makedirs(f"{root}/checkpoint_00000002", exist_ok=True)
    fs.pipe_file(f"{root}/checkpoint_00000002/COMMITTED.rank0", b"{}")
    fs.ls(root)  # a worker that listed the run folder (a restore) holds a cached listing without the marker
    assert not worker.requested()
    # the driver is another process (its own client): what it writes reaches this one only through the store
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()).request('SIGTERM')"
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(driver), check=True, timeout=60)
    assert not worker.requested()  # polled at most every poll_s: not looked again yet
    worker._last = None  # (as if the interval had passed)
    assert worker.requested() and worker.reason == "SIGTERM"
    assert fs.exists(f"{root}/STOP_REQUESTED")
    again = StopSignal.create(run, Storage(storage))  # the next attempt (a --resume) starts without the old request
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/STOP_REQUESTED") and not pickle.loads(pickle.dumps(again)).requested()
