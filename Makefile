# One-command set-up, tests and demo. Every target is idempotent.
#   make setup   build .venv and install everything (Debian packages too, when we are root with apt)
#   make test    run the whole test suite (runs setup first if needed)
#   make test-fast  the unit tests and the loader/checkpoint/engine integration tests (a few minutes): for iterating
#   make demo    run the end-to-end demo
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
# Install order matters: torch first (2.14.1 + torchvision 0.29.1 is the pair whose wheels install locally and
# that timm/torchvision need), then DeepSpeed built against that torch (its sdist imports torch at build time),
# then the project with its test extras.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEBIAN_PACKAGES := dataset-fashion-mnist chromium iproute2

# DeepSpeed JIT-compiles ops on first use; keep them in a cache that survives re-runs, one per venv (an op built
# against another venv's headers is rebuilt on every load, so two venvs sharing one cache thrash it).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/vitpipe/torch_extensions/$(shell printf '%s' '$(abspath $(VENV))' | md5sum | cut -c1-12)
# The venv's tools first, as an activated venv has them: torch builds those ops with the first `ninja` on PATH, and
# two ninjas (the venv's pip one, Debian's ninja-build) hash their command lines differently, so every process
# that found the other one rebuilt the ops (~1-2 min of both cores, several times per test run).
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test test-fast test-unit lint demo bench clean debian-packages

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory debian-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -q -e '.[test]'
	$(PY) -c "import torch, torchvision, deepspeed, ray, mlflow, webdataset, s3fs, timm; print('setup ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
	# DeepSpeed's CPU ops (cpu_adam for optimizer offload, shm for CPU collectives) built once here, into this venv's
	# cache, rather than inside the first run that needs them (~1-2 min of both cores)
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); \
	    from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
	touch $(STAMP)

# Debian packages: the demo's real data (Fashion-MNIST), headless Chromium for the UI check, iproute2 for the
# multi-node network namespaces. Skipped with a message when we are not root or have no apt.
debian-packages:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else echo "note: not root or no apt-get; skipping Debian packages ($(DEBIAN_PACKAGES)); the demo falls back to scikit-learn digits"; fi

test: setup
	$(PY) -m pytest tests --durations=25

# No Ray cluster, no MLflow server: the sample plan, the loader on local disk and S3, stop markers, the engine on
# gloo ranks.
# Import order, imports at the top of files (pyproject.toml's [tool.ruff]); tests/unit/test_layers.py runs it too.
lint: setup
	$(PY) -m ruff check pipeline jobs tests benchmarks

test-fast: setup
	$(PY) -m pytest tests/unit tests/integration/test_data_loader.py tests/integration/test_stop_signal.py \
	    tests/integration/test_pretrain_engine.py tests/integration/test_evaluation.py

test-unit: setup
	$(PY) -m pytest tests/unit

demo: setup
	$(VENV)/bin/vitpipe demo

bench: setup
	$(PY) benchmarks/model_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
