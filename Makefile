# apppass: `make demo` runs the proxy against a sandbox upstream; `make test` runs every test
# (after `make lint`: ruff and mypy).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit lint bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apppass demo

test: lint
	scripts/install-test-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

bench: $(STAMP)
	scripts/install-test-deps
	$(PY) bench/run.py

bench-quick: $(STAMP)
	scripts/install-test-deps
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .hypothesis
