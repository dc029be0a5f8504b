# Two entry points, each doing its own set-up on a fresh machine:
#   make run   - create .venv, install, run the main job on the embedded default model
#   make test  - create .venv, install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= models/pydoc-moe
PROMPT ?= The for statement
# 8MB per actor holds 5 of its 16 experts (each 1.6 MB in float32): the run pages.
WORKER_MEMORY ?= 8MB
ARGS ?=
# Every test must pass alone and in any order: `make test` runs the whole suite shuffled (pytest-randomly:
# module order, then test order within each module) with a fresh seed it prints; `make test SEED=N` replays
# that order.
ifndef SEED
SEED := $(shell python3 -c 'import random; print(random.randrange(10**6))')
endif

.PHONY: run test setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/moeshard generate $(MODEL) --workers 2 --worker-memory $(WORKER_MEMORY) --prompt "$(PROMPT)" \
		--max-new-tokens 64 --heatmap expert_heatmap.png $(ARGS)

test: $(VENV)/.installed
	@echo "test order: pytest-randomly seed $(SEED) (replay with: make test SEED=$(SEED))"
	$(PY) -m pytest -q -ra -p randomly --randomly-seed=$(SEED) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
