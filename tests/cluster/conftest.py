"""One share-nothing cluster for every test in this folder (started once, stopped after the last): a 4-node local
stack (pipeline.devstack) whose nodes each have their own network namespace and their own private /tmp,
/dev/shm, HOME, Ray temp dir and working dir: a head that runs the jobs' drivers and takes no training workers,
and three worker nodes of one CPU each. moto S3 and an `mlflow server` listen on the bridge. A path that only
works on a shared disk fails here, as it would on a real cluster.

Fixtures:
  cluster   (package) the Stack
  datasets  (package) split -> manifest URL on the stack's S3: the pretraining split written by a shards *job*
            (`vitpipe submit shards` reading raw IDX files from the bucket, as a user's job would: the submitting
            machine's disk is not the cluster's), the small eval and transfer splits written from here with the
            same writer; `datasets["_job"]` is the shards job's CompletedProcess
"""

from __future__ import annotations

import pytest

from pipeline.devstack import Stack
from tests.cluster.support import source_files, vitpipe
from tests.fixtures.ray_stack import multinode_available

SUBNET = "10.213.6.0/24"
# a node is declared dead a few seconds after its link is cut (tests/cluster/test_jobs.py), with room for
# a slow answer from a raylet on a busy 2-core machine
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                "health_check_failure_threshold": 4}


@pytest.fixture(scope="package")
def cluster(tmp_path_factory, shm_comm_op):
    reason = multinode_available()
    if reason:
        pytest.skip(reason)
    stack = Stack.up(tmp_path_factory.mktemp("cluster"), nodes=4, subnet=SUBNET, ports={"s3": 0, "mlflow": 0},
                     cpus_per_node=1, health_check=HEALTH_CHECK)
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="package")
def datasets(cluster, tmp_path_factory):
    from pipeline.data.config import StorageConfig
    from pipeline.data.sources import IdxSource
    from pipeline.data.storage import get_filesystem
    from pipeline.data.writer import write_shards

    env = cluster.env()
    files = source_files(tmp_path_factory.mktemp("sources"))
    data = f"s3://{cluster.bucket}/e2e"
    storage = StorageConfig(endpoint_url=cluster.s3_endpoint)
    with pytest.MonkeyPatch.context() as m:  # the stack's own credentials, only while writing
        for k, v in env.items():
            if k.startswith("AWS_"):
                m.setenv(k, v)
        fs, root = get_filesystem(f"{data}/raw", storage)
        raw = {}
        for kind in ("images", "labels"):
            local = files[f"train-{kind}"]
            fs.put_file(local, f"{root}/{local.rsplit('/', 1)[-1]}")
            raw[kind] = f"{data}/raw/{local.rsplit('/', 1)[-1]}"
        manifests = {}
        for split in ("val", "digits-train", "digits-test"):
            name = "digits" if split.startswith("digits") else "fashion-mnist"
            src = IdxSource(files[f"{split}-images"], files[f"{split}-labels"])
            manifests[split] = write_shards(src, f"{data}/{split}", name=name, split=split, samples_per_shard=128,
                                            storage=storage, progress=False)
    dest = f"{data}/train"
    job = vitpipe(["submit", "shards", "--follow", "--", raw["images"], dest, "--labels", raw["labels"],
                   "--name", "fashion-mnist", "--split", "train", "--samples-per-shard", "128", "--no-progress"], env)
    manifests.update({"_job": job, "train": f"{dest}/manifest.json"})
    return manifests
