# Two entry points, each sets itself up on a fresh clone (idempotent):
#   make demo   meta-trains MAML on sinusoid tasks and reports held-out MSE
#   make test   runs the test suite on every core (pytest-xdist; slow tests: make test PYTEST_ARGS=--run-large)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keras-meta-installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,plots,datasets]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/sinusoid_demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n auto --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
