# Two entry points: `make demo` (fresh machine -> demo) and `make test` (fresh machine -> tests).
# TORCH pins the PyTorch build installed first; the default is the local CPU wheel
# (`pip install torch==2.13.0`), so pip never pulls gigabytes of CUDA packages.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/tvsprune demo --out demo-out

# torchvision and timm for the architecture tests only: their model definitions are pure
# Python; --no-deps keeps pip from replacing the CPU torch (see tests/hub_models.py).
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps torchvision==0.29.2 timm==1.0.31
	touch $@

test: setup $(VENV)/.test-installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache
