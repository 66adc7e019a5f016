# CoRX — the two commands a new user needs (see README):
#   make demo   simulate a patient series and run the pipeline end to end -> output/demo/
#   make test   run the whole test suite
# Both create .venv/ on first use and install everything the project needs into it.

PYTHON ?= python3
VENV   ?= .venv
# torch is pinned in the same install command so nothing upgrades it to a multi-GB CUDA
# build. On a machine without a local CPU wheel, point pip at a CPU wheel index with
# TORCH_INDEX=<url> (GPU users: TORCH="torch" to take the CUDA build).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= test,baseline
OUT         ?= output/demo

PIP_INDEX_ARG = $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
STAMP = $(VENV)/.corx-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(PIP_INDEX_ARG) "$(TORCH)" -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/corx demo --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q Testing

clean:
	rm -rf $(VENV) output .pytest_cache
