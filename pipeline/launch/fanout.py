"""Ray, reached from one place: `connect_ray` (the cluster at $RAY_ADDRESS, or a local one bound to 127.0.0.1).
ray is imported inside the functions (`vitpipe --help` stays fast)."""

from __future__ import annotations

import os

__all__ = ["connect_ray"]


def connect_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Connects to `address` / $RAY_ADDRESS, or starts a local single-node Ray bound to 127.0.0.1; a Ray already
    initialised in this process is used as it is. `log_to_driver`: the workers' output is printed here too."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray picks the eth0 address for its services and MASTER_ADDR unless told it runs a local-only node; its
        # child processes read the variable at start, this process's Ray read it at import (maybe already done).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)
