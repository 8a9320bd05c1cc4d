# gram: set up, run the emoji pipeline, run the tests. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: help setup demo test test-fast lint report clean-results

help:
	@echo "make demo   set up, then run the emoji pipeline end to end (results/emoji/*.md)"
	@echo "make test   set up, then run the test suite (what CI runs)"
	@echo "make lint   snakemake --lint, snakefmt --check, dvc dag"
	@echo "make report snakemake --report results/<profile>/report.html (tables and plots of a finished run)"
	@echo "make setup  only create $(VENV) with the pinned stack and gram installed in editable mode"

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

demo: $(STAMP)
	source $(BIN)/activate && snakemake --cores $(CORES) --profile workflow/profiles/local
	@echo && cat results/emoji/zero_shot.md results/emoji/few_shot.md results/emoji/base_to_new.md \
	  results/emoji/cross_dataset.md results/emoji/domain_generalisation.md

test: $(STAMP)
	source $(BIN)/activate && HF_HUB_OFFLINE=1 python -m pytest -q --durations=12

lint: $(STAMP)
	source $(BIN)/activate && snakemake --lint --cores 1 && snakefmt --check Snakefile workflow/rules && dvc dag

report: $(STAMP)
	source $(BIN)/activate && snakemake --report results/$$(python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['profile'])")/report.html

clean-results:
	rm -rf results/emoji models/emoji logs/emoji
