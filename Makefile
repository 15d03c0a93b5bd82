# The two set-up commands of the README: `make demo` and `make test`.
# VENV can live outside the clone (CI keeps one keyed by the hash of pyproject.toml).
VENV ?= .venv
# The Python the virtual environment is made with: PYTHON if you name one, else the newest python3.1x (3.11 or
# later) on PATH that runs (a pyenv shim of a version that is not selected does not). macOS's own python3 is 3.9.
PYTHON ?=
CANDIDATES := $(or $(PYTHON),$(foreach v,20 19 18 17 16 15 14 13 12 11,python3.$(v)) python3)
NEEDED := import sys; sys.exit(sys.version_info < (3, 11))
# A CPU build where the platform offers one on its default index; users with a GPU may install their own torch.
TORCH ?= torch==2.13.0
# named in the message when no Python fits
SHOWN := $(or $(PYTHON),python3)
comma := ,
STAMP := $(VENV)/.yem-deps-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# setuptools warns at every editable install ("Editable installation … same name as your package"); it says
# nothing about yem, so that one warning is silenced.
EDITABLE := PYTHONWARNINGS='ignore:Editable installation'

ifeq ($(wildcard $(STAMP)),)
# The environment is to be made: find its Python first, and stop before anything is created if none fits.
FOUND := $(shell for p in $(CANDIDATES); do "$$p" -c '$(NEEDED)' 2>/dev/null && { echo "$$p"; break; }; done)
ifeq ($(FOUND),)
GOT := $(shell command -v $(SHOWN) >/dev/null && $(SHOWN) --version 2>&1 | head -n 1)
$(error Python: yem needs 3.11 or newer (got $(SHOWN): $(or $(GOT),not found)$(if $(PYTHON),,$(comma) and no newer python3.1x on PATH)). Install one (brew install python@3.12, or uv python install 3.12), then run make again, or name it: make demo PYTHON=/path/to/python3.12)
endif
endif

.PHONY: install demo test check

$(STAMP):
	$(FOUND) -m venv $(VENV)
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
