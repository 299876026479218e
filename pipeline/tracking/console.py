"""What a user following a job sees: the job's own lines (its run link, progress, result), warnings and errors,
without the routine lines Ray and the libraries print on every job. Filtering happens only where lines reach the
user's terminal (the `vitpipe` process's stdout/stderr and its own Ray logger, and `vitpipe submit --follow`'s copy
of the job log); Ray's own log files (job-driver-*.log, worker-*.out/.err, logs/train/) keep every line."""

from __future__ import annotations

import io
import logging
import re
import sys
from contextlib import contextmanager
from typing import Iterator, TextIO

__all__ = ["NOISE", "NOISE_TRACEBACKS", "LineFilter", "FilteredStream", "NoiseLogFilter", "quiet_console",
           "quiet_ray_logger", "progress_line", "say"]

# Lines Ray and its dependencies print on every job that say nothing to its user. Matched anywhere in a line, so
# Ray's "(RayTrainWorker pid=...)" prefixes do not matter.
NOISE = tuple(re.compile(p) for p in (
    r"Failed to query Ray Train Controller actor state",  # the placement-group cleaner polling the State API
    r"State API may be temporarily unavailable",
    r"Reporting training result \d+: TrainingReport\(",  # Ray Train v2 echoes every ray.train.report at INFO
    r"has constructor arguments in the object store and max_restarts > 0",  # Ray Train's own PreemptionWatcher
    r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully",  # each rank's op (cache hit or not)
    r"Did not detect any changes in the cluster resources",  # an elastic group's every resize consideration
    r"\b(Future|Deprecation|RayDeprecation|PendingDeprecation)Warning: ",  # the line that warnings printed
    # Ray's job manager and the job's connection to its cluster (`vitpipe submit` printed what it submitted)
    r"Runtime env is setting up\.",
    r"Running entrypoint for job \S+: ",
    r"Connecting to existing Ray cluster at address: ",
    r"Connected to Ray cluster\. View the dashboard at ",
    r"Directory '[^']+' is now ignored by default when packaging the working directory",  # we exclude it anyway
    # Ray Train forming the worker group ("Started training worker group" and its ranks' addresses stay)
    r"Requesting resources: \{",
    r"Attempting to start training worker group of size \d+",
    r"Setting up process group for: ",
    # botocore's credential and endpoint lookup, in the driver and in every worker
    r"Found credentials (in|from|using) ",
    r"Found endpoint for \w+ via: ",
    # CPU workers: DeepSpeed's and torch's accelerator probes, gloo's reverse lookup of a loopback peer
    r"Setting accelerator to CPU\. If you have GPU",
    r"No CUDA runtime is found, using CUDA_HOME=",
    r"\[c10d\] The hostname of the client socket cannot be retrieved",
    # MLflow: its INFO lines (its own format), the run links end_run echoes (the job printed its run link),
    # and the artifact progress bars (tqdm in a log file: one line per update)
    r"\bINFO mlflow[\w.]*: ",
    r"View (run \S+|experiment) at: http",
    r"(Downloading|Uploading) artifacts: ",
))
# Tracebacks of Ray's own threads that say nothing to the user: the line that opens one; its frames and the exception
# line that ends it (lines behind the same "(Actor pid=N)" prefix) go with it.
NOISE_TRACEBACKS = tuple(re.compile(p) for p in (
    # the placement-group cleaner's monitor, when it cannot tell which Ray's State API to ask (a machine running
    # more than one Ray, e.g. a shared development box): the same cleaner as the "Failed to query" lines above
    r"Exception in thread PlacementGroupCleanerMonitor:",
))
# warnings.warn prints the warning line, then the offending source line indented: drop that one with it
_SOURCE_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?(\([^)]*\)\s*(\x1b\[[0-9;]*m)?)?\s{2,}\S")


class LineFilter:
    """Stateful per-stream filter: `keep(line)` says whether a complete line is shown."""

    def __init__(self, noise: tuple[re.Pattern, ...] = NOISE,
                 tracebacks: tuple[re.Pattern, ...] = NOISE_TRACEBACKS):
        self.noise, self.tracebacks = noise, tracebacks
        self.dropped = 0
        self._after_warning = False
        self._traceback: str | None = None  # the prefix of the noise traceback being dropped

    def keep(self, line: str) -> bool:
        if self._traceback is not None and line.startswith(self._traceback):
            body = line[len(self._traceback):]
            if not body.startswith((" ", "\t", "Traceback")):
                self._traceback = None  # the exception line: the traceback's last
            self.dropped += 1
            return False
        for p in self.tracebacks:
            m = p.search(line)
            if m:
                self._traceback = line[:m.start()]
                self.dropped += 1
                return False
        if self._after_warning and _SOURCE_LINE.match(line):
            self._after_warning = False
            self.dropped += 1
            return False
        self._after_warning = False
        if any(p.search(line) for p in self.noise):
            self._after_warning = "Warning: " in line
            self.dropped += 1
            return False
        return True


class FilteredStream(io.TextIOBase):
    """A text stream that forwards complete lines to `target` unless the filter drops them. Blank lines wait for the
    next line and go with it: a progress bar in a log file starts with one (its carriage return), and is dropped."""

    def __init__(self, target: TextIO, line_filter: LineFilter | None = None):
        self.target, self.filter = target, line_filter or LineFilter()
        self._partial = ""
        self._blank = 0

    def write(self, text: str) -> int:
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line, "\n")
        return len(text)

    def _line(self, line: str, end: str) -> None:
        if not line.strip():
            self.filter.keep(line)  # a blank line ends a warning: an indented line after it is not its source line
            self._blank += 1
            return
        blank, self._blank = self._blank, 0
        if self.filter.keep(line):
            self.target.write("\n" * blank + line + end)

    def flush(self) -> None:
        self.target.flush()

    def close_line(self) -> None:
        """Writes a pending unterminated line (end of stream); blank lines at the end are dropped."""
        if self._partial:
            self._line(self._partial, "")
        self._partial, self._blank = "", 0
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


@contextmanager
def quiet_console() -> Iterator[None]:
    """For the duration, this process's sys.stdout and sys.stderr drop NOISE lines (what Ray forwards from its
    workers and actors is printed through them)."""
    saved = sys.stdout, sys.stderr
    out, err = FilteredStream(saved[0]), FilteredStream(saved[1])
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        yield
    finally:
        out.close_line()
        err.close_line()
        sys.stdout, sys.stderr = saved


class NoiseLogFilter(logging.Filter):
    """Drops log records whose message matches NOISE (for a handler that writes to the user's terminal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in NOISE)


def quiet_ray_logger() -> None:
    """In a process that submits or follows jobs: the "ray" logger's routine INFO lines (packaging the working dir,
    uploading it, the log stream's websocket closing) and its NOISE warnings stay out of the terminal; its other
    warnings and errors show. Call it after ray is imported: the import sets that logger's level and handler."""
    logger = logging.getLogger("ray")
    logger.setLevel(logging.WARNING)
    for name, child in list(logging.root.manager.loggerDict.items()):
        # some of Ray's modules set their own logger to INFO (the job SDK's): those too
        if (name.startswith("ray.") and isinstance(child, logging.Logger)
                and logging.NOTSET < child.level < logging.WARNING):
            child.setLevel(logging.WARNING)
    for handler in logger.handlers:
        if not any(isinstance(f, NoiseLogFilter) for f in handler.filters):
            handler.addFilter(NoiseLogFilter())


def say(line: str) -> None:
    """One line on this process's stdout, once. Not `print`: in Ray Train workers `print` is patched to also log
    through the root logger, so a printed line reaches the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_line(step: int, steps: int, metrics: dict[str, float], elapsed_s: float, start_step: int = 0) -> str:
    """`step 40/100 (40%)  loss 2.3012  1,234 img/s  data wait 3%  ETA 0:01:23`: one line per logging interval.
    The ETA extrapolates the time per step measured since this process started training at `start_step`."""
    parts = [f"step {step}/{steps} ({100 * step // max(steps, 1)}%)"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if "perf/images_per_s" in metrics:
        parts.append(f"{metrics['perf/images_per_s']:,.0f} img/s")
    if "perf/data_wait_fraction" in metrics:
        parts.append(f"data wait {100 * metrics['perf/data_wait_fraction']:.0f}%")
    done = step - start_step
    if done > 0 and step < steps:
        left = int(elapsed_s / done * (steps - step))
        parts.append(f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
    return "  ".join(parts)
