"""Ports for the stack's servers on this machine, and the HTTP probe that says a server answers."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from pipeline.devstack.errors import StackError

__all__ = ["resolve_ports", "port_free", "free_port", "http_ok"]


def resolve_ports(ports: dict[str, int], host: str, names: list[str]) -> None:
    """Fills in `ports[name] == 0` with a free port and refuses a fixed one that is taken, in place."""
    for name in names:
        if ports[name] == 0:
            ports[name] = free_port(host)
        elif not port_free(host, ports[name]):
            raise StackError(
                f"port {host}:{ports[name]} ({name}) is already in use: stop what listens there or choose "
                f"another with --{name}-port (0 picks a free one)"
            )


def port_free(host: str, port: int) -> bool:
    """Free for a server: like the servers we start, SO_REUSEADDR, so TIME_WAIT leftovers do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError):
        return False
