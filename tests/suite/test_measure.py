"""rfbench.suite.measure: the timing loop's samples and reference, the CPU allocation tracker,
the test hook, and the nonfinite status."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import rfbench as rb
from rfbench.errors import SpecError
from rfbench.suite import measure as X
from rfbench.suite.cells import _measure, _note_nonfinite

CPU = torch.device("cpu")
MiB = 2**20


def test_timing_keeps_every_sample_and_an_interleaved_reference():
    x = torch.randn(64, 64)
    t = X.time_forward(lambda: x @ x, CPU, warmup=1, repeats=6, max_seconds=10.0)
    assert t.n_rep == 6 and len(t.samples_ms) == 6 and len(t.cpu_samples_ms) == 6
    assert len(t.ref_samples_ms) == 7 and len(t.ref_cpu_samples_ms) == 7  # one before, one after each
    assert t.median_ms == pytest.approx(sorted(t.samples_ms)[2:4][0] / 2 + sorted(t.samples_ms)[2:4][1] / 2)
    assert t.ref_ms > 0 and t.cpu_ms > 0 and math.isfinite(t.cv) and math.isfinite(t.cpu_cv)


def test_the_time_budget_stops_early_but_not_before_the_minimum():
    t = X.time_forward(lambda: time.sleep(0.02), CPU, warmup=0, repeats=50, max_seconds=0.01)
    assert t.n_rep == X.MIN_REPEATS
    # sleeping costs wall time, not CPU time (what is left: torch's idle OpenMP threads spinning)
    assert min(t.samples_ms) >= 20.0 and t.cpu_ms < 0.6 * t.median_ms


def _pattern():
    a = torch.empty(MiB, dtype=torch.uint8)
    b = torch.empty(2 * MiB, dtype=torch.uint8)
    del a
    c = torch.empty(MiB, dtype=torch.uint8)
    c.view(-1)[:10].add_(1)  # a view and an in-place op: no new bytes
    torch.add(b[:MiB], c, out=c)  # out=: no new bytes
    return b


def test_the_tracker_counts_tensor_bytes_at_the_peak_exactly():
    assert X.peak_memory(_pattern, CPU) == 3 * MiB  # a and b alive together; c reuses a's room
    x = torch.ones(1000, 1000)  # made before: never counted
    assert X.peak_memory(lambda: (x * 2 + 1).sum(), CPU) == 8_000_000  # x*2 and +1 alive together


@pytest.mark.parametrize("name", ["posrf-iid", "trigrf-iid", "darkis-iid"])
def test_peak_memory_of_a_forward_repeats_to_the_byte(name):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 32, generator=g) * 0.3 for _ in range(3))
    est = rb.make_estimator(name, 32, 64, 0)
    if est.feature_map.data_dependent:
        est.fit(q, k)
    with torch.inference_mode():
        peaks = {X.peak_memory(lambda: est.attention(q, k, v, check=False), CPU) for _ in range(3)}
    assert len(peaks) == 1 and peaks.pop() > 256 * 32 * 4  # at least the output


def test_the_injection_hook_is_off_by_default_and_parses(monkeypatch):
    monkeypatch.delenv(X.INJECT_ENV, raising=False)
    assert X.injection("posrf-iid") is None
    text = "posrf-iid:slow=1.5,mem=2; exact:mem=3"
    assert X.injection("posrf-iid", text) == X.Injection(slow=1.5, mem=2.0)
    assert X.injection("exact", text) == X.Injection(mem=3.0)
    assert X.injection("posrf-orf", text) is None
    for bad in ("posrf-iid:slow=0.5", "posrf-iid:fast=2", "posrf-iid", "posrf-iid:slow=x"):
        with pytest.raises(SpecError, match=X.INJECT_ENV):
            X.injection("posrf-iid", bad)


def test_injected_slowdown_and_memory(monkeypatch):
    monkeypatch.setenv(X.INJECT_ENV, "victim:slow=1.5,mem=2")

    def work():  # 10 ms of CPU time
        end = time.process_time() + 0.01
        while time.process_time() < end:
            pass

    t = X.time_forward(work, CPU, warmup=0, repeats=3, name="victim")
    assert min(t.cpu_samples_ms) >= 14.9  # then a busy wait of half its CPU time
    t = X.time_forward(work, CPU, warmup=0, repeats=3, name="other")
    assert max(t.cpu_samples_ms) < 14.0
    assert X.peak_memory(_pattern, CPU, name="victim") == 6 * MiB
    assert X.peak_memory(_pattern, CPU, name="other") == 3 * MiB


def test_measure_writes_the_timing_columns():
    from rfbench.suite.spec_types import TimingSpec

    class S:
        timing = TimingSpec(warmup=1, repeats=4, max_seconds=5.0)

    x = torch.randn(32, 32)
    row = _measure(lambda: x @ x, S, CPU, tokens=32, name="m")
    assert len(json.loads(row["time_samples_ms"])) == row["n_rep"] == 4
    assert len(json.loads(row["ref_cpu_samples_ms"])) == 5
    assert row["peak_mem_bytes"] == 32 * 32 * 4 and row["ref_ms"] > 0 and row["cpu_ms"] > 0


def test_a_nonfinite_output_gets_its_own_status():
    row = {"status": "ok", "message": ""}
    _note_nonfinite(row, torch.tensor([[1.0, 2.0]]))
    assert row == {"status": "ok", "message": ""}
    _note_nonfinite(row, torch.tensor([[1.0, math.nan], [math.inf, math.nan]]))
    assert row["status"] == "nonfinite"
    assert "2 NaN and 1 Inf of 4 values" in row["message"]
    from rfbench.results.schema import STATUSES

    assert STATUSES.index("nonfinite") < STATUSES.index("error")
