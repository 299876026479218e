"""What a user following a job sees: the job's own progress lines, warnings and errors, without Ray's known-harmless
noise. Filtering happens only where lines reach the user's terminal (the `vitpipe` process's stdout/stderr, and
`vitpipe submit --follow`'s copy of the job log); Ray's own log files (job-driver-*.log, worker-*.out/.err,
logs/train/) keep every line."""

from __future__ import annotations

import io
import re
import sys
from contextlib import contextmanager
from typing import Iterator, TextIO

__all__ = ["NOISE", "LineFilter", "FilteredStream", "quiet_console", "progress_line", "say"]

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
))
# warnings.warn prints the warning line, then the offending source line indented: drop that one with it
_SOURCE_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?(\([^)]*\)\s*(\x1b\[[0-9;]*m)?)?\s{2,}\S")


class LineFilter:
    """Stateful per-stream filter: `keep(line)` says whether a complete line is shown."""

    def __init__(self, noise: tuple[re.Pattern, ...] = NOISE):
        self.noise = noise
        self.dropped = 0
        self._after_warning = False

    def keep(self, line: str) -> bool:
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
    """A text stream that forwards complete lines to `target` unless the filter drops them."""

    def __init__(self, target: TextIO, line_filter: LineFilter | None = None):
        self.target, self.filter = target, line_filter or LineFilter()
        self._partial = ""

    def write(self, text: str) -> int:
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if self.filter.keep(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_line(self) -> None:
        """Writes a pending unterminated line (end of stream)."""
        if self._partial and self.filter.keep(self._partial):
            self.target.write(self._partial)
        self._partial = ""
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
