"""What elasticity costs on the share-nothing stack (not a test; prints figures): a node lost without notice, a node
coming back, a preemption notice. Needs root and iproute2 (network namespaces), like `vitpipe stack up --nodes`.

A 4-node stack (a head that runs drivers, 3 worker nodes of one CPU, moto S3, an MLflow server) is started in a
temporary folder; the cluster tests' Fashion-MNIST slice (512 images, 28 px) is written as shards; each round
submits one elastic pretraining job (`scaling.num_workers: [2, 3]`, ZeRO-2, global batch 48, a checkpoint every 20
steps, Ray's resize interval 5 s) and, while it trains:
  cut      a worker node's link is cut once the 3-worker group committed a checkpoint (no notice)
  back     the node returns (its link up, its raylet restarted)
  preempt  a SIGTERM to a worker; once every rank committed a checkpoint, its node is cut (the machine reclaimed)
For each event it prints the seconds from the event to the first step of the group that continues (the MLflow
timestamp of that step's `scaling/world_size`), that group's checkpoint load at its new size (`scaling/restore_s`:
DeepSpeed's universal conversion and load) and start-up (`scaling/startup_s`: model, engine, load, loader), the
steps lost (trained, never committed, trained again: goal none beyond the last commit) and the samples replayed
(samples trained twice beyond those steps' own, or outside the plan: steps whose batch digest differs from the
uninterrupted plan's; goal 0). Medians over --rounds.

    sudo .venv/bin/python benchmarks/elastic.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# the test suite's DeepSpeed op cache (tests/conftest.py), handed to the nodes by the stack
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/vitpipe/torch_extensions"
                                                  / hashlib.md5(sys.prefix.encode()).hexdigest()[:12]))

STEPS, EVERY, BATCH, MICRO, READERS = 300, 20, 48, 8, 12
THREE = ["COMMITTED.rank0", "COMMITTED.rank1", "COMMITTED.rank2"]


def job_args(bucket: str, train: str, name: str) -> list[str]:
    # model.num_classes: the shards hold all 10 Fashion-MNIST classes (the demo's recipe pretrains on 6 of them)
    return ["configs/demo/pretrain-quick.yaml", "--set", f"name={name}", f"data.train={train}", "data.val=null",
            "data.fewshot_train=null", "data.fewshot_test=null", "model.num_classes=10", "data.num_workers=1",
            f"data.virtual_readers={READERS}", f"train.steps={STEPS}", f"train.global_batch={BATCH}",
            f"train.micro_batch={MICRO}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
            "train.eval_every=100000", "train.fewshot_every=0", "scaling.num_workers=[2,3]",
            "scaling.resize_interval_s=5", "scaling.max_failures=-1", "scaling.cpus_per_worker=1",
            "scaling.num_to_keep=4", "scaling.stop_grace_s=120", f"scaling.storage_path=s3://{bucket}/runs",
            "tracking.experiment=bench-elastic", "tracking.registered_model=null", "tracking.flush_every_s=0.5"]


def wait(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Round:
    """One elastic job and its three events."""

    def __init__(self, stack, train: str, name: str, env: dict[str, str]):
        import s3fs

        self.stack, self.name, self.env = stack, name, env
        self.fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                    endpoint_url=stack.s3_endpoint, skip_instance_cache=True)
        self.root = f"{stack.bucket}/runs/{name}"
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "submit", "pretrain",
                                      *job_args(stack.bucket, train, name), "--follow"], cwd=ROOT,
                                     env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def committed(self) -> dict[int, list[str]]:
        from pipeline.train.checkpoint import step_of

        self.fs.invalidate_cache()
        try:
            dirs = [d for d in self.fs.ls(self.root, detail=False) if step_of(d) >= 0]
        except FileNotFoundError:
            return {}
        return {step_of(d): sorted(f.rsplit("/", 1)[1] for f in self.fs.ls(d) if "COMMITTED" in f) for d in dirs}

    def first(self, ranks: int, after: int) -> int | None:
        return next((s for s, m in sorted(self.committed().items()) if m == THREE[:ranks] and s > after), None)

    def run(self) -> dict[str, float]:
        stack, times = self.stack, {}
        at = wait(lambda: self.first(3, 0), 600, "the 3-worker group's first checkpoint")
        times["cut"] = time.time()
        stack.cut_node(3)
        two = wait(lambda: self.first(2, at), 600, "a checkpoint of the 2 workers left")
        stack.restore_node(3)
        stack.restart_node(3)
        times["back"] = time.time()
        grown = wait(lambda: self.first(3, two), 600, "the group grown back to 3")
        group = "".join(self.lines).split("Started training worker group of size 3")[-1]
        pids = {ip: int(pid) for ip, pid in re.findall(r"\(ip=([0-9.]+), pid=(\d+)\) world_rank=\d+", group)}
        before = max(self.committed())
        times["preempt"] = time.time()
        os.kill(pids[stack.node_ips[2]], signal.SIGTERM)
        wait(lambda: self.first(3, max(before, grown)), 300, "the preemption's checkpoint")
        stack.cut_node(2)
        if self.proc.wait(900) != 0:
            raise SystemExit("the elastic job failed:\n" + "".join(self.lines)[-6000:])
        stack.restore_node(2)
        stack.restart_node(2)
        return times


def measure(uri: str, name: str, times: dict[str, float], reference: dict[int, float]) -> dict[str, dict]:
    """Per event: recovery seconds, restore_s and startup_s of the group that continued, steps lost."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-elastic")
    run = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")[0]

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)

    starts = [m for m in history("scaling/world_size") if m.step in {x.step for x in history("scaling/restore_s")}]
    restore = {m.step: m.value for m in history("scaling/restore_s")}
    startup = {m.step: m.value for m in history("scaling/startup_s")}
    losses = history("train/loss")
    digests: dict[int, float] = {}
    for m in history("data/batch_digest"):
        digests[m.step] = m.value
    out = {}
    for event in ("cut", "back", "preempt"):
        t = times[event] * 1000
        first = next(m for m in starts if m.timestamp > t)  # the first step of the group that continued
        # what the previous group trained before it was replaced, beyond the checkpoint the new one restored
        trained_before = max((m.step for m in losses if m.timestamp < first.timestamp), default=0)
        out[event] = {"s": (first.timestamp - t) / 1000, "restore_s": restore[first.step],
                      "startup_s": startup[first.step], "lost": max(0, trained_before - (first.step - 1)),
                      "workers": int(first.value)}
    counts: dict[int, int] = {}
    for m in losses:
        counts[m.step] = counts.get(m.step, 0) + 1
    retrained = sum(n - 1 for n in counts.values())
    outside = [s for s in range(1, STEPS + 1) if digests.get(s) != reference[s]]
    lost = sum(e["lost"] for e in out.values())
    out["samples"] = {"replayed": (retrained - lost) * BATCH + len(outside) * BATCH, "retrained_steps": retrained,
                      "outside_plan": len(outside)}
    return out


def reference_digests(stack, train: str, env: dict[str, str]) -> dict[int, float]:
    from pipeline.config import load_config
    from pipeline.data.loader import build_train_loader
    from pipeline.data.storage import Storage
    from pipeline.train.loop import batch_digest

    args = job_args(stack.bucket, train, "reference")
    cfg = load_config(ROOT / args[0], args[2:] + [f"storage.endpoint_url={stack.s3_endpoint}"])
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    loader = build_train_loader(cfg.data.train, cfg.data, Storage(cfg.storage), global_batch=BATCH, micro_batch=MICRO,
                                image_size=cfg.model.image_size, in_chans=cfg.model.in_chans,
                                num_classes=cfg.model.num_classes)
    steps = loader.steps()
    return {s: float(sum(batch_digest(b["key"], b["aug"].tolist()) for b in next(steps))) for s in range(1, STEPS + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subnet", default="10.213.7.0/24")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/elastic.py needs root (network and mount namespaces per node)")
    from deepspeed.comm.torch import build_shm_op

    from pipeline.data.config import StorageConfig
    from pipeline.data.sources import IdxSource
    from pipeline.data.writer import write_shards
    from pipeline.devstack import Stack
    from tests.cluster.support import source_files

    build_shm_op()  # built once on the host and given to the nodes (each building its own: minutes on two cores)
    with tempfile.TemporaryDirectory(prefix="vitpipe-bench-elastic-") as tmp:
        stack = Stack.up(Path(tmp) / "stack", nodes=4, subnet=args.subnet, ports={"s3": 0, "mlflow": 0},
                         cpus_per_node=1, health_check={"health_check_period_ms": 1000,
                                                        "health_check_timeout_ms": 2000,
                                                        "health_check_failure_threshold": 4})
        try:
            env = stack.env()
            files = source_files(Path(tmp))
            os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
            train = write_shards(IdxSource(files["train-images"], files["train-labels"]),
                                 f"s3://{stack.bucket}/data/train", name="fashion-mnist", split="train",
                                 samples_per_shard=128, storage=StorageConfig(endpoint_url=stack.s3_endpoint),
                                 progress=False)
            reference = reference_digests(stack, train, env)
            results = []
            for i in range(args.rounds):
                name = f"elastic-{i}"
                times = Round(stack, train, name, env).run()
                results.append(measure(stack.mlflow_uri, name, times, reference))
                print(f"round {i + 1}: " + "; ".join(
                    f"{e} {r['s']:.1f} s (restore {r['restore_s']:.2f} s, start-up {r['startup_s']:.1f} s, "
                    f"lost {r['lost']} steps, -> {r['workers']} workers)"
                    for e, r in results[-1].items() if e != "samples") + f"; samples {results[-1]['samples']}",
                    flush=True)
        finally:
            stack.down()
    med = lambda event, key: statistics.median(r[event][key] for r in results)  # noqa: E731
    print(f"\nelastic pretraining, 3 worker nodes of 1 CPU, medians of {len(results)} rounds")
    print(f"{'event':<10}{'to first step (s)':>19}{'checkpoint load (s)':>21}{'start-up (s)':>14}"
          f"{'steps lost':>12}{'workers':>9}")
    for event in ("cut", "back", "preempt"):
        print(f"{event:<10}{med(event, 's'):>19.1f}{med(event, 'restore_s'):>21.2f}{med(event, 'startup_s'):>14.1f}"
              f"{med(event, 'lost'):>12.0f}{med(event, 'workers'):>9.0f}")
    print(f"samples replayed beyond the lost steps' own: {med('samples', 'replayed'):.0f} (goal 0); "
          f"steps outside the uninterrupted plan: {med('samples', 'outside_plan'):.0f} (goal 0)")


if __name__ == "__main__":
    main()
