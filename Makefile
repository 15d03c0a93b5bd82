# The two set-up commands of the README: `make demo` and `make test`.
# VENV can live outside the clone (CI keeps one keyed by the hash of pyproject.toml).
VENV ?= .venv
PYTHON ?= python3
# A CPU build where the platform offers one on its default index; users with a GPU may install their own torch.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.yem-deps-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# setuptools warns at every editable install ("Editable installation … same name as your package"); it says
# nothing about yem, so that one warning is silenced.
EDITABLE := PYTHONWARNINGS='ignore:Editable installation'

.PHONY: install demo test check

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip "setuptools>=69"
	$(EDITABLE) $(VENV)/bin/pip install --quiet "$(TORCH)" -e ".[test,lowmem]"
	touch $@

install: $(STAMP)
	$(EDITABLE) $(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .

# The one-liner with no options: `dvc repro` as one program, ending with where the LoRA, grid and card are.
demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 $(VENV)/bin/python -m yem train

test: install
	$(VENV)/bin/python -m pytest

# ruff, and the import layers of docs/architecture.md (import-linter contracts in pyproject.toml)
check: install
	$(VENV)/bin/ruff check yem stages tests benchmarks
	$(VENV)/bin/lint-imports
