"""Evaluation runs in the workers, each rank on its share of a split: the same numbers on 1 and on 2 ranks, every
sample counted once (75 images: not a multiple of batch x ranks), logged once by rank 0 through the run's sink,
pictures included. Evaluation-only specs (pipeline.launch.local.run_rank on the session's ranks: the loop a Ray
worker runs) on a saved model; the Ray path is test_transfer.py's."""

from __future__ import annotations

import pytest

from pipeline.data.storage import Storage
from tests.fixtures.faults import CLASSES, synthetic

pytestmark = pytest.mark.integration

SMOKE = "configs/pretrain/smoke.yaml"
N_EVAL = 75
N_POOL = 90  # neither is a multiple of batch (16) x ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model checkpoint (seeded random init: some classes right, some wrong) and its splits."""
    import torch

    from pipeline.config import load_config
    from pipeline.data.writer import write_array_shards
    from pipeline.model import build_model
    from pipeline.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("evaluation")
    names = [str(i) for i in range(CLASSES)]
    pool_x, pool_y = synthetic(N_POOL, 0)
    eval_x, eval_y = synthetic(N_EVAL, 1)
    pool = write_array_shards(pool_x, pool_y, str(root / "pool"), name="synth", class_names=names, samples_per_shard=20)
    test = write_array_shards(eval_x, eval_y, str(root / "test"), name="synth", class_names=names, samples_per_shard=16)
    cfg = load_config(SMOKE, ["name=eval", "model.image_size=16", f"model.num_classes={CLASSES}", f"data.train={pool}",
                              f"data.val={test}", "data.num_workers=0", "train.global_batch=32", "train.micro_batch=16",
                              "train.fewshot_shots=[1,5]", f"scaling.storage_path={root / 'runs'}",
                              "tracking.sink=null"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "model", build_model(cfg.model).state_dict(), cfg.model, {})
    return cfg, str(ckpt), pool, test


def _spec(cfg, ckpt, pool, test, run=None, plots=False):
    from pipeline.tracking.sinks import RunRef
    from pipeline.train.spec import FewshotEval, FinalEval, InitSpec, WorkerSpec

    return WorkerSpec(config=cfg, run_url=cfg.scaling.storage_path + "/eval", run=run or RunRef(),
                      init=InitSpec(checkpoint=ckpt), evaluate_only=True,
                      final_eval=FinalEval(plots=plots, class_names=[str(i) for i in range(CLASSES)]),
                      fewshot_eval=FewshotEval(pool=pool, test=test))


def test_one_and_two_ranks_agree_and_count_every_sample_once(setup, ranks1, ranks2):
    cfg, ckpt, pool, test = setup
    one, = ranks1.run(_spec(cfg, ckpt, pool, test))
    two = ranks2.run(_spec(cfg, ckpt, pool, test))
    # every rank has the all-reduced totals; the few-shot solve runs on rank 0 only
    assert two[1]["final/top1"] == two[0]["final/top1"] and "fewshot/1shot" not in two[1]
    two = two[0]
    assert one["final/eval_images"] == two["final/eval_images"] == N_EVAL
    assert one["final/top1"] == two["final/top1"]  # integer counts of the same samples
    assert two["final/loss"] == pytest.approx(one["final/loss"], rel=1e-5)  # summed in another order
    assert set(one) >= {"fewshot/1shot", "fewshot/5shot", "fewshot/5shot_std"}
    # the few-shot pool and test set: each sample embedded once (a duplicate index across ranks is refused)
    assert one["fewshot/pool_images"] == two["fewshot/pool_images"] == N_POOL
    assert one["fewshot/test_images"] == two["fewshot/test_images"] == N_EVAL
    for k in ("fewshot/1shot", "fewshot/5shot"):  # gathered in manifest order: the same shots on either
        assert abs(one[k] - two[k]) <= 1 / N_EVAL, (k, one[k], two[k])
    assert 0.0 < one["final/top1"] < 1.0


def test_rank_zero_logs_metrics_matrix_and_pictures_once(setup, ranks2, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from pipeline.tracking.config import TrackingConfig
    from pipeline.tracking.run import TrackedRun

    cfg, ckpt, pool, test = setup
    tracking = TrackingConfig(sink="mlflow", tracking_uri=mlflow_server.url, experiment="test-evaluation")
    with TrackedRun.open(tracking, "eval-2-ranks") as run:
        metrics = ranks2.run(_spec(cfg, ckpt, pool, test, run=run.ref, plots=True))[0]
    client = MlflowClient(mlflow_server.url)
    logged = client.get_run(run.run_id).data.metrics
    assert logged["final/top1"] == metrics["final/top1"] and logged["final/eval_images"] == N_EVAL
    assert len(client.get_metric_history(run.run_id, "final/top1")) == 1  # once, by rank 0
    assert {a.path for a in client.list_artifacts(run.run_id, "plots")} == {
        "plots/attention_rollout.png", "plots/pos_embed_similarity.png", "plots/confusion_matrix.png"}
    import json

    matrix = json.loads(open(client.download_artifacts(run.run_id, "eval/confusion_matrix.json", str(tmp_path))).read())
    assert sum(map(sum, matrix["matrix"])) == N_EVAL  # the gathered matrix covers every sample once


def test_multi_label_map_and_prec1_match_sklearn_on_one_and_two_ranks(setup, ranks1, ranks2, tmp_path):
    """A multi-hot split (the i21k/JFT convention): the workers' mean average precision equals scikit-learn's over
    the same logits (each rank gathers its share of the classes), and precision@1 counts a top prediction that is
    any true label; on 1 and on 2 ranks."""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score

    from pipeline.data.loader import build_loader
    from pipeline.data.transforms import to_model_input
    from pipeline.data.writer import write_array_shards
    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.tracking.sinks import RunRef
    from pipeline.train.spec import FinalEval, InitSpec, WorkerSpec

    cfg, ckpt, _, _ = setup
    x, y = synthetic(N_EVAL, 5)
    rng = np.random.default_rng(0)
    multi = [[int(c)] + ([int(c + 1) % CLASSES] if rng.random() < 0.5 else []) for c in y]
    url = write_array_shards(x, multi, str(tmp_path / "multi"), name="synth-multi", split="val",
                             class_names=[str(i) for i in range(CLASSES)], samples_per_shard=16, label_type="multi")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val": url})})
    spec = WorkerSpec(config=cfg, run_url=cfg.scaling.storage_path + "/eval-multi", run=RunRef(),
                      init=InitSpec(checkpoint=ckpt), evaluate_only=True, final_eval=FinalEval(plots=False))
    one, = ranks1.run(spec)
    two = ranks2.run(spec)[0]

    # the reference: the same model over the same split in this process, scikit-learn's AP per class
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(ckpt)[0])
    model.eval()
    logits, targets = [], []
    with torch.no_grad():
        for b in build_loader(url, cfg.data, Storage(cfg.storage), batch_size=16, train=False, drop_last=False,
                              image_size=cfg.model.image_size, num_classes=CLASSES):
            logits.append(model(to_model_input(b["image"], "cpu", torch.float32, cfg.data.augment))[b["valid"]])
            targets.append(b["label"][b["valid"]])
    logits, targets = torch.cat(logits).numpy(), torch.cat(targets).numpy() > 0
    assert len(logits) == N_EVAL
    present = [c for c in range(CLASSES) if targets[:, c].any()]
    ref_map = float(np.mean([average_precision_score(targets[:, c], logits[:, c]) for c in present]))
    ref_prec1 = float(targets[np.arange(N_EVAL), logits.argmax(1)].mean())
    print(f"mAP {ref_map:.4f} (sklearn) vs {one['final/map']:.4f} (1 rank) / {two['final/map']:.4f} (2 ranks); "
          f"prec@1 {ref_prec1:.4f}")
    assert one["final/eval_images"] == two["final/eval_images"] == N_EVAL
    assert one["final/map"] == pytest.approx(ref_map, abs=1e-5)
    assert two["final/map"] == pytest.approx(ref_map, abs=1e-5)
    assert one["final/top1"] == pytest.approx(ref_prec1, abs=1e-9) and two["final/top1"] == one["final/top1"]
