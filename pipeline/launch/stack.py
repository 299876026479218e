"""The local stack: a Ray cluster, an S3-compatible endpoint and an MLflow tracking server started by one call.

Single node (default): every service binds 127.0.0.1 and Ray is forced onto loopback. With `nodes=N > 1` the
nodes share nothing a real cluster's machines would not: each Ray node runs in its own network namespace on a
private /24 (see `netns.py`) and its own mount namespace with a private tmpfs `/tmp` and `/dev/shm`, where its
HOME, Ray temp dir, working dir and caches live. What nodes share is what a container image would: the installed
venv and the project's code (DeepSpeed's compiled ops are copied into each node's cache at start, as an image
would ship them). S3 and MLflow listen on the bridge address so every node reaches them; `cut_node(i)` really
severs node i's link. The head takes no training workers by default (`head_cpus=0`), as on real clusters.

    stack = Stack.up(workdir, nodes=2)      # -> Stack (its fields are the state written to .vitpipe-stack/)
    stack.env()                             # RAY_ADDRESS, AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI, ...
    stack.cut_node(1); stack.restore_node(1)
    stack.down()                            # stops only what `up` started, removes namespaces

Ray nodes are `ray start --block` processes (never `ray stop`, which would kill every Ray on the machine); each
service is started in its own session so `down` can stop its whole process group. Ray token auth is on, with a
per-stack token file (never printed).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.launch import netns

__all__ = ["Stack", "StackError", "STATE_DIRNAME", "DEFAULT_PORTS", "MOTO_CREDENTIALS"]

log = logging.getLogger(__name__)

STATE_DIRNAME = ".vitpipe-stack"
DEFAULT_PORTS = {"ray": 6379, "dashboard": 8265, "s3": 9000, "mlflow": 5000}
# moto accepts any credentials; these placeholders are not secrets and are what stack clients use against it.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "vitpipe-local", "AWS_SECRET_ACCESS_KEY": "vitpipe-local"}
_BIN = Path(sys.executable).parent

# A multi-node stack's node: everything it writes lives in its own tmpfs /tmp (and /dev/shm), gone with it.
NODE_WORKDIR = "/tmp/work"
NODE_RAY_TEMP = "/tmp/ray"
NODE_TOKEN = "/tmp/home/.ray/auth_token"
NODE_ENV = {
    "HOME": "/tmp/home", "TMPDIR": "/tmp", "XDG_CACHE_HOME": "/tmp/cache",
    "TORCH_EXTENSIONS_DIR": "/tmp/cache/torch_extensions", "RAY_AUTH_TOKEN_PATH": NODE_TOKEN,
}
# Run by `sh -c` inside the node's new mount namespace, then exec's the node's command. The token and DeepSpeed's
# compiled ops come in through the environment / a path outside /tmp (a path under the host's /tmp is hidden).
# What the nodes share (the venv, the project) may itself live under /tmp (a checkout there): those folders are
# parked on a private tmpfs over /mnt while the node's own /tmp is mounted, then bound back at their paths.
_NODE_SETUP = f"""set -eu
i=0
for p in $VITPIPE_NODE_SHARED; do
  case "$p" in /tmp/*) [ "$i" -gt 0 ] || mount -t tmpfs vitpipe-node-keep /mnt
    mkdir -p /mnt/keep$i; mount --bind "$p" /mnt/keep$i; i=$((i+1));; esac
done
mount -t tmpfs -o mode=1777 vitpipe-node-tmp /tmp
i=0
for p in $VITPIPE_NODE_SHARED; do
  case "$p" in /tmp/*) mkdir -p "$p"; mount --bind /mnt/keep$i "$p"; i=$((i+1));; esac
done
unset VITPIPE_NODE_SHARED
mount -t tmpfs -o mode=1777 vitpipe-node-shm /dev/shm
mkdir -p "$HOME/.ray" {NODE_WORKDIR} {NODE_RAY_TEMP} "$TORCH_EXTENSIONS_DIR"
( umask 077; printf '%s' "$VITPIPE_NODE_TOKEN" > "$RAY_AUTH_TOKEN_PATH" )
unset VITPIPE_NODE_TOKEN
if [ -n "${{VITPIPE_NODE_OPS:-}}" ] && [ -d "$VITPIPE_NODE_OPS" ]; then
  cp -a "$VITPIPE_NODE_OPS/." "$TORCH_EXTENSIONS_DIR/"
fi
unset VITPIPE_NODE_OPS
cd {NODE_WORKDIR}
exec "$@"
"""


class StackError(RuntimeError):
    """The stack cannot start or be found; the message says what and what to do."""


@dataclass
class Proc:
    name: str
    pid: int
    create_time: float
    cmd: list[str]
    log: str
    namespace: str | None = None


@dataclass
class Stack:
    workdir: str
    nodes: int
    host: str  # where S3 and MLflow listen (127.0.0.1, or the bridge address)
    node_ips: list[str]
    ray_address: str  # GCS host:port of the head
    dashboard_url: str  # job submission / dashboard (token-protected)
    s3_endpoint: str
    s3_managed: bool  # True when the stack runs moto itself
    bucket: str
    mlflow_uri: str
    artifacts_destination: str
    backend_store_uri: str
    token_path: str
    subnet: str | None = None
    namespaces: list[str] = field(default_factory=list)
    bridge: str | None = None  # set once this stack made its bridge: `down` removes only what `up` made
    temp_root: str = ""
    procs: list[Proc] = field(default_factory=list)
    health_check: dict[str, int] = field(default_factory=dict)
    cpus_per_node: int = 2
    object_store_mb: int = 512
    head_cpus: int | None = None  # None = cpus_per_node (single node) / 0 (multi-node): no workers on the head

    # ------------------------------------------------------------------ paths and state
    @staticmethod
    def state_dir(workdir: str | Path) -> Path:
        return Path(workdir).resolve() / STATE_DIRNAME

    @property
    def state_file(self) -> Path:
        return self.state_dir(self.workdir) / "state.json"

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, workdir: str | Path = ".") -> "Stack":
        path = cls.state_dir(workdir) / "state.json"
        if not path.is_file():
            raise StackError(f"no stack state at {path}: start one with `vitpipe stack up` (from {Path(workdir)})")
        data = json.loads(path.read_text())
        data["procs"] = [Proc(**p) for p in data.get("procs", [])]
        return cls(**data)

    # ------------------------------------------------------------------ up
    @classmethod
    def up(
        cls,
        workdir: str | Path = ".",
        *,
        nodes: int = 1,
        ports: dict[str, int] | None = None,
        subnet: str = "10.213.0.0/24",
        s3_endpoint: str | None = None,
        bucket: str = "vitpipe",
        backend_store_uri: str | None = None,
        cpus_per_node: int = 2,
        object_store_mb: int = 512,
        health_check: dict[str, int] | None = None,
        timeout_s: float = 90.0,
        head_cpus: int | None = None,
    ) -> "Stack":
        """Starts the stack and waits until every service is healthy. `ports` values of 0 mean "any free port"
        (single node only; in multi-node mode Ray listens inside its namespaces). `s3_endpoint` set = use that
        endpoint (credentials from the environment) instead of starting moto. `head_cpus` (default: 0 with several
        nodes, keeping training workers off the head as on real clusters; cpus_per_node on a single node). On
        failure everything started so far is stopped again."""
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        workdir = str(Path(workdir).resolve())
        sdir = cls.state_dir(workdir)
        if (sdir / "state.json").is_file():
            old = cls.load(workdir)
            if any(_alive(p) for p in old.procs):
                raise StackError(f"a stack started from {workdir} is still running: `vitpipe stack down` first")
            old.down()  # stale state from a crash: clear what is left
        p = {**DEFAULT_PORTS, **(ports or {})}
        multi = nodes > 1
        net = None
        if multi:
            netns.check_available()
            net = netns.Subnet(subnet)
            host = net.host_ip
            node_ips = [net.node_ip(i) for i in range(nodes)]
            for k in ("ray", "dashboard"):  # inside the head's own namespace the defaults are always free
                p[k] = p[k] or DEFAULT_PORTS[k]
        else:
            host = "127.0.0.1"
            node_ips = [host]
        ray_host = node_ips[0]
        # user-facing ports are checked before anything starts (a clear error beats a half-started stack); in
        # multi-node mode the bridge address exists only once the bridge does, so they are checked right after it
        names = ["s3", "mlflow"] if s3_endpoint is None else ["mlflow"]
        if not multi:
            _resolve_ports(p, host, names + ["ray", "dashboard"])
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "logs").mkdir(exist_ok=True)
        token_path = sdir / "ray_auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        stack = cls(
            workdir=workdir,
            nodes=nodes,
            host=host,
            node_ips=node_ips,
            ray_address=f"{ray_host}:{p['ray']}",
            dashboard_url=f"http://{ray_host}:{p['dashboard']}",
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
            health_check=health_check or {},
            cpus_per_node=cpus_per_node,
            object_store_mb=object_store_mb,
            head_cpus=(0 if multi else None) if head_cpus is None else head_cpus,
        )
        stack._save()
        try:
            if net is not None:
                reclaimed = netns.create_bridge(net)
                if reclaimed:
                    log.warning("removed %s: left by a multi-node stack on %s that no longer runs",
                                ", ".join(reclaimed), net.cidr)
                stack.bridge = net.bridge
                stack._save()
                _resolve_ports(p, host, names)
                for i in range(nodes):
                    netns.add_node(net, i)
                    stack.namespaces.append(net.namespace(i))
                    stack._save()
            deadline = time.monotonic() + timeout_s
            s3_url = stack.s3_endpoint = s3_endpoint or f"http://{host}:{p['s3']}"
            stack.mlflow_uri = f"http://{host}:{p['mlflow']}"
            stack._save()
            if stack.s3_managed:
                stack._spawn("s3", [str(_BIN / "python"), "-m", "moto.server", "-H", host, "-p", str(p["s3"])])
                _wait(lambda: _http_ok(s3_url + "/"), deadline, f"S3 endpoint {s3_url}", stack._log("s3"),
                      stack.procs)
            stack._ensure_bucket()
            stack._spawn("mlflow", stack._mlflow_cmd(p["mlflow"]), env=stack._mlflow_env())
            for i in range(nodes):
                stack._start_ray_node(i, p)
                if i == 0:
                    _wait(lambda: stack._ray_nodes() is not None, deadline, f"Ray head {stack.dashboard_url}",
                          stack._log("ray-0"), stack.procs)
            _wait(lambda: _http_ok(stack.mlflow_uri + "/health"), deadline, f"MLflow {stack.mlflow_uri}",
                  stack._log("mlflow"), stack.procs)
            _wait(lambda: len(stack.alive_nodes()) == nodes, deadline, f"{nodes} alive Ray node(s)",
                  stack._log(f"ray-{nodes - 1}"), stack.procs)
        except BaseException:
            stack.down()
            raise
        return stack

    def _log(self, name: str) -> Path:
        return self.state_dir(self.workdir) / "logs" / f"{name}.log"

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, ns: str | None = None) -> Proc:
        import psutil

        full = netns.exec_prefix(ns) + cmd
        logf = self._log(name)
        with open(logf, "ab") as out:
            popen = subprocess.Popen(
                full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )
        _CHILDREN[popen.pid] = popen
        proc = Proc(name, popen.pid, psutil.Process(popen.pid).create_time(), full, str(logf), ns)
        self.procs.append(proc)
        self._save()
        return proc

    def service_env(self) -> dict[str, str]:
        """Environment every process of the stack (and every job on it) should see. Includes the moto placeholder
        credentials when the stack runs moto; real credentials are inherited, never written here."""
        env = {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        env.setdefault("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        if self.s3_managed:
            env.update(MOTO_CREDENTIALS)
        return env

    def _mlflow_env(self) -> dict[str, str]:
        return {**self.service_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def _mlflow_cmd(self, port: int) -> list[str]:
        # MLflow 3 refuses the UI's own API calls from origins other than localhost: allow the address it serves on
        origins = f"http://{self.host}:{port},http://localhost:{port},http://127.0.0.1:{port}"
        return [
            str(_BIN / "mlflow"), "server", "--host", self.host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", self.backend_store_uri, "--artifacts-destination", self.artifacts_destination,
            "--cors-allowed-origins", origins,
        ]

    def _ensure_bucket(self) -> None:
        import boto3
        from botocore.exceptions import ClientError

        env = self.service_env()
        kwargs: dict[str, Any] = {"endpoint_url": self.s3_endpoint, "region_name": env["AWS_DEFAULT_REGION"]}
        if self.s3_managed:
            kwargs.update(aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        s3 = boto3.client("s3", **kwargs)
        try:
            s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            s3.create_bucket(Bucket=self.bucket)

    def _start_ray_node(self, i: int, ports: dict[str, int]) -> None:
        multi = self.nodes > 1
        ip = self.node_ips[i]
        env = self.service_env()
        # job entrypoints say `python ...`: on this stack that is the Python that runs Ray (this venv)
        env["PATH"] = f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        if multi:
            # gloo advertises the address the hostname resolves to (127.0.0.1 here, in every namespace), so ranks
            # on other nodes could not connect: bind it to the node's own interface
            env["GLOO_SOCKET_IFNAME"] = self._net().veth_node(i)
            # the caller may have started a loopback-only local Ray before (connect_ray sets this to 0 in its
            # environment, which nodes inherit): worker nodes would then refuse to join
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
            env.update(NODE_ENV)
            env["VITPIPE_NODE_OPS"] = os.environ.get("TORCH_EXTENSIONS_DIR", "")
            env["VITPIPE_NODE_SHARED"] = " ".join(_shared_paths())
            env["VITPIPE_NODE_TOKEN"] = Path(self.token_path).read_text().strip()
            temp = NODE_RAY_TEMP
        else:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps Ray on 127.0.0.1 (see ENVIRONMENT.md)
            # Ray's metrics ports are fixed by default; other Ray instances on this machine may hold them
            env["AUTOSCALER_METRIC_PORT"] = str(_free_port(ip))
            env["DASHBOARD_METRIC_PORT"] = str(_free_port(ip))
            temp = str(Path(self.temp_root) / f"n{i}")
            Path(temp).mkdir(parents=True, exist_ok=True)
        cpus = self.cpus_per_node if i or self.head_cpus is None else self.head_cpus
        cmd = [
            str(_BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", ip,
            "--num-cpus", str(int(cpus)), "--object-store-memory", str(self.object_store_mb * 2**20),
            "--temp-dir", temp, "--resources", json.dumps({f"vp_node_{i}": 1}),
        ]
        if i == 0:
            cmd += ["--head", "--port", str(ports["ray"]), "--dashboard-host", ip,
                    "--dashboard-port", str(ports["dashboard"]), "--include-dashboard", "true"]
            if self.health_check:
                cmd += ["--system-config", json.dumps(self.health_check)]
            if not multi:  # fixed defaults (10001, 52365) would collide with other Ray instances on this machine
                cmd += ["--ray-client-server-port", str(_free_port(ip)),
                        "--dashboard-agent-listen-port", str(_free_port(ip))]
        else:
            cmd += ["--address", self.ray_address]
        if multi:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _NODE_SETUP, "vitpipe-node", *cmd]
        self._spawn(f"ray-{i}", cmd, env=env, ns=self.namespaces[i] if multi else None)

    # ------------------------------------------------------------------ queries
    def _auth_headers(self) -> dict[str, str]:
        try:
            return {"Authorization": "Bearer " + Path(self.token_path).read_text().strip()}
        except OSError:
            return {}

    def _ray_nodes(self) -> list[dict] | None:
        """Nodes as the head's state API reports them, or None when the head does not answer."""
        try:
            req = urllib.request.Request(
                self.dashboard_url + "/api/v0/nodes?limit=1000&detail=false", headers=self._auth_headers()
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                body = json.loads(resp.read())
            return body["data"]["result"]["result"]
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            return None

    def alive_nodes(self) -> list[dict]:
        return [n for n in (self._ray_nodes() or []) if n.get("state") == "ALIVE"]

    def env(self) -> dict[str, str]:
        """Variables a client shell needs (`vitpipe stack env`): addresses and the token *path*, no secrets."""
        env = self.service_env()
        env.pop("MLFLOW_DISABLE_TELEMETRY")
        env.pop("RAY_USAGE_STATS_ENABLED")
        env["RAY_ADDRESS"] = self.ray_address
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        if not self.s3_managed:
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                env.pop(k, None)
        return env

    def status(self) -> dict[str, Any]:
        """Health of every part: processes alive, S3/MLflow answering, Ray nodes alive, node links up."""
        procs = {p.name: _alive(p) for p in self.procs}
        nodes = self._ray_nodes()
        out: dict[str, Any] = {
            "workdir": self.workdir,
            "nodes": self.nodes,
            "processes": procs,
            "s3": {"url": self.s3_endpoint, "healthy": _http_ok(self.s3_endpoint + "/")},
            "mlflow": {"url": self.mlflow_uri, "healthy": _http_ok(self.mlflow_uri + "/health")},
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
            _stop(proc)
            self.procs.remove(proc)
        self._start_ray_node(i, DEFAULT_PORTS)
        ip = self.node_ips[i]
        _wait(lambda: any(n["node_ip"] == ip for n in self.alive_nodes()), time.monotonic() + timeout_s,
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
        env.update({**NODE_ENV, "RAY_AUTH_TOKEN_PATH": NODE_TOKEN})
        # --wd: the node's working directory (resolved inside its mount namespace)
        prefix = ["nsenter", "--target", str(node.pid), "--mount", "--net", "--wd", "--"]
        return subprocess.run(prefix + cmd, env=env, **kwargs)

    # ------------------------------------------------------------------ down
    def down(self) -> list[str]:
        """Stops every process `up` started (Ray workers before the head), removes the namespaces, bridge and
        temporary dirs; keeps logs/. Returns what was stopped."""
        from concurrent.futures import ThreadPoolExecutor

        # worker nodes (together), then the head, then S3 and MLflow (together); a multi-node stack's namespaces are
        # swept below anyway, so its Ray nodes get a short grace
        grace = 5.0 if self.subnet else 20.0
        waves = [[p for p in self.procs if p.name.startswith("ray-") and p.name != "ray-0"],
                 [p for p in self.procs if p.name == "ray-0"],
                 [p for p in self.procs if not p.name.startswith("ray-")]]
        stopped = []
        with ThreadPoolExecutor(max_workers=4) as pool:
            for wave in waves:
                done = list(pool.map(lambda p: _stop(p, grace if p.name.startswith("ray-") else 20.0), wave))
                stopped += [p.name for p, ok in zip(wave, done) if ok]
        if self.subnet:
            net = netns.Subnet(self.subnet)
            for i in range(self.nodes):
                if net.namespace(i) not in self.namespaces:
                    continue  # never made by this stack (an `up` that failed early): not ours to touch
                for pid in netns.ns_pids(net.namespace(i)):  # anything still inside is ours
                    _kill_pid(pid)
                netns.remove_node(net, i)
            if self.bridge:
                netns.remove_bridge(net)
        if self.temp_root:  # single node (a multi-node stack's temp dirs vanish with its mount namespaces)
            _kill_matching(self.temp_root)
            shutil.rmtree(self.temp_root, ignore_errors=True)
        sdir = self.state_dir(self.workdir)
        for name in ("state.json", "ray_auth_token"):
            (sdir / name).unlink(missing_ok=True)
        if self.backend_store_uri == f"sqlite:///{sdir / 'mlflow.db'}":
            (sdir / "mlflow.db").unlink(missing_ok=True)
        return stopped


def _shared_paths() -> list[str]:
    """What an image would hold and every node sees: the venv (and the Python it was made from) and the
    project's code."""
    project = Path(__file__).resolve().parents[2]
    paths = {sys.prefix, os.path.realpath(sys.prefix), sys.base_prefix, str(project)}
    if any(" " in p for p in paths):
        raise StackError(f"a multi-node stack cannot share paths with spaces: {sorted(paths)}")
    return sorted(paths)


# ---------------------------------------------------------------------- process helpers
_CHILDREN: dict[int, subprocess.Popen] = {}  # Popen objects of this process, reaped on stop (no zombies)


def _alive(proc: Proc) -> bool:
    import psutil

    popen = _CHILDREN.get(proc.pid)
    if popen is not None and popen.poll() is not None:
        return False
    try:
        p = psutil.Process(proc.pid)
        return abs(p.create_time() - proc.create_time) < 0.5 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop(proc: Proc, grace_s: float = 20.0) -> bool:
    """SIGTERM the process (Ray's `--block` parent then stops its children), wait, then SIGKILL its group and
    any descendants. Only touches the process if it is still the one we started (pid + start time)."""
    import psutil

    if not _alive(proc):
        _reap(proc.pid)
        return False
    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        family = []
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(proc):
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    _reap(proc.pid)
    return True


def _reap(pid: int) -> None:
    popen = _CHILDREN.pop(pid, None)
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _kill_matching(marker: str) -> None:
    """Last sweep: processes whose command line names this stack's private temp dir (Ray workers that left
    their session) are ours."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in arg for arg in p.info["cmdline"] or []):
            _kill_pid(p.info["pid"])


# ---------------------------------------------------------------------- network helpers
def _resolve_ports(ports: dict[str, int], host: str, names: list[str]) -> None:
    for name in names:
        if ports[name] == 0:
            ports[name] = _free_port(host)
        elif not _port_free(host, ports[name]):
            raise StackError(
                f"port {host}:{ports[name]} ({name}) is already in use: stop what listens there or choose "
                f"another with --{name}-port (0 picks a free one)"
            )


def _port_free(host: str, port: int) -> bool:
    """Free for a server: like the servers we start, SO_REUSEADDR, so TIME_WAIT leftovers do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError):
        return False


def _wait(check, deadline: float, what: str, logfile: Path | None = None, procs: list[Proc] = ()) -> None:
    """Polls `check` until it holds; fails early (with the log's tail) when a process it depends on exits."""
    died = None
    while time.monotonic() < deadline:
        if check():
            return
        died = next((p for p in procs if not _alive(p)), None)
        if died is not None:
            break
        time.sleep(0.5)
    reason = f"{died.name} exited while waiting for {what}" if died else f"timed out waiting for {what}"
    tail = ""
    if logfile and logfile.is_file():
        tail = "\n  last log lines (" + str(logfile) + "):\n    " + "\n    ".join(
            logfile.read_text(errors="replace").splitlines()[-15:]
        )
    raise StackError(f"{reason}{tail}")
