"""A node's network link is cut in the middle of a multi-node run, then the run is re-submitted with --resume.

On the package's share-nothing cluster (tests/cluster/conftest.py: a head without CPUs that runs the job's
driver, two worker nodes of 1 CPU, GCS health checks of a few seconds; moto S3 and MLflow on the bridge), a
2-worker pretraining job is submitted (`vitpipe submit pretrain`): one worker per worker node. Once a checkpoint is
committed in storage, the link of worker node 2 is cut. Our config has no elastic scaling (the worker group needs
both CPUs), so the guarantee is: the job fails (with scaling.max_failures=0) naming the lost node, and a
re-submission with --resume after the node is back continues from the last committed checkpoint, in the same
MLflow run, and ends at exactly the configured step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.fixtures.faults import CLASSES, counts, report, synthetic

pytestmark = [pytest.mark.integration]

VITPIPE = [sys.executable, "-m", "pipeline.cli"]
STEPS = 24
CUT = 2  # a worker node (0 is the head)


def _submit(stack, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **stack.env()}
    args = [*VITPIPE, "submit", "pretrain", "configs/pretrain/smoke.yaml", "--set",
            "name=cut", "model.image_size=16", f"model.num_classes={CLASSES}",
            f"data.train=s3://{stack.bucket}/faults/train/manifest.json", "data.num_workers=0",
            "data.shuffle_buffer=32", f"train.steps={STEPS}", "train.global_batch=32", "train.micro_batch=16",
            "train.schedule.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=4",
            "train.eval_every=1000", "scaling.num_workers=2", f"scaling.storage_path=s3://{stack.bucket}/runs",
            "scaling.max_failures=0", "tracking.sink=mlflow", "tracking.experiment=test-faults-multinode",
            "tracking.flush_every_s=0.5", *extra, "--follow"]
    if "--resume" in extra:
        args.remove("--resume")
        args.insert(args.index("--set"), "--resume")
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

@pytest.mark.timeout(420)
def test_cut_node_fails_clearly_and_resume_continues(cluster, tmp_path, monkeypatch):
    import s3fs
    from mlflow.tracking import MlflowClient

    from pipeline.data.config import StorageConfig
    from pipeline.data.shards import write_array_shards
    from pipeline.train.checkpoint import find_latest_complete, step_of

    stack = cluster
    env = stack.env()
    storage = StorageConfig(endpoint_url=stack.s3_endpoint)
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=stack.s3_endpoint, skip_instance_cache=True)
    images, labels = synthetic(128, 0)
    with monkeypatch.context() as m:  # the stack's own credentials, only while writing
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            m.setenv(k, env[k])
        write_array_shards(images, labels, f"s3://{stack.bucket}/faults/train", name="synth", split="train",
                           class_names=[str(i) for i in range(CLASSES)], samples_per_shard=16, storage=storage)
    run_root = f"{stack.bucket}/runs/cut"

    def committed() -> list[int]:
        try:
            fs.invalidate_cache()
            dirs = fs.ls(run_root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(step_of(d) for d in dirs if fs.exists(f"{d}/COMMITTED.rank1"))

    job = _submit(stack)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None and not committed():
        time.sleep(0.3)
    assert job.poll() is None, "the job ended before a checkpoint was committed:\n" + job.stdout.read()[-4000:]
    at_cut = committed()
    assert at_cut, "no checkpoint committed in time"
    node, worker_ip = CUT, stack.node_ips[CUT]  # the head has no CPUs: both worker nodes run a rank
    t_cut = time.monotonic()
    stack.cut_node(node)
    try:
        out, _ = job.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job did not end after node 1 was cut (hung on the lost worker?)")
    failed_after_s = time.monotonic() - t_cut
    (tmp_path / "job1.log").write_text(out)
    assert job.returncode == 1, out[-4000:]
    # a clear message: Ray's error names the dead node (its address)
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in out.splitlines()
             if worker_ip in l and ("died" in l or "dead" in l.lower())]
    assert lines, out[-6000:]
    last = find_latest_complete(f"s3://{run_root}", storage)
    assert last is not None
    last_step = step_of(last)
    assert 0 < last_step < STEPS

    stack.restore_node(node)
    stack.restart_node(node)
    resumed = _submit(stack, "--resume")
    out2, _ = resumed.communicate(timeout=240)
    (tmp_path / "job2.log").write_text(out2)
    assert resumed.returncode == 0, out2[-6000:]
    summary = json.loads(out2[out2.rindex('{\n  "name"'):out2.index("}", out2.rindex('{\n  "name"')) + 1])
    assert summary["step"] == STEPS
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("test-faults-multinode")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]  # the same MLflow run across both jobs
    logged = counts(stack.mlflow_uri, summary["run_id"])
    assert sorted(logged) == list(range(1, STEPS + 1))
    # up to the last committed checkpoint every step ran once: the resume did not start over
    assert all(logged[s] == 1 for s in range(1, last_step + 1)), logged
    assert committed()[-1] == STEPS
    report("cut the link of a worker node mid-run (3-node share-nothing stack)",
           {"cut node": f"{node} ({worker_ip}, running a rank)", "committed checkpoints at the cut": at_cut},
           {"first job": f"FAILED after {failed_after_s:.1f}s: {lines[0].strip()[:140]}",
            "last committed checkpoint": last_step, "resubmitted --resume": f"SUCCEEDED at step {summary['step']}",
            "mlflow runs": len(runs), "steps logged once up to checkpoint": last_step}, tmp_path)
