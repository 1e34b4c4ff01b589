"""Timing and peak-memory measurement of one forward, and classification of a cell's failure.

Timing (``time_forward``):
- CPU: ``time.perf_counter`` around each call, after ``warmup`` untimed calls; at most
  ``repeats`` timed calls, fewer once ``max_seconds`` have been spent (never fewer than
  ``MIN_REPEATS``). Reported: median, 20th and 80th percentile (ms) and the count.
- CUDA: ``triton.testing.do_bench(fn, warmup=.., rep=.., return_mode="all")`` (CUDA events,
  L2 flushed before each call) when triton is importable and asked for, else CUDA events
  around each call after a synchronised warm-up. Quantiles are taken from the raw timings.

Peak memory (``peak_memory``), measured in a run of its own, apart from timing:
- CUDA: ``max_memory_allocated() - memory_allocated()`` around one call after
  ``synchronize / empty_cache / reset_peak_memory_stats`` (flash-attention's and xformers'
  recipe): bytes held by tensors at the peak, above what was held before.
- CPU: torch keeps no allocator statistics on the CPU and ``tracemalloc`` does not see its
  buffers, so we measure the process's resident set: free heap pages are handed back to the
  kernel first (``malloc_trim(0)``, glibc), then a thread samples ``/proc/self/statm`` every
  ``CPU_SAMPLE_S`` during one call, and the kernel's own high-water mark (``ru_maxrss``) is
  used where the call raised it. Reported: peak RSS minus RSS before the call. It counts
  everything the process touched (torch's scratch buffers and BLAS workspaces included) and can
  miss a peak shorter than the sampling period; see ``CPU_MEMORY_NOTE``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rfbench.errors import UnsupportedError

MIN_REPEATS = 3
CPU_SAMPLE_S = 0.0005
QUANTILES = (0.5, 0.2, 0.8)

CPU_MEMORY_NOTE = (
    "CPU: peak resident-set growth (bytes) of one forward, in-process: malloc_trim(0) first, then "
    f"/proc/self/statm sampled every {CPU_SAMPLE_S * 1e3:g} ms plus ru_maxrss when the call raised it, "
    "minus the RSS before the call; includes torch/BLAS scratch, may miss peaks shorter than the period"
)
CUDA_MEMORY_NOTE = (
    "CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before one forward, after "
    "synchronize, empty_cache and reset_peak_memory_stats (bytes held by tensors, not the reserved pool)"
)


@dataclass(frozen=True)
class Timing:
    """Forward time in milliseconds: median, 20th and 80th percentile over ``n_rep`` calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n_rep: int
    timer: str


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable, device: torch.device):
    """``(fn(), milliseconds)`` for one call, synchronised on CUDA (for draw and fit times)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - t0) * 1e3


def _summary(times_ms: list[float], timer: str) -> Timing:
    t = np.asarray(times_ms, dtype=np.float64)
    q50, q20, q80 = np.quantile(t, QUANTILES)
    return Timing(float(q50), float(q20), float(q80), int(t.size), timer)


def time_forward(
    fn: Callable,
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 2.0,
    gpu_timer: str = "do_bench",
    gpu_warmup_ms: float = 25.0,
    gpu_rep_ms: float = 100.0,
) -> Timing:
    """Time ``fn`` (a forward with its inputs bound) on ``device``; see the module docstring."""
    if device.type == "cuda":
        if gpu_timer == "do_bench":
            try:
                from triton.testing import do_bench
            except ImportError:
                do_bench = None
            if do_bench is not None:
                times = do_bench(fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, return_mode="all")
                return _summary(list(times), "triton.testing.do_bench")
        return _time_cuda_events(fn, device, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(repeats, 1):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= MIN_REPEATS and time.perf_counter() - start > max_seconds:
            break
    return _summary(times, "time.perf_counter")


def _time_cuda_events(fn, device, *, warmup, repeats, max_seconds) -> Timing:
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(repeats, 1):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()  # one sync per call: a wall-clock budget needs to know where we are
        times.append(begin.elapsed_time(end))
        if len(times) >= MIN_REPEATS and time.perf_counter() - start > max_seconds:
            break
    return _summary(times, "torch.cuda.Event")


# --------------------------------------------------------------------------- memory
def peak_memory(fn: Callable, device: torch.device) -> int:
    """Peak memory (bytes) of one call of ``fn`` above what was held before; see the module docstring."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(max(peak, 0))
    return _cpu_peak_rss_growth(fn)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIBC = None


def _malloc_trim() -> None:
    """Return free heap pages to the kernel (glibc), so that RSS growth shows new allocations."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return _maxrss()


def _maxrss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(CPU_SAMPLE_S)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _cpu_peak_rss_growth(fn: Callable) -> int:
    # No gc.collect() here: tensors are freed by reference counting, and a full collection of a
    # process holding torch and pandas costs more than most forwards.
    _malloc_trim()
    base = _rss()
    high_before = _maxrss()
    sampler = _Sampler()
    sampler.peak = base
    sampler.start()
    try:
        out = fn()
        peak = max(sampler.peak, _rss())
    finally:
        peak_sampled = sampler.stop()
    high_after = _maxrss()
    peak = max(peak, peak_sampled)
    if high_after > high_before:  # the call set a new process high-water mark: that is its exact peak
        peak = max(peak, high_after)
    del out
    return int(max(peak - base, 0))


# --------------------------------------------------------------------------- failures
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def classify_failure(exc: BaseException) -> str:
    """The results ``status`` of a cell that raised ``exc``: "skipped", "oom" or "error"."""
    if isinstance(exc, UnsupportedError):
        return "skipped"
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), MemoryError) if t is not None)
    if isinstance(exc, oom_types):
        return "oom"
    if isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _OOM_TEXT):
        return "oom"
    return "error"


def failure_message(exc: BaseException, limit: int = 500) -> str:
    """One line: the exception type and its message (reasons, for an unsupported case)."""
    if isinstance(exc, UnsupportedError):
        text = "; ".join(exc.reasons)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def free_memory(device: torch.device | None = None) -> None:
    """Release what a failed cell left behind (call outside the ``except`` block: its traceback
    keeps the cell's tensors alive, pytorch#18853)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
