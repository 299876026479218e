"""What goes wrong with the development cluster: situations `vitpipe stack` explains (exit 2), not tracebacks."""

from __future__ import annotations

__all__ = ["StackError", "NetnsError"]


class StackError(RuntimeError):
    """The stack cannot start or be found; the message says what and what to do."""


class NetnsError(RuntimeError):
    """A namespace/link operation failed; the message carries the `ip` command and its error."""
