"""The errors a user meets, in one leaf module that imports nothing of the project.

Every layer raises these and the command line maps them to exit codes in one place (`pipeline.commands.run`):
a `ConfigError` (and any other `ValueError` raised before work starts) is bad input, exit 2; `RunStopped` is a run
stopped on request with its checkpoint committed, exit 143.
"""

from __future__ import annotations

__all__ = ["ConfigError", "RegistryError", "DamagedCheckpointError", "RunStopped"]


class ConfigError(ValueError):
    """A configuration that cannot work; the message says where and what to do."""


class RegistryError(ValueError):
    """A registry reference or entry that cannot be used; the message lists what exists."""


class DamagedCheckpointError(ValueError):
    """No committed checkpoint of a run is intact in storage."""


class RunStopped(Exception):
    """Training stopped on request (SIGTERM, `vitpipe jobs stop`) after every rank committed a checkpoint at
    `step`; `--resume` continues from it. A run ended by this is KILLED; commands exit with `exit_code`."""

    exit_code = 143  # 128 + SIGTERM

    def __init__(self, name: str, step: int, checkpoint: str | None, reason: str = "stop requested"):
        self.name, self.step, self.checkpoint, self.reason = name, step, checkpoint, reason
        super().__init__(
            f"run {name!r} stopped ({reason}) at step {step}; checkpoint {checkpoint} is committed: continue with "
            "--resume"
        )
