# gram: set up, run the emoji pipeline, run the tests. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
# the profile `make report` renders (default: the `profile:` key of params.yaml)
PROFILE ?= $(shell awk '/^profile:/ {print $$2}' params.yaml)

.PHONY: help setup demo full test test-fast lint report clean-results

help:
	@echo "make demo       set up, then run the demo: the emoji world, 1 seed, shots 1/4/16 (results/demo/)"
	@echo "make full       set up, then run the full emoji grid: 3 seeds, shots 1-16 (results/emoji/)"
	@echo "make test-fast  set up, then run the unit tests and one tiny end-to-end run"
	@echo "make test       set up, then run the whole test suite (what CI runs)"
	@echo "make lint       snakemake --lint, snakefmt --check, dvc dag"
	@echo "make report     snakemake --report results/<profile>/report.html (PROFILE=demo for the demo's)"
	@echo "make setup      only create $(VENV) with the pinned stack and gram installed in editable mode"

# torch is installed first and pinned for every later install (constraints.txt): an unpinned torch
# would pull a multi-GB CUDA build on a CPU machine.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[workflow,dev,slurm,corpus]"
	$(BIN)/pip install -q -c constraints.txt --no-deps img2dataset
	touch $(STAMP)

setup: $(STAMP)

# the demo is the `demo` profile (the emoji world with smaller budgets and its own grid); `full` is `emoji`
demo: $(STAMP)
	source $(BIN)/activate && snakemake --cores $(CORES) --profile workflow/profiles/local --config profile=demo \
	  && snakemake --report results/demo/report.html --config profile=demo
	@echo && cat results/demo/zero_shot.md results/demo/few_shot.md results/demo/base_to_new.md \
	  results/demo/meta_training.md results/demo/test_time.md

full: $(STAMP)
	source $(BIN)/activate && snakemake --cores $(CORES) --profile workflow/profiles/local --config profile=emoji
	@echo && cat results/emoji/zero_shot.md results/emoji/few_shot.md results/emoji/base_to_new.md \
	  results/emoji/cross_dataset.md results/emoji/domain_generalisation.md results/emoji/test_time.md

test-fast: $(STAMP)
	source $(BIN)/activate && HF_HUB_OFFLINE=1 python -m pytest -q -m "not slow or fast_e2e" --durations=8

test: $(STAMP)
	source $(BIN)/activate && HF_HUB_OFFLINE=1 python -m pytest -q --durations=12

lint: $(STAMP)
	source $(BIN)/activate && snakemake --lint --cores 1 && snakefmt --check Snakefile workflow/rules && dvc dag

report: $(STAMP)
	source $(BIN)/activate && snakemake --report results/$(PROFILE)/report.html --config profile=$(PROFILE)

clean-results:
	rm -rf results/emoji models/emoji logs/emoji results/demo models/demo logs/demo
