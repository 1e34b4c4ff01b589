"""The GPU benchmark script's CPU-side logic (tests/bench/gpu_benchmark.py): argument parsing,
the sweep's bookkeeping (skips, OOMs), tables, goal verdicts and the plot, with fake timings
(--dry-run) and with a tiny real run on the CPU (Triton in its interpreter)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


def _load():
    path = Path(__file__).with_name("gpu_benchmark.py")
    spec = importlib.util.spec_from_file_location("rfbench_gpu_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gb = _load()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dry_run_writes_every_output(tmp_path):
    assert gb.main(["--out", str(tmp_path), "--dry-run", "--lengths", "1024,65536"]) == 0
    for name in ("results.csv", "results.md", "goals.md", "plot.png", "meta.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = _rows(tmp_path / "results.csv")
    # 2 dtypes x 2 causal x 2 lengths x 4 attention providers, + fla on causal rows, + kernel error
    # once per length (float32, non-causal).
    assert len(rows) == 2 * 2 * 2 * 4 + 2 * 2 + 2
    assert {r["provider"] for r in rows} == set(gb.PROVIDERS)
    assert all(r["causal"] == "True" for r in rows if r["provider"] == "fla")
    assert {(r["dtype"], r["causal"]) for r in rows if r["provider"] == "kernel-error"} == {("fp32", "False")}
    goals = (tmp_path / "goals.md").read_text()
    assert "DRY RUN" in goals and goals.count("| pass |") + goals.count("| FAIL |") == 5
    assert json.loads((tmp_path / "meta.json").read_text())["dry_run"] is True
    table = (tmp_path / "results.md").read_text()
    assert "### attention, causal, bf16" in table and "| 65536 |" in table


def _row(provider="rfbench-triton", op="attention", causal=False, dtype="bf16", **kw):
    return gb.Row(provider, op, gb.GOAL_L, causal, dtype, 8, 64, 256, **kw)


def test_goal_verdicts():
    rows = [
        _row(median_ms=0.45, peak_mib=100.0, out_mib=64.0, extra_over_out=(100 - 64) / 64),
        _row(causal=True, median_ms=2.5),
        _row("kernel-error", "kernel_error", dtype="fp32", status="oom", message="OutOfMemoryError: x"),
    ]
    table = [line for line in gb.goals(rows, False).splitlines() if line.count("|") > 3]
    lines = {line.split("|")[1].strip(): line for line in table}
    assert lines["non-causal bf16 time <= 0.5 ms"].endswith("| pass |")
    assert lines["non-causal bf16 extra memory <= 1.5x output"].endswith("| pass |")
    assert lines["causal bf16 time <= 2 ms"].endswith("| FAIL |")
    assert "oom" in lines["kernel error < 100 ms"] and lines["kernel error < 100 ms"].endswith("| FAIL |")


def test_failures_are_classified():
    assert gb._is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not gb._is_oom(RuntimeError("other"))
    assert gb.not_applicable("fla", torch.bfloat16, False)
    assert gb.not_applicable("kernel-error", torch.float32, True)
    assert not gb.not_applicable("sdpa", torch.float32, False)


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gb.parse_args(["--out", str(tmp_path), "--providers", "flashy", "--dry-run"])
    assert "unknown dtype/provider" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gb.parse_args(["--out", str(tmp_path)])  # cuda by default


@pytest.mark.triton
def test_tiny_real_run_on_cpu(tmp_path):
    """Every provider's real code path at L = 48 on the CPU (rfbench-triton in the interpreter)."""
    pytest.importorskip("triton")
    args = ["--out", str(tmp_path), "--device", "cpu", "--heads", "1", "--dim", "16", "--features", "16",
            "--lengths", "48", "--dtypes", "fp32", "--causal", "yes"]
    assert gb.main(args) == 0
    rows = {r["provider"]: r for r in _rows(tmp_path / "results.csv")}
    for provider in ("rfbench-triton", "torch-posrf", "sdpa"):
        assert rows[provider]["status"] == "ok", rows[provider]
        assert float(rows[provider]["median_ms"]) > 0
    for provider, module in (("performer", "performer_pytorch"), ("fla", "fla")):
        runs_here = importlib.util.find_spec(module) and (provider != "fla" or torch.cuda.is_available())
        assert rows[provider]["status"] == ("ok" if runs_here else "skipped"), rows[provider]
