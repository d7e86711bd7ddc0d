# Two commands on a fresh machine:  make quickstart  /  make test
# Everything goes into .venv (created with --system-site-packages so that a torch already
# installed on the machine, CPU or CUDA, is kept). torch==2.13.0 is installed only when no torch
# imports: on machines like ours it is the CPU wheel, never the multi-GB CUDA stack.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install install-test install-bench quickstart test test-fast screenshots benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"

install-bench: install  # benchmarks/fastnas_comparison.py: NVIDIA ModelOpt, and torchprofile without the torchvision it declares (pyproject.toml)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --no-deps "torchprofile==0.0.4"

quickstart: install
	$(BIN)/secateurs search configs/quickstart.yaml

test: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=20

test-fast: install-test  # everything not marked integration (no Ray, no MLflow store): under two minutes
	$(BIN)/python -m pytest -q -n 2 -m "not integration"

screenshots: install-test  # refresh docs/img from a real search in a real MLflow UI (needs Debian's chromium)
	SECATEURS_UI_SCREENSHOTS=docs/img $(BIN)/python -m pytest -q tests/search/test_ui_browser.py

benchmark: install
	$(BIN)/python benchmarks/quickstart.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
