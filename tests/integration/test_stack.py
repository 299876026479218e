"""The local stack for real: `vitpipe stack up/status/env/down` on 127.0.0.1, and 2 Ray nodes in network and
mount namespaces whose link a test can cut."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pipeline.devstack import Stack, StackError, netns
from tests.fixtures.ray_stack import multinode_available

pytestmark = pytest.mark.integration
VITPIPE = [sys.executable, "-m", "pipeline.cli"]


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def _tree(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out |= {pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    return out


def test_single_node_up_status_env_down(tmp_path):
    free = []
    for _ in range(4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free.append(s.getsockname()[1])
    ray_port, dash_port, s3_port, mlflow_port = free
    up = subprocess.run(
        [*VITPIPE, "stack", "up", "--workdir", str(tmp_path), "--ray-port", str(ray_port), "--dashboard-port",
         str(dash_port), "--s3-port", str(s3_port), "--mlflow-port", str(mlflow_port)],
        capture_output=True, text=True, timeout=180,
    )
    assert up.returncode == 0, up.stderr[-3000:]
    stack = Stack.load(tmp_path)
    try:
        pids = _tree([p.pid for p in stack.procs])
        status = subprocess.run([*VITPIPE, "stack", "status", "--workdir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        st = json.loads(status.stdout)
        assert st["healthy"] and st["ray"]["alive_nodes"] == ["127.0.0.1"]
        assert st["mlflow"]["healthy"] and st["s3"]["healthy"]

        listening = _listening(pids)
        ports = {port for _, port in listening}
        assert {ray_port, dash_port, s3_port, mlflow_port} <= ports
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), listening

        env = subprocess.run([*VITPIPE, "stack", "env", "--workdir", str(tmp_path)],
                             capture_output=True, text=True, timeout=30).stdout
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in env
        assert f"export RAY_API_SERVER_ADDRESS=http://127.0.0.1:{dash_port}" in env
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{s3_port}" in env
        token = Path(stack.token_path).read_text().strip()
        assert token and token not in env and token not in up.stdout  # the Ray token is never printed

        # a second `up` from the same workdir refuses instead of starting a second stack
        again = subprocess.run([*VITPIPE, "stack", "up", "--workdir", str(tmp_path)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "still running" in again.stderr
    finally:
        down = subprocess.run([*VITPIPE, "stack", "down", "--workdir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert set(down.stdout.split(":", 1)[1].replace(",", " ").split()) == {"ray-0", "s3", "mlflow"}
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    listening = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert not listening & {ray_port, dash_port, s3_port, mlflow_port}
    assert not (tmp_path / ".vitpipe-stack" / "state.json").exists()
    assert not Path(stack.temp_root).exists()


def test_port_taken_is_a_clear_error(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(StackError, match=rf"127\.0\.0\.1:{port} \(mlflow\) is already in use"):
            Stack.up(tmp_path, ports={"ray": 0, "dashboard": 0, "s3": 0, "mlflow": port})
        r = subprocess.run([*VITPIPE, "stack", "up", "--workdir", str(tmp_path), "--dashboard-port", str(port)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"127.0.0.1:{port} (dashboard) is already in use" in r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / ".vitpipe-stack" / "state.json").exists()  # nothing was started


PROBE = textwrap.dedent("""
    import json, subprocess, ray
    ray.init()
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])

    @ray.remote(num_cpus=0)
    def where():
        # the addresses this process sees on its own interfaces: its namespace's, not the host's
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        ips = sorted(l.split()[3].split("/")[0] for l in out.splitlines() if "scope global" in l)
        return {"ray_ip": ray.util.get_node_ip_address(), "interfaces": ips}

    placed = [ray.get(where.options(resources={f"vp_node_{i}": 0.01}).remote()) for i in range(2)]
    print("RESULT " + json.dumps({"alive": alive, "placed": placed}))
""")


def test_two_nodes_in_namespaces_and_cut_one(stack_factory, tmp_path):
    reason = multinode_available()
    if reason:
        pytest.skip(reason)
    # what a killed session leaves behind: the kernel keeps its bridge and namespaces, with no process inside
    net = netns.Subnet("10.213.0.0/24")
    netns.create_bridge(net)
    netns.add_node(net, 0)
    stack = stack_factory(
        nodes=2, subnet="10.213.0.0/24", ports={"s3": 0, "mlflow": 0}, cpus_per_node=1,
        # short GCS health checks so a cut node is declared dead in seconds
        health_check={"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                      "health_check_failure_threshold": 4},
    )
    head_ip, worker_ip = stack.node_ips
    assert stack.host == "10.213.0.1" and head_ip != worker_ip
    # (a driver on node 0 sees node 0's private /tmp, not this machine's: the probe travels as an argument)
    r = stack.node_exec(0, [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result["alive"] == sorted([head_ip, worker_ip])
    assert result["placed"] == [{"ray_ip": head_ip, "interfaces": [head_ip]},
                                {"ray_ip": worker_ip, "interfaces": [worker_ip]}]
    # S3 and MLflow listen on the bridge address only
    listening = _listening(_tree([p.pid for p in stack.procs if p.name in ("s3", "mlflow")]))
    assert listening and all(ip == stack.host for ip, _ in listening), listening

    # a second stack on the same subnet is refused, and its failed start leaves the running one untouched
    with pytest.raises(netns.NetnsError, match=r"10\.213\.0\.0/24 is in use by another multi-node stack"):
        Stack.up(tmp_path / "second", nodes=2, subnet="10.213.0.0/24", ports={"s3": 0, "mlflow": 0})
    assert stack.status()["healthy"]

    stack.cut_node(1)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        st = stack.status()
        if worker_ip in st["ray"]["dead_nodes"]:
            break
        time.sleep(0.5)
    assert worker_ip in st["ray"]["dead_nodes"] and st["ray"]["alive_nodes"] == [head_ip], st["ray"]
    assert st["links"] == {head_ip: True, worker_ip: False} and not st["healthy"]

    stack.restore_node(1)
    stack.restart_node(1)
    assert sorted(n["node_ip"] for n in stack.alive_nodes()) == sorted([head_ip, worker_ip])

    namespaces = list(stack.namespaces)
    stack.down()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in namespaces)
    assert subprocess.run(["ip", "link", "show", "dev", "vpbr0"], capture_output=True).returncode != 0
