# Quick start:  make demo                          (set up .venv, build, run the self-check + benchmark)
#               .venv/bin/python -m pytest -q tests (run the test suite; `make test` also sets up first)
# VENV=        use $(PYTHON)'s own environment instead of .venv (e.g. a machine with torch preinstalled)
# TORCH_SPEC   torch to install when the environment has none (torch==2.13.0: a CPU build where a local
#              wheel exists; elsewhere any torch>=2.6 works, a CUDA one for the SM90 kernels)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
FLASHMLA_BUILD_CUDA ?= auto
export FLASHMLA_BUILD_CUDA

ifeq ($(VENV),)
PY := $(PYTHON)
STAMP := build/.installed-system
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: setup demo test bench clean

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m torch_flashmla

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_decode.py

$(STAMP): $(SOURCES)
ifneq ($(VENV),)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
endif
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q ninja numpy pytest expecttest
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	mkdir -p $(dir $(STAMP)) && touch $(STAMP)

clean:
	rm -rf build .venv torch_flashmla/_C*.so *.egg-info
