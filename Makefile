# The two commands of the README:
#   make demo   set everything up, prepare data, train the tiny preset a few minutes, evaluate, tell a story
#   make test   set everything up and run the whole test suite (what CI runs)
# `make test-fast` skips the tests marked slow.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On this project's machines `pip install torch==2.13.0` takes the local CPU build; an unpinned
# torch would pull gigabytes of CUDA packages. Override on a GPU machine: make TORCH=torch
TORCH  ?= torch==2.13.0
DEMO   ?= out/demo

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py --out $(DEMO)

test: setup
	bash scripts/install_browser.sh
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out *.egg-info .pytest_cache
