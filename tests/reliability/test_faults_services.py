"""The services around a training run fail while it runs: object storage misbehaves and the MLflow server goes away.

One 2-worker Ray + DeepSpeed ZeRO-2 run (vit_pico4, 16 px, 16 steps, a checkpoint every 4) that reads its shards AND
writes its checkpoints (Ray storage_path on s3://) through the fault-injecting proxy in front of the S3 test
server: 10% of requests answered 503 SlowDown, 10% of GET bodies cut off half-way by a TCP reset, 10% of
responses delayed 0.3 s. After rank 0 finished step 2 the MLflow server is stopped for 15 s and started again on
the same port and store (a pause of 1 s after every step, a test hook, makes the run outlast the outage).

Guarantees checked: the run completes at its configured step; the loader's retries are counted and logged
(data/retries > 0 in MLflow) and nothing is skipped (skipped/truncated counters 0, and every step's sample keys
equal an uninterrupted loader's); checkpoints are committed in storage; training kept stepping while MLflow was
down and every step's metrics reached the server afterwards.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.fixtures.faults import effective_steps, fault_cfg, history, read_record, reference_keys, report
from tests.fixtures.hooks import FaultHooks

pytestmark = [pytest.mark.integration]

STEPS = 16
OUTAGE_S = 15.0
PROXY = {"fail_fraction": 0.1, "reset_fraction": 0.1, "slow_fraction": 0.1, "delay_s": 0.3, "seed": 7}


@pytest.fixture(scope="module")
def services_run(fault_ray, fault_data, s3_server, mlflow_server, tmp_path_factory):
    from pipeline.pretrain import run_pretraining
    from tests.fixtures.faulty_proxy import FaultyProxy

    tmp = tmp_path_factory.mktemp("services")
    record = str(tmp / "record")
    outage: dict[str, float] = {}

    def take_mlflow_down() -> None:
        # after rank 0 finished step 2: stop the server, keep it down OUTAGE_S, start it again
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if any(e["event"] == "step" and e["step"] >= 2 for e in read_record(record, 0)):
                break
            time.sleep(0.2)
        else:
            return
        outage["stopped"] = time.time()
        mlflow_server.stop()
        time.sleep(OUTAGE_S)
        outage["starting"] = time.time()
        mlflow_server.start()
        outage["healthy"] = time.time()

    with FaultyProxy(s3_server, **PROXY) as proxy:
        cfg = fault_cfg("services", fault_data["train"], proxy.url, mlflow_server.url, f"train.steps={STEPS}",
                        "train.checkpoint_every=4")
        chaos = threading.Thread(target=take_mlflow_down, name="mlflow-outage", daemon=True)
        chaos.start()
        t0 = time.monotonic()
        try:
            result = run_pretraining(cfg, hooks=FaultHooks(record=record, step_sleep_s=1.0))
        finally:
            chaos.join(60)
            if not mlflow_server.running:
                mlflow_server.start()
        wall = time.monotonic() - t0
        counts = dict(proxy.counts)
    return {"cfg": cfg, "result": result, "record": record, "outage": outage, "proxy": counts, "wall_s": wall}


@pytest.mark.timeout(300)
def test_object_storage_faults_are_retried_counted_and_nothing_is_skipped(services_run, mlflow_server,
                                                                          fault_buckets, s3_server, tmp_path):
    from pipeline.train.checkpoint import step_of

    cfg, result, injected = services_run["cfg"], services_run["result"], services_run["proxy"]
    direct = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"endpoint_url": s3_server})})
    assert result.step == STEPS
    assert injected["slowdown_503"] > 0 and injected["resets"] > 0 and injected["delayed"] > 0, injected
    # the loader's counters as logged to MLflow (summed over ranks) at the last step
    logged = {k: history(mlflow_server.url, result.run_id, f"data/{k}")[STEPS][-1]
              for k in ("retries", "skipped_samples", "skipped_shards", "truncated_shards", "bad_images")}
    assert logged["retries"] > 0, logged
    assert logged["skipped_samples"] == logged["skipped_shards"] == logged["truncated_shards"] == 0, logged
    # nothing skipped silently either: every step trained on exactly the uninterrupted loader's samples
    for rank in (0, 1):
        steps = effective_steps(read_record(services_run["record"], rank))
        ref = reference_keys(direct, rank=rank, world_size=2, steps=STEPS)  # (the proxy is gone by now)
        assert [steps[s]["keys"] for s in range(1, STEPS + 1)] == ref, rank
    # checkpoints went through the proxy too: committed in storage, final model exported
    keys = {o["Key"] for o in fault_buckets.list_objects_v2(Bucket="faults-runs", Prefix="runs/services/")["Contents"]}
    kept = sorted({k.split("/")[2] for k in keys if step_of(k.split("/")[2]) >= 0})
    assert kept and kept[-1] == f"checkpoint_{STEPS:08d}", kept  # (older ones removed by scaling.num_to_keep)
    for name in kept:
        assert {f"runs/services/{name}/COMMITTED.rank{r}" for r in (0, 1)} <= keys, name
    assert "runs/services/final/model.json" in keys
    report("object storage faults (proxy before S3: data + checkpoints)", injected,
           {**{f"mlflow data/{k}": v for k, v in logged.items()}, "final step": result.step,
            "committed checkpoints kept": kept,
            "keys = uninterrupted": f"steps 1-{STEPS}, both ranks", "wall_s": round(services_run["wall_s"], 1)},
           tmp_path)


@pytest.mark.timeout(300)
def test_mlflow_outage_does_not_stop_training_and_its_metrics_arrive(services_run, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    result, outage = services_run["result"], services_run["outage"]
    assert "healthy" in outage, f"the outage was not injected: {outage}"
    assert outage["starting"] - outage["stopped"] >= OUTAGE_S
    steps = effective_steps(read_record(services_run["record"], 0))
    during = sorted(s for s, e in steps.items() if outage["stopped"] < e["time"] < outage["healthy"])
    after = sorted(s for s, e in steps.items() if e["time"] >= outage["healthy"])
    assert len(during) >= 3, (during, outage)  # training kept stepping while the server was down
    assert after, "the run ended before the server came back: it did not span the outage"
    assert result.step == STEPS
    losses = history(mlflow_server.url, result.run_id)
    assert {s: len(v) for s, v in losses.items()} == {s: 1 for s in range(1, STEPS + 1)}  # every step, once
    for s in during:
        assert losses[s][0] == pytest.approx(steps[s]["loss"], rel=1e-6)
    assert MlflowClient(mlflow_server.url).get_run(result.run_id).info.status == "FINISHED"
    report("MLflow server outage", {"server down for s": round(outage["healthy"] - outage["stopped"], 1),
                                    "after step": 2},
           {"steps trained while down": during, "steps after": f"{after[0]}-{after[-1]}",
            "steps with train/loss in MLflow": f"{len(losses)}/{STEPS}", "run status": "FINISHED"}, tmp_path)
