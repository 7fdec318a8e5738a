# Two entry points for a fresh machine with only Python 3.10+:
#   make demo   -> creates .venv, installs LungNoduleAI, detects nodules in the bundled sample CT (outputs in demo-output/)
#   make test   -> creates/updates .venv with the test extras, runs ruff (lint and format check) and the whole pytest suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch from the package index; for an NVIDIA GPU install a CUDA build into .venv first (see README).
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/lungnoduleai demo --output-dir demo-output

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo-output .pytest_cache
