#!/usr/bin/env bash
# Builds the op library with Bazel and runs the op test against it, offline.
#
#   bash bazel/build_and_test.sh [BAZEL_OPTION...]
#
# Runs `bazel build //tf_ops/...` and `bazel test //tf_ops:ops_test` from the workspace
# root; extra arguments go to both commands. Environment:
#   PYTHON_BIN_PATH  interpreter with TensorFlow (default: <workspace>/.venv/bin/python)
#   BAZEL            Bazel executable (default: bazel)
#   CI               when "true", plain output and `bazel shutdown` at exit, so no Bazel
#                    server outlives the run
# Exits with the status of the first command that fails.
set -euo pipefail

cd "$(dirname "$0")/.."
bazel_bin="${BAZEL:-bazel}"

if ! command -v "${bazel_bin}" >/dev/null; then
  echo "Bazel not found: ${bazel_bin}. Install Debian's packages with" \
    "'apt-get install bazel-bootstrap bazel-rules-java bazel-skylib bazel-platforms'" \
    "or set BAZEL to the executable." >&2
  exit 1
fi

python_bin="${PYTHON_BIN_PATH:-$(pwd)/.venv/bin/python}"
if [[ ! -x "${python_bin}" ]]; then
  echo "Python interpreter not found: ${python_bin}. Run 'make venv' to create .venv, or" \
    "set PYTHON_BIN_PATH to a Python with TensorFlow installed." >&2
  exit 1
fi
echo "Python interpreter for TensorFlow: ${python_bin}"

bazel_options=("$@")
if [[ "${CI:-}" == "true" ]]; then
  bazel_options=(--color=no --curses=no "${bazel_options[@]}")
  trap '"${bazel_bin}" shutdown' EXIT
fi

print_and_run() {
  echo "+ $*"
  "$@"
}

print_and_run "${bazel_bin}" build "${bazel_options[@]}" //tf_ops/...
print_and_run "${bazel_bin}" test "${bazel_options[@]}" //tf_ops:ops_test
