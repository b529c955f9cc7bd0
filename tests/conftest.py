"""Shared test set-up: thread pools sized for parallel workers, a private compile cache, timm
as an oracle."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from vitkit.benchmark import declare_torchvision_ops, import_timm
from vitkit.data import load_dataset

# Parallel test workers share the cores: one torch thread pool each, sized to its share, or
# the pools oversubscribe the CPU and every test runs many times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

# Compiled models built by tests (and by the servers they start) go to a cache of their own.
os.environ["VITKIT_CACHE"] = tempfile.mkdtemp(prefix="vitkit-test-cache-")
atexit.register(shutil.rmtree, os.environ["VITKIT_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def timm():
    try:
        return import_timm()
    except ImportError as e:
        pytest.skip(f"timm is not installed: {e}")


@pytest.fixture(scope="session")
def transformers():
    """Hugging Face transformers (an oracle), with torchvision made importable for it."""
    declare_torchvision_ops()
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, training and test splits, for small training runs (a module
    that needs fewer images defines its own `digits`)."""
    pytest.importorskip("sklearn")
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
