"""Timing and peak-memory measurement of one forward, and classification of a cell's failure.

Timing (``time_forward``), CPU, counted in calls:
- ``warmup`` untimed calls of the forward (quick suite: 1; default 2), each followed by one
  untimed call of the calibration kernel;
- then one timed calibration call, and up to ``repeats`` timed forwards (quick: 5; default 10),
  each followed by one timed calibration call: ``repeats + 1`` reference samples interleaved
  with the forward's. The loop stops early once ``max_seconds`` have been spent, but never
  before ``MIN_REPEATS`` (3) forwards.
- ``time.perf_counter`` (wall) and ``time.process_time`` (the process's CPU time, all its
  threads) around each call. Kept: every raw sample of both (``samples_ms``, ``cpu_samples_ms``),
  the wall median, 20th and 80th percentile, the coefficient of variation std/mean of each
  (``cv``, ``cpu_cv``), and the reference's samples and medians (``ref_ms``, ``ref_cpu_ms``).
- Why CPU time too: on a shared machine the wall time of a call includes the time the process
  waited for a core (on this 2-core machine with 7 busy processes, 1.7-14 ms for one 1.7 ms
  forward), CPU time does not (1.7-3.3 ms). With ``timing.threads = 1`` it is the forward's
  uncontended latency; with more threads it is their summed work, OpenMP's spin-waiting
  included (a lost-parallelism regression shows in wall time only).
- The calibration kernel (``REF_N`` x ``REF_N`` float32 matmul into a preallocated output, the
  same inputs every call and every run) is work of a fixed size: on a shared machine whatever
  slows the forward (another process on the core, a lower clock) slows it too, so ``time_ms /
  ref_ms`` drifts less between runs than ``time_ms`` does (``rfbench compare`` judges both).

Why this loop and not ``torch.utils.benchmark.Timer``: ``Timer.blocked_autorange`` and
``adaptive_autorange`` time blocks of several calls and report per-block means, so they keep no
per-call samples; they choose the number of calls themselves (no fixed count and no hard time
budget per cell, which a sweep of hundreds of cells needs); they set torch's thread count to
their own ``num_threads`` (default 1) instead of the suite's ``timing.threads``; and they give
no place to interleave a reference call between repeats. The loop is a few lines with all four.

- CUDA: ``triton.testing.do_bench(fn, warmup=.., rep=.., return_mode="all")`` (CUDA events,
  L2 flushed before each call) when triton is importable and asked for, else CUDA events
  around each call after a synchronised warm-up. The reference kernel is timed the same way
  just before and just after (do_bench cannot interleave).

Peak memory (``peak_memory``), measured in a call of its own, apart from timing:
- CUDA: ``max_memory_allocated() - memory_allocated()`` around one call after
  ``synchronize / empty_cache / reset_peak_memory_stats`` (flash-attention's and xformers'
  recipe): bytes held by tensors at the peak, above what was held before.
- CPU: torch 2.13 keeps no CPU allocator statistics (no ``torch.cpu.memory`` API), and the
  resident set (RSS) growth measured before this change was not repeatable (30-60 % between two
  runs of one commit: glibc's arenas, freed pages kept or returned, a sampling thread). So the
  CPU figure counts tensor bytes the way CUDA's allocator statistics do: ``TensorTracker`` (a
  ``TorchDispatchMode``) sees every aten op of the call, adds the bytes of each storage an op
  creates (not views, in-place results or ``out=`` targets: their storage is an input's) and
  subtracts them when the storage is freed (a weak reference's callback), and keeps the maximum.
  Deterministic: the same forward on the same inputs gives the same bytes, call after call and
  run after run (tests/suite/test_measure.py). It leaves out memory a kernel allocates for
  itself (BLAS packing buffers, oneDNN scratch), as CUDA's figure leaves out the workspaces.

Test hook (never on by default): ``RFBENCH_TEST_INJECT="posrf-iid:slow=1.5,mem=2"`` (several
entries joined by ``;``) makes the named estimator's (or baseline's) forward ``slow`` times
slower (a busy wait of (slow - 1) times the call's own CPU time after each call; wall time on
CUDA) and its peak memory ``mem`` times larger (a ballast tensor of (mem - 1) times the
forward's peak held during the call). Read here only, by ``time_forward`` and ``peak_memory``;
used by the compare acceptance benchmark (tests/bench/test_compare_acceptance.py).
"""

from __future__ import annotations

import gc
import os
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rfbench.errors import SpecError, UnsupportedError

MIN_REPEATS = 3
QUANTILES = (0.5, 0.2, 0.8)
REF_N = 256  # calibration matmul: [256, 256] @ [256, 256] float32, 33.6 MFLOP
INJECT_ENV = "RFBENCH_TEST_INJECT"

CPU_MEMORY_NOTE = (
    "CPU: peak bytes of tensor storage held during one forward above what was held before, counted "
    "by a TorchDispatchMode allocation tracker (storages created by each aten op, released when freed); "
    "deterministic; excludes memory kernels allocate internally (BLAS/oneDNN scratch)"
)
CUDA_MEMORY_NOTE = (
    "CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before one forward, after "
    "synchronize, empty_cache and reset_peak_memory_stats (bytes held by tensors, not the reserved pool)"
)


@dataclass(frozen=True)
class Timing:
    """Forward time in milliseconds: median, 20th and 80th percentile over ``n_rep`` calls, every
    raw sample, their coefficient of variation, the same for the process CPU time of each call
    (CPU device only; NaN on CUDA), and the interleaved calibration kernel's samples."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n_rep: int
    timer: str
    samples_ms: tuple[float, ...] = ()
    cv: float = float("nan")
    ref_ms: float = float("nan")
    ref_samples_ms: tuple[float, ...] = ()
    cpu_ms: float = float("nan")
    cpu_samples_ms: tuple[float, ...] = ()
    cpu_cv: float = float("nan")
    ref_cpu_ms: float = float("nan")
    ref_cpu_samples_ms: tuple[float, ...] = ()


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


def _cv(t: np.ndarray) -> float:
    return float(t.std(ddof=1) / t.mean()) if t.size > 1 and t.mean() > 0 else float("nan")


def _median(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.median(x)) if x.size and np.isfinite(x).all() else float("nan")


def _summary(times_ms, timer: str, ref_ms=(), cpu_ms=(), ref_cpu_ms=()) -> Timing:
    t = np.asarray(times_ms, dtype=np.float64)
    q50, q20, q80 = np.quantile(t, QUANTILES)
    c = np.asarray(cpu_ms, dtype=np.float64)
    return Timing(float(q50), float(q20), float(q80), int(t.size), timer, tuple(map(float, t)), _cv(t),
                  _median(ref_ms), tuple(map(float, ref_ms)), _median(c), tuple(map(float, c)),
                  _cv(c) if c.size else float("nan"), _median(ref_cpu_ms), tuple(map(float, ref_cpu_ms)))


def calibration_kernel(device: torch.device) -> Callable[[], None]:
    """The reference work: a fixed ``REF_N``-square float32 matmul into a preallocated output."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(REF_N, REF_N, generator=g).to(device)
    b = torch.randn(REF_N, REF_N, generator=g).to(device)
    c = torch.empty(REF_N, REF_N, device=device)
    return lambda: torch.mm(a, b, out=c)


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
    name: str = "",
) -> Timing:
    """Time ``fn`` (a forward with its inputs bound) on ``device``; see the module docstring.

    ``name``: the estimator or baseline measured (only the test hook reads it)."""
    inject = injection(name)
    if inject is not None and inject.slow != 1.0:
        fn = _slowed(fn, inject.slow, device)
    ref = calibration_kernel(device)
    if device.type == "cuda":
        if gpu_timer == "do_bench":
            try:
                from triton.testing import do_bench
            except ImportError:
                do_bench = None
            if do_bench is not None:
                ref_before = float(np.median(do_bench(ref, warmup=5, rep=20, return_mode="all")))
                times = do_bench(fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, return_mode="all")
                ref_after = float(np.median(do_bench(ref, warmup=5, rep=20, return_mode="all")))
                return _summary(list(times), "triton.testing.do_bench", (ref_before, ref_after))
        return _time_loop(fn, ref, device, warmup=max(warmup, 1), repeats=repeats, max_seconds=max_seconds,
                          clock=_cuda_event_ms, timer="torch.cuda.Event")
    return _time_loop(fn, ref, device, warmup=warmup, repeats=repeats, max_seconds=max_seconds,
                      clock=_perf_counter_ms, timer="time.perf_counter")


def _perf_counter_ms(fn: Callable) -> tuple[float, float]:
    """(wall, process CPU) milliseconds of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return (t1 - t0) * 1e3, (c1 - c0) * 1e3


def _cuda_event_ms(fn: Callable) -> tuple[float, float]:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()  # one sync per call: a wall-clock budget needs to know where we are
    return begin.elapsed_time(end), float("nan")


def _time_loop(fn, ref, device, *, warmup, repeats, max_seconds, clock, timer) -> Timing:
    for _ in range(warmup):
        fn()
        ref()
    synchronize(device)
    times: list[tuple[float, float]] = []
    refs = [clock(ref)]
    start = time.perf_counter()
    while len(times) < max(repeats, 1):
        times.append(clock(fn))
        refs.append(clock(ref))
        if len(times) >= MIN_REPEATS and time.perf_counter() - start > max_seconds:
            break
    wall, cpu = zip(*times)
    ref_wall, ref_cpu = zip(*refs)
    cuda = device.type == "cuda"
    return _summary(wall, timer, ref_wall, () if cuda else cpu, () if cuda else ref_cpu)


# --------------------------------------------------------------------------- memory
def peak_memory(fn: Callable, device: torch.device, *, name: str = "") -> int:
    """Peak memory (bytes) of one call of ``fn`` above what was held before; see the module docstring."""
    measure = _cuda_peak if device.type == "cuda" else _tracked_peak
    inject = injection(name)
    if inject is None or inject.mem == 1.0:
        return measure(fn, device)
    extra = int(round((inject.mem - 1.0) * measure(fn, device)))

    def with_ballast():
        ballast = torch.empty(max(extra, 0), dtype=torch.uint8, device=device)  # held during the call
        out = fn()
        del ballast
        return out

    return measure(with_ballast, device)


def _cuda_peak(fn: Callable, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(max(peak, 0))


def _tracked_peak(fn: Callable, device: torch.device) -> int:
    tracker = TensorTracker()
    with tracker:
        out = fn()
    del out
    return tracker.peak


class TensorTracker(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive: ``current`` and ``peak``.

    A storage counts once, when the first op that returns it runs, if no input of that op holds
    it (views, in-place ops and ``out=`` return an input's storage: no new bytes); it is
    subtracted when torch frees it (a weak reference to the storage object, which torch keeps
    alive exactly as long as the storage). CPU and CUDA tensors alike; storages created before
    the mode are never counted.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # storage id -> (bytes, weakref)

    def _freed(self, key: int) -> None:
        nbytes, _ = self._live.pop(key, (0, None))
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self._live:
                continue
            nbytes = int(st.nbytes())
            self._live[key] = (nbytes, weakref.ref(st, lambda _r, key=key: self._freed(key)))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse or storage-less tensors
        return None


# --------------------------------------------------------------------------- test hook
@dataclass(frozen=True)
class Injection:
    """A slowdown and a memory factor for one estimator's forward (the test hook)."""

    slow: float = 1.0
    mem: float = 1.0


def injection(name: str, env: str | None = None) -> Injection | None:
    """The ``RFBENCH_TEST_INJECT`` entry for ``name`` (None: none, the default); SpecError on a
    malformed value. ``env``: the variable's text (default: read from the environment)."""
    text = os.environ.get(INJECT_ENV, "") if env is None else env
    if not text.strip() or not name:
        return None
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        target, _, spec = entry.partition(":")
        values = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(slow|mem)\s*=\s*([0-9]*\.?[0-9]+)", part)
            if not m or float(m.group(2)) < 1.0:
                raise SpecError(f"{INJECT_ENV}: bad entry {entry!r}; write e.g. 'posrf-iid:slow=1.5,mem=2' "
                                "(factors >= 1)")
            values[m.group(1)] = float(m.group(2))
        if not values:
            raise SpecError(f"{INJECT_ENV}: entry {entry!r} names no factor; write e.g. 'posrf-iid:slow=1.5'")
        if target.strip() == name:
            return Injection(**values)
    return None


def _slowed(fn: Callable, factor: float, device: torch.device) -> Callable:
    """``fn`` followed by a busy wait of (factor - 1) times its own cost: its process CPU time on
    the CPU (the clock ``rfbench compare`` judges; waiting for a busy core is not stretched), its
    synchronised wall time on CUDA."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def call():
        t0 = clock()
        out = fn()
        synchronize(device)
        end = clock() + (factor - 1.0) * (clock() - t0)
        while clock() < end:  # busy: the core is taken, as by more work
            pass
        return out

    return call


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


def nonfinite_message(out: torch.Tensor, what: str = "attention output") -> str:
    """'' when ``out`` is all finite, else one line counting its NaN and Inf values (status
    "nonfinite": the cell ran, but its numbers mean nothing)."""
    finite = torch.isfinite(out)
    if bool(finite.all()):
        return ""
    n_nan = int(torch.isnan(out).sum())
    n_inf = int(out.numel() - int(finite.sum()) - n_nan)
    return (f"{what} is not finite: {n_nan} NaN and {n_inf} Inf of {out.numel()} values "
            "(over- or underflow at these logits); its metrics are not comparable")


def free_memory(device: torch.device | None = None) -> None:
    """Release what a failed cell left behind (call outside the ``except`` block: its traceback
    keeps the cell's tensors alive, pytorch#18853)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
