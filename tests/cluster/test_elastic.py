"""An elastic pretraining job (`scaling.num_workers: [2, 3]`) on the share-nothing cluster's 3 worker nodes, through
`vitpipe submit` as a user runs it, loses nodes and gets one back, and nobody types anything:

1. A node is lost without notice (its link cut mid-epoch, once a checkpoint is committed): the job goes on by itself
   on the 2 workers that remain, from the last committed checkpoint, in the same MLflow run.
2. The node returns: Ray's elastic policy (resize interval shortened to 5 s) grows the group back to 3, after every
   rank committed a checkpoint at a common step, and the 3-worker group starts at the very next step.
3. A worker gets a SIGTERM (a preemption notice): every rank commits at a common step, the node then goes (its link
   cut, as a reclaimed machine's), and the group continues on 2 workers at the very next step.
The job finishes SUCCEEDED, in one FINISHED run whose `scaling/world_size` went 3 -> 2 -> 3 -> 2, with a
`scaling.resize.*` tag per change; every step's `data/batch_digest` (its samples and their augmentation) equals the
uninterrupted plan's, computed here from the loader on one rank. Then the run is continued with more steps and
stopped with `vitpipe jobs stop`: it ends KILLED with one checkpoint committed by every rank.

The cut nodes are brought back afterwards, whatever happened."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from pipeline.data.storage import Storage
from tests.cluster.support import run_by_name, status, submitted, vitpipe, vitpipe_popen, wait_for

pytestmark = pytest.mark.integration

CFG = "configs/demo/pretrain-quick.yaml"
EXPERIMENT, RUN = "vit-elastic", "e2e-elastic"
STEPS, EVERY, BATCH, MICRO, READERS = 300, 20, 48, 8, 12
THREE = ["COMMITTED.rank0", "COMMITTED.rank1", "COMMITTED.rank2"]
TWO = THREE[:2]


def _args(cluster, datasets, *extra: str) -> list[str]:
    # model.num_classes: these shards hold all 10 classes (the demo's recipe pretrains on 6 of them)
    return [CFG, "--set", f"name={RUN}", f"data.train={datasets['train']}", "data.val=null", "data.fewshot_train=null",
            "data.fewshot_test=null", "model.num_classes=10", "data.num_workers=1", f"data.virtual_readers={READERS}",
            f"train.steps={STEPS}", f"train.global_batch={BATCH}", f"train.micro_batch={MICRO}",
            f"train.checkpoint_every={EVERY}", "train.log_every=1", "train.eval_every=100000", "train.fewshot_every=0",
            "scaling.num_workers=[2,3]", "scaling.resize_interval_s=5", "scaling.max_failures=4",
            "scaling.cpus_per_worker=1", "scaling.num_to_keep=4", "scaling.stop_grace_s=120",
            f"scaling.storage_path=s3://{cluster.bucket}/e2e/runs", f"tracking.experiment={EXPERIMENT}",
            "tracking.registered_model=null", "tracking.flush_every_s=0.5", *extra]


def _reference_digests(cluster, datasets) -> dict[int, float]:
    """step -> batch digest of the uninterrupted plan, from the loader on one rank (the loop's own digest)."""
    from pipeline.config import load_config
    from pipeline.data.loader import build_train_loader
    from pipeline.train.loop import batch_digest

    args = _args(cluster, datasets)
    cfg = load_config(args[0], args[2:] + [f"storage.endpoint_url={cluster.s3_endpoint}"])
    with pytest.MonkeyPatch.context() as m:  # the stack's own credentials, only while reading
        for k, v in cluster.env().items():
            if k.startswith("AWS_"):
                m.setenv(k, v)
        loader = build_train_loader(cfg.data.train, cfg.data, Storage(cfg.storage), global_batch=BATCH, micro_batch=MICRO,
                                    image_size=cfg.model.image_size, in_chans=cfg.model.in_chans,
                                    num_classes=cfg.model.num_classes)
        steps = loader.steps()
        return {s: float(sum(batch_digest(b["key"], b["aug"].tolist()) for b in next(steps)))
                for s in range(1, STEPS + 1)}


def test_an_elastic_group_loses_nodes_grows_back_and_hands_over_without_a_person(cluster, datasets, tmp_path):
    import s3fs
    from mlflow import MlflowClient

    from pipeline.train.checkpoint import step_of
    from tests.fixtures.faults import report

    env, uri = cluster.env(), cluster.mlflow_uri
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=cluster.s3_endpoint, skip_instance_cache=True)
    root = f"{cluster.bucket}/e2e/runs/{RUN}"

    def committed() -> dict[int, list[str]]:
        fs.invalidate_cache()
        try:
            dirs = [d for d in fs.ls(root, detail=False) if step_of(d) >= 0]
        except FileNotFoundError:
            return {}
        out = {}
        for d in dirs:
            try:
                out[step_of(d)] = sorted(f.rsplit("/", 1)[1] for f in fs.ls(d) if "COMMITTED" in f)
            except FileNotFoundError:  # removed by checkpoint retention (num_to_keep) between the two listings
                continue
        return out

    def first(markers: list[str], after: int) -> int | None:
        return next((s for s, m in sorted(committed().items()) if m == markers and s > after), None)

    log = tmp_path / "job.log"
    events: dict[str, float] = {}
    job = vitpipe_popen(["submit", "pretrain", *_args(cluster, datasets), "--follow"], env)
    reader = _Tail(job, log)
    cut: list[int] = []
    try:
        # 1. three workers, a committed checkpoint, then a node lost without notice
        t0 = time.monotonic()
        at = wait_for(lambda: first(THREE, 0) or reader.ended(), 300, "a checkpoint of the 3-worker group")
        events["submit to the first checkpoint (s)"] = round(time.monotonic() - t0, 1)
        assert not reader.ended(), reader.text()[-4000:]
        lost = 3
        cluster.cut_node(lost)
        cut.append(lost)
        t_cut = time.monotonic()
        two_at = wait_for(lambda: first(TWO, at) or reader.ended(), 300, "a checkpoint of 2 workers after the loss")
        assert not reader.ended(), reader.text()[-4000:]
        events["lost node: cut to the 2-worker group's first checkpoint (s)"] = round(time.monotonic() - t_cut, 1)
        # 2. the node returns; the group grows back at a checkpoint every rank committed
        cluster.restore_node(lost)
        cluster.restart_node(lost)
        cut.remove(lost)
        t_back = time.monotonic()
        grown = wait_for(lambda: first(THREE, two_at) or reader.ended(), 300, "the group to grow back to 3")
        assert not reader.ended(), reader.text()[-4000:]
        events["node back to the 3-worker group's first checkpoint (s)"] = round(time.monotonic() - t_back, 1)
        # 3. a preemption notice: SIGTERM to the worker on node 2; every rank commits, then the node goes
        group = reader.text().split("Started training worker group of size 3")[-1]
        pids = {ip: int(pid) for ip, pid in re.findall(r"\(ip=([0-9.]+), pid=(\d+)\) world_rank=\d+", group)}
        preempted = 2
        before = max(committed())
        os.kill(pids[cluster.node_ips[preempted]], signal.SIGTERM)
        handed = wait_for(lambda: first(THREE, before) or reader.ended(), 120, "the preemption's checkpoint")
        cluster.cut_node(preempted)
        cut.append(preempted)
        t_term = time.monotonic()
        r = reader.wait(600)
        events["preemption notice to the end of the job (s)"] = round(time.monotonic() - t_term, 1)
    finally:
        for i in cut:
            cluster.restore_node(i)
            cluster.restart_node(i)
    out = reader.text()
    print("\nphases:", events, flush=True)
    job_id = submitted(r)
    assert r.returncode == 0 and status(job_id, env) == "SUCCEEDED", out[-6000:]

    run = run_by_name(uri, EXPERIMENT, RUN)
    assert run.info.status == "FINISHED"
    client = MlflowClient(uri)
    # each group's first step and size in the order they ran (logged together at its first step): 3 -> 2 -> 3 -> 2
    firsts = {(m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, "scaling/startup_s")}
    starts = sorted((m.timestamp, m.step, int(m.value)) for m in client.get_metric_history(
        run.info.run_id, "scaling/world_size") if (m.step, m.timestamp) in firsts)
    assert [size for _, _, size in starts] == [3, 2, 3, 2], starts
    resizes = {k: v for k, v in run.data.tags.items() if k.startswith("scaling.resize.")}
    assert sorted(resizes.values()) == sorted(["3 -> 2 workers (gradient accumulation 2 -> 3)",
                                              "2 -> 3 workers (gradient accumulation 3 -> 2)",
                                              "3 -> 2 workers (gradient accumulation 2 -> 3)"]), resizes
    resize_steps = sorted(int(k.rsplit("step", 1)[1]) for k in resizes)
    # each group started right after the checkpoint it restored: the last periodic one before the unnoticed loss,
    # the one the group committed for the grow (between the 2-worker group's first checkpoint and the 3-worker
    # group's), and the one every rank committed on the preemption notice
    assert resize_steps[0] >= at and two_at < resize_steps[1] < grown and resize_steps[2] == handed, (
        resize_steps, at, two_at, grown, handed)
    assert [s + 1 for s in resize_steps] == [step for _, step, _ in starts[1:]], (resize_steps, starts)
    history = {}
    for m in sorted(client.get_metric_history(run.info.run_id, "data/batch_digest"), key=lambda m: m.timestamp):
        history[m.step] = m.value  # the last value logged for each step
    reference = _reference_digests(cluster, datasets)
    assert sorted(history) == list(range(1, STEPS + 1))
    differ = [s for s in history if history[s] != reference[s]]
    assert not differ, f"steps whose samples differ from the uninterrupted plan: {differ[:10]}"
    logged = {}
    for m in client.get_metric_history(run.info.run_id, "train/loss"):
        logged[m.step] = logged.get(m.step, 0) + 1
    replayed = sorted(s for s, n in logged.items() if n > 1)
    # only steps trained after the last checkpoint before the unnoticed loss ran twice: the grow and the preemption
    # lost none
    assert all(resize_steps[0] < s <= resize_steps[0] + EVERY for s in replayed), (replayed, resize_steps)
    assert "resize to 3 workers at the checkpoint of step" in out, out[-4000:]

    # 4. continued with more steps and stopped: KILLED, one checkpoint every rank committed
    more = vitpipe(["submit", "pretrain", *_args(cluster, datasets, f"train.steps={STEPS + 200}")[:1], "--resume",
                    *_args(cluster, datasets, f"train.steps={STEPS + 200}")[1:]], env)
    job2 = submitted(more)
    wait_for(lambda: "Started training worker group" in vitpipe(["jobs", "logs", job2], env).stdout, 240,
             "the continued job's workers to start", poll_s=1.0)
    seen = set(committed())
    stop = vitpipe(["jobs", "stop", job2, "--wait"], env, timeout=400)
    assert stop.returncode == 0 and f"{job2}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert run_by_name(uri, EXPERIMENT, RUN).info.status == "KILLED"
    new = {s: m for s, m in committed().items() if s not in seen}
    assert len(new) == 1 and list(new.values())[0] in (TWO, THREE), new
    report("an elastic group on 3 share-nothing worker nodes", {
        "lost node": f"node {lost} cut after the step-{at} checkpoint",
        "returned node": f"node {lost} back", "preemption": f"SIGTERM to the worker on node {preempted}, then cut",
        "jobs stop": "on the continued run"}, {
        "job": "SUCCEEDED without a person", "world sizes": "3 -> 2 -> 3 -> 2", "resizes at steps": resize_steps,
        "steps replayed (after the unnoticed loss)": f"{len(replayed)}", "digests = uninterrupted plan": "all steps",
        **events, "stopped": f"KILLED, one checkpoint at step {list(new)[0]}"}, tmp_path)


class _Tail:
    """A background job's output, read as it comes (so the pipe never fills) into a file."""

    def __init__(self, proc, path):
        import threading

        self.proc, self.path, self._lines = proc, path, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "w") as f:
            for line in self.proc.stdout:
                self._lines.append(line)
                f.write(line)

    def text(self) -> str:
        return "".join(self._lines)

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def wait(self, timeout: float):
        import subprocess

        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("the elastic job did not end:\n" + self.text()[-6000:])
        self._thread.join(10)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.text(), "")
