#!/usr/bin/env bash
# Replaces Bazel's coverage tools, which this offline workspace does not have.
echo "Coverage tools are not available: @remote_coverage_tools is a local stub because the" \
  "keras-dfp Bazel build runs offline. Measure coverage with pytest-cov instead." >&2
exit 1
