# Build, train and test keras-dfp on a fresh machine. Every target is idempotent.
#
#   make train    create .venv, build the DFP ops, train cifar_cnn on the embedded sample
#   make test     create .venv, build the DFP ops, run the Python test suite
#
# make train takes POLICY (dfp16 | float32 | mixed_bfloat16), DATA (a directory of
# train-*/test-* TFRecord shards, a glob, or a directory of train/ and test/ class folders;
# empty for the embedded sample), EPOCHS,
# MODEL and MODEL_DIR, for example: make train POLICY=float32 DATA=/data/cifar10

PYTHON ?= python3.11
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
VENV_PIP := $(VENV)/bin/pip

# Written after a successful dependency install; it is older than Makefile when the
# pins below change, which triggers a reinstall.
DEPS_STAMP := $(VENV)/.keras-dfp-deps.stamp
DEPS := "tensorflow==2.21.*" "keras==3.15.*" absl-py numpy pytest hypothesis matplotlib tensorboard \
	setuptools wheel

OPS_LIBRARY := keras_dfp/_keras_dfp_ops.so
OPS_SOURCES := $(shell find tf_ops -type f \( -name '*.cc' -o -name '*.h' \) 2>/dev/null) \
	$(wildcard setup.py pyproject.toml MANIFEST.in)

POLICY ?= dfp16
DATA ?=
EPOCHS ?=
MODEL ?= cifar_cnn
MODEL_DIR ?=

BAZEL_APT_PACKAGES := bazel-bootstrap bazel-rules-java bazel-skylib bazel-platforms
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv build train test bazel-test clean distclean

venv: $(DEPS_STAMP)

$(DEPS_STAMP): Makefile
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PIP) install $(DEPS)
	touch $@

# A library built for another TensorFlow version (after a TensorFlow upgrade in .venv)
# is removed first, so the rule below rebuilds it.
build: $(DEPS_STAMP)
	@$(VENV_PYTHON) -c "$$CHECK_BUILT_TF" || rm -f $(OPS_LIBRARY)
	@$(MAKE) --no-print-directory $(OPS_LIBRARY)

# Exits 1 when the recorded TensorFlow version of the library differs from the
# installed one, without importing TensorFlow.
define CHECK_BUILT_TF
import importlib.metadata, json, sys
try:
    with open('keras_dfp/_keras_dfp_ops.build_info.json') as f:
        built = json.load(f)['tensorflow_version']
except (OSError, ValueError, KeyError):
    sys.exit(0)
installed = importlib.metadata.version('tensorflow')
if built != installed:
    print(f'The ops library was built for TensorFlow {built}; rebuilding it for {installed}.')
    sys.exit(1)
endef
export CHECK_BUILT_TF

# pip builds the ops library in place; touch gives it a time stamp newer than its
# sources even when pip found nothing to rebuild.
$(OPS_LIBRARY): $(DEPS_STAMP) $(OPS_SOURCES)
	$(VENV_PIP) install --no-build-isolation -e .
	@test -f $@ || { echo "Expected $@ after 'pip install -e .', but it is missing." \
		"Check the compiler output above." >&2; exit 1; }
	touch $@

train: build
	$(VENV_PYTHON) -m model_garden.train --model=$(MODEL) --policy=$(POLICY) \
		--data=$(DATA) $(if $(EPOCHS),--epochs=$(EPOCHS)) \
		$(if $(MODEL_DIR),--model_dir=$(MODEL_DIR))

# pytest exits 5 when it collects no test; that fails the target like any other error.
test: build
	$(VENV_PYTHON) -m pytest -q tests || { status=$$?; \
		if [ $$status -eq 5 ]; then echo "pytest collected no tests." >&2; fi; \
		exit $$status; }

# Installs the Debian Bazel packages that are missing (each one is needed offline), then
# builds the op library with Bazel and runs the op test against it.
bazel-test: venv
	@missing=$$(for package in $(BAZEL_APT_PACKAGES); do \
		dpkg -s $$package >/dev/null 2>&1 || echo $$package; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages for Bazel:" $$missing; \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y $$missing; \
	fi
	bash bazel/build_and_test.sh

# Removes build outputs and training runs; keeps .venv (see distclean).
clean:
	rm -rf build dist *.egg-info runs .pytest_cache
	rm -f $(OPS_LIBRARY) keras_dfp/_keras_dfp_ops.build_info.json
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
