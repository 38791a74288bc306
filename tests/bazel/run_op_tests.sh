#!/usr/bin/env bash
# Runs tests/test_ops_exact.py with pytest against the Bazel-built op library.
# Called by //tf_ops:ops_test as: run_op_tests.sh PYTHON LIBRARY
#   PYTHON   absolute path of the interpreter that @local_config_tf ran
#   LIBRARY  runfiles path of _keras_dfp_ops.so, relative to the test's working directory
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "Expected 2 arguments (PYTHON LIBRARY). Received: $#. Run this script through" \
    "'bazel test //tf_ops:ops_test'." >&2
  exit 2
fi
python_bin="$1"
library="$(pwd)/$2"

# @keras_dfp_sources maps the workspace root, so its runfiles contain keras_dfp/ and tests/.
sources="${TEST_SRCDIR:?TEST_SRCDIR is not set; run through bazel test}/keras_dfp_sources"
test_file="${sources}/tests/test_ops_exact.py"
if [[ ! -f "${test_file}" ]]; then
  echo "Op test not found: ${test_file}. tests/test_ops_exact.py must exist in the workspace." >&2
  exit 1
fi

export KERAS_DFP_OPS_LIBRARY="${library}"
export PYTHONPATH="${sources}"
# Runfiles are symlinks into the source tree, so keep __pycache__ and .pytest_cache out.
export PYTHONDONTWRITEBYTECODE=1

pytest_args=(-p no:cacheprovider -q "${test_file}")
if [[ -n "${XML_OUTPUT_FILE:-}" ]]; then
  pytest_args+=("--junitxml=${XML_OUTPUT_FILE}")
fi

cd "${TEST_TMPDIR:-/tmp}"
echo "Running: KERAS_DFP_OPS_LIBRARY=${library} ${python_bin} -m pytest ${pytest_args[*]}"
exec "${python_bin}" -m pytest "${pytest_args[@]}"
