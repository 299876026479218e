"""The development cluster: a Ray cluster, an S3-compatible endpoint and an MLflow tracking server started by one
call, for `vitpipe stack ...` and the tests. A dev tool beside `pipeline.launch`, not part of it: nothing here
imports the training or launch code.

Single node (default): every service binds 127.0.0.1 and Ray is forced onto loopback. With `nodes=N > 1` the
nodes share nothing a real cluster's machines would not: each Ray node runs in its own network namespace on a
private /24 (`netns.py`) and its own mount namespace with a private tmpfs `/tmp` and `/dev/shm`, where its HOME,
Ray temp dir, working dir and caches live (`nodes.py`). What nodes share is what a container image would: the
installed venv and the project's code. S3 and MLflow (`services.py`) listen on the bridge address so every node
reaches them; `cut_node(i)` really severs node i's link. The head takes no training workers by default
(`head_cpus=0`), as on real clusters.

    stack = Stack.up(workdir, nodes=2)      # -> Stack (its fields are the state written to .vitpipe-stack/)
    stack.env()                             # RAY_ADDRESS, AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI, ...
    stack.cut_node(1); stack.restore_node(1)
    stack.down()                            # stops only what `up` started, removes namespaces

Ray nodes are `ray start --block` processes (never `ray stop`, which would kill every Ray on the machine); each
service is started in its own session so `down` can stop its whole process group (`processes.py`). Ray token auth
is on, with a per-stack token file (never printed).
"""

from __future__ import annotations

from pipeline.devstack.errors import NetnsError, StackError
from pipeline.devstack.services import MOTO_CREDENTIALS
from pipeline.devstack.stack import DEFAULT_PORTS, STATE_DIRNAME, Stack

__all__ = ["Stack", "StackError", "NetnsError", "STATE_DIRNAME", "DEFAULT_PORTS", "MOTO_CREDENTIALS"]
