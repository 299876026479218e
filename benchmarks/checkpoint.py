"""Checkpoint save + restore throughput against raw s3fs on the same bytes (not a test; prints figures and ratios).

A ViT-S/16 DeepSpeed ZeRO-2 engine (bf16 mixed precision, AdamW, one CPU rank on gloo) after one optimizer step:
  ours  save:    the loop's save (DeepSpeed's files + training state + commit marker with every file's sha256,
                 hashed as the bytes stream out) to a local folder, then `RunStore.upload` (the marker last) to the
                 moto S3 server (its own `moto_server` process on 127.0.0.1)
        restore: `RunStore.fetch_intact` (markers read, sizes checked from one listing, files downloaded, sha256 verified)
                 + `engine.load_checkpoint`
  raw   s3fs `put` of the same local folder / s3fs `get` of it, nothing else
Target: raw time / our time >= 0.8 for save + restore. Printed beside: the part of our save the training loop
waits for (the local write; uploads run in the background under Ray, pipeline.launch.worker.CheckpointReporter)
and the split of our restore. Rounds alternate ours and raw (the order flips each round); medians over rounds.

    .venv/bin/python benchmarks/checkpoint.py [--variant vit_s16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vitpipe" / "torch_extensions"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import free_port, moto_server  # noqa: E402


def build(variant: str):
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.train.engine import build_engine
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/pretrain/smoke.yaml", [
        f"model.name={variant}", "model.image_size=224", "model.num_classes=1000", "train.micro_batch=2",
        "train.global_batch=2", "train.zero.stage=2", "train.precision=bf16", "scaling.num_workers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg.train, 1, param_groups(model, cfg.train.optim.weight_decay))
    x = torch.randn(2, 3, 224, 224, dtype=torch.bfloat16)
    loss = compute_loss("softmax", engine(x), torch.tensor([1, 2]))
    engine.backward(loss)
    engine.step()
    return cfg, engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="vit_s16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from pipeline.data.config import StorageConfig
    from pipeline.data.storage import Storage, get_filesystem
    from pipeline.train.checkpoint import read_train_state, save_train_checkpoint
    from pipeline.train.runstore import RunStore

    tmp = Path(tempfile.mkdtemp(prefix="vitpipe-bench-ckpt-"))
    with moto_server() as (_, endpoint):
        storage = StorageConfig(endpoint_url=endpoint)
        fs, _ = get_filesystem("s3://bench", storage)
        cfg, engine = build(args.variant)
        params = sum(p.numel() for p in engine.module.parameters())

        ours, raw = [], []

        def run_ours(r: int) -> dict:
            run_url = f"s3://bench/ours{r}"
            local = tmp / f"ours{r}"
            local.mkdir()
            t0 = time.perf_counter()
            save_train_checkpoint(engine, local, step=1, rank=0, world_size=1, loader_state=None, run_id=None)
            t1 = time.perf_counter()
            store = RunStore(run_url, Storage(storage))
            nbytes = store.upload(local, 1)
            t2 = time.perf_counter()
            shutil.rmtree(local)
            with store.fetch_intact() as found:
                t3 = time.perf_counter()
                _, restored = found
                engine.load_checkpoint(restored, tag=read_train_state(restored, 0)["tag"])
                t4 = time.perf_counter()
            return {"bytes": nbytes, "write": t1 - t0, "upload": t2 - t1, "fetch": t3 - t2, "load": t4 - t3,
                    "save": t2 - t0, "restore": t4 - t2, "total": t4 - t0}

        def run_raw(r: int) -> dict:
            src = tmp / "source"
            if not src.exists():
                save_train_checkpoint(engine, src, step=1, rank=0, world_size=1, loader_state=None, run_id=None)
            dest = f"bench/raw{r}"
            t0 = time.perf_counter()
            fs.put(str(src) + "/", dest, recursive=True)
            t1 = time.perf_counter()
            fs.invalidate_cache()
            fs.get(dest + "/", str(tmp / f"raw{r}") + "/", recursive=True)
            t2 = time.perf_counter()
            shutil.rmtree(tmp / f"raw{r}")
            return {"save": t1 - t0, "restore": t2 - t1, "total": t2 - t0}

        for r in range(args.rounds):
            order = [run_ours, run_raw] if r % 2 == 0 else [run_raw, run_ours]
            for fn in order:
                (ours if fn is run_ours else raw).append(fn(r))
        med = lambda xs, k: float(np.median([x[k] for x in xs]))  # noqa: E731
        mb = ours[0]["bytes"] / 1e6
        print(f"{args.variant}: {params / 1e6:.1f}M params, ZeRO-2 bf16 checkpoint {mb:.0f} MB "
              f"(bf16 weights + fp32 master weights and Adam moments); moto S3 server on 127.0.0.1; "
              f"{args.rounds} rounds, alternating")
        for k in ("save", "restore", "total"):
            o, w = med(ours, k), med(raw, k)
            print(f"{k:8s} ours {o:6.2f} s ({mb / o:6.1f} MB/s)   raw s3fs {w:6.2f} s ({mb / w:6.1f} MB/s)   "
                  f"raw/ours = {w / o:.2f}")
        print(f"our save: local write {med(ours, 'write'):.2f} s (what the training loop waits for) + upload "
              f"{med(ours, 'upload'):.2f} s (in the background under Ray)")
        print(f"our restore: fetch + verify {med(ours, 'fetch'):.2f} s + engine.load_checkpoint {med(ours, 'load'):.2f} s")
        ratio = med(raw, "total") / med(ours, "total")
        print(f"target raw/ours >= 0.8 for save + restore: {ratio:.2f} {'met' if ratio >= 0.8 else 'MISSED'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
