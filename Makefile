# apppass: `make demo` runs the proxy against a sandbox upstream; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apppass demo

test: $(STAMP)
	scripts/install-test-deps
	$(PY) -m pytest -q tests

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
