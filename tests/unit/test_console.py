"""What a user following a job sees: Ray's known-harmless lines dropped (split across chunks or not), everything
else kept, and the progress line's fields."""

from __future__ import annotations

import io

from pipeline.tracking.console import FilteredStream, LineFilter, progress_line

PFX = "\x1b[36m(PlacementGroupCleaner pid=16045)\x1b[0m "
WPFX = "\x1b[36m(RayTrainWorker pid=16086)\x1b[0m "
LOG = (
    f"{PFX}Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing.\n"
    f"{WPFX}step 5/30 (16%)  loss 2.2300  1,334 img/s  data wait 26%  ETA 0:00:12\n"
    f"{WPFX}/x/torch/distributed/c10d_logger.py:83: FutureWarning: `all_gather_into_tensor` is deprecated.\n"
    f"{WPFX}  return func(*args, **kwargs)\n"
    f"{WPFX}Reporting training result 1: TrainingReport(checkpoint=None, metrics={{}}) from rank 0\n"
    f"{WPFX}WARNING pipeline.data.loader: shard s3://b/x-000003.tar: truncated; 12 samples skipped\n"
    "  an indented line that follows no warning stays\n"
    "Traceback (most recent call last):\n"
    "ValueError: a real error\n"
)


def _filtered(chunks: list[str]) -> str:
    out = io.StringIO()
    stream = FilteredStream(out)
    for c in chunks:
        stream.write(c)
    stream.close_line()
    return out.getvalue()


def test_noise_is_dropped_and_everything_else_kept_whatever_the_chunking():
    want = [line for line in LOG.splitlines() if any(s in line for s in (
        "step 5/30", "truncated; 12 samples", "indented line", "Traceback", "a real error"))]
    assert len(want) == 5
    whole = _filtered([LOG])
    assert whole.splitlines() == want
    assert _filtered([LOG[i:i + 7] for i in range(0, len(LOG), 7)]) == whole  # lines split across chunks
    assert _filtered([LOG.rstrip("\n")]) == whole.rstrip("\n")  # an unterminated last line is still written


def test_the_filter_counts_what_it_dropped():
    f = LineFilter()
    kept = [line for line in LOG.splitlines() if f.keep(line)]
    assert len(kept) == 5 and f.dropped == 4


def test_progress_line():
    m = {"train/loss": 2.345678, "perf/images_per_s": 1234.5, "perf/data_wait_fraction": 0.031, "train/lr": 1e-3}
    assert progress_line(40, 100, m, elapsed_s=20.0, start_step=0) == (
        "step 40/100 (40%)  loss 2.3457  1,234 img/s  data wait 3%  ETA 0:00:30")
    # resumed at step 60: the rate is measured over the steps this process ran
    assert progress_line(80, 100, m, elapsed_s=4000.0, start_step=60).endswith("ETA 1:06:40")
    assert progress_line(100, 100, {"train/loss": 1.0}, 9.0) == "step 100/100 (100%)  loss 1.0000"
