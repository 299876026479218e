"""The prepared GPU check: one command on a CUDA machine (a few minutes; well under 8) that prints one table.

    python3 benchmarks/gpu_check.py            # on the GPU machine, from the repo root
    python3 benchmarks/gpu_check.py --cpu      # here: every piece on the CPU with a tiny model (checks the script;
                                               # its figures mean nothing)

What it runs, without Ray and without an MLflow server (the machine has neither, and no package index):
  a  ViT-B/16 at 224 px, bf16: training images/s and MFU through our DeepSpeed engine (benchmarks/gpu_mfu.py)
  b  the loop every Ray worker runs (pipeline.launch.local.fit_local: world size 1, NCCL, bf16, ZeRO-2) on synthetic
     JPEG shards in local storage: a few dozen steps, a committed checkpoint, a resume from it, the consolidated
     fp32 export loaded back and run
  c  evaluation on the GPU in the workers' code (an evaluation-only spec): top-1 over a split and few-shot
  d  JPEG decode of a batch: the CPU loader path vs torchvision's nvJPEG (data.decode_device=cuda)
Missing packages (DeepSpeed, pydantic, ...) are installed from benchmarks/.gpu-wheels (benchmarks/gpu_wheels.sh
fills it on a machine with PyPI) into benchmarks/.gpu-site with `pip install --target`. Without CUDA (and without
--cpu) it exits 2 with one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / ".gpu-wheels"
SITE = ROOT / "benchmarks" / ".gpu-site"
NEEDED = ("deepspeed", "pydantic", "hjson", "webdataset", "braceexpand")


def ensure_packages() -> None:
    """Imports NEEDED, installing them from WHEELS into SITE first when they are missing."""
    sys.path.insert(0, str(SITE))
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        return
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: {', '.join(missing)} not installed and no wheels in {WHEELS} "
                         "(run benchmarks/gpu_wheels.sh where PyPI is reachable, then carry that folder)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(SITE), *wheels], check=True)
    importlib.invalidate_caches()


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.failed = False

    def add(self, check: str, what: str, value) -> None:
        self.rows.append((check, what, value if isinstance(value, str) else f"{value:.4g}"))

    def run(self, check: str, fn, *args) -> None:
        t = time.perf_counter()
        try:
            fn(self, *args)
            self.add(check, "wall s", time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
            self.failed = True
            self.add(check, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            traceback.print_exc()

    def print(self, title: str) -> None:
        w0, w1 = max(len(r[0]) for r in self.rows), max(len(r[1]) for r in self.rows)
        print(f"\n{title}\n{'check':<{w0}}  {'figure':<{w1}}  value\n{'-' * w0}  {'-' * w1}  {'-' * 20}")
        for check, what, value in self.rows:
            print(f"{check:<{w0}}  {what:<{w1}}  {value}")


def check_mfu(t: Table, args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_mfu import measure

    r = measure(args.variant, args.image_size, args.batch, args.mfu_steps, 3 if args.cpu else 10,
                device="cpu" if args.cpu else "cuda")
    t.add("a mfu", f"{r['variant']} {r['image_size']}px bf16 batch {r['batch']}: images/s", r["images_per_s"])
    t.add("a mfu", "step ms", r["step_ms"])
    t.add("a mfu", "MFU", "n/a (no peak for this device)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of "
          f"{r['peak_tflops']:.0f} TFLOP/s")
    if r["peak_memory_gib"] is not None:
        t.add("a mfu", "peak memory GiB", r["peak_memory_gib"])


def _shards(root: Path, n: int, size: int, seed: int) -> str:
    import numpy as np

    from pipeline.data.writer import write_array_shards

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    # learnable: a class-dependent colour ramp under noise
    ramp = np.linspace(0, 1, size)[None, :, None, None] * (labels[:, None, None, None] + 1) * 20
    images = np.clip(ramp + rng.normal(0, 25, (n, size, size, 3)) + 60, 0, 255).astype(np.uint8)
    return write_array_shards(images, labels, str(root), name="synth", class_names=[str(i) for i in range(10)],
                              samples_per_shard=max(16, n // 8), image_format="jpg")


def _run_cfg(args, workdir: Path, urls: dict, name: str, steps: int):
    from pipeline.config import load_config

    return load_config(ROOT / "configs/pretrain/smoke.yaml", [
        f"name={name}", f"model.name={args.worker_variant}", f"model.image_size={args.worker_size}",
        "model.num_classes=10", "model.pre_logits=null", f"data.train={urls['train']}", f"data.val={urls['val']}",
        f"data.fewshot_train={urls['train']}", f"data.fewshot_test={urls['val']}", "train.fewshot_shots=[1,5]",
        f"data.num_workers={args.data_workers}", "data.shuffle_buffer=256", f"train.steps={steps}",
        f"train.global_batch={args.worker_batch}", f"train.micro_batch={args.worker_batch}", "train.precision=bf16",
        "train.zero.stage=2", "train.optim.lr=1e-3", "train.schedule.warmup_steps=2", "train.log_every=5",
        f"train.checkpoint_every={args.worker_steps}", f"train.eval_every={steps}", f"train.fewshot_every={steps}",
        "train.eval_batches=4", "scaling.num_workers=1", f"scaling.use_gpu={str(not args.cpu).lower()}",
        f"scaling.storage_path={workdir / 'runs'}", "tracking.sink=stdout",
    ])


def check_worker(t: Table, args, workdir: Path, urls: dict) -> None:
    import torch

    from pipeline.launch.local import fit_local
    from pipeline.model.checkpoint import load_model
    from pipeline.train.checkpoint import step_of
    from pipeline.train.runstore import RunStore

    first = _run_cfg(args, workdir, urls, "gpu-check", args.worker_steps)
    r1 = fit_local(first, world_size=1)
    t.add("b worker", f"{args.worker_variant} {args.worker_size}px bf16 ZeRO-2, steps", r1.step)
    t.add("b worker", "images/s (last window)", r1.metrics.get("perf/images_per_s", float("nan")))
    t.add("b worker", "data wait fraction", r1.metrics.get("perf/data_wait_fraction", float("nan")))
    t.add("b worker", "train/loss at the end", r1.metrics.get("train/loss", float("nan")))
    t.add("b worker", "committed checkpoint", f"step {step_of(RunStore(r1.run_url).latest() or '')}")
    more = args.worker_steps + 8
    r2 = fit_local(_run_cfg(args, workdir, urls, "gpu-check", more), world_size=1)  # the same run folder
    if r2.step != more:
        raise RuntimeError(f"resume ended at step {r2.step}, not {more}")
    t.add("b worker", "resumed to step", r2.step)
    t.add("b worker", "val/prec1, fewshot 5-shot", f"{r2.metrics.get('val/prec1', float('nan')):.3f}, "
          f"{r2.metrics.get('fewshot/synth_5shot', float('nan')):.3f}")
    model = load_model(r2.final_checkpoint)
    dtypes = {str(p.dtype) for p in model.parameters()}
    x = torch.zeros(2, 3, args.worker_size, args.worker_size)
    out = model(x)
    t.add("b worker", "export", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params {','.join(dtypes)}, "
          f"logits {tuple(out.shape)} finite={bool(torch.isfinite(out).all())}")


def check_eval(t: Table, args, workdir: Path, urls: dict) -> None:
    from pipeline.launch.local import run_rank
    from pipeline.train.spec import FewshotEval, FinalEval, InitSpec, WorkerSpec

    cfg = _run_cfg(args, workdir, urls, "gpu-check-eval", 1)
    final = workdir / "runs" / "gpu-check" / "final"
    spec = WorkerSpec(config=cfg, run_url=str(workdir / "runs" / "gpu-check-eval"), init=InitSpec(checkpoint=str(final)),
                      evaluate_only=True, final_eval=FinalEval(plots=False),
                      fewshot_eval=FewshotEval(pool=urls["train"], test=urls["val"]))
    t0 = time.perf_counter()
    m = run_rank(spec, 0, 1)
    dt = time.perf_counter() - t0
    t.add("c eval", f"top-1 over {int(m['final/eval_images'])} images", m["final/top1"])
    t.add("c eval", "few-shot 1 / 5-shot", f"{m['fewshot/1shot']:.3f} / {m['fewshot/5shot']:.3f}")
    t.add("c eval", "images/s (top-1 + both few-shot sets)",
          (m["final/eval_images"] * 2 + args.samples) / dt)


def check_decode(t: Table, args, urls: dict) -> None:
    import torch

    from pipeline.data.config import DataConfig
    from pipeline.data.loader import TrainLoader
    from pipeline.data.manifest import load_dataset_spec
    from pipeline.data.samples import iter_tar_samples
    from pipeline.data.storage import Storage, open_url
    from pipeline.data.transforms import IMAGE_KEYS, decode_batch, decode_image

    device = "cpu" if args.cpu else torch.device("cuda", torch.cuda.current_device())
    manifest = load_dataset_spec(urls["train"])
    with open_url(manifest.shards[0], "rb") as f:
        data = [next(s[k] for k in IMAGE_KEYS if k in s) for s in iter_tar_samples(f)]
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    t0 = time.perf_counter()
    for _ in range(3):
        for d in data:
            decode_image(d)
    cpu = 3 * len(data) / (time.perf_counter() - t0)
    t.add("d decode", f"CPU decode ({len(data)} JPEGs, one core), images/s", cpu)
    decode_batch(encoded, device)
    if not args.cpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        decode_batch(encoded, device)
    if not args.cpu:
        torch.cuda.synchronize()
    batched = 10 * len(data) / (time.perf_counter() - t0)
    t.add("d decode", f"batched decode_jpeg on {device}, images/s", batched)
    t.add("d decode", "batched / one CPU core", batched / cpu)
    # the loader end to end (training crops, 224 px): decoding in the DataLoader workers vs on the device
    data_cfg = DataConfig(train=urls["train"], num_workers=args.data_workers, shuffle_buffer=256)
    for name, on in (("workers (CPU)", None), (f"batch on {device}", device)):
        loader = TrainLoader(manifest, data_cfg, Storage(), global_batch=args.worker_batch,
                             micro_batch=args.worker_batch, image_size=args.worker_size, batch_decode_device=on)
        t0, n, steps = time.perf_counter(), 0, loader.steps()
        for _ in range(loader.steps_per_epoch):
            n += sum(len(batch["key"]) for batch in next(steps))
        if not args.cpu:
            torch.cuda.synchronize()
        t.add("d decode", f"loader, decode in {name} ({args.data_workers} workers), images/s",
              n / (time.perf_counter() - t0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run every piece on the CPU with a tiny model (no figures)")
    p.add_argument("--variant", default="vit_b16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mfu-steps", type=int, default=30)
    p.add_argument("--worker-variant", default="vit_s16")
    p.add_argument("--worker-size", type=int, default=224)
    p.add_argument("--worker-batch", type=int, default=64)
    p.add_argument("--worker-steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=2048, help="synthetic training images (the val split is 1/4)")
    p.add_argument("--data-workers", type=int, default=6)
    args = p.parse_args()
    if args.cpu:
        args.variant, args.image_size, args.batch, args.mfu_steps = "vit_pico4", 16, 8, 3
        args.worker_variant, args.worker_size, args.worker_batch, args.worker_steps = "vit_pico4", 32, 16, 6
        args.samples, args.data_workers = 192, 0
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run it on a GPU machine (or --cpu to check the script)",
                  file=sys.stderr)
            return 2
        os.environ["DS_ACCELERATOR"] = "cuda"
    ensure_packages()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from pipeline.launch.local import free_port, init_process_group

    init_process_group(0, 1, free_port(), use_gpu=not args.cpu)
    table = Table()
    with tempfile.TemporaryDirectory(prefix="vitpipe-gpu-check-") as tmp:
        workdir = Path(tmp)
        urls = {"train": _shards(workdir / "train", args.samples, args.worker_size, 0),
                "val": _shards(workdir / "val", args.samples // 4, args.worker_size, 1)}
        table.run("a mfu", check_mfu, args)
        table.run("b worker", check_worker, args, workdir, urls)
        table.run("c eval", check_eval, args, workdir, urls)
        table.run("d decode", check_decode, args, urls)
    import torch

    device = "cpu (--cpu: the script checked, no figures)" if args.cpu else torch.cuda.get_device_name()
    table.print(f"vitpipe gpu_check on {device}, torch {torch.__version__}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
