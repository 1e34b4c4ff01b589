"""Kill and resume at several random points: `rfbench run` is SIGKILLed again and again (inside a
cell, between cells, while it writes), each time resumed with --resume; in the end every cell is
there once, and the numbers equal those of an uninterrupted run (issue 15, item 11)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd

from rfbench import results as R
from rfbench.results import store
from rfbench.suite import runner
from rfbench.suite.spec import parse_suite

SUITE = """
[suite]
name = "killme"
[estimators]
names = ["posrf-iid", "oprf-orf", "darkis-iid"]
baselines = ["exact"]
[[data]]
kind = "anisotropic"
dim = 8
[sweep]
seq_len = [32, 48, 64, 80]
num_features = [4, 8]
[seeds]
count = 2
[metrics]
kernel_max_tokens = 32
[timing]
# each timed forward repeats for 0.05 s: a cell lasts long enough to be killed inside it
warmup = 0
repeats = 100000
max_seconds = 0.05
memory = false
threads = 1
"""
N_CELLS = 4 * (1 + 2 * 3)
KILLS = 3


def _stable(df):
    return df.drop(columns=list(R.TIMED_COLUMNS)).sort_values(["cell", "seed_index"]).reset_index(drop=True)


def _run_and_kill(suite_file, out, resume: bool, wait_cells: int, delay: float) -> int:
    """Start `rfbench run`, SIGKILL it ``delay`` s after ``wait_cells`` more cells are written;
    return how many cells were written when it died."""
    before = len(store.cell_files(out)) if out.exists() else 0
    cmd = [sys.executable, "-m", "rfbench.cli", "run", str(suite_file), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while (proc.poll() is None and time.monotonic() < deadline
               and len(store.cell_files(out) if out.exists() else []) < before + wait_cells):
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    err = proc.stderr.read().decode()
    assert "Traceback" not in err, err
    return len(store.cell_files(out))


def test_random_kill_points_then_resume(tmp_path):
    rng = random.Random(int(os.environ.get("RFBENCH_KILL_SEED", "15")))
    suite_file = tmp_path / "killme.toml"
    suite_file.write_text(SUITE)
    out = tmp_path / "killed"
    counts = []
    for i in range(KILLS):
        counts.append(_run_and_kill(suite_file, out, resume=i > 0, wait_cells=rng.randint(1, 3),
                                    delay=rng.uniform(0.0, 0.12)))
    assert counts == sorted(counts) and counts[-1] < N_CELLS, counts  # progress kept, work left
    resumed = runner.run_suite(suite_file, out, resume=True, progress=False)
    df = R.load_results(resumed)
    assert df["cell"].nunique() == N_CELLS and not df.duplicated(["cell", "seed_index"]).any()
    assert set(df["status"]) == {"ok"}
    runs = R.load_meta(out).runs
    assert [r["resume"] for r in runs] == [False] + [True] * KILLS
    assert [r["status"] for r in runs][:KILLS] == ["died"] * KILLS and runs[-1]["status"] == "finished"

    untimed = SUITE.split("[timing]")[0] + "[timing]\nenabled = false\nthreads = 1\n"
    whole = R.load_results(runner.run_suite(parse_suite(untimed), tmp_path / "whole", progress=False))
    pd.testing.assert_frame_equal(_stable(df), _stable(whole))
