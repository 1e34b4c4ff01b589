"""Shared test setup: Triton runs in its interpreter on machines without CUDA; gpu tests skip."""

from __future__ import annotations

import os

# Must be set before triton is imported anywhere: on a CPU-only machine, Triton kernels run in
# the interpreter on CPU tensors (slow but exact enough to test at small sizes).
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny ops: one torch thread avoids OpenMP spin-waits on a busy machine's other core
    (up to 10x here); results are unchanged. Use with ``pytestmark = pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
