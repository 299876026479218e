"""Committed checkpoints damaged in storage, for real: 2 CPU ranks (tests/fixtures/ranks.py: the loop a Ray worker
runs, DeepSpeed ZeRO-2) write a run to the S3 test server with a checkpoint every 2 steps (2, 4, 6); then a copy of
that run folder has a file of its checkpoints truncated or bit-flipped behind the run's back and is resumed.

  truncated ZeRO shard in the latest checkpoint  -> the size check (one listing, before any download) names it; the
                                                    run resumes from checkpoint 4 and ends with the uninterrupted
                                                    run's weights, bit for bit (training is resume-exact)
  one bit flipped (same size) in the module states -> caught by the sha256 of the downloaded copy; the same fallback
  every committed checkpoint damaged               -> the ranks fail with one line naming the run folder and the
                                                    damaged files, never torch's "failed finding central directory"
The markers themselves: every file of a checkpoint is recorded by the rank that wrote it, with the size and sha256
of the bytes in storage (DeepSpeed's files hashed as they were written). And Ray's worker (restore_point, with Ray's
registered checkpoint faked) restores the newest intact checkpoint, not the damaged one Ray registered.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile

import pytest

from tests.fixtures.faults import CLASSES, read_record, synthetic
from tests.fixtures.hooks import FaultHooks

pytestmark = [pytest.mark.integration]

SMOKE = "configs/pretrain/smoke.yaml"
STEPS = 6
BUCKET = "integrity-runs"
TAG6 = "checkpoint_00000006/step00000006"


@pytest.fixture(scope="module")
def s3(s3_server):
    from tests.fixtures.s3 import ensure_buckets

    return ensure_buckets(s3_server, BUCKET)


@pytest.fixture(scope="module")
def train_url(tmp_path_factory):
    from pipeline.data.writer import write_array_shards

    images, labels = synthetic(128, 0)
    return write_array_shards(images, labels, str(tmp_path_factory.mktemp("integrity-data") / "train"), name="synth",
                              split="train", class_names=[str(i) for i in range(CLASSES)], samples_per_shard=16)


@pytest.fixture(scope="module")
def config(train_url, s3_server):
    from pipeline.config import load_config

    def cfg(name: str):
        return load_config(SMOKE, [
            f"name={name}", "model.image_size=16", f"model.num_classes={CLASSES}", f"data.train={train_url}",
            "data.num_workers=0", "data.shuffle_buffer=64", "data.augment.scale=[0.5,1.0]", f"train.steps={STEPS}",
            "train.global_batch=32", "train.micro_batch=16", "train.optim.lr=3e-3", "train.schedule.warmup_steps=1",
            "train.schedule.decay=constant", "train.log_every=1", "train.checkpoint_every=2", "train.zero.stage=2",
            "scaling.num_workers=2", f"scaling.storage_path=s3://{BUCKET}/runs", f"storage.endpoint_url={s3_server}",
            "storage.backoff_base_s=0.05", "storage.backoff_max_s=0.5", "tracking.sink=null"])

    return cfg


def _final(result, storage):
    from pipeline.data.storage import Storage
    from pipeline.model.checkpoint import load_checkpoint

    with Storage(storage).fetch_dir(result.final_checkpoint) as local:
        return load_checkpoint(local)[0]


def _losses(record: str) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_record(record, 0) if e["event"] == "step"}


@pytest.fixture(scope="module")
def reference(ranks2, config, s3, tmp_path_factory):
    """The uninterrupted run: checkpoints 2, 4 and 6 committed in storage, the final model exported."""
    cfg = config("reference")
    record = str(tmp_path_factory.mktemp("integrity") / "reference")
    result = ranks2.fit(cfg, hooks=FaultHooks(record=record))
    assert result.step == STEPS
    return {"cfg": cfg, "result": result, "final": _final(result, cfg.storage), "losses": _losses(record)}


def _keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]


def _copy_run(s3, name: str) -> str:
    """runs/<name>: the reference run's committed checkpoints (not its export), as a run folder of its own."""
    for key in _keys(s3, "runs/reference/checkpoint_"):
        s3.copy_object(Bucket=BUCKET, Key=key.replace("runs/reference/", f"runs/{name}/", 1),
                       CopySource={"Bucket": BUCKET, "Key": key})
    return f"runs/{name}"


def _read(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _truncate(s3, key: str) -> None:
    data = _read(s3, key)
    s3.put_object(Bucket=BUCKET, Key=key, Body=data[: len(data) // 2])


def _flip(s3, key: str) -> None:
    data = bytearray(_read(s3, key))
    data[len(data) // 2] ^= 0x10
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))


def _resume_after_damage(ranks2, config, s3, reference, tmp_path, caplog, name: str, damaged: str, damage,
                         says: str) -> None:
    from pipeline.launch.local import restore_from_storage
    from pipeline.train.checkpoint import read_train_state
    from pipeline.train.spec import WorkerSpec

    cfg = config(name)
    run = _copy_run(s3, name)
    damage(s3, f"{run}/{TAG6}/{damaged}")
    # what a rank's restore does, in this process (the ranks' logs stay in their processes): warn, fall back
    spec = WorkerSpec(config=cfg, run_url=f"s3://{BUCKET}/{run}")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.runstore"), restore_from_storage(spec) as local:
        assert read_train_state(local, 0)["step"] == 4
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert f"s3://{BUCKET}/{run}/checkpoint_00000006 is damaged" in warning, warning
    assert f"step00000006/{damaged} {says}" in warning, warning

    record = str(tmp_path / "record")
    result = ranks2.fit(cfg, hooks=FaultHooks(record=record))
    for rank in (0, 1):
        assert [e["start_step"] for e in read_record(record, rank) if e["event"] == "start"] == [4], rank
    assert result.step == STEPS and result.checkpoint == f"s3://{BUCKET}/{run}/checkpoint_00000006"
    losses = _losses(record)
    assert sorted(losses) == [5, 6] and all(losses[s] == reference["losses"][s] for s in (5, 6)), losses
    final, ref = _final(result, cfg.storage), reference["final"]
    assert final.keys() == ref.keys()
    assert all(final[k].equal(ref[k]) for k in ref), "the resumed run's weights differ from the uninterrupted run's"


@pytest.mark.timeout(300)
def test_truncated_zero_shard_in_the_latest_checkpoint_resumes_from_the_previous_one(
        ranks2, config, s3, reference, tmp_path, caplog):
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = len(_read(s3, f"runs/reference/{TAG6}/{shard}"))
    _resume_after_damage(ranks2, config, s3, reference, tmp_path, caplog, "truncated", shard, _truncate,
                         f"has {size // 2} bytes, {size} committed")


@pytest.mark.timeout(300)
def test_bit_flip_is_caught_by_the_sha256_and_resumes_from_the_previous_one(
        ranks2, config, s3, reference, tmp_path, caplog):
    _resume_after_damage(ranks2, config, s3, reference, tmp_path, caplog, "bitflip", "mp_rank_00_model_states.pt",
                         _flip, "differs from its committed sha256")


@pytest.mark.timeout(120)
def test_markers_record_size_and_sha256_of_every_file_of_the_checkpoint(s3, reference):
    for step in (2, 4, 6):
        prefix = f"runs/reference/checkpoint_{step:08d}/"
        stored = {k[len(prefix):]: _read(s3, k) for k in _keys(s3, prefix)}
        markers = {r: json.loads(stored.pop(f"COMMITTED.rank{r}")) for r in (0, 1)}
        assert all((m["world_size"], m["step"]) == (2, step) for m in markers.values())
        by_rank = {r: set(m["files"]) for r, m in markers.items()}
        assert by_rank[0].isdisjoint(by_rank[1]) and by_rank[0] | by_rank[1] == set(stored), (by_rank, set(stored))
        tag = f"step{step:08d}"
        assert by_rank[1] == {f"{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt", "train_state.rank1.json"}
        assert {f"{tag}/mp_rank_00_model_states.pt", f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest",
                "train_state.rank0.json"} <= by_rank[0]
        for r, m in markers.items():
            for rel, entry in m["files"].items():
                assert entry == {"size": len(stored[rel]), "sha256": hashlib.sha256(stored[rel]).hexdigest()}, rel
        # DeepSpeed's files were hashed as they were written, not read back: torch.save went to our hashing file
        # object (which names the archive's folder "archive"; saved to a path, it is named after the file)
        for rel in (r for r in stored if r.endswith(".pt")):
            with zipfile.ZipFile(io.BytesIO(stored[rel])) as z:
                assert z.namelist()[0].startswith("archive/"), rel


@pytest.mark.timeout(60)
def test_ray_workers_restore_the_newest_intact_checkpoint_whatever_ray_registered(tmp_path, monkeypatch, caplog):
    """pipeline.launch.worker.restore_point (Ray's worker, Ray's checkpoint faked; the stand-in checkpoints of
    tests/unit/test_checkpoint_integrity.py): Ray's latest checkpoint is one of the run folder's; when it is damaged
    the workers take the previous intact one; Ray's checkpoint without any committed one in storage is an error."""
    import ray.train

    from pipeline.config import load_config
    from pipeline.launch.worker import restore_point
    from pipeline.train.spec import WorkerSpec
    from tests.unit.test_checkpoint_integrity import _run, _shard

    class Registered:
        path = str(tmp_path / "checkpoint_00000004")

    run = _run(tmp_path, steps=(2, 4))
    spec = WorkerSpec(config=load_config("configs/pretrain/smoke.yaml", []), run_url=run)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: Registered())
    with restore_point(spec) as local:
        assert local == Registered.path
    _shard(tmp_path / "checkpoint_00000004", 4).write_bytes(b"")
    with caplog.at_level(logging.WARNING), restore_point(spec) as local:
        assert local == f"{run}/checkpoint_00000002"
    assert "Ray's latest: step 4" in caplog.text and "checkpoint_00000004 is damaged" in caplog.text
    spec = WorkerSpec(config=spec.config, run_url=str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="storage holds no committed one"):
        with restore_point(spec):
            pass
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    with restore_point(spec) as local:
        assert local is None


@pytest.mark.timeout(300)
def test_every_committed_checkpoint_damaged_fails_with_one_clear_line(ranks2, config, s3, reference):
    """Last in the module: the ranks' failure restarts the rank group (tests/fixtures/ranks.py)."""
    cfg = config("alldamaged")
    run = _copy_run(s3, "alldamaged")
    _truncate(s3, f"{run}/{TAG6}/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _flip(s3, f"{run}/checkpoint_00000004/step00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    s3.delete_object(Bucket=BUCKET, Key=f"{run}/checkpoint_00000002/step00000002/mp_rank_00_model_states.pt")
    with pytest.raises(RuntimeError) as e:
        ranks2.fit(cfg)
    text = str(e.value)
    assert "central directory" not in text and "PytorchStreamReader" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("pipeline.errors.DamagedCheckpointError")]
    assert len(lines) == 1, text  # the first failing rank's traceback (the group reports one)
    line = lines[0]
    assert f"run folder s3://{BUCKET}/{run}: no committed checkpoint is intact" in line, line
    assert "checkpoint_00000006: step00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt has" in line, line
    assert "checkpoint_00000004: step00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt differs" in line, line
    assert "checkpoint_00000002: step00000002/mp_rank_00_model_states.pt is missing" in line, line
