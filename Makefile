# Two commands do all set-up on a fresh machine:
#   make run    install into .venv, then fine-tune the quickstart FineTuneJob locally (no cluster)
#   make test   install into .venv, build/reuse the test cluster's binaries and the images, run the
#               whole test suite (the node tests need root and Debian's containerd, runc, CNI plugins,
#               podman and mmdebstrap: `make node-deps` installs them)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export UV_LINK_MODE ?= copy
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: run test test-deps venv crds lint testenv images node-deps bench clean mlflow-venv

# Debian packages for the test node and the image builds (docs/testenv.md, docs/images.md).
NODE_DEPS := containerd runc containernetworking-plugins iptables conntrack podman buildah mmdebstrap gcc libc6-dev

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip sync --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/tailor run examples/quickstart.yaml

testenv:
	scripts/testenv build

node-deps:
	@missing=$$(for p in $(NODE_DEPS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

images: $(STAMP) node-deps
	scripts/images build

# The MLflow server the registry tests start: a pinned mlflow in its own cached venv (not in
# requirements.lock; the operator speaks MLflow's REST API without the package).
mlflow-venv: $(STAMP)
	scripts/mlflow-venv >/dev/null

# What the suite needs, built side by side: the Go builds of the test control plane (CPU) overlap
# the venv, the Debian packages, the images and the MLflow venv (mostly downloads).
test-deps:
	$(MAKE) --no-print-directory -j4 $(STAMP) node-deps testenv images mlflow-venv

# Two pytest runs: everything but the node tests on $(TEST_WORKERS) workers (pytest-xdist), then the
# node tests (a kubelet, containerd and Ray pods on this machine) alone, as they were written to
# run. Both always run; the exit code is the first failure's. Only when PYTEST_ARGS names some
# tests is 5 ("nothing selected") no failure: they may all be of one kind. A plain `make test`
# (CI) fails on it.
TEST_WORKERS ?= 2
test: test-deps
	@rc=0; ok5=$(if $(strip $(PYTEST_ARGS)),5,none); \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not node" $(PYTEST_ARGS) || { r=$$?; [ $$r = $$ok5 ] || rc=$$r; }; \
	$(BIN)/python -m pytest -m node $(PYTEST_ARGS) || { r=$$?; [ $$r = $$ok5 ] || [ $$rc -ne 0 ] || rc=$$r; }; \
	exit $$rc

crds: $(STAMP)
	$(BIN)/tailor crds

lint: $(STAMP)
	$(BIN)/lint-imports .importlinter

bench: $(STAMP)
	$(BIN)/python bench/prep.py
	$(BIN)/python bench/train.py

# Regenerate the pinned dependency set after changing pyproject.toml.
lock:
	uv pip compile pyproject.toml --extra operator --extra trainer --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
