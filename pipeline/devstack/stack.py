"""`Stack`: the development cluster as one object. `Stack.up` starts it in named steps (record, network, services,
Ray, health); `status`, `cut_node`, `restart_node`, `node_exec` act on it; `down` stops exactly what `up` started.
The parts live beside it: `services.py` (S3, MLflow), `nodes.py` (Ray nodes), `netns.py` (the multi-node network),
`processes.py` (child processes), `state.py` (the record a later shell loads).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.devstack import netns
from pipeline.devstack.errors import StackError
from pipeline.devstack.nodes import NODE_ENV, enter_node, node_env, ray_nodes, ray_start_command, remove_namespaces
from pipeline.devstack.ports import http_ok, resolve_ports
from pipeline.devstack.processes import Proc, alive, kill_matching, spawn, stop, wait_for
from pipeline.devstack.services import ensure_bucket, mlflow_command, mlflow_env, moto_command
from pipeline.devstack.state import STATE_DIRNAME, StackState

__all__ = ["Stack", "STATE_DIRNAME", "DEFAULT_PORTS"]

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"ray": 6379, "dashboard": 8265, "s3": 9000, "mlflow": 5000}


class Stack(StackState):
    """The running stack: `up` starts it, `down` stops it; its record (`StackState`) is what `load` finds."""

    # ------------------------------------------------------------------ up
    @classmethod
    def up(cls, workdir: str | Path = ".", *, nodes: int = 1, ports: dict[str, int] | None = None,
           subnet: str = "10.213.0.0/24", s3_endpoint: str | None = None, bucket: str = "vitpipe",
           backend_store_uri: str | None = None, cpus_per_node: int = 2, object_store_mb: int = 512,
           health_check: dict[str, int] | None = None, timeout_s: float = 90.0,
           head_cpus: int | None = None) -> Stack:
        """Starts the stack and waits until every service is healthy. `ports` values of 0 mean "any free port"
        (single node only; in multi-node mode Ray listens inside its namespaces). `s3_endpoint` set = use that
        endpoint (credentials from the environment) instead of starting moto. `head_cpus` (default: 0 with several
        nodes, keeping training workers off the head as on real clusters; cpus_per_node on a single node). On
        failure everything started so far is stopped again."""
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        workdir = str(Path(workdir).resolve())
        cls._clear_stale(workdir)
        p = {**DEFAULT_PORTS, **(ports or {})}
        stack = cls._create(
            workdir, nodes, subnet, p, s3_endpoint=s3_endpoint, bucket=bucket, backend_store_uri=backend_store_uri,
            cpus_per_node=cpus_per_node, object_store_mb=object_store_mb, health_check=health_check or {},
            head_cpus=head_cpus,
        )
        try:
            stack._make_network(p)
            deadline = time.monotonic() + timeout_s
            stack._start_services(p, deadline)
            stack._start_ray(p, deadline)
            stack._wait_healthy(deadline)
        except BaseException:
            stack.down()
            raise
        return stack

    @classmethod
    def _clear_stale(cls, workdir: str) -> None:
        """Refuses to start over a running stack; clears what a crashed one left (its state says what it ran)."""
        if (cls.state_dir(workdir) / "state.json").is_file():
            old = cls.load(workdir)
            if any(alive(p) for p in old.procs):
                raise StackError(f"a stack started from {workdir} is still running: `vitpipe stack down` first")
            old.down()  # stale state from a crash: clear what is left

    @classmethod
    def _create(cls, workdir: str, nodes: int, subnet: str, ports: dict[str, int], *, s3_endpoint: str | None,
                bucket: str, backend_store_uri: str | None, cpus_per_node: int, object_store_mb: int,
                health_check: dict[str, int], head_cpus: int | None) -> Stack:
        """The stack's record before anything runs: its addresses, a fresh Ray token; saved. On a single node the
        ports are checked here, before anything starts (a clear error beats a half-started stack)."""
        multi = nodes > 1
        net = _subnet(subnet) if multi else None
        host = net.host_ip if net else "127.0.0.1"
        node_ips = [net.node_ip(i) for i in range(nodes)] if net else [host]
        if multi:
            for k in ("ray", "dashboard"):  # inside the head's own namespace the defaults are always free
                ports[k] = ports[k] or DEFAULT_PORTS[k]
        else:
            resolve_ports(ports, host, _service_ports(s3_endpoint is None) + ["ray", "dashboard"])
        sdir = cls.state_dir(workdir)
        (sdir / "logs").mkdir(parents=True, exist_ok=True)
        token_path = sdir / "ray_auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        stack = cls(
            workdir=workdir, nodes=nodes, host=host, node_ips=node_ips,
            ray_address=f"{node_ips[0]}:{ports['ray']}",
            dashboard_url=f"http://{node_ips[0]}:{ports['dashboard']}",
            s3_endpoint=s3_endpoint or "",  # both URLs are filled in once the ports are known
            s3_managed=s3_endpoint is None,
            bucket=bucket,
            mlflow_uri="",
            artifacts_destination=f"s3://{bucket}/mlflow-artifacts",
            backend_store_uri=backend_store_uri or f"sqlite:///{sdir / 'mlflow.db'}",
            token_path=str(token_path),
            subnet=net.cidr if net else None,
            # single node: short (Ray's unix socket paths are length-limited); multi-node: each node's private /tmp
            temp_root="" if multi else tempfile.mkdtemp(prefix="vp", dir="/tmp"),
            health_check=health_check, cpus_per_node=cpus_per_node, object_store_mb=object_store_mb,
            head_cpus=(0 if multi else None) if head_cpus is None else head_cpus,
        )
        stack._save()
        return stack

    def _make_network(self, ports: dict[str, int]) -> None:
        """Multi-node: the bridge (reclaiming one a killed stack left), the service ports on its address (which
        exists only now), a namespace per node; each saved once made, so `down` removes exactly what `up` made."""
        if not self.subnet:
            return
        net = netns.Subnet(self.subnet)
        reclaimed = netns.create_bridge(net)
        if reclaimed:
            log.warning("removed %s: left by a multi-node stack on %s that no longer runs",
                        ", ".join(reclaimed), net.cidr)
        self.bridge = net.bridge
        self._save()
        resolve_ports(ports, self.host, _service_ports(self.s3_managed))
        for i in range(self.nodes):
            netns.add_node(net, i)
            self.namespaces.append(net.namespace(i))
            self._save()

    def _start_services(self, ports: dict[str, int], deadline: float) -> None:
        """S3 (moto, waited for: the bucket is made next) and MLflow (waited for at the end, while Ray starts)."""
        self.s3_endpoint = self.s3_endpoint or f"http://{self.host}:{ports['s3']}"
        self.mlflow_uri = f"http://{self.host}:{ports['mlflow']}"
        self._save()
        if self.s3_managed:
            self._spawn("s3", moto_command(self.host, ports["s3"]))
            wait_for(lambda: http_ok(self.s3_endpoint + "/"), deadline, f"S3 endpoint {self.s3_endpoint}",
                     self._log("s3"), self.procs)
        ensure_bucket(self.s3_endpoint, self.bucket, self.service_env(), self.s3_managed)
        cmd = mlflow_command(host=self.host, port=ports["mlflow"], backend_store_uri=self.backend_store_uri,
                             artifacts_destination=self.artifacts_destination)
        self._spawn("mlflow", cmd, env=mlflow_env(self.service_env()))

    def _start_ray(self, ports: dict[str, int], deadline: float) -> None:
        """The head (waited for until its state API answers: workers join it), then the worker nodes."""
        for i in range(self.nodes):
            self._start_ray_node(i, ports)
            if i == 0:
                wait_for(lambda: self._ray_nodes() is not None, deadline, f"Ray head {self.dashboard_url}",
                         self._log("ray-0"), self.procs)

    def _wait_healthy(self, deadline: float) -> None:
        wait_for(lambda: http_ok(self.mlflow_uri + "/health"), deadline, f"MLflow {self.mlflow_uri}",
                 self._log("mlflow"), self.procs)
        wait_for(lambda: len(self.alive_nodes()) == self.nodes, deadline, f"{self.nodes} alive Ray node(s)",
                 self._log(f"ray-{self.nodes - 1}"), self.procs)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, ns: str | None = None) -> Proc:
        proc = spawn(name, cmd, logfile=self._log(name), cwd=self.workdir, env=env, ns=ns)
        self.procs.append(proc)
        self._save()
        return proc

    def _start_ray_node(self, i: int, ports: dict[str, int]) -> None:
        multi = self.nodes > 1
        ip = self.node_ips[i]
        env, temp = node_env(i, ip, self.service_env(), subnet=self._net() if multi else None,
                             token_path=self.token_path, temp_root=self.temp_root)
        cpus = self.cpus_per_node if i or self.head_cpus is None else self.head_cpus
        cmd = ray_start_command(i, ip, cpus=cpus, object_store_mb=self.object_store_mb, temp=temp, ports=ports,
                                health_check=self.health_check, head_address=self.ray_address, multi=multi)
        self._spawn(f"ray-{i}", cmd, env=env, ns=self.namespaces[i] if multi else None)

    # ------------------------------------------------------------------ queries
    def _ray_nodes(self) -> list[dict] | None:
        return ray_nodes(self.dashboard_url, self.token_path)

    def alive_nodes(self) -> list[dict]:
        return [n for n in (self._ray_nodes() or []) if n.get("state") == "ALIVE"]

    def status(self) -> dict[str, Any]:
        """Health of every part: processes alive, S3/MLflow answering, Ray nodes alive, node links up."""
        procs = {p.name: alive(p) for p in self.procs}
        nodes = self._ray_nodes()
        out: dict[str, Any] = {
            "workdir": self.workdir,
            "nodes": self.nodes,
            "processes": procs,
            "s3": {"url": self.s3_endpoint, "healthy": http_ok(self.s3_endpoint + "/")},
            "mlflow": {"url": self.mlflow_uri, "healthy": http_ok(self.mlflow_uri + "/health")},
            "ray": {
                "address": self.ray_address,
                "dashboard": self.dashboard_url,
                "healthy": nodes is not None,
                "alive_nodes": sorted(n["node_ip"] for n in nodes or [] if n.get("state") == "ALIVE"),
                "dead_nodes": sorted(n["node_ip"] for n in nodes or [] if n.get("state") != "ALIVE"),
            },
        }
        if self.subnet:
            net = netns.Subnet(self.subnet)
            out["links"] = {self.node_ips[i]: netns.link_is_up(net, i) for i in range(self.nodes)}
        out["healthy"] = (
            all(procs.values()) and out["s3"]["healthy"] and out["mlflow"]["healthy"]
            and len(out["ray"]["alive_nodes"]) == self.nodes
        )
        return out

    # ------------------------------------------------------------------ fault injection (multi-node)
    def _net(self) -> netns.Subnet:
        if not self.subnet:
            raise StackError("cut-node/restore-node need a multi-node stack (`vitpipe stack up --nodes 2`)")
        return netns.Subnet(self.subnet)

    def _check_node(self, i: int) -> None:
        if not 0 <= i < self.nodes:
            raise StackError(f"node {i} does not exist: this stack has nodes 0..{self.nodes - 1} (0 = head)")

    def cut_node(self, i: int) -> None:
        """Takes node i's link to the bridge down: it can no longer reach the other nodes, S3 or MLflow."""
        self._check_node(i)
        netns.set_link(self._net(), i, up=False)

    def restore_node(self, i: int) -> None:
        self._check_node(i)
        netns.set_link(self._net(), i, up=True)

    def restart_node(self, i: int, timeout_s: float = 60.0) -> None:
        """Stops node i's Ray processes and starts it again (a worker that Ray declared dead cannot rejoin as it
        was). Head restarts are not supported: they would lose the cluster's state."""
        self._check_node(i)
        if i == 0:
            raise StackError("restarting the head would lose the cluster; use `down` and `up`")
        for proc in [p for p in self.procs if p.name == f"ray-{i}"]:
            stop(proc)
            self.procs.remove(proc)
        self._start_ray_node(i, DEFAULT_PORTS)
        ip = self.node_ips[i]
        wait_for(lambda: any(n["node_ip"] == ip for n in self.alive_nodes()), time.monotonic() + timeout_s,
                 f"node {i} ({ip}) to rejoin", self._log(f"ray-{i}"))

    def node_exec(self, i: int, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Runs a command on node i as a process of that node would: in its network and mount namespaces (its
        private /tmp, HOME and working dir), with the stack's environment. Tests use this to run a driver next to
        the cluster."""
        self._check_node(i)
        env = {**os.environ, **self.service_env(), "RAY_ADDRESS": self.ray_address}
        if not self.subnet:
            return subprocess.run(cmd, env=env, **kwargs)
        node = next(p for p in self.procs if p.name == f"ray-{i}")
        env.update(NODE_ENV)  # its HOME, caches and token path (what the node's `ray start` was given)
        return subprocess.run(enter_node(node.pid) + cmd, env=env, **kwargs)

    # ------------------------------------------------------------------ down
    def down(self) -> list[str]:
        """Stops every process `up` started (Ray workers before the head), removes the namespaces, bridge and
        temporary dirs; keeps logs/. Returns what was stopped."""
        stopped = self._stop_processes()
        if self.subnet:
            net = netns.Subnet(self.subnet)
            remove_namespaces(net, self.nodes, self.namespaces)
            if self.bridge:
                netns.remove_bridge(net)
        if self.temp_root:  # single node (a multi-node stack's temp dirs vanish with its mount namespaces)
            kill_matching(self.temp_root)
            shutil.rmtree(self.temp_root, ignore_errors=True)
        sdir = self.state_dir(self.workdir)
        for name in ("state.json", "ray_auth_token"):
            (sdir / name).unlink(missing_ok=True)
        if self.backend_store_uri == f"sqlite:///{sdir / 'mlflow.db'}":
            (sdir / "mlflow.db").unlink(missing_ok=True)
        return stopped

    def _stop_processes(self) -> list[str]:
        """Worker nodes (together), then the head, then S3 and MLflow (together). A multi-node stack's namespaces
        are swept afterwards anyway, so its Ray nodes get a short grace."""
        grace = 5.0 if self.subnet else 20.0
        waves = [[p for p in self.procs if p.name.startswith("ray-") and p.name != "ray-0"],
                 [p for p in self.procs if p.name == "ray-0"],
                 [p for p in self.procs if not p.name.startswith("ray-")]]
        stopped = []
        with ThreadPoolExecutor(max_workers=4) as pool:
            for wave in waves:
                done = list(pool.map(lambda p: stop(p, grace if p.name.startswith("ray-") else 20.0), wave))
                stopped += [p.name for p, ok in zip(wave, done) if ok]
        return stopped


def _subnet(cidr: str) -> netns.Subnet:
    """A multi-node stack's network, once this machine can make one (root, iproute2)."""
    netns.check_available()
    return netns.Subnet(cidr)


def _service_ports(s3_managed: bool) -> list[str]:
    # the S3 port matters only when the stack runs moto itself
    return ["s3", "mlflow"] if s3_managed else ["mlflow"]
