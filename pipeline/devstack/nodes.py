"""The stack's Ray nodes: the `ray start --block` command of the head or a worker, what each node's environment
holds, and the head's view of which nodes are alive.

On a multi-node stack each node runs in its own network namespace (`netns.py`) and its own mount namespace with a
private tmpfs `/tmp` and `/dev/shm`, where its HOME, Ray temp dir, working dir and caches live. What nodes share
is what a container image would: the installed venv and the project's code (DeepSpeed's compiled ops are copied
into each node's cache at start, as an image would ship them).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.devstack import netns
from pipeline.devstack.errors import StackError
from pipeline.devstack.ports import free_port
from pipeline.devstack.processes import BIN, kill_pid

__all__ = ["NODE_WORKDIR", "NODE_RAY_TEMP", "NODE_TOKEN", "NODE_ENV", "shared_paths", "node_env",
           "ray_start_command", "ray_nodes", "enter_node", "remove_namespaces"]

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


def shared_paths() -> list[str]:
    """What an image would hold and every node sees: the venv (and the Python it was made from) and the
    project's code."""
    project = Path(__file__).resolve().parents[2]
    paths = {sys.prefix, os.path.realpath(sys.prefix), sys.base_prefix, str(project)}
    if any(" " in p for p in paths):
        raise StackError(f"a multi-node stack cannot share paths with spaces: {sorted(paths)}")
    return sorted(paths)


def node_env(i: int, ip: str, service_env: dict[str, str], *, subnet: netns.Subnet | None, token_path: str,
             temp_root: str) -> tuple[dict[str, str], str]:
    """Node i's environment (the stack's `service_env` and what Ray on that node needs) and its Ray temp dir.
    `subnet` set = a multi-node stack's node, in its own namespaces; None = the single node on loopback."""
    env = dict(service_env)
    # job entrypoints say `python ...`: on this stack that is the Python that runs Ray (this venv)
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if subnet is not None:
        # gloo advertises the address the hostname resolves to (127.0.0.1 here, in every namespace), so ranks
        # on other nodes could not connect: bind it to the node's own interface
        env["GLOO_SOCKET_IFNAME"] = subnet.veth_node(i)
        # the caller may have started a loopback-only local Ray before (connect_ray sets this to 0 in its
        # environment, which nodes inherit): worker nodes would then refuse to join
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        env.update(NODE_ENV)
        env["VITPIPE_NODE_OPS"] = os.environ.get("TORCH_EXTENSIONS_DIR", "")
        env["VITPIPE_NODE_SHARED"] = " ".join(shared_paths())
        env["VITPIPE_NODE_TOKEN"] = Path(token_path).read_text().strip()
        return env, NODE_RAY_TEMP
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps Ray on 127.0.0.1 (see ENVIRONMENT.md)
    # Ray's metrics ports are fixed by default; other Ray instances on this machine may hold them
    env["AUTOSCALER_METRIC_PORT"] = str(free_port(ip))
    env["DASHBOARD_METRIC_PORT"] = str(free_port(ip))
    temp = str(Path(temp_root) / f"n{i}")
    Path(temp).mkdir(parents=True, exist_ok=True)
    return env, temp


def ray_start_command(i: int, ip: str, *, cpus: int, object_store_mb: int, temp: str, ports: dict[str, int],
                      health_check: dict[str, int], head_address: str, multi: bool) -> list[str]:
    """`ray start --block` for node i (0 = the head, which listens on `ports`; others join `head_address`);
    on a multi-node stack wrapped so that it runs in a new mount namespace set up by `_NODE_SETUP`."""
    cmd = [
        str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", ip,
        "--num-cpus", str(int(cpus)), "--object-store-memory", str(object_store_mb * 2**20),
        "--temp-dir", temp, "--resources", json.dumps({f"vp_node_{i}": 1}),
    ]
    if i == 0:
        cmd += ["--head", "--port", str(ports["ray"]), "--dashboard-host", ip,
                "--dashboard-port", str(ports["dashboard"]), "--include-dashboard", "true"]
        if health_check:
            cmd += ["--system-config", json.dumps(health_check)]
        if not multi:  # fixed defaults (10001, 52365) would collide with other Ray instances on this machine
            cmd += ["--ray-client-server-port", str(free_port(ip)),
                    "--dashboard-agent-listen-port", str(free_port(ip))]
    else:
        cmd += ["--address", head_address]
    if multi:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _NODE_SETUP, "vitpipe-node", *cmd]
    return cmd


def ray_nodes(dashboard_url: str, token_path: str) -> list[dict] | None:
    """Nodes as the head's state API reports them, or None when the head does not answer."""
    try:
        req = urllib.request.Request(
            dashboard_url + "/api/v0/nodes?limit=1000&detail=false", headers=_auth_headers(token_path)
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = json.loads(resp.read())
        return body["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None


def _auth_headers(token_path: str) -> dict[str, str]:
    try:
        return {"Authorization": "Bearer " + Path(token_path).read_text().strip()}
    except OSError:
        return {}


def enter_node(pid: int) -> list[str]:
    """Command prefix that runs a program in the network and mount namespaces of node process `pid`, in the node's
    working directory (--wd: resolved inside its mount namespace)."""
    return ["nsenter", "--target", str(pid), "--mount", "--net", "--wd", "--"]


def remove_namespaces(subnet: netns.Subnet, nodes: int, made: list[str]) -> None:
    """Kills what still runs inside the node namespaces in `made` (anything there is the stack's) and removes
    them; a namespace this stack never made (an `up` that failed early) is not touched."""
    for i in range(nodes):
        if subnet.namespace(i) not in made:
            continue
        for pid in netns.ns_pids(subnet.namespace(i)):
            kill_pid(pid)
        netns.remove_node(subnet, i)
