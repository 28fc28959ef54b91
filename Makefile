# Quick start: `make demo` and `make test`. Both create/update .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all clean reproduce-tables table smoke-data fashion-data sizes bench bench-infer kernels lean-check

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard bnn_adapt/deploy/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# digits comparison: base pretraining if needed, then five strategies, one table
demo: install
	$(PY) -m bnn_adapt --multirun --config-dir sweeps --config-name demo
	$(PY) -m bnn_adapt.report outputs/demo

# ---------------------------------------------------------------- thesis tables (README: Reproducing the thesis)
# `make reproduce-tables [PROFILE=full|smoke]`: every thesis table; `make table T=6.5`: one
# (T=fashion: the real-data Fashion-MNIST table). Each table is a Hydra multirun with a fixed
# sweep directory (sweeps/table_*.yaml); runs that already finished with the same config are
# not repeated, so an interrupted reproduction continues where it stopped. Tables, CSVs and
# figures are rendered from the runs' own files into $(RESULTS). ARGS: extra overrides for
# every run (e.g. ARGS="trainer=gpu hydra/launcher=parallel" or ARGS=base.bn=adapt).
PROFILE ?= full
ARGS ?=
RESULTS ?= $(if $(filter smoke,$(PROFILE)),results/smoke,results)
ifeq ($(PROFILE),smoke)
export OMP_NUM_THREADS ?= 1   # tiny models: one torch thread per process is steadier on a shared CPU
endif
THESIS_TABLES := 5.2 6.1 6.2 6.3 6.4 6.5 6.6 6.7
# the sweeps a table needs, bases first; SWEEP:OVERRIDE runs part of a sweep
SWEEPS_5.2 := table_5_2
SWEEPS_6.1 := table_6_1
SWEEPS_6.2 := bases:experiment=cifar5_5_base table_6_2
SWEEPS_6.3 := table_6_1:base=ste_resnet_cifar table_6_3
SWEEPS_6.4 := table_6_1:base=ste_resnet_cifar table_6_4
SWEEPS_6.5 := table_6_1:base=ste_resnet_cifar table_6_5
SWEEPS_6.6 := table_6_6
SWEEPS_6.7 := table_6_7
SWEEPS_fashion := bases:experiment=fashion5_5_base table_fashion
ALL_SWEEPS := table_5_2 table_6_1 bases:experiment=cifar5_5_base table_6_2 table_6_3 table_6_4 table_6_5 table_6_6 table_6_7
DATA_smoke := smoke-data
DATA_fashion := $(if $(filter full,$(PROFILE)),fashion-data)

# run the sweeps in $(1) in order; a sweep that crashes leaves its rows marked in the table
define run_sweeps
	@for s in $(1); do \
	  name=$${s%%:*}; part=$$( [ "$$s" != "$$name" ] && echo "$${s#*:}" ); \
	  echo "== sweep $$name $$part (profile $(PROFILE))"; \
	  $(PY) -m bnn_adapt --multirun --config-dir sweeps --config-name $$name profile=$(PROFILE) $$part $(ARGS) \
	    || echo "== sweep $$name did not finish: its missing rows are marked in the table"; \
	done
endef
RENDER = $(PY) -m bnn_adapt.tables --profile $(PROFILE) --out $(RESULTS) $(foreach a,$(ARGS),--override $(a))

reproduce-tables: install $(DATA_$(PROFILE))
	$(call run_sweeps,$(ALL_SWEEPS))
	$(RENDER) $(THESIS_TABLES)

table: install $(DATA_$(PROFILE)) $(DATA_$(T))
	@test -n "$(SWEEPS_$(T))" || { echo "usage: make table T=<$(THESIS_TABLES) fashion> [PROFILE=full|smoke]"; exit 2; }
	$(call run_sweeps,$(SWEEPS_$(T)))
	$(RENDER) $(T)

# small generated datasets in the real formats + a tiny ReActNet checkpoint (kept if present)
smoke-data: install
	$(PY) -m bnn_adapt.synthetic

# Fashion-MNIST from Debian's dataset-fashion-mnist package (offline), installed if missing and root
fashion-data:
	@test -d /usr/share/datasets/fashion-mnist || test -d data/fashion_mnist || \
	  { [ "$$(id -u)" = 0 ] && apt-get install -y dataset-fashion-mnist; } || \
	  { echo "Fashion-MNIST missing: apt-get install dataset-fashion-mnist (or put the IDX files in data/fashion_mnist)"; exit 2; }

# bytes on disk at the thesis configurations: packed bases and exported adapters vs the size formula (README)
sizes: install
	$(PY) -m bnn_adapt.sizes

# speed and memory of every strategy x trainer.memory, side by side in one process (README: Speed and
# memory). Writes benchmarks/results.{json,md}; a full run also refreshes the README's table.
# QUICK=1: fewer steps (a few minutes); BENCH_ARGS: e.g. --models ste_resnet_cifar --threads 2 --device cuda
QUICK ?=
BENCH_ARGS ?=
bench: install
	$(PY) -m bnn_adapt.bench $(if $(QUICK),--quick,--readme README.md) $(BENCH_ARGS)

# 1-bit inference: the packed XNOR-popcount kernels against fp32 convs, side by side (README: 1-bit inference).
# Writes benchmarks/inference.{json,md}; a full run also refreshes the README's table. QUICK=1: a few minutes.
# PY=/path/to/python runs it with an interpreter that has the package already (no install step).
bench-infer: $(if $(filter $(VENV)/bin/python,$(PY)),install)
	$(PY) -m bnn_adapt.tools.bench_infer $(if $(QUICK),--quick,--readme README.md) $(BENCH_ARGS)

# rebuild the kernels in place after editing bnn_adapt/deploy/csrc (make install builds them once)
kernels:
	$(PY) setup.py build_ext --inplace

# pretrain the digits base with trainer.memory=standard|lean|lean_fp16, 3 seeds; compare final top-1
lean-check: install
	$(PY) -m bnn_adapt --multirun --config-dir sweeps --config-name lean_pretrain
	$(PY) -m bnn_adapt.report outputs/lean_pretrain

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

clean:
	rm -rf outputs/runs outputs/multiruns outputs/demo outputs/lean_pretrain
