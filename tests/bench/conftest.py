"""Shared pieces of rfbench's benchmarks and speed-ratio checks (tests/bench).

- ``timing.side_by_side``: time two callables in one process, interleaved, and return median
  times; their ratio cancels the machine's speed (the CI speed check).
- ``speed_bounds``: the committed bounds (tests/bench/speed_bounds.toml).
- ``run_bench``: pytest-benchmark's fixture when benchmarks are asked for (``--benchmark-only``,
  ``--benchmark-enable``, ``--benchmark-autosave``/``--benchmark-save``/``--benchmark-json``);
  otherwise the function runs once, so the default test run stays quick and still exercises
  every benchmark's code path and correctness gate.
- machine_info gets the GPU name and torch/CUDA/Triton versions (pytest-benchmark keys its
  storage by OS and Python only, not by GPU).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

BOUNDS_FILE = Path(__file__).with_name("speed_bounds.toml")


def pytest_benchmark_update_machine_info(config, machine_info):
    import platform

    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
    machine_info["processor"] = machine_info.get("cpu", {}).get("brand_raw", platform.processor())


@pytest.fixture(scope="session")
def speed_bounds() -> dict:
    if tomllib is None:
        pytest.skip("reading speed_bounds.toml needs Python >= 3.11 or `pip install tomli`")
    with open(BOUNDS_FILE, "rb") as f:
        return tomllib.load(f)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` intra-op threads (None: unchanged); one thread steadies CPU ratios on shared runners."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cuda_time(fn) -> float:
    """Median kernel time in seconds by triton.testing.do_bench (L2 flushed between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0] * 1e-3


def side_by_side(fast, slow, repeats: int, timer=cpu_time, warmup: int = 0) -> dict:
    """Interleaved repeats of two callables; medians and their ratio (fast / slow).

    Interleaving puts both under the same slow drifts of a shared machine; medians drop the
    outliers of a busy neighbour. Callers warm both up first (the correctness check does).
    """
    for _ in range(warmup):
        fast()
        slow()
    a, b = [], []
    for _ in range(repeats):
        a.append(timer(fast))
        b.append(timer(slow))
    ma, mb = statistics.median(a), statistics.median(b)
    return {"fast_s": ma, "slow_s": mb, "ratio": ma / mb, "fast_all": a, "slow_all": b}


@pytest.fixture
def run_bench(request, benchmark):
    """``run_bench(fn, gpu=False)``: benchmark ``fn`` when asked to, else call it once."""
    opt = request.config.getoption
    enabled = any(
        opt(name, default=None)
        for name in ("benchmark_only", "benchmark_enable", "benchmark_autosave", "benchmark_save",
                     "benchmark_json")
    )

    def run(fn, gpu: bool = False, **extra_info):
        benchmark.extra_info.update(extra_info)
        if not gpu:
            # One intra-op thread: on a shared runner two spinning OpenMP threads make CPU
            # timings swing by 10x (measured); one thread is slower but steady.
            benchmark.extra_info["torch_threads"] = 1
            with torch_threads(1):
                return fn() if not enabled else benchmark(fn)
        if not enabled:
            return fn()
        # perf_counter does not wait for the GPU: synchronise inside the timed call, and record
        # the kernel-only median of do_bench alongside (ECOSYSTEM.md B1).
        benchmark.extra_info["do_bench_median_ms"] = cuda_time(fn) * 1e3

        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out

        return benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)

    return run


@pytest.fixture(scope="session")
def timing():
    """The timing helpers above, for test modules (conftest is not importable by name)."""
    import types

    return types.SimpleNamespace(
        side_by_side=side_by_side, cpu_time=cpu_time, cuda_time=cuda_time, torch_threads=torch_threads
    )
