"""Shared helpers of the test suite."""
from __future__ import annotations

import zlib

import pytest
import torch

from fused_lstm.testing import assert_as_accurate_as  # noqa: F401  (the rule, for every test file)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
CUDA_SKIP = "needs a CUDA device"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=CUDA_SKIP)
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


def pytest_terminal_summary(terminalreporter):
    # Without a GPU most of the suite's skips are the CUDA tests: say so, so that a count
    # of skips does not read as tests that failed to run for some other reason.
    skipped = terminalreporter.stats.get("skipped", [])
    cuda = sum(CUDA_SKIP in str(report.longrepr) for report in skipped)
    if cuda:
        terminalreporter.write_line(
            f"{cuda} of the {len(skipped)} skipped tests are CUDA tests: torch "
            f"{torch.__version__} sees no CUDA device here (they run on a GPU machine)")
