# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.basinmerge-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
EXTRAS ?= dev,flower,hf

.PHONY: all demo test lint-ruff test-all test-fast bench lint data venv clean

all: test

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; installed only when we are root.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
	    && echo "installed dataset-fashion-mnist" || echo "warning: could not install dataset-fashion-mnist"; \
	  else \
	    echo "note: Fashion-MNIST missing and not root; run 'sudo apt-get install dataset-fashion-mnist' (MNIST-1D is used instead)"; \
	  fi; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/basinmerge demo --force

# `deployment` tests start a real Flower SuperLink, SuperNodes and `flwr run` (minutes each).
test: $(STAMP) data
	$(PY) -m pytest -q -p no:cacheprovider -m "not deployment"

test-all: $(STAMP) data
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP) data
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not flower and not deployment"

bench: $(STAMP) data
	$(PY) -m benchmarks

# ruff (style, imports, bugbear, complexity C901) and mypy (configured in pyproject.toml), both
# from the dev extra that $(STAMP) installs.
lint: lint-ruff
	$(VENV)/bin/mypy src

# ruff alone (style, imports, complexity), for a quick check; CI runs `make lint`.
lint-ruff: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
