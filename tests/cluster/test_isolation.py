"""The emulated cluster shares nothing a real one would not: a file a job's task writes under its node's /tmp, HOME
or working dir is invisible to the job's driver on the head, to the other worker node and to the submitting
machine; and a run whose storage_path is a directory on the driver's machine is refused before any worker
starts, naming the field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.cluster.support import status, submitted, vitpipe

pytestmark = pytest.mark.integration

PROBE = textwrap.dedent("""
    import json, os, ray

    ray.init()

    def places(tag):
        # the same three places on every node: its /tmp, its HOME, and the job's working dir (the same path on
        # every node: <ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>)
        return [f"/tmp/vp-iso-{tag}", os.path.expanduser(f"~/vp-iso-{tag}"), os.path.abspath(f"vp-iso-{tag}")]

    @ray.remote(num_cpus=0)
    def write(tag):
        for p in places(tag):
            with open(p, "w") as f:
                f.write(tag)
        return places(tag)

    @ray.remote(num_cpus=0)
    def seen(paths):
        return {"ip": ray.util.get_node_ip_address(), "seen": [p for p in paths if os.path.exists(p)]}

    on = lambda i: {"resources": {f"vp_node_{i}": 0.01}}
    written = ray.get(write.options(**on(1)).remote("n1"))
    for p in places("driver"):
        with open(p, "w") as f:
            f.write("driver")
    print("RESULT " + json.dumps({
        "written": written, "driver_written": places("driver"), "driver_ip": ray.util.get_node_ip_address(),
        "home": os.path.expanduser("~"), "cwd": os.getcwd(),
        "driver_sees": [p for p in written if os.path.exists(p)],
        "node1_sees": ray.get(seen.options(**on(1)).remote(written)),
        "node2_sees": ray.get(seen.options(**on(2)).remote(written)),
        "node1_sees_driver": ray.get(seen.options(**on(1)).remote(places("driver"))),
    }))
""")


def test_a_file_written_on_one_node_is_invisible_elsewhere(cluster):
    env = cluster.env()
    r = vitpipe(["submit", "command", "--follow", "--", "python", "-c", PROBE], env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, r.stdout[-4000:]
    got = json.loads(line[len("RESULT "):])
    head, n1, n2 = cluster.node_ips[:3]
    assert got["driver_ip"] == head and got["home"] == "/tmp/home"
    assert got["node1_sees"] == {"ip": n1, "seen": got["written"]}  # written: visible where it was written
    assert got["driver_sees"] == []                                  # ... but not to the job's driver (head)
    assert got["node2_sees"] == {"ip": n2, "seen": []}               # nor to the other worker node
    assert got["node1_sees_driver"] == {"ip": n1, "seen": []}        # and the driver's files not to a worker
    assert not [p for p in got["written"] + got["driver_written"] if Path(p).exists()]  # nor to this machine


def test_node_local_storage_is_refused_before_any_worker_starts(cluster, datasets):
    env = cluster.env()
    r = vitpipe(["submit", "pretrain", "configs/pretrain/smoke.yaml", "--follow", "--set", "name=local-runs",
                 f"data.train={datasets['train']}", "scaling.storage_path=./runs"], env)
    job = submitted(r)
    assert r.returncode == 1 and status(job, env) == "FAILED", r.stdout[-3000:]
    assert ("scaling.storage_path './runs' is a directory on the driver's machine, but the Ray cluster has 4 nodes"
            in r.stdout), r.stdout[-3000:]
    assert "scaling.storage_path=s3://BUCKET/runs" in r.stdout and "shared_filesystem=true" in r.stdout
    assert "Started training worker group" not in r.stdout  # no worker started
