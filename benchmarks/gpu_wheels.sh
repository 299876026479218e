#!/usr/bin/env bash
# The Python 3.12 wheels benchmarks/gpu_check.py needs on a GPU machine that has torch, torchvision, triton, numpy,
# PyYAML, safetensors, fsspec, msgpack, ninja, psutil, py-cpuinfo and tqdm but no DeepSpeed, pydantic or webdataset, and no
# package index. Run it here (PyPI reachable); it fills benchmarks/.gpu-wheels/ (ignored by git, well under the
# 64 MiB a device run may carry), which gpu_check.py installs with `pip install --target` before importing them.
#   bash benchmarks/gpu_wheels.sh            # then: run gpu_check.py there with carry=[benchmarks/.gpu-wheels]
# The versions are the ones this checkout's venv runs (pinned below from it), so both machines run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=benchmarks/.gpu-wheels
rm -rf "$DEST" && mkdir -p "$DEST"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# DeepSpeed ships an sdist only: build its (pure-Python, ops compiled at first use) wheel here, against this torch
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
  "deepspeed==$(version deepspeed)" 2>&1 | grep -v "^\s*$" | tail -3 || true
ls "$DEST"/deepspeed-*.whl >/dev/null
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in pydantic pydantic_core annotated_types typing_inspection hjson webdataset braceexpand; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$pkg==$(version "$pkg")"
done
du -sh "$DEST"
ls -1 "$DEST"
