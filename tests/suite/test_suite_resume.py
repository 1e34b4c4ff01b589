"""Resume after a kill: `rfbench run` is SIGKILLed mid-sweep, then resumed; no cell is lost or
duplicated, finished cells are not redone, and the numbers equal those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from rfbench import results as R
from rfbench.results import store
from rfbench.suite import cells, runner
from rfbench.suite.spec import parse_suite

SUITE = """
[suite]
name = "killme"
[estimators]
names = ["posrf-iid", "hyprf-orf", "oprf-orf"]
baselines = ["exact"]
[[data]]
kind = "isotropic"
dim = 8
[sweep]
seq_len = [32, 48, 64]
num_features = [4, 8]
[seeds]
count = 2
[metrics]
kernel_max_tokens = 32
[timing]
# Each timed forward repeats for 0.1 s: the sweep lasts a few seconds, long enough to be killed midway.
warmup = 0
repeats = 100000
max_seconds = 0.1
memory = false
threads = 1
"""


def _stable(df):
    stable = df.drop(columns=list(R.TIMED_COLUMNS))
    return stable.sort_values(["cell", "seed_index"]).reset_index(drop=True)


def test_resume_after_sigkill(tmp_path, monkeypatch):
    suite_file = tmp_path / "killme.toml"
    suite_file.write_text(SUITE)
    out = tmp_path / "killed"
    n_cells = 3 * (1 + 2 * 3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rfbench.cli", "run", str(suite_file), "--out", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not store.cell_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done_before = set(store.cell_files(out))
    assert 1 <= len(done_before) < n_cells  # killed in the middle of the sweep
    meta = R.load_meta(out)
    assert meta.runs[-1]["status"] == "died"  # never closed by the killed run; its process is gone

    calls = []
    real = cells.run_cell
    monkeypatch.setattr(
        cells, "run_cell", lambda cell, holder, suite: calls.append(cell.cell) or real(cell, holder, suite)
    )
    resumed = runner.run_suite(suite_file, out, resume=True, progress=False)
    assert not set(calls) & done_before  # finished cells were not run again
    df = R.load_results(resumed)
    assert df["cell"].nunique() == n_cells and not df.duplicated(["cell", "seed_index"]).any()
    assert len(df) == 3 * (1 + 2 * 3 * 2)
    assert set(df["status"]) == {"ok"}
    assert [r["resume"] for r in R.load_meta(out).runs] == [False, True]

    # The same cells, uninterrupted (untimed, to be quick: timing settings are not part of a cell).
    untimed = SUITE.split("[timing]")[0] + "[timing]\nenabled = false\nthreads = 1\n"
    whole = R.load_results(runner.run_suite(parse_suite(untimed), tmp_path / "whole", progress=False))
    pd.testing.assert_frame_equal(_stable(df), _stable(whole))
    summary = store.load_summary(resumed)
    assert len(summary) == n_cells
    assert summary.sort_values("cell")["bias2"].tolist() == pytest.approx(
        store.load_summary(tmp_path / "whole").sort_values("cell")["bias2"].tolist(), nan_ok=True, rel=1e-12
    )
