# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps onnx2torch==1.5.15
	touch $@

setup: $(VENV)/.installed
	$(PY) -m facepay contract build
	$(PY) -m facepay models fetch

demo: setup
	$(PY) -m facepay demo

test: setup
	$(PY) -m pytest -ra

bench: setup
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) var facepay/v1
