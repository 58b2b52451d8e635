# Two commands do all the set-up on a fresh machine:
#   make run   - install, then screen ../shared/data/dicom into SQLite (cxr-screen.db)
#   make test  - install, then lint, type-check and run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DICOM ?= ../shared/data/dicom

.PHONY: install run test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	touch $@

run: install
	$(VENV)/bin/cxr-screen run $(DICOM)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest
