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


# what a followed smoke job printed before its first progress line (Ray 2.60, DeepSpeed on CPU, botocore, MLflow)
CPFX = "\x1b[36m(TrainController pid=22834)\x1b[0m "
CLEANER = "\x1b[36m(PlacementGroupCleaner pid=13374)\x1b[0m "
ROUTINE = (
    "2026-12-07 22:51:35,124\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
    "Running entrypoint for job raysubmit_J5Vja: python -m jobs.pretrain configs/pretrain/smoke.yaml\n"
    "2026-12-07 22:51:39,839 INFO aiobotocore.credentials: Found credentials in environment variables.\n"
    "2026-12-07 22:51:40,086 INFO botocore.configprovider: Found endpoint for s3 via: environment_global.\n"
    "2026-12-07 22:51:40,519\tINFO worker.py:1841 -- Connecting to existing Ray cluster at address: 127.0.0.1:6379\n"
    "2026-12-07 22:51:40,543\tINFO worker.py:2029 -- Connected to Ray cluster. View the dashboard at http://x:8265\n"
    "2026-12-07 22:51:42,556 INFO pipeline.tracking.run: MLflow run 1f13 (experiment vit-ui): http://x/#/runs/1f13\n"
    f"{CPFX}Requesting resources: {{'CPU': 1.0}} * 2\n"
    f"{CPFX}Attempting to start training worker group of size 2 with the following resources: [{{'CPU': 1.0}}] * 2\n"
    f"{WPFX}Setting up process group for: env:// [rank=0, world_size=2]\n"
    f"{WPFX}Found credentials in environment variables.\n"
    f"{CPFX}Started training worker group of size 2: \n"
    f"{CPFX}- (ip=127.0.0.1, pid=23133) world_rank=0, local_rank=0, node_rank=0\n"
    f"{WPFX}[2026-12-07 22:52:12,059] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
    "If you have GPU or other accelerator, we were unable to detect it.\n"
    f"{WPFX}[rank0]:W1207 22:52:16.220000 23133 torch/utils/cpp_extension.py:183] No CUDA runtime is found, using "
    "CUDA_HOME='/usr/local'\n"
    f"{WPFX}[W1207 22:52:16.3 socket.cpp:752] [c10d] The hostname of the client socket cannot be retrieved. err=-3\n"
    f"{CLEANER}Exception in thread PlacementGroupCleanerMonitor:\n"
    f"{CLEANER}Traceback (most recent call last):\n"
    f"{CLEANER}  File \"/x/ray/dashboard/utils.py\", line 687, in ray_address_to_api_server_url\n"
    f"{CLEANER}    address = services.canonicalize_bootstrap_address_or_die(address)\n"
    f"{CLEANER}ConnectionError: Found multiple active Ray instances: {{'127.0.0.1:60145', '127.0.0.1:52565'}}.\n"
    f"{WPFX}step 1/4 (25%)  loss 2.3026  29 img/s  data wait 91%  ETA 0:00:03\n"
    "2026/12/07 22:53:55 INFO mlflow.pyfunc: Validating input example against model signature\n"
    "\n"
    "Downloading artifacts:   0%|          | 0/1 [00:00<?, ?it/s]\n"
    "Downloading artifacts: 100%|██████████| 1/1 [00:00<00:00, 10034.22it/s]\n"
    "2026/12/07 22:53:58 INFO mlflow.store.model_registry.abstract_store: Waiting up to 300 seconds for model version\n"
    "2026-12-07 22:53:58,415 INFO pipeline.tracking.registry: registered vit-ui version 1 (alias champion)\n"
    "🏃 View run f1 at: http://127.0.0.1:35397/#/experiments/1/runs/1f13\n"
    "🧪 View experiment at: http://127.0.0.1:35397/#/experiments/1\n"
    "\n"
    '{"name": "f1", "run_id": "1f13", "step": 4}\n'
    f"{CLEANER}ValueError: a later exception line of the same actor is shown\n"
)


def test_a_followed_job_shows_its_own_lines_and_the_worker_group():
    shown = _filtered([ROUTINE[i:i + 11] for i in range(0, len(ROUTINE), 11)]).splitlines()
    assert [line.split(" INFO ")[-1].split(")\x1b[0m ")[-1][:40] for line in shown] == [
        "pipeline.tracking.run: MLflow run 1f13 (",
        "Started training worker group of size 2:",
        "- (ip=127.0.0.1, pid=23133) world_rank=0",
        "step 1/4 (25%)  loss 2.3026  29 img/s  d",
        "pipeline.tracking.registry: registered v",
        "",  # a blank line before a kept line stays
        '{"name": "f1", "run_id": "1f13", "step":',
        "ValueError: a later exception line of th",
    ], shown


def test_ray_logger_drops_routine_info_and_noise_warnings_only():
    import io
    import logging

    from pipeline.tracking.console import quiet_ray_logger

    ray_logger, sdk = logging.getLogger("ray"), logging.getLogger("ray.dashboard.modules.job.sdk")
    saved = ray_logger.level, sdk.level, ray_logger.handlers, ray_logger.propagate
    out = io.StringIO()
    ray_logger.handlers, ray_logger.propagate = [logging.StreamHandler(out)], False
    sdk.setLevel(logging.INFO)  # as Ray's job SDK does
    try:
        quiet_ray_logger()
        sdk.info("WebSocket closed for job raysubmit_x with close code 1000")
        logging.getLogger("ray._private.runtime_env.packaging").info("Ignoring upload to cluster for these files")
        logging.getLogger("ray._private.runtime_env.working_dir").warning(
            "Directory '.git' is now ignored by default when packaging the working directory. To disable ...")
        logging.getLogger("ray._private.runtime_env.working_dir").warning("a warning to act on")
    finally:
        ray_logger.setLevel(saved[0])
        sdk.setLevel(saved[1])
        ray_logger.handlers, ray_logger.propagate = saved[2], saved[3]
    assert out.getvalue() == "a warning to act on\n"


def test_evaluation_line_names_the_accuracies_not_their_internals():
    from pipeline.tracking.tail import evaluation_line

    m = {"val/loss": 1.8718, "val/prec1": 0.3047, "fewshot/fmnist_10shot": 0.3856, "fewshot/fmnist_1shot": 0.2756,
         "fewshot/fmnist_1shot_std": 0.02674, "fewshot/fmnist_10shot_log2_l2": 3.0, "fewshot/fmnist_pool_images": 300}
    assert evaluation_line(m) == "val loss 1.8718  top-1 30.5%  few-shot fmnist 1-shot 27.6%  10-shot 38.6%"
    assert evaluation_line({"train/loss": 2.3}) == ""
