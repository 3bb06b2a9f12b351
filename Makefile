# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench clean

# The `byo` extra of pyproject.toml, installed without its dependencies: onnx2torch declares
# torchvision, and the PyPI torchvision that fits the pinned torch does not import beside the CPU
# wheel (byo.py copes; `pip install -e '.[byo]'` is the equivalent for a user's own environment).
BYO_REQUIREMENTS = $(shell $(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['byo']))")

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(BYO_REQUIREMENTS)
	touch $@

setup: $(VENV)/.installed
	$(PY) -m facepay contract build
	$(PY) -m facepay models fetch

demo: setup
	$(PY) -m facepay demo

test: setup
	$(PY) -m pytest -ra

test-fast: setup  # everything but the tests marked slow (whole-pipeline runs, calibration)
	$(PY) -m pytest -ra -m "not slow"

bench: setup
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) var facepay/v1
