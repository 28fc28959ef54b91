# Quick start: `make demo` and `make test`. Both create/update .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lock test-compat gpu-check demo test test-all clean reproduce-tables table smoke-data fashion-data sizes bench bench-infer kernels lean-check docs docs-serve docs-screenshots

LOCK := requirements.lock

install: $(STAMP)

# pyproject.toml states ranges; the exact known-good set is requirements.lock (pip constraints)
$(STAMP): pyproject.toml setup.py $(LOCK) $(wildcard bnn_adapt/deploy/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]" -c $(LOCK)
	touch $(STAMP)

# regenerate requirements.lock: the newest versions pyproject's ranges allow, resolved in a fresh venv
# (DEVELOPERS.md: Dependencies), then `make install` and the tests use them
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e ".[test]"
	{ echo "# The known-good set: make install installs exactly these (pip -c). Regenerate: make lock"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock

# the oldest supported torch / torchvision / lightning in a second venv (the rest from the lock; CUDA wheels,
# which run on CPU: PyPI has no CPU-only torch 2.11), then a digits adaptation, export and predict, and the
# tests of folding, packing, lean backprop and received files (weights_only loading) (DEVELOPERS.md: Dependencies)
COMPAT := .venv-compat
COMPAT_PINS := torch==2.11.0 torchvision==0.26.0 lightning==2.5.6
test-compat:
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT)/bin/python -m pip install --quiet $(COMPAT_PINS)
	grep -viE '^(torch|torchvision|lightning|pytorch-lightning|triton|nvidia-.*|cuda-.*)==' $(LOCK) \
	  > $(COMPAT)/constraints.txt  # the lock less torch and what comes with it
	$(COMPAT)/bin/python -m pip install --quiet -e ".[test]" -c $(COMPAT)/constraints.txt
	$(COMPAT)/bin/python -m benchmarks.gpu_check --device cpu --expect $(COMPAT_PINS) --only predict_cpu \
	  --work outputs/gpu_check_compat
	OMP_NUM_THREADS=1 $(COMPAT)/bin/python -m pytest -q -p no:cacheprovider tests/test_bits.py \
	  tests/test_packed_inference.py tests/test_export.py tests/test_predict.py tests/test_lean.py tests/test_lean_steps.py \
  tests/test_received_checkpoints.py tests/test_received_packed_base.py tests/test_received_adapter_files.py \
  tests/test_fuzz_received_files.py tests/test_write_errors.py

# digits comparison: base pretraining if needed, then five strategies, one table
# (ARGS: extra overrides, e.g. `make demo ARGS=logger=[csv,tensorboard]`)
demo: install
	$(PY) -m bnn_adapt --multirun --config-dir sweeps --config-name demo $(ARGS)
	$(PY) -m bnn_adapt.report outputs/demo

# ---------------------------------------------------------------- thesis tables (docs: Reproducing the thesis)
# `make reproduce-tables [PROFILE=full|smoke]`: every thesis table; `make table T=6.5`: one; PLAN=1: print every run
# it needs, which are complete and the estimated time of the rest from measured epoch times (runs nothing)
# (T=fashion: the real-data Fashion-MNIST table). Each table is a Hydra multirun with a fixed
# sweep directory, sweeps/table_*.yaml, whose `table:` node says what it needs first (bases);
# runs that already finished with the same config are not repeated, so an interrupted
# reproduction continues where it stopped. Tables, CSVs and figures are rendered from the runs'
# own files into $(RESULTS). ARGS: extra overrides for every run (e.g. ARGS="trainer=gpu
# hydra/launcher=parallel"). PROTOCOL=clean: adapt the last base epoch with frozen BN (default
# thesis: its best epoch, BN drifting), into run directories and $(RESULTS)/clean of its own.
PROFILE ?= full
PROTOCOL ?= thesis
ARGS ?=
RESULTS ?= $(if $(filter smoke,$(PROFILE)),results/smoke,results)$(if $(filter clean,$(PROTOCOL)),/clean)
ifeq ($(PROFILE),smoke)
export OMP_NUM_THREADS ?= 1   # tiny models: one torch thread per process is steadier on a shared CPU
endif
DATA_smoke := smoke-data
DATA_fashion := $(if $(filter full,$(PROFILE)),fashion-data)
DATA_fashion_bn := $(DATA_fashion)
TABLES = $(PY) -m bnn_adapt.thesis.tables --profile $(PROFILE) --protocol $(PROTOCOL) --out $(RESULTS) $(foreach a,$(ARGS),--override $(a))

reproduce-tables: install $(if $(PLAN),,$(DATA_$(PROFILE)))
	$(TABLES) $(if $(PLAN),--plan,--run)

table: install $(DATA_$(PROFILE)) $(DATA_$(T))
	@test -n "$(T)" || { echo "usage: make table T=<id> [PROFILE=full|smoke]; ids: python -m bnn_adapt.thesis.tables --list"; exit 2; }
	$(TABLES) --run $(T)

# small generated datasets in the real formats + a tiny ReActNet checkpoint (kept if present)
smoke-data: install
	$(PY) -m bnn_adapt.thesis.synthetic

# Fashion-MNIST from Debian's dataset-fashion-mnist package (offline), installed if missing and root
fashion-data:
	@test -d /usr/share/datasets/fashion-mnist || test -d data/fashion_mnist || \
	  { [ "$$(id -u)" = 0 ] && apt-get install -y dataset-fashion-mnist; } || \
	  { echo "Fashion-MNIST missing: apt-get install dataset-fashion-mnist (or put the IDX files in data/fashion_mnist)"; exit 2; }

# bytes on disk at the thesis configurations: packed bases and exported adapters vs the size formula (docs: Deployment)
sizes: install
	$(PY) -m bnn_adapt.thesis.sizes

# speed and memory of every strategy x trainer.memory, timed side by side in one process, peaks in fresh
# processes, and whole epochs through python -m bnn_adapt's training against a bare PyTorch loop (docs: Speed and
# memory). Writes benchmarks/results.{json,md} and benchmarks/epochs.json, which the docs page includes as written.
# QUICK=1: fewer steps (a few minutes); BENCH_ARGS: e.g. --models ste_resnet_cifar --threads 2 --device cuda --only epochs
QUICK ?=
BENCH_ARGS ?=
bench: install
	$(PY) -m benchmarks.bench $(if $(QUICK),--quick) $(BENCH_ARGS)

# 1-bit inference: the packed XNOR-popcount kernels against fp32 convs, side by side (docs: Speed and memory).
# Writes benchmarks/inference.{json,md}, which the docs page includes as written. QUICK=1: a few minutes.
# PY=/path/to/python runs it with an interpreter that has the package already (no install step).
bench-infer: $(if $(filter $(VENV)/bin/python,$(PY)),install)
	$(PY) -m benchmarks.bench_infer $(if $(QUICK),--quick) $(BENCH_ARGS)

# rebuild the kernels in place after editing bnn_adapt/deploy/csrc (make install builds them once)
kernels:
	$(PY) setup.py build_ext --inplace

# pretrain the digits base with memory=standard|lean|lean_fp16, 3 seeds; compare top-1, every step's loss and the final checkpoints
lean-check: install
	$(PY) -m bnn_adapt --multirun --config-dir sweeps --config-name lean_pretrain
	$(PY) -m bnn_adapt.report outputs/lean_pretrain

# the GPU story in one prepared run of at most 8 minutes on one GPU, each step with its own time limit
# (docs: Scale-out); writes benchmarks/gpu_check.{md,json}. DEVICE=cpu: the same steps at tiny
# sizes on CPU (a few minutes; its report goes to outputs/gpu_check/)
DEVICE ?= cuda
gpu-check: install
	$(PY) -m benchmarks.gpu_check --device $(DEVICE)

# ---------------------------------------------------------------- documentation site (mkdocs.yml, docs/)
# `make docs`: the configuration reference regenerated from conf/ (docs/hooks/config_reference.py), then a strict build into site/
# (a broken link, a missing anchor or a missing included file fails it); `make docs-serve`: at
# http://127.0.0.1:8000, rebuilt on every change; `make docs-screenshots`: headless Chromium
# (Debian's chromium package) screenshots of the built home and configuration pages, to look at.
CHROMIUM ?= chromium
SCREENSHOT_PAGES ?= index.html reference/configuration/index.html
docs docs-serve: export NO_MKDOCS_2_WARNING = 1   # Material's banner about its successor, printed on every build
docs: install
	$(PY) -m mkdocs build --strict

docs-serve: install
	$(PY) -m mkdocs serve

docs-screenshots: docs
	@command -v $(CHROMIUM) >/dev/null || { echo "needs Chromium: apt-get install chromium"; exit 2; }
	mkdir -p site/screenshots
	for page in $(SCREENSHOT_PAGES); do \
	  profile=$$(mktemp -d); \
	  $(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	    --disable-sync --no-first-run --user-data-dir=$$profile --window-size=1280,2000 --hide-scrollbars \
	    --screenshot=site/screenshots/$$(echo $${page%/index.html} | tr / _ | sed 's/\.html$$//').png \
	    file://$(CURDIR)/site/$$page 2>/dev/null; \
	  rm -rf $$profile; \
	done
	@ls site/screenshots/*.png

# the fast tier (in process, tiny widths); test-all adds the integration tier (tests marked integration:
# the command line as a subprocess, search workers, DDP, submitit, PostgreSQL, the smoke reproduction)
# the fast tier on every core (pytest-xdist), one torch thread per worker; the integration tier after it, one test
# at a time (its tests start processes of their own)
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto

test-all: test
	$(PY) -m pytest -q -m integration

clean:
	rm -rf outputs/runs outputs/multiruns outputs/demo outputs/lean_pretrain
