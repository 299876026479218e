"""Training workers die for real (SIGKILL of the Ray train worker process) and the run carries on exactly; then the
run is resumed on another world size (2 workers -> 1) through DeepSpeed's universal checkpoint.

One 2-worker Ray + DeepSpeed ZeRO-2 run (vit_pico4, 16 px, 8 steps, a checkpoint every 2 steps, 4 steps per epoch,
max_failures=4) in which rank 1 is SIGKILLed four times, once per phase (tests/fixtures/hooks.FaultHooks):
  step        at step 4, between backward and the optimizer step     -> resumes from checkpoint 2 (mid-epoch)
  data        at step 6, after the loader handed out the step's batch -> resumes from checkpoint 4 (epoch boundary)
  upload      at step 6 again (after that restore), while checkpoint 6 uploads in the background and training has
              gone on to step 7: rank 1's files are in storage, its marker is not -> resumes from checkpoint 4
  checkpoint  at step 8, after rank 1's DeepSpeed shard files were written, before its commit marker; rank 0's
              half of checkpoint 8 reaches storage, uncommitted      -> resumes from checkpoint 6, never 8
Every rank records where it (re)started and each step's sample keys; the reference keys come from iterating the
same loader (rank, world size) uninterrupted. Steps that ran twice (before a kill and after the restore) must log
the same loss: the re-run after a restore reproduces the uninterrupted trajectory.

World-size change (2 -> 1), the guarantee: the run continues from the checkpoint's step with the same weights and
the same optimizer state (DeepSpeed universal checkpoint: ZeRO shards of any world size re-partitioned; Adam
moments and step counts kept), in the same MLflow run, and at the exact next sample: the 1-worker run's steps 9-10
train the samples the 2 workers would have trained (pipeline.data.epochs.ReaderPlan), in 2 micro-batches each.
"""

from __future__ import annotations

import math
import time

import pytest

from tests.fixtures.faults import effective_steps, fault_cfg, history, read_record, reference_keys, report
from tests.fixtures.hooks import FaultHooks

pytestmark = [pytest.mark.integration]

STEPS = 8
KILLS = {"step": 4, "data": 6, "upload": 6, "checkpoint": 8}  # phase -> step; rank 1 each time, in this order
RESUMED_FROM = {"step": 2, "data": 4, "upload": 4, "checkpoint": 6}


@pytest.fixture(scope="module")
def killed_run(fault_ray, fault_data, s3_server, mlflow_server, tmp_path_factory):
    from pipeline.pretrain import run_pretraining

    tmp = tmp_path_factory.mktemp("killed")
    cfg = fault_cfg("sigkill", fault_data["train"], s3_server, mlflow_server.url, "scaling.max_failures=4")
    record = str(tmp / "record")
    kills = [{"step": s, "rank": 1, "phase": p, "marker": str(tmp / f"killed-{p}")} for p, s in KILLS.items()]
    t0 = time.monotonic()
    result = run_pretraining(cfg, hooks=FaultHooks(kills=kills, record=record))
    return {"cfg": cfg, "result": result, "record": record, "tmp": tmp, "wall_s": time.monotonic() - t0}


def _starts(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "start"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", list(KILLS))
def test_sigkill_phase_resumes_from_last_complete_checkpoint(killed_run, phase, tmp_path):
    import json

    tmp, record = killed_run["tmp"], killed_run["record"]
    marker = tmp / f"killed-{phase}"
    assert marker.exists(), f"the {phase} kill was not injected"
    killed = json.loads(marker.read_text())
    assert killed == {**killed, "rank": 1, "step": KILLS[phase], "phase": phase}
    if phase == "upload":  # the upload ran in the background: training had gone past the checkpoint's step
        assert killed["trained_to"] > KILLS[phase], killed
    # the rank-1 process that started after this kill (starts are in time order; the kills happen in step order)
    starts = _starts(read_record(record, 1))
    assert len(starts) == 1 + len(KILLS), starts
    killed_pids = [s["pid"] for s in starts]
    idx = list(KILLS).index(phase)
    assert killed["pid"] == killed_pids[idx], "the killed process is the one that ran before the restart"
    restart = starts[idx + 1]
    assert restart["pid"] != killed["pid"]
    assert restart["start_step"] == RESUMED_FROM[phase], restart
    # both ranks restarted from the same checkpoint
    assert _starts(read_record(record, 0))[idx + 1]["start_step"] == RESUMED_FROM[phase]
    # the steps re-run after the restore logged the same loss as before the kill (exact resume)
    losses = history(killed_run["cfg"].tracking.tracking_uri, killed_run["result"].run_id)
    # (a kill while checkpointing or uploading comes after the step logged its loss: that step re-ran too)
    rerun = list(range(RESUMED_FROM[phase] + 1, KILLS[phase] + (phase in ("checkpoint", "upload"))))
    for step in rerun:
        assert len(losses[step]) >= 2, (step, losses[step])
        assert all(math.isclose(v, losses[step][0], rel_tol=1e-6) for v in losses[step]), (step, losses[step])
    report(f"SIGKILL rank 1, phase {phase}", {"signal": "SIGKILL", "rank": 1, "phase": phase,
                                              "at step": KILLS[phase], "pid": killed["pid"]},
           {"restarted pid": restart["pid"], "resumed from checkpoint": restart["start_step"],
            "re-run steps with identical loss": rerun}, tmp_path)


@pytest.mark.timeout(300)
def test_killed_run_finishes_with_uninterrupted_data_and_one_mlflow_run(killed_run, mlflow_server, fault_buckets,
                                                                        tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, result = killed_run["cfg"], killed_run["result"]
    assert result.step == STEPS
    # data position: per rank, the keys of the finished trajectory are the uninterrupted loader's, step by step
    survived = {}
    for rank in (0, 1):
        steps = effective_steps(read_record(killed_run["record"], rank))
        assert sorted(steps) == list(range(1, STEPS + 1))
        ref = reference_keys(cfg, rank=rank, world_size=2, steps=STEPS)
        for step in range(1, STEPS + 1):
            assert steps[step]["keys"] == ref[step - 1], (rank, step)
        survived[f"rank {rank} keys = uninterrupted"] = f"steps 1-{STEPS}"
    # one MLflow run, every step's loss in it
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("test-faults").experiment_id],
                              filter_string="attributes.run_name = 'sigkill'")
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert sorted(history(mlflow_server.url, result.run_id)) == list(range(1, STEPS + 1))
    assert client.get_run(result.run_id).info.status == "FINISHED"
    # the final checkpoint is complete and exported
    keys = {o["Key"] for o in fault_buckets.list_objects_v2(Bucket="faults-runs", Prefix="runs/sigkill/")["Contents"]}
    assert {"runs/sigkill/checkpoint_00000008/COMMITTED.rank0", "runs/sigkill/checkpoint_00000008/COMMITTED.rank1",
            "runs/sigkill/final/model.json"} <= keys
    report("SIGKILL run overall", {"kills": dict(KILLS), "max_failures": 4},
           {**survived, "final step": result.step, "mlflow runs": len(runs),
            "wall_s": round(killed_run["wall_s"], 1)}, tmp_path)


@pytest.mark.timeout(300)
def test_resume_on_one_worker_through_universal_checkpoint(killed_run, fault_ray, mlflow_server, tmp_path, caplog):
    from pipeline.pretrain import run_pretraining

    cfg = killed_run["cfg"]
    record = str(tmp_path / "record")
    one = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"steps": STEPS + 2}),
        "scaling": cfg.scaling.model_copy(update={"num_workers": 1, "max_failures": 0}),
    })
    with caplog.at_level("INFO", logger="pipeline.pretrain"):
        result = run_pretraining(one, resume=True, hooks=FaultHooks(record=record))
    assert result.step == STEPS + 2
    changed = {r.getMessage() for r in caplog.records if r.name == "pipeline.pretrain"}
    assert {f"--resume: train.steps changed {STEPS} -> {STEPS + 2}", "--resume: scaling.num_workers changed 2 -> 1"} \
        <= changed, changed
    assert result.run_id == killed_run["result"].run_id  # the same MLflow run
    events = read_record(record, 0)
    start = _starts(events)
    assert [(s["start_step"], s["world_size"]) for s in start] == [(STEPS, 1)]
    # weights and Adam state are those of the 2-worker step-8 checkpoint: the sum over its two ZeRO partitions
    before = [effective_steps(read_record(killed_run["record"], r))[STEPS]["digest"] for r in (0, 1)]
    after = start[0]["digest"]
    assert math.isclose(after["weights"], before[0]["weights"], rel_tol=1e-9)
    for moment in ("exp_avg", "exp_avg_sq"):
        assert after[moment] > 0
        assert math.isclose(after[moment], before[0][moment] + before[1][moment], rel_tol=1e-6), moment
    assert after["adam_steps"] == [float(STEPS)] and after["global_steps"] == STEPS
    # data: one worker (2 micro-batches per step) trains the samples both workers would have trained
    ref = reference_keys(one, rank=0, world_size=1, steps=2, first=STEPS + 1)
    pair = [reference_keys(cfg, rank=r, world_size=2, steps=2, first=STEPS + 1) for r in (0, 1)]
    steps = effective_steps(events)
    for i, step in enumerate((STEPS + 1, STEPS + 2)):
        assert steps[step]["keys"] == ref[i] and sorted(ref[i]) == sorted(pair[0][i] + pair[1][i]), step
    losses = history(mlflow_server.url, result.run_id)
    assert sorted(losses) == list(range(1, STEPS + 3))
    assert [len(losses[s]) for s in (STEPS + 1, STEPS + 2)] == [1, 1]  # the new steps appended once
    assert losses[STEPS + 1][-1] < losses[1][0] - 0.1, losses  # continues a trained model, not a fresh one
    report("resume 2 workers -> 1 (universal checkpoint)", {"world size": "2 -> 1", "from checkpoint": STEPS},
           {"weights |sum|": after["weights"], "adam moments = sum of 2 partitions": True,
            "adam step": after["adam_steps"], "data": "steps 9-10: the 2-worker run's samples",
            "final step": result.step, "same mlflow run": True}, tmp_path)
