# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean image image-cuda image-cuda-resolve

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

# The container image (deploy/image/): built with buildah from a debootstrap root file system
# (cached in /var/cache/facepay-image), then smoke-tested as its non-root user.
image: $(VENV)/.installed
	PYTHON=$(PY) deploy/image/build.sh cpu

# Several GB of CUDA wheels; image-cuda-resolve builds up to the torch step and resolves it only.
image-cuda: $(VENV)/.installed
	PYTHON=$(PY) deploy/image/build.sh cuda

image-cuda-resolve: $(VENV)/.installed
	PYTHON=$(PY) deploy/image/build.sh cuda --resolve-only

clean:
	rm -rf $(VENV) var facepay/v1
