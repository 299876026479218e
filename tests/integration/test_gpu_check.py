"""benchmarks/gpu_check.py, the prepared GPU check, run here the way it runs on a GPU machine that has no Ray, no
MLflow, no s3fs (nor its aiohttp and botocore) and no pyarrow (imports of them fail): without CUDA it refuses with
one line; with --cpu every piece runs on the CPU (the worker's loop, a resume, the export, evaluation in the workers' code, both decode paths)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BLOCK = '''
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "s3fs", "aiohttp", "botocore", "boto3", "pyarrow"):
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, _Absent())
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("DS_ACCELERATOR", None)  # the script sets its own
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(660)
def test_gpu_check_refuses_without_cuda_and_runs_every_piece_on_the_cpu(tmp_path):
    refused = _run(tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here; run it on a GPU machine (or --cpu to check the script)"]
    done = _run(tmp_path, "--cpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("vitpipe gpu_check on cpu"):]
    rows = {}
    for line in table.splitlines()[3:]:
        check, rest = line[:10].strip(), line[10:]
        rows.setdefault(check, []).append(rest)
    assert set(rows) == {"a mfu", "b worker", "c eval", "d decode"}, table
    assert "FAILED" not in table
    assert any("resumed to step" in r and r.rstrip().endswith(" 14") for r in rows["b worker"]), table
    assert any("torch.float32" in r and "finite=True" in r for r in rows["b worker"]), table
    assert any("top-1 over 48 images" in r for r in rows["c eval"]), table
    assert any("loader, decode in batch on cpu" in r for r in rows["d decode"]), table
