"""Many writers, one folder: 4 ``rfbench run --resume`` processes (plain, or as shards) started
at once into one results folder, over several trials. Each must exit 0 without a traceback; each
cell must be computed exactly once (every run record lists the cells it computed, and each cell
file names the run that wrote it); the results must be complete; every run record must be there.

The quick version (3 trials) runs with the test suite; ``-m slow`` runs the 20-trial one.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from rfbench.results import store

SUITE = """
[suite]
name = "crowd"
[estimators]
names = ["posrf-iid", "hyprf-orf", "gerf-iid"]
baselines = ["exact"]
[[data]]
kind = "isotropic"
dim = 8
[sweep]
seq_len = [16, 24]
num_features = [4, 8]
[seeds]
count = 2
[metrics]
kernel_max_tokens = 16
[timing]
enabled = false
threads = 1
"""
N_CELLS = 2 * (1 + 2 * 3)
WORKERS = 4


def _trial(suite_file, out, shards: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "rfbench.cli",
        "run",
        str(suite_file),
        "--out",
        str(out),
        "--quiet",
        "--resume",
    ]
    # Half the trials mix two shards with two plain runs of the whole suite.
    extra = [["--shard", "1/2"], ["--shard", "2/2"], [], []] if shards else [[]] * WORKERS
    procs = [
        subprocess.Popen([*argv, *e], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for e in extra
    ]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    codes = [p.returncode for p in procs]
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    records = [r for doc in runs for r in doc["runs"]]
    computed = collections.Counter(c for r in records for c in r.get("cells_computed", []))
    writers = {c: store.cell_info(p).meta.get("run_id") for c, p in store.cell_files(out).items()}
    df = pd.read_parquet(out / "results.parquet")
    return {
        "crashes": sum(c != 0 or "Traceback" in e for c, e in zip(codes, errs)),
        "errors": [e for e in errs if e.strip()],
        "twice": sum(n > 1 for n in computed.values()),
        "cells": len(writers),
        "computed": set(computed),
        "writers_ok": all(
            computed[c] == 1 and any(r["run_id"] == w and c in r["cells_computed"] for r in records)
            for c, w in writers.items()
        ),
        "complete": df["cell"].nunique() == N_CELLS
        and not df.duplicated(["cell", "seed_index"]).any()
        and set(df["status"]) == {"ok"},
        "records": len(records),
        "finished": sum(r["status"] == "finished" for r in records),
        "meta_runs": len(json.loads((out / "meta.json").read_text())["runs"]),
        "split": sorted((len(r["cells_computed"]) for r in records), reverse=True),
        "by_others": sum(r.get("cells_done_by_others", 0) for r in records),
    }


def _check(tmp_path, trials: int) -> list[dict]:
    suite_file = tmp_path / "crowd.toml"
    suite_file.write_text(SUITE)
    figures = []
    for t in range(trials):
        f = _trial(suite_file, tmp_path / f"t{t}", shards=t % 2 == 1)
        figures.append(f)
        assert f["crashes"] == 0, f["errors"]
        assert f["twice"] == 0 and f["writers_ok"]
        assert f["cells"] == N_CELLS and f["computed"] == set(store.cell_files(tmp_path / f"t{t}"))
        assert f["complete"]
        assert f["records"] == f["finished"] == f["meta_runs"] == WORKERS
    return figures


def test_four_writers_share_one_folder(tmp_path):
    _check(tmp_path, trials=3)


@pytest.mark.slow
def test_four_writers_share_one_folder_20_trials(tmp_path):
    figures = _check(tmp_path, trials=20)
    shared = sum(sum(n > 0 for n in f["split"]) > 1 for f in figures)
    print(
        f"\n20 trials x {WORKERS} writers x {N_CELLS} cells: 0 crashes, 0 cells computed twice, "
        f"20 complete folders, {20 * WORKERS} run records; trials where >1 writer computed cells: "
        f"{shared}; cells found finished by another: "
        f"{sum(f['by_others'] for f in figures)}; splits: {[f['split'] for f in figures]}"
    )
