# CoRX — the two commands a new user needs (see README):
#   make demo   simulate a patient series and run the pipeline end to end -> output/demo/
#   make test   run the whole test suite (then the torch-free part under Slicer 5.8's Python 3.9)
# Both create .venv/ on first use and install everything the project needs into it.

PYTHON ?= python3
VENV   ?= .venv
# torch is pinned in the same install command so nothing upgrades it to a multi-GB CUDA
# build. On a machine without a local CPU wheel, point pip at a CPU wheel index with
# TORCH_INDEX=<url> (GPU users: TORCH="torch" to take the CUDA build).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS      ?= test,baseline,scanner
OUT         ?= output/demo

PIP_INDEX_ARG = $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
STAMP = $(VENV)/.corx-installed

# Slicer 5.8 runs Python 3.9 with these packages and no torch: the TIA, DICOM-time and I/O tests run
# there too (slicer-core has no 3.9 wheel, so the MRML tests run only in the main environment).
PY39    ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9) $(shell command -v python3.9 2>/dev/null))
VENV58  ?= .venv-slicer58
SLICER58_PACKAGES = numpy==1.26.4 scipy==1.13.1 SimpleITK==2.3.1 pydicom==2.4.4 "pytest>=7"
SLICER58_TESTS = Testing/test_tia.py Testing/test_dicom_times.py Testing/test_dicom.py Testing/test_series_io.py Testing/test_torch_free.py \
                 Testing/test_bad_input.py Testing/test_pvc.py

.PHONY: setup demo test test-slicer58 clean

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
	$(MAKE) --no-print-directory test-slicer58

test-slicer58:
ifeq ($(strip $(PY39)),)
	@echo "test-slicer58: no python3.9 on this machine (set PY39=/path/to/python3.9); Slicer 5.8 checks skipped"
else
	test -f $(VENV58)/.installed || ($(PY39) -m venv $(VENV58) && \
	  $(VENV58)/bin/python -m pip install --quiet $(SLICER58_PACKAGES) && touch $(VENV58)/.installed)
	PYTHONPATH=CoRXRegistration:TIAMapping $(VENV58)/bin/python -m pytest -q -p no:cacheprovider $(SLICER58_TESTS)
endif

clean:
	rm -rf $(VENV) $(VENV58) output .pytest_cache
