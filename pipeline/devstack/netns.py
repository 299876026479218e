"""Network namespaces for the multi-node development cluster: one namespace per emulated node, joined by a bridge.

Each node gets a veth pair: one end inside its namespace with the node's address, the other end on a bridge in
the root namespace that holds the subnet's first address (where S3 and MLflow listen). No default route is added
inside a namespace, so a node can only talk to the private subnet. Cutting a node = taking its bridge-side veth
down; traffic between nodes really crosses these interfaces. Needs root and iproute2 (`ip`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

from pipeline.devstack.errors import NetnsError

__all__ = ["NetnsError", "Subnet", "check_available", "create_bridge", "add_node", "set_link", "link_is_up",
           "ns_pids", "leftovers", "remove_node", "remove_bridge", "exec_prefix", "list_namespaces"]


@dataclass(frozen=True)
class Subnet:
    """Names and addresses of one stack's private network (a /24). `index` keeps concurrent stacks apart."""

    cidr: str = "10.213.0.0/24"

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cidr, strict=True)
        if net.prefixlen != 24 or not net.is_private:
            raise ValueError(f"subnet {self.cidr!r}: use a private /24 such as 10.213.0.0/24")

    @property
    def _net(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.cidr)  # type: ignore[return-value]

    @property
    def tag(self) -> str:
        # third octet: short, unique per /24 within 10.213.x.0, keeps interface names under 15 characters
        return str(self._net.network_address).split(".")[2]

    @property
    def bridge(self) -> str:
        return f"vpbr{self.tag}"

    @property
    def host_ip(self) -> str:
        return str(self._net.network_address + 1)

    def node_ip(self, i: int) -> str:
        return str(self._net.network_address + 10 + i)

    def namespace(self, i: int) -> str:
        return f"vp{self.tag}n{i}"

    def veth_host(self, i: int) -> str:
        return f"vp{self.tag}h{i}"

    def veth_node(self, i: int) -> str:
        return f"vp{self.tag}e{i}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def check_available() -> None:
    """Raises a clear error when namespaces cannot be made here (not root, no iproute2)."""
    if shutil.which("ip") is None:
        raise NetnsError("multi-node stack needs iproute2 (`ip`): apt-get install iproute2")
    if os.geteuid() != 0:
        raise NetnsError("multi-node stack creates network namespaces and needs root; use --nodes 1 otherwise")


def list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


def leftovers(subnet: Subnet) -> list[str]:
    """Namespaces of `subnet` that exist now (`vp<tag>n<i>`), e.g. left by a stack whose processes were killed."""
    prefix = subnet.namespace(0)[:-1]
    return sorted(ns for ns in list_namespaces() if ns.startswith(prefix) and ns[len(prefix):].isdigit())


def create_bridge(subnet: Subnet) -> list[str]:
    """The subnet's bridge, holding its first address. A bridge left by a stack that no longer runs (its session
    was killed: the kernel keeps links and namespaces after their processes are gone) is reclaimed first; one
    whose namespaces still hold processes belongs to a running stack and is refused. Returns what was reclaimed."""
    spaces = leftovers(subnet)
    busy = [ns for ns in spaces if ns_pids(ns)]
    bridge = _link_exists(subnet.bridge)
    if busy or bridge and not spaces and _bridge_ports(subnet.bridge):
        raise NetnsError(
            f"{subnet.cidr} is in use by another multi-node stack (bridge {subnet.bridge}"
            f"{'; processes run in ' + ', '.join(busy) if busy else ''}): stop it with `vitpipe stack down`, or pick "
            "another subnet with --subnet 10.213.N.0/24"
        )
    for ns in spaces:
        remove_node(subnet, int(ns[len(subnet.namespace(0)) - 1:]))
    if bridge:
        remove_bridge(subnet)
    reclaimed = spaces + ([subnet.bridge] if bridge else [])
    _ip("link", "add", subnet.bridge, "type", "bridge")
    _ip("addr", "add", f"{subnet.host_ip}/24", "dev", subnet.bridge)
    _ip("link", "set", subnet.bridge, "up")
    return reclaimed


def _bridge_ports(bridge: str) -> list[str]:
    """Interfaces attached to `bridge` (a bridge with ports but none of our namespaces is not ours to remove)."""
    out = _ip("-o", "link", "show", "master", bridge, check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def add_node(subnet: Subnet, i: int) -> None:
    """Namespace `i` with a veth to the bridge and address node_ip(i); loopback up inside."""
    ns, host, node = subnet.namespace(i), subnet.veth_host(i), subnet.veth_node(i)
    if ns in list_namespaces():
        raise NetnsError(f"network namespace {ns} already exists (left from an earlier stack? `ip netns del {ns}`)")
    _ip("netns", "add", ns)
    _ip("link", "add", host, "type", "veth", "peer", "name", node)
    _ip("link", "set", node, "netns", ns)
    _ip("link", "set", host, "master", subnet.bridge)
    _ip("link", "set", host, "up")
    _ip("-n", ns, "addr", "add", f"{subnet.node_ip(i)}/24", "dev", node)
    _ip("-n", ns, "link", "set", node, "up")
    _ip("-n", ns, "link", "set", "lo", "up")


def set_link(subnet: Subnet, i: int, up: bool) -> None:
    """Cuts (up=False) or restores node i's link to the bridge."""
    _ip("link", "set", subnet.veth_host(i), "up" if up else "down")


def link_is_up(subnet: Subnet, i: int) -> bool:
    out = _ip("-o", "link", "show", "dev", subnet.veth_host(i), check=False).stdout
    if "<" not in out:
        return False
    flags = out.split("<", 1)[1].split(">", 1)[0].split(",")
    return "UP" in flags  # administratively up (what cut/restore toggles)


def ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def remove_node(subnet: Subnet, i: int) -> None:
    """Deletes node i's veth and namespace (processes inside must be stopped first). Missing parts are fine."""
    if _link_exists(subnet.veth_host(i)):
        _ip("link", "del", subnet.veth_host(i), check=False)
    if subnet.namespace(i) in list_namespaces():
        _ip("netns", "del", subnet.namespace(i), check=False)


def remove_bridge(subnet: Subnet) -> None:
    if _link_exists(subnet.bridge):
        _ip("link", "del", subnet.bridge, check=False)


def exec_prefix(ns: str | None) -> list[str]:
    """Command prefix that runs a program inside namespace `ns` (nothing for the root namespace)."""
    return ["ip", "netns", "exec", ns] if ns else []
