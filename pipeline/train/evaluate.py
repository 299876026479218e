"""The evaluations the workers run, on their device in the training precision, each rank on its disjoint share of
a split (the loader pads the split to equal batch counts and masks the padding, so every sample counts exactly
once): validation loss and top-1 over `data.val`, few-shot linear evaluation on `data.fewshot_train/test`, the
hooks' own, and a transfer job's final evaluation (top-1 over the whole split, the confusion matrix, pictures).

Every rank calls the same methods at the same steps (under ZeRO-3 the forward pass is collective); sums are
all-reduced and features gathered, the closed-form few-shot solve runs once, and only rank 0's metrics and
artifacts reach the run (through its sink). The job's driver never runs the model over a dataset.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import RunConfig
from pipeline.data.loader import build_loader
from pipeline.data.storage import Storage
from pipeline.data.transforms import to_model_input
from pipeline.eval.classify import average_precision, evaluate_classifier
from pipeline.eval.fewshot import extract_features, fewshot_results, ridge_probe
from pipeline.eval.gather import distributed, gather_column_shard, gather_rows
from pipeline.eval.plots import plot_attention_rollout, plot_confusion_matrix, plot_pos_embed_similarity
from pipeline.model import build_model
from pipeline.tracking.sinks import MetricsSink, NullSink
from pipeline.train.ema import ParamEMA
from pipeline.train.engine import full_parameters
from pipeline.train.hooks import EvalContext, TrainHooks, all_reduce_sum
from pipeline.train.spec import FewshotEval, FinalEval

__all__ = ["Evaluator", "fewshot_name", "MAX_CONFUSION_CLASSES"]

MAX_CONFUSION_CLASSES = 1000  # above this a confusion matrix is neither readable nor cheap to all-reduce


def fewshot_name(cfg: RunConfig, manifest_name: str = "") -> str:
    """fewshot/<name>_<k>shot: the configured name, else the few-shot set's manifest name, else its folder."""
    if cfg.train.fewshot_name:
        return cfg.train.fewshot_name
    if manifest_name:
        return manifest_name
    # .../<dataset>/train/manifest.json -> <dataset>
    parts = [p for p in (cfg.data.fewshot_train or "").split("://")[-1].split("/") if p]
    parts = [p for p in parts if p not in ("manifest.json", "train") and "|" not in p]
    return parts[-1] if parts else "fewshot"


class Evaluator:
    def __init__(self, cfg: RunConfig, hooks: TrainHooks, *, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 sink: MetricsSink | None = None, final: FinalEval | None = None, ema: ParamEMA | None = None):
        self.cfg, self.hooks, self.rank, self.world_size = cfg, hooks, rank, world_size
        self.device, self.dtype, self.loss_fn = device, dtype, loss_fn
        self.sink, self.final_spec, self.ema = sink or NullSink(), final, ema
        self._workdir: str | None = None
        self._fixed_images: torch.Tensor | None = None  # rank 0's pictures/attention_rollout inputs

    # -- what the loop calls ------------------------------------------------------------------------------------
    def _due(self, step: int, every: int) -> bool:
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """The evaluations due at `step`. With Polyak averaging on, the metrics are the averaged weights' (the
        model that is exported) and the raw weights' are logged beside them as raw/<metric>."""
        if self.ema is None:
            return self._run(model, step)
        raw = self._run(model, step, headline=False)
        with self.ema.swapped():
            out = self._run(model, step)
        out.update({f"raw/{k}": v for k, v in raw.items()})
        return out

    def _run(self, model: torch.nn.Module, step: int, headline: bool = True) -> dict[str, float]:
        cfg, tr = self.cfg, self.cfg.train
        out: dict[str, float] = {}
        if cfg.data.val and self._due(step, tr.eval_every):
            out.update(self.validate(model))
        if cfg.data.fewshot_train and self._due(step, tr.fewshot_every):
            out.update(self.fewshot(model, cfg.data.fewshot_train, cfg.data.fewshot_test or cfg.data.fewshot_train))
            if headline and tr.fewshot_pictures:
                self.progress_pictures(model, step)
        if headline and self._due(step, tr.eval_every):
            ctx = EvalContext(model, step, self.rank, self.world_size, cfg, self.device, self.dtype)
            out.update({k: float(v) for k, v in self.hooks.evaluate(ctx).items()})
        if self.final_spec is not None and step == tr.steps:
            out.update(self.final(model, step, artifacts=headline))
        return out

    def close(self) -> None:
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _loader(self, url: str):
        cfg = self.cfg
        return build_loader(url, cfg.data, Storage(cfg.storage), batch_size=cfg.train.micro_batch, train=False,
                            rank=self.rank, world_size=self.world_size, drop_last=False,
                            pin_memory=self.device.type == "cuda", image_size=cfg.model.image_size,
                            in_chans=cfg.model.in_chans, num_classes=cfg.model.num_classes)

    def _autocast(self):
        # inputs are cast to the engine's dtype; autocast keeps ops like the softmax / layer norms in bf16-safe form
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _classify(self, model: torch.nn.Module, url: str, max_batches: int | None,
                  num_classes: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        with self._autocast():
            sums = evaluate_classifier(model, self._loader(url), self.loss_fn, max_batches, self.dtype, self.device,
                                       self.cfg.data.augment, num_classes)
        loss_sum, correct, count = all_reduce_sum([sums["loss_sum"], sums["correct"], sums["count"]], self.device)
        if "confusion" in sums and distributed():
            import torch.distributed as dist

            cm = sums["confusion"].to(self.device)
            dist.all_reduce(cm)
            sums["confusion"] = cm.cpu()
        totals = {"loss_sum": loss_sum, "correct": correct, "count": count}
        if all_reduce_sum([float("scores" in sums)], self.device)[0]:  # multi-hot labels (on every rank, or none)
            totals["map"] = self._mean_average_precision(sums)
        return totals, sums

    def _mean_average_precision(self, sums: dict[str, Any]) -> float:
        """mAP over the classes with a positive in the evaluated split: each rank gathers every sample's scores of
        its share of the classes, computes their APs exactly, and the sums are all-reduced."""
        k = self.cfg.model.num_classes
        scores = sums.get("scores", torch.zeros(0, k))
        targets = sums.get("targets", torch.zeros(0, k, dtype=torch.bool))
        # one tensor per rank: scores and targets travel together (targets as 0/1 in the scores' dtype)
        both, _ = gather_column_shard(torch.stack([scores.float(), targets.float()], 2), self.device)
        ap_sum, classes = average_precision(both[..., 0], both[..., 1])
        ap_sum, classes = all_reduce_sum([ap_sum, float(classes)], self.device)
        return ap_sum / classes if classes else float("nan")

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        totals, _ = self._classify(model, self.cfg.data.val, self.cfg.train.eval_batches)
        if totals["count"] == 0:
            return {}
        out = {"val/loss": totals["loss_sum"] / totals["count"], "val/prec1": totals["correct"] / totals["count"]}
        if "map" in totals:
            out["val/map"] = totals["map"]
        return out

    def features(self, model: torch.nn.Module, url: str,
                 max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(features, labels, the manifest's name) of the split's valid samples, every rank's share gathered and
        put in manifest order (the same arrays whatever the world size)."""
        loader = self._loader(url)
        with self._autocast():
            feats, labels, index = extract_features(model, loader, self.dtype, self.device, self.cfg.data.augment,
                                                    max_batches)
        feats, labels, index = (gather_rows(t, self.device) for t in (feats, labels, index))
        if len(torch.unique(index)) != len(index):  # the loader's padding leaked into a metric: refuse to report it
            raise RuntimeError(f"evaluation of {url}: a sample was embedded twice across ranks ({len(index)} rows, "
                               f"{len(torch.unique(index))} distinct)")
        order = torch.argsort(index)
        return feats[order], labels[order], getattr(loader.manifest, "name", "") or ""

    def fewshot(self, model: torch.nn.Module, pool: str, test: str, *, pool_batches: int | None = None,
                test_batches: int | None = None, prefix: str | None = None, probe: bool = False) -> dict[str, float]:
        """Few-shot accuracies (rank 0; {} elsewhere): each rank embeds its share of both sets, rank 0 solves."""
        tr_x, tr_y, name = self.features(model, pool, pool_batches)
        te_x, te_y, _ = self.features(model, test, test_batches)
        if self.rank != 0:
            return {}
        tr = self.cfg.train
        results = fewshot_results(tr_x, tr_y, te_x, te_y, tr.fewshot_shots, tr.fewshot_l2, tr.seed, tr.fewshot_seeds)
        prefix = prefix if prefix is not None else f"fewshot/{fewshot_name(self.cfg, name)}_"
        # each valid sample once whatever the number of ranks (the loader's padding is masked)
        out: dict[str, float] = {f"{prefix}pool_images": float(len(tr_y)), f"{prefix}test_images": float(len(te_y))}
        for k, r in results.items():
            # the mean over the draws of the shots; beside it their spread and the (median) regulariser chosen
            out[f"{prefix}{k}shot"] = r.mean
            out[f"{prefix}{k}shot_std"] = r.std
            out[f"{prefix}{k}shot_log2_l2"] = math.log2(sorted(r.l2)[len(r.l2) // 2])
        if probe:  # every pool image labelled: the frozen-feature linear probe
            out["probe/top1"], l2 = ridge_probe(tr_x, tr_y, te_x, te_y)
            out["probe/log2_l2"] = math.log2(l2)
        return out

    def fewshot_only(self, model: torch.nn.Module, spec: FewshotEval) -> dict[str, float]:
        """An evaluation-only job's few-shot metrics (fewshot/<k>shot)."""
        bs, world = self.cfg.train.micro_batch, self.world_size
        pool_batches = None if spec.pool_samples is None else -(-spec.pool_samples // (bs * world))
        return self.fewshot(model, spec.pool, spec.test, pool_batches=pool_batches, test_batches=spec.test_batches,
                            prefix="fewshot/", probe=spec.probe)

    def final(self, model: torch.nn.Module, step: int, artifacts: bool = True) -> dict[str, float]:
        """The final evaluation of `final_spec` on data.val: metrics final/*; with `artifacts`, rank 0 logs the
        confusion matrix and the pictures through the sink."""
        spec, k = self.final_spec, self.cfg.model.num_classes
        num_classes = k if k <= MAX_CONFUSION_CLASSES else None
        totals, sums = self._classify(model, self.cfg.data.val, spec.max_batches, num_classes)
        if totals["count"] == 0:
            raise ValueError(f"final evaluation: data.val ({self.cfg.data.val}) yielded no samples")
        metrics = {"final/top1": totals["correct"] / totals["count"], "final/loss": totals["loss_sum"] / totals["count"],
                   "final/eval_images": totals["count"]}
        if "map" in totals:
            metrics["final/map"] = totals["map"]
        cm = sums.get("confusion")
        if not artifacts:
            return metrics
        if self.rank == 0 and cm is not None:
            self.sink.log_dict({"matrix": cm.tolist()}, "eval/confusion_matrix.json")
        if spec.plots:
            images = sums["images"][: spec.plot_images] if sums["images"] is not None else None
            for png in self.pictures(model, images, cm, step):
                self.sink.log_artifact(png, "plots")
        return metrics

    def progress_pictures(self, model: torch.nn.Module, step: int) -> list[Path]:
        """What the model is learning, at a few-shot evaluation step: attention rollout on the same fixed images
        every time (the first of rank 0's share of data.val, else of the few-shot test set) and the
        position-embedding similarity, logged by rank 0 as the MLflow image series pictures/<name> at `step`.
        Every rank calls this (the parameters are gathered under ZeRO-3)."""
        if self.rank == 0 and self._fixed_images is None:
            url = self.cfg.data.val or self.cfg.data.fewshot_test or self.cfg.data.fewshot_train
            n = self.cfg.train.fewshot_pictures
            kept: list[torch.Tensor] = []
            for batch in self._loader(url):
                kept.append(batch["image"][batch["valid"]])
                if sum(len(t) for t in kept) >= n:
                    break
            self._fixed_images = torch.cat(kept)[:n] if kept else torch.zeros(0)
        pngs = self.pictures(model, self._fixed_images, None, step, folder="pictures")
        for png in pngs:
            self.sink.log_image(png, f"pictures/{png.stem}", step)
        return pngs

    def pictures(self, model: torch.nn.Module, images: torch.Tensor | None, confusion: torch.Tensor | None,
                 step: int, folder: str = "plots") -> list[Path]:
        """Attention rollout on `images` (uint8), the position-embedding similarity and the confusion matrix, drawn
        by rank 0 from a plain copy of the model (ZeRO-3's partitions gathered first: every rank calls this); the
        PNGs' paths on rank 0 ([] elsewhere)."""
        with full_parameters(model) as params:
            state = {n: p.detach().float().cpu().clone() for n, p in params.items()} if self.rank == 0 else None
        if self.rank != 0:
            return []
        plain = build_model(self.cfg.model)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if unexpected or any(n in dict(plain.named_parameters()) for n in missing):
            raise ValueError(f"pictures: parameters do not match the model ({missing[:3]}, {unexpected[:3]})")
        plain.to(self.device).eval()
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="vitpipe-plots-")
        out_dir = Path(self._workdir) / f"{folder}-step{step}"
        out = []
        if images is not None and len(images):
            x = to_model_input(images, self.device, torch.float32, self.cfg.data.augment)
            out.append(plot_attention_rollout(plain, x, out_dir / "attention_rollout.png"))
        out.append(plot_pos_embed_similarity(plain.pos_embed, out_dir / "pos_embed_similarity.png",
                                             plain.num_prefix_tokens))
        if confusion is not None:
            names = self.final_spec.class_names if self.final_spec else None
            out.append(plot_confusion_matrix(confusion, out_dir / "confusion_matrix.png", names))
        return out
