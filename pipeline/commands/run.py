"""How a command ends: the one mapping from what a command raised to its exit code and its one line on stderr, shared
by `vitpipe` (pipeline.cli.main) and the Ray job entrypoints (jobs/*.py), so both report bad input alike.

    0    done (BrokenPipeError too: `vitpipe model list | head`, the reader went away)
    2    bad input, said in one line: ConfigError and any other ValueError / FileNotFoundError; an unreachable or
         refusing tracking server, object store (mlflow / botocore errors, with a hint) or Ray cluster
         (`reported_cluster_errors`). With -v the traceback instead (a ConfigError still as its one line).
    130  Ctrl-C
    143  RunStopped (SIGTERM, `vitpipe jobs stop`): every rank committed a checkpoint; --resume continues it
    1    anything else: Python's traceback
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from pipeline.errors import ConfigError, RunStopped

__all__ = ["run_command", "reported_cluster_errors", "configure_logging", "SERVICE_HINTS"]

# matched by the exception's top-level module: neither mlflow nor botocore is imported here
SERVICE_HINTS = {
    "mlflow": "check the tracking URI: tracking.tracking_uri, --tracking-uri or $MLFLOW_TRACKING_URI",
    "botocore": "check storage.endpoint_url / $AWS_ENDPOINT_URL and the credentials",
}


def run_command(func: Callable[[Any], int | None], args: Any, prog: str) -> int:
    """Calls `func(args)` and returns its exit code (None counts as 0), or the code of what it raised (see the module
    docstring), having printed that as one line `PROG: message` on stderr. `args`: what `func` takes, usually the
    parsed argparse.Namespace; its `verbose` asks for tracebacks."""
    verbose = bool(getattr(args, "verbose", False))
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # a ConfigError is a ValueError that names where and what to do
        if verbose and not isinstance(e, ConfigError):
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RunStopped as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        sys.stdout = None  # nothing more to flush into the closed pipe at exit
        return 0
    except Exception as e:
        hint = SERVICE_HINTS.get(type(e).__module__.split(".")[0])
        if verbose or hint is None:
            raise
        print(f"{prog}: {type(e).__name__}: {e} ({hint})", file=sys.stderr)
        return 2


def reported_cluster_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wraps a cluster command: an unreachable or refusing cluster (ConnectionError, RuntimeError, Ray's
    AuthenticationError) is explained in one line `args.prog: Type: message` (exit 2), not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except Exception as e:  # noqa: BLE001 - ray's AuthenticationError is imported lazily, matched by name
            if getattr(args, "verbose", False) or not (
                isinstance(e, (ConnectionError, RuntimeError)) or type(e).__name__ == "AuthenticationError"
            ):
                raise
            print(f"{args.prog}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2

    return run


def configure_logging(verbose: bool = False) -> None:
    """Log records to stderr, DEBUG with -v, else INFO."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
