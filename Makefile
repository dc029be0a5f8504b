# Two entry points, each doing its own set-up on a fresh machine:
#   make run   - create .venv, install, run the main job on the embedded default model
#   make test  - create .venv, install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= models/pydoc-moe
PROMPT ?= The for statement
ARGS ?=

.PHONY: run test setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/moeshard generate --model $(MODEL) --workers 2 --worker-memory auto --prompt "$(PROMPT)" $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
