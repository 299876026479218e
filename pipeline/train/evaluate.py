"""The evaluations the training loop runs at its evaluation steps: validation loss and top-1 over `data.val`,
few-shot linear evaluation on `data.fewshot_train/test`, and the hooks' own. Every rank calls `Evaluator.run` at
the same steps (the forward passes may be collective: ZeRO-3); rank 0's metrics are the ones logged."""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipeline.config import RunConfig
from pipeline.train.hooks import EvalContext, TrainHooks, all_reduce_sum

__all__ = ["Evaluator", "fewshot_name"]


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
                 dtype: torch.dtype, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.cfg, self.hooks, self.rank, self.world_size = cfg, hooks, rank, world_size
        self.device, self.dtype, self.loss_fn = device, dtype, loss_fn
        self.loader_kw = dict(image_size=cfg.model.image_size, in_chans=cfg.model.in_chans,
                              num_classes=cfg.model.num_classes)

    def _due(self, step: int, every: int) -> bool:
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        cfg, tr = self.cfg, self.cfg.train
        out: dict[str, float] = {}
        if cfg.data.val and self._due(step, tr.eval_every):
            out.update(self._validate(model))
        if cfg.data.fewshot_train and self._due(step, tr.fewshot_every):
            out.update(self._fewshot(model))
        if self._due(step, tr.eval_every):
            ctx = EvalContext(model, step, self.rank, self.world_size, cfg, self.device, self.dtype)
            out.update({k: float(v) for k, v in self.hooks.evaluate(ctx).items()})
        return out

    def _validate(self, model: torch.nn.Module) -> dict[str, float]:
        from pipeline.data.loader import build_loader
        from pipeline.eval.classify import evaluate_classifier

        cfg = self.cfg
        loader = build_loader(cfg.data.val, cfg.data, cfg.storage, batch_size=cfg.train.micro_batch, train=False,
                              rank=self.rank, world_size=self.world_size, **self.loader_kw)
        sums = evaluate_classifier(model, loader, self.loss_fn, cfg.train.eval_batches, self.dtype, self.device)
        loss_sum, correct, count = all_reduce_sum([sums["loss_sum"], sums["correct"], sums["count"]], self.device)
        if count == 0:
            return {}
        return {"val/loss": loss_sum / count, "val/prec1": correct / count}

    def _fewshot(self, model: torch.nn.Module) -> dict[str, float]:
        """Every rank extracts the features (under ZeRO-3 the forward pass is collective); rank 0 solves."""
        from pipeline.data.loader import build_loader
        from pipeline.eval.fewshot import extract_features, fewshot_accuracy

        cfg = self.cfg
        feats: dict[str, Any] = {}
        manifest_name = ""
        for split, url in (("train", cfg.data.fewshot_train), ("test", cfg.data.fewshot_test or cfg.data.fewshot_train)):
            loader = build_loader(url, cfg.data, cfg.storage, batch_size=cfg.train.micro_batch, train=False,
                                  rank=0, world_size=1, drop_last=False, **self.loader_kw)
            feats[split] = extract_features(model, loader, self.dtype, self.device)
            if split == "train":
                manifest_name = getattr(getattr(loader, "manifest", None), "name", "") or ""
        if self.rank != 0:
            return {}
        acc = fewshot_accuracy(*feats["train"], *feats["test"], cfg.train.fewshot_shots, cfg.train.fewshot_l2,
                               cfg.train.seed)
        name = fewshot_name(cfg, manifest_name)
        return {f"fewshot/{name}_{k}shot": v for k, v in acc.items()}
