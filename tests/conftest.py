"""Shared helpers of the test suite."""
from __future__ import annotations

import zlib

import pytest
import torch

from fused_lstm.testing import assert_as_accurate_as  # noqa: F401  (the rule, for every test file)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh seed per test: every test draws its own random inputs, reproducibly (str's
    # hash() changes from one process to the next; crc32 does not).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
