"""The engine's modes for real, on CPU ranks (gloo) without Ray: every ZeRO stage, bf16 and fp16, optimizer and
parameter offload, the sigmoid loss, gradient accumulation. Every run goes through the loop a Ray worker runs
(pipeline.launch.local.run_rank on the session's rank processes, tests/fixtures/ranks.py), with checkpoints in
storage and the final export; what ran is read back from the engine itself (tests/fixtures/hooks.engine_facts),
never from our own config. (Ray Train, S3 and MLflow around the same loop: test_pretrain.py.)

Runs are cached by name for the module; the 2-rank fp32 ZeRO-2 run is the reference the others are compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.faults import CLASSES, read_record, synthetic
from tests.fixtures.hooks import FaultHooks

pytestmark = pytest.mark.integration

SMOKE = "configs/pretrain/smoke.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Local shards: 128 learnable 16 px images (16 per shard), a 64-image set that is one global batch, and the
    128 images again with multi-hot labels (their class plus, for half of them, the next one)."""
    from pipeline.data.writer import write_array_shards

    root = tmp_path_factory.mktemp("engine-data")
    names = [str(i) for i in range(CLASSES)]
    images, labels = synthetic(128, 0)
    one_x, one_y = synthetic(64, 2)
    rng = np.random.default_rng(3)
    multi = [[int(y)] + ([int(y + 1) % CLASSES] if rng.random() < 0.5 else []) for y in labels]
    return {
        "train": write_array_shards(images, labels, str(root / "train"), name="synth", split="train",
                                    class_names=names, samples_per_shard=16),
        "onebatch": write_array_shards(one_x, one_y, str(root / "onebatch"), name="synth", split="onebatch",
                                       class_names=names, samples_per_shard=32),
        "multi": write_array_shards(images, multi, str(root / "multi"), name="synth-multi", split="train",
                                    class_names=names, samples_per_shard=16, label_type="multi"),
    }


@dataclass
class Run:
    cfg: object
    result: object  # pipeline.launch.driver.FitResult
    records: list[list[dict]]  # per rank: FaultHooks' JSON lines

    @property
    def losses(self) -> dict[int, float]:
        """step -> mean loss over the ranks (the last record of each step)."""
        return {e["step"]: e["loss"] for e in self.records[0] if e["event"] == "step"}

    def engine(self, rank: int = 0) -> dict:
        return next(e["engine"] for e in self.records[rank] if e["event"] == "start")

    def files(self, step: int) -> set[str]:
        """The DeepSpeed files of the checkpoint at `step` (every rank's), as they lie in storage."""
        tag = Path(self.result.run_url) / f"checkpoint_{step:08d}" / f"step{step:08d}"
        return {p.name for p in tag.iterdir()}

    def final(self) -> dict[str, torch.Tensor]:
        from pipeline.model.checkpoint import load_model

        model = load_model(self.result.final_checkpoint)  # builds the architecture and loads every key (strict)
        return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(ranks1, ranks2, shards, tmp_path_factory):
    """run(name, *overrides, workers=2) -> Run, trained once per module and name."""
    from pipeline.config import load_config

    root = tmp_path_factory.mktemp("engine-runs")
    cache: dict[str, Run] = {}

    def run(name: str, *over: str, workers: int = 2, data: str = "train") -> Run:
        key = f"{name}:{';'.join(over)}"
        if key not in cache:
            cfg = load_config(SMOKE, [
                f"name={name}", "model.image_size=16", f"model.num_classes={CLASSES}", f"data.train={shards[data]}",
                "data.num_workers=0", "data.shuffle_buffer=64", "data.augment.scale=[0.5,1.0]", f"train.steps={STEPS}",
                "train.global_batch=32", "train.micro_batch=16", "train.optim.lr=3e-3", "train.schedule.warmup_steps=1",
                "train.schedule.decay=constant", "train.log_every=1", "train.checkpoint_every=3",
                f"scaling.num_workers={workers}", f"scaling.storage_path={root}", "tracking.sink=null", *over])
            record = root / f"{name}.record"
            result = (ranks2 if workers == 2 else ranks1).fit(cfg, hooks=FaultHooks(record=str(record)))
            cache[key] = Run(cfg, result, [read_record(record, r) for r in range(workers)])
        return cache[key]

    return run


def _close(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, len(a) + 1)), (a, b)
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rel), (step, a[step], b[step])


def _learns(losses: dict[int, float]) -> None:
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert (losses[STEPS] + losses[STEPS - 1]) / 2 < losses[1] - 0.1, losses


def _states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32, (k, a[k].dtype)
        assert torch.allclose(a[k], b[k], rtol=0.0, atol=atol), (k, float((a[k] - b[k]).abs().max()))


def zero_files(stage: int, bf16: bool = False) -> set[str]:
    """The DeepSpeed files of one checkpoint written by 2 ranks at a ZeRO stage: the module state once (stages
    0-2) or per rank (3), the optimizer partitions per rank (DeepSpeed names the bf16 optimizer's
    `bf16_zero_...`)."""
    if stage == 0:
        return {"mp_rank_00_model_states.pt"}
    optim = {f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    if stage == 3:
        return optim | {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
    return optim | {"mp_rank_00_model_states.pt"}


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_each_zero_stage_runs_partitions_and_matches_zero2(runs, stage):
    """fp32, 2 ranks: the engine reports the stage asked for, its checkpoints have that stage's per-rank files,
    and the loss trajectory and the consolidated final weights equal ZeRO-2's."""
    ref, run = runs("z2", "train.zero.stage=2"), runs(f"z{stage}", f"train.zero.stage={stage}")
    for r, rank_stage in ((ref, 2), (run, stage)):
        for rank in (0, 1):
            facts = r.engine(rank)
            assert facts["zero_stage"] == rank_stage and facts["param_dtype"] == "torch.float32", facts
            assert facts["optimizer"] == "AdamW" and not facts["offload_optimizer"], facts
        assert r.files(3) == zero_files(rank_stage), r.files(3)
    _close(run.losses, ref.losses, 1e-4)
    _learns(run.losses)
    # all-reduce (0) vs reduce-scatter (1-3) sum the gradients in another order; Adam's normalised step turns that
    # last-bit noise on near-zero gradients into visible weight differences (seen: 1.1e-4 on one bias, lr 3e-3)
    _states_close(run.final(), ref.final(), atol=3e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_trains_exports_fp32_and_resumes_exactly(runs, stage):
    """bf16 weights on the engine (DeepSpeed keeps fp32 masters): a learning run whose export is fp32 and close to
    the fp32 run's; stopped at step 3 and resumed from that bf16 checkpoint, it takes the very same steps 4-6."""
    bf16 = runs(f"bf16-z{stage}", f"train.zero.stage={stage}", "train.precision=bf16")
    for rank in (0, 1):
        facts = bf16.engine(rank)
        assert facts["zero_stage"] == stage and facts["bf16"] and facts["param_dtype"] == "torch.bfloat16", facts
    assert bf16.files(3) == zero_files(stage, bf16=True)
    _learns(bf16.losses)
    _close(bf16.losses, runs("z2", "train.zero.stage=2").losses, 5e-2)  # bf16 rounding, same trajectory
    _states_close(bf16.final(), runs("z2", "train.zero.stage=2").final(), atol=2e-2)

    name = f"bf16-z{stage}-resumed"
    first = runs(name, f"train.zero.stage={stage}", "train.precision=bf16", "train.steps=3")
    assert first.result.step == 3
    resumed = runs(name, f"train.zero.stage={stage}", "train.precision=bf16")  # the same run folder: resumes at 3
    start = next(e for e in resumed.records[0] if e["event"] == "start" and e["start_step"] == 3)
    assert start["engine"]["bf16"]
    assert resumed.result.step == STEPS
    for step in (4, 5, 6):
        assert resumed.losses[step] == bf16.losses[step], (step, resumed.losses, bf16.losses)
    _states_close(resumed.final(), bf16.final(), atol=0.0)


def test_fp16_trains_with_loss_scaling(runs):
    """DeepSpeed's CPU accelerator runs fp16 where oneDNN has fp16 kernels (this machine): fp16 weights, dynamic
    loss scaling, a finite learning run and an fp32 export."""
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this CPU has no fp16 oneDNN kernels (config validation refuses fp16 on it: test_config.py)")
    fp16 = runs("fp16-z2", "train.zero.stage=2", "train.precision=fp16", "train.steps=12")
    facts = fp16.engine()
    assert facts["fp16"] and facts["param_dtype"] == "torch.float16", facts
    losses = fp16.losses
    assert all(math.isfinite(v) for v in losses.values()) and (losses[12] + losses[11]) / 2 < losses[1] - 0.1, losses
    assert all(v.dtype == torch.float32 for v in fp16.final().values())


def test_offloaded_optimizer_steps_with_cpu_adam_and_tracks_the_device_optimizer(runs, cpu_adam_op):
    """ZeRO-2 with the optimizer offloaded: DeepSpeedCPUAdam (the compiled cpu_adam op) steps the partitions, and
    the run follows the non-offloaded one (torch.optim.AdamW): losses to 1e-4 relative, weights to 1e-3."""
    ref = runs("z2", "train.zero.stage=2")
    off = runs("offload-z2", "train.zero.stage=2", "train.zero.offload_optimizer=true")
    for rank in (0, 1):
        facts = off.engine(rank)
        assert facts["optimizer"] == "DeepSpeedCPUAdam" and facts["offload_optimizer"], facts
        assert facts["zero_stage"] == 2 and not facts["offload_params"], facts
    assert off.files(3) == zero_files(2)
    _close(off.losses, ref.losses, 1e-4)
    # the weights to 1e-3 (a third of one step at lr 3e-3): CPUAdam sums in another order, and Adam turns that
    # rounding into whole-step differences where a gradient is ~0 (seen: 2e-4 on a few biases after 6 steps)
    _states_close(off.final(), ref.final(), atol=1e-3)


def test_offloaded_parameters_on_zero3_track_zero3(runs, cpu_adam_op):
    """ZeRO-3 with parameters and optimizer offloaded to the CPU follows plain ZeRO-3."""
    ref = runs("z3", "train.zero.stage=3")
    off = runs("offload-z3", "train.zero.stage=3", "train.zero.offload_optimizer=true",
               "train.zero.offload_params=true")
    for rank in (0, 1):
        facts = off.engine(rank)
        assert facts["zero_stage"] == 3 and facts["offload_params"] and facts["optimizer"] == "DeepSpeedCPUAdam", facts
    assert off.files(3) == zero_files(3)
    _close(off.losses, ref.losses, 1e-4)
    _states_close(off.final(), ref.final(), atol=1e-3)  # as for ZeRO-2's offload above


def test_sigmoid_loss_on_multi_hot_labels(runs):
    """The i21k/JFT loss on a multi-label manifest, the head bias initialised to -10 as the recipes do: the first
    loss is ~10 per positive label (not the ~0.69 per class of a zero bias), finite, and it falls."""
    run = runs("sigmoid", "train.loss=sigmoid", "model.head_bias_init=-10", "train.optim.lr=1e-2", data="multi")
    losses = run.losses
    assert 9.9 < losses[1] < 20.1, losses  # 1 or 2 positives per image, ~10 nats each (zero bias: ~2.8)
    _learns(losses)
    assert float(run.final()["head.bias"].max()) > -10.0  # the bias moved up from its -10 start


def test_one_worker_accumulating_equals_two_workers(runs):
    """global 64 = micro 32 x workers x accumulation; each step is the whole 64-image set, unaugmented, so 1 worker x
    2 micro-batches and 2 workers x 1 see the same examples per step: the same trajectory (ZeRO-1)."""
    over = ("train.zero.stage=1", "train.global_batch=64", "train.micro_batch=32", "data.shuffle_buffer=0",
            "data.augment.scale=[1.0,1.0]", "data.augment.ratio=[1.0,1.0]", "data.augment.hflip=false",
            "train.steps=4")
    one = runs("accum-w1", *over, workers=1, data="onebatch")
    two = runs("accum-w2", *over, workers=2, data="onebatch")
    assert one.engine()["zero_stage"] == two.engine()["zero_stage"] == 1
    assert one.losses[4] < one.losses[1]
    _close(one.losses, two.losses, 1e-4)


EMA = ("train.ema_decay=0.6", "train.eval_every=2", "train.eval_batches=2")


def test_polyak_average_is_exported_evaluated_beside_the_raw_weights_and_resumes_exactly(runs, shards):
    """train.ema_decay on ZeRO-2 and ZeRO-3 (2 ranks): training itself is untouched (the loss trajectory equals the
    run without averaging, evaluations swapping the average in and out included); the export is the average (not
    the raw weights) and the same under both stages (ZeRO-3 averages partitions, gathered for the checkpoint);
    validation is logged for both; stopped at step 3 and resumed, the average continues exactly."""
    val = f"data.val={shards['train']}"
    raw = runs("z2", "train.zero.stage=2")
    z2 = runs("ema-z2", "train.zero.stage=2", val, *EMA)
    z3 = runs("ema-z3", "train.zero.stage=3", val, *EMA)
    assert z2.losses == raw.losses  # bit for bit: the swaps restore the raw weights exactly
    _close(z3.losses, raw.losses, 1e-4)
    assert {"val/prec1", "val/loss", "raw/val/prec1", "raw/val/loss"} <= set(z2.result.metrics), z2.result.metrics
    assert z2.result.metrics["val/loss"] != z2.result.metrics["raw/val/loss"]
    assert {"ema.safetensors"} <= {p.name for p in (Path(z3.result.run_url) / "checkpoint_00000006").iterdir()}
    _states_close(z3.final(), z2.final(), atol=3e-4)
    moved = max(float((z2.final()[k] - raw.final()[k]).abs().max()) for k in raw.final())
    assert moved > 1e-3, moved  # the export is the average, far from the last raw weights at decay 0.6

    name = "ema-z3-resumed"
    first = runs(name, "train.zero.stage=3", val, *EMA, "train.steps=3")
    assert first.result.step == 3
    resumed = runs(name, "train.zero.stage=3", val, *EMA)
    assert resumed.result.step == STEPS
    _states_close(resumed.final(), z3.final(), atol=0.0)
