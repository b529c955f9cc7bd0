"""Shared test set-up: timm as an oracle without loading torchvision's compiled ops."""

from __future__ import annotations

import os

import pytest
import torch

# Parallel test workers share the cores: one torch thread pool each, sized to its share, or
# the pools oversubscribe the CPU and every test runs many times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

_torchvision_ops: torch.library.Library | None = None


def _declare_torchvision_ops() -> None:
    """PyPI's torchvision is a CUDA build whose ops can't load beside the CPU torch wheel; it
    only needs the op schemas to exist to import, and ViTs use none of its ops."""
    global _torchvision_ops
    if _torchvision_ops is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already defined (working torchvision)
        return
    except (AttributeError, RuntimeError):
        pass
    _torchvision_ops = torch.library.Library("torchvision", "DEF")
    _torchvision_ops.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_ops.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


@pytest.fixture(scope="session")
def timm():
    _declare_torchvision_ops()
    return pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
