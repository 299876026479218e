"""What a development cluster is, as written to `WORKDIR/.vitpipe-stack/state.json`: its addresses, the processes
it started, the namespaces and bridge it made, and the environment that points a client at it. Any shell can
load it (`Stack.load`) to query, cut or stop a stack that another one started."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

from pipeline.devstack.errors import StackError
from pipeline.devstack.processes import Proc, write_state
from pipeline.devstack.services import service_env

__all__ = ["StackState", "STATE_DIRNAME"]

STATE_DIRNAME = ".vitpipe-stack"


@dataclass
class StackState:
    """One stack's record; `Stack` adds what starts, queries and stops it."""

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

    @staticmethod
    def state_dir(workdir: str | Path) -> Path:
        return Path(workdir).resolve() / STATE_DIRNAME

    @property
    def state_file(self) -> Path:
        return self.state_dir(self.workdir) / "state.json"

    def _save(self) -> None:
        write_state(self.state_file, asdict(self))

    @classmethod
    def load(cls, workdir: str | Path = ".") -> Self:
        path = cls.state_dir(workdir) / "state.json"
        if not path.is_file():
            raise StackError(f"no stack state at {path}: start one with `vitpipe stack up` (from {Path(workdir)})")
        data = json.loads(path.read_text())
        data["procs"] = [Proc(**p) for p in data.get("procs", [])]
        return cls(**data)

    def _log(self, name: str) -> Path:
        return self.state_dir(self.workdir) / "logs" / f"{name}.log"

    def service_env(self) -> dict[str, str]:
        """Environment every process of the stack (and every job on it) should see. Includes the moto placeholder
        credentials when the stack runs moto; real credentials are inherited, never written here."""
        return service_env(s3_endpoint=self.s3_endpoint, mlflow_uri=self.mlflow_uri, token_path=self.token_path,
                           s3_managed=self.s3_managed)

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
