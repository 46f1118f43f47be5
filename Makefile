# minillm — every target does its own set-up: a virtual environment in .venv, made on first use.
# `make demo` installs the package alone; `make test` adds the dev and crosscheck extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
# torch is pinned in the same pip command as the extras so pip takes the CPU wheel on this machine.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0
# One BLAS thread: minillm's matrices are small (C = 128), so a second OpenBLAS thread gains little
# on a quiet 2-core machine and loses 3-5x when anything else runs (measured: a PPO iteration 2 s
# vs 7-11 s, pretraining 121 s vs 329 s). Override with `make demo OPENBLAS_NUM_THREADS=2`.
export OPENBLAS_NUM_THREADS ?= 1
# The CLI targets choose threads per stage instead (minillm/threads.py, docs/performance.md): a second
# thread for training only when a core is idle at the stage's start, one for generation.
# MINILLM_THREADS=auto overrides the pin above for them; `make demo MINILLM_THREADS=1` restores it.
demo bench: export MINILLM_THREADS ?= auto

BASE_STAMP := $(VENV)/.base-installed
DEV_STAMP := $(VENV)/.dev-installed
CHAPTERS := 01 02 03 04 05 06 07 08 09 10 11 12 13 14

.PHONY: help demo test notebooks bench gpu-check datasets clean $(addprefix test-ch,$(CHAPTERS))

help:
	@echo "make demo       run the whole fine-tuning pipeline and print where the report is"
	@echo "make test       run every test and execute every notebook"
	@echo "make test-chNN  run one chapter's tests, e.g. make test-ch05"
	@echo "make datasets   regenerate datasets/ from minillm/tasks.py"
	@echo "make bench      speed and memory benchmarks (JSON)"
	@echo "make gpu-check  build the CUDA extension, run the cuda tests and the kernel benchmark"

$(VENV)/bin/activate:
	$(PY) -m venv $(VENV)

$(BASE_STAMP): $(VENV)/bin/activate pyproject.toml setup.py
	$(PYTHON) -m pip install -q -e .
	@touch $@

$(DEV_STAMP): $(VENV)/bin/activate pyproject.toml setup.py
	$(PYTHON) -m pip install -q "$(TORCH)" -e ".[dev,crosscheck]"
	@touch $@ $(BASE_STAMP)

demo: $(BASE_STAMP)
	$(BIN)/minillm pipeline

# Tests, then every notebook executed in place (outputs refreshed), then the check that each
# notebook's printed claims fall in the ranges its chapter states.
test: $(DEV_STAMP)
	$(PYTHON) -m pytest -q tests --ignore=tests/test_notebooks.py
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=300 --overwrite notebooks && \
	  $(PYTHON) -m pytest -q tests/test_notebooks.py; \
	else echo "no notebooks yet"; fi

$(addprefix test-ch,$(CHAPTERS)): test-ch%: $(DEV_STAMP)
	$(PYTHON) -m pytest -q -m ch$* tests

notebooks: $(DEV_STAMP)
	$(PYTHON) -m pytest -q --nbmake --nbmake-timeout=300 --overwrite notebooks

datasets: $(BASE_STAMP)
	$(PYTHON) -m minillm.tasks --out datasets

bench: $(DEV_STAMP)
	$(BIN)/minillm bench generate
	$(BIN)/minillm bench train-step

gpu-check:
	bash .ci/gpu-check

clean:
	rm -rf build dist *.egg-info minillm/*.so runs .pytest_cache
