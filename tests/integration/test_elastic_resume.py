"""Resume anywhere, exactly: a run checkpointed mid-epoch on 2 ranks continues on 1 and on 3 (ZeRO 1, 2 and 3, real
DeepSpeed on gloo ranks without Ray, tests/fixtures/ranks.py) at the exact next sample, with the weights and
optimizer state re-partitioned through DeepSpeed's universal checkpoint and the gradient accumulation that keeps
the global batch (48 = 8 x 2 ranks x 3 = 8 x 1 x 6 = 8 x 3 x 2).

240 images, 5 steps of 48 per epoch; the step-2 checkpoint of the 2-rank reference run is copied into a new run
folder and continued to step 5 on another number of ranks. Across the two parts every sample of the epoch is trained
exactly once, and every step takes the reference's samples.

Tolerance (fp32), relative 1e-6 on every step's loss: the resumed run computes the same sums in another order (the
mean of 6, 3 or 2 micro-batch means; gradients reduced over another number of ranks, in other buckets), so only
float32 rounding may differ; measured: at most 3e-8 (step 3, on exactly the restored weights: 0 or 2e-16).
"""

from __future__ import annotations

import math
import shutil

import pytest

from tests.fixtures.faults import CLASSES, read_record, synthetic
from tests.fixtures.hooks import FaultHooks

pytestmark = pytest.mark.integration

SMOKE = "configs/pretrain/smoke.yaml"
STEPS, CUT, SAMPLES = 5, 2, 240
# the ZeRO stage and the world sizes its step-2 checkpoint continues on
CASES = [(1, 1), (1, 3), (2, 1), (2, 3), (3, 1), (3, 3)]


@pytest.fixture(scope="module")
def elastic(ranks1, ranks2, ranks3, tmp_path_factory):
    """run(stage, world) -> (cfg, records per rank): the 2-rank reference (world 2) or its step-2 checkpoint
    continued on `world` ranks; each trained once per module."""
    from pipeline.config import load_config
    from pipeline.data.writer import write_array_shards

    root = tmp_path_factory.mktemp("elastic")
    images, labels = synthetic(SAMPLES, 5)
    url = write_array_shards(images, labels, str(root / "train"), name="synth", split="train",
                             class_names=[str(i) for i in range(CLASSES)], samples_per_shard=16)
    groups = {1: ranks1, 2: ranks2, 3: ranks3}
    cache: dict[tuple[int, int], tuple] = {}

    def run(stage: int, world: int):
        if (stage, world) in cache:
            return cache[stage, world]
        name = f"z{stage}-w{world}"
        cfg = load_config(SMOKE, [
            f"name={name}", "model.image_size=16", f"model.num_classes={CLASSES}", f"data.train={url}",
            "data.num_workers=0", "data.shuffle_buffer=16", "data.virtual_readers=12", "data.augment.scale=[0.5,1.0]",
            f"train.steps={STEPS}", "train.global_batch=48", "train.micro_batch=8", "train.optim.lr=3e-3",
            "train.schedule.warmup_steps=1", "train.schedule.decay=constant", "train.log_every=1",
            f"train.checkpoint_every={CUT}", f"train.zero.stage={stage}", f"scaling.num_workers={world}",
            f"scaling.storage_path={root}", "tracking.sink=null"])
        if world != 2:  # continue the reference's mid-epoch checkpoint in a run folder of its own
            ref_cfg, _ = run(stage, 2)
            source = root / ref_cfg.name / f"checkpoint_{CUT:08d}"
            shutil.copytree(source, root / name / source.name)
        record = root / f"{name}.record"
        groups[world].fit(cfg, hooks=FaultHooks(record=str(record)))
        cache[stage, world] = (cfg, [read_record(record, r) for r in range(world)])
        return cache[stage, world]

    return run


def _steps(records: list[list[dict]]) -> dict[int, dict]:
    """step -> {"keys": every rank's keys of the step, "loss"} (the last record of each step)."""
    out: dict[int, dict] = {}
    for events in records:
        for e in events:
            if e["event"] == "step":
                out.setdefault(e["step"], {"keys": {}, "loss": e["loss"]})
                out[e["step"]]["keys"][e["rank"]] = e["keys"]
                out[e["step"]]["loss"] = e["loss"]
    return {s: {"keys": sorted(k for keys in v["keys"].values() for k in keys), "loss": v["loss"]}
            for s, v in out.items()}


@pytest.mark.parametrize("stage,world", CASES)
def test_a_mid_epoch_checkpoint_continues_on_another_world_size_at_the_next_sample(elastic, stage, world):
    _, ref_records = elastic(stage, 2)
    _, records = elastic(stage, world)
    reference, resumed = _steps(ref_records), _steps(records)
    starts = [e for events in records for e in events if e["event"] == "start"]
    assert {(e["start_step"], e["world_size"]) for e in starts} == {(CUT, world)} and len(starts) == world
    assert {e["engine"]["zero_stage"] for e in starts} == {stage}
    assert sorted(resumed) == list(range(CUT + 1, STEPS + 1))
    # the epoch: steps 1-2 on 2 ranks and 3-5 on `world` ranks train every sample exactly once
    trained = [k for s in range(1, CUT + 1) for k in reference[s]["keys"]] + \
        [k for s in resumed for k in resumed[s]["keys"]]
    assert len(trained) == SAMPLES and len(set(trained)) == SAMPLES
    for s in resumed:  # each step the reference's samples
        assert resumed[s]["keys"] == reference[s]["keys"], s
    # the restored optimizer moments are the 2-rank checkpoint's, re-partitioned
    at_cut = [next(e for e in events if e["event"] == "step" and e["step"] == CUT)["digest"] for events in ref_records]
    for moment in ("exp_avg", "exp_avg_sq"):
        restored = sum(e["digest"][moment] for e in starts)
        assert math.isclose(restored, sum(d[moment] for d in at_cut), rel_tol=1e-6) and restored > 0, (
            moment, [e["digest"] for e in starts], at_cut)
    assert {tuple(e["digest"]["adam_steps"]) for e in starts} == {(float(CUT),)}
    # the weights and optimizer state came back: every step on them is the reference's, to summation order
    losses = {s: (resumed[s]["loss"], reference[s]["loss"]) for s in resumed}
    for s in resumed:
        assert math.isclose(resumed[s]["loss"], reference[s]["loss"], rel_tol=1e-6), (s, losses)
    rel = {s: abs(resumed[s]["loss"] / reference[s]["loss"] - 1) for s in resumed}
    print(f"\nZeRO-{stage} 2 -> {world} ranks: loss relative to the uninterrupted run, steps {CUT + 1}-{STEPS}: "
          + ", ".join(f"{v:.1e}" for v in rel.values()))


def test_a_world_size_the_plan_cannot_serve_is_refused_before_training(elastic):
    """On 1 rank a plan of 12 readers and a global batch of 48 works; asked for 5 ranks through the config, the
    check names the fields and the sizes that work (what preflight says before any worker starts)."""
    from pipeline.errors import ConfigError
    from pipeline.launch.checks import check_world_sizes

    cfg, _ = elastic(2, 1)
    five = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 5})})
    with pytest.raises(ConfigError, match=r"scaling.num_workers=5: 5 workers cannot serve the training plan: "
                                          r"data.virtual_readers \(12\) is not a multiple of 5.*1, 2, 3, 6"):
        check_world_sizes(five)
    ranged = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": (2, 4)})})
    with pytest.raises(ConfigError, match=r"scaling.num_workers=\[2, 4\].*but 4 cannot serve.*1, 2, 3, 6"):
        check_world_sizes(ranged)
