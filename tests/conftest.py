"""Shared pytest fixtures for the keras-dfp tests."""

import os
import sys

import numpy as np
import pytest

# Run against the in-tree package (`pytest tests/` from the repository root)
# even when keras-dfp is not installed.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def rng():
    """Return a NumPy generator with a fixed seed, fresh for every test."""
    return np.random.default_rng(20180430)
