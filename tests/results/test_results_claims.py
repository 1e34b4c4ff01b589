"""rfbench.results for many writers: claims, temporaries of live writers, run records, modes,
and damaged files repaired instead of blocking."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from rfbench.results import claims as CL
from rfbench.results import store
from rfbench.results.meta import Meta, SuiteRecord, assemble_meta, read_meta, write_run


def _rows(cell: str, values, status="ok"):
    base = dict(suite="t", cell=cell, kind="estimator", estimator="posrf-iid", feature_map="posrf",
                weight_matrix="iid", data="iso", seq_len=16, num_features=4, feature_dim=4, dim=8, batch=1,
                heads=1, causal=False, dtype="float32", device="cpu", status=status, target="softmax",
                eval_len=16)
    return [{**base, "seed": 100 + i, "seed_index": i, "kernel_rel_mse": v} for i, v in enumerate(values)]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process of this host has it (until the kernel reuses it)


def _plant_claim(out, cell, host, pid, age_s=0.0):
    path = out / CL.CLAIMS_DIR / f"{cell}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "run_id": "other"}))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_a_claim_is_exclusive_until_released(tmp_path):
    a, b = CL.Claims(tmp_path, "run-a"), CL.Claims(tmp_path, "run-b")
    assert a.claim("c1") and not b.claim("c1") and b.claim("c2")
    owner = json.loads((tmp_path / "claims" / "c1.claim").read_text())
    assert (owner["host"], owner["pid"], owner["run_id"]) == (socket.gethostname(), os.getpid(), "run-a")
    b.release("c1")  # not b's: left alone
    assert not b.claim("c1")
    a.release("c1")
    assert b.claim("c1")


def test_stale_claims_are_taken_over(tmp_path):
    mine = CL.Claims(tmp_path, "run-a", stale_after_s=60)
    _plant_claim(tmp_path, "dead", socket.gethostname(), _dead_pid())  # dead here: stale at once
    _plant_claim(tmp_path, "live", socket.gethostname(), os.getppid())  # a live process: kept
    _plant_claim(tmp_path, "far", "another-host", 1, age_s=10)  # fresh heartbeat elsewhere: kept
    _plant_claim(tmp_path, "silent", "another-host", 1, age_s=120)  # no heartbeat for 2 min
    assert [mine.claim(c) for c in ("dead", "live", "far", "silent")] == [True, False, False, True]
    assert json.loads((tmp_path / "claims" / "silent.claim").read_text())["run_id"] == "run-a"


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path):
    with CL.Claims(tmp_path, "run-a", stale_after_s=1.0, heartbeat_s=0.05) as mine:
        assert mine.claim("c")
        path = tmp_path / "claims" / "c.claim"
        os.utime(path, (0, 0))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 1.0
        assert not CL.Claims(tmp_path, "run-b", stale_after_s=1.0).claim("c")
    assert not path.exists()  # released on exit


def test_start_up_deletes_only_temporaries_of_gone_writers(tmp_path):
    cells = store.cells_dir(tmp_path)
    cells.mkdir(parents=True)
    host = socket.gethostname()
    names = {
        "live": f".a.parquet.{os.getpid()}@{host}.x1.tmp",
        "dead": f".b.parquet.{_dead_pid()}@{host}.x2.tmp",
        "far_fresh": ".c.parquet.1@another-host.x3.tmp",
        "far_old": ".d.parquet.1@another-host.x4.tmp",
        "legacy_old": ".e.parquet.77.tmp",
    }
    for what, name in names.items():
        (cells / name).write_bytes(b"half")
        if what.endswith("old"):
            os.utime(cells / name, (0, 0))
    assert store.remove_stale_temporaries(tmp_path) == 3
    assert sorted(p.name for p in cells.iterdir()) == sorted([names["live"], names["far_fresh"]])


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = store.write_cell(tmp_path, "a", _rows("a", [1.0]), {"status": "ok"})
        store.consolidate(tmp_path)
        claim = CL.Claims(tmp_path, "r")
        claim.claim("a")
    finally:
        os.umask(old)
    for p in (path, tmp_path / "results.parquet", tmp_path / "claims" / "a.claim"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def _run_meta(run_id, start, status="finished", name="t"):
    record = {"run_id": run_id, "start_time": start, "end_time": start.replace("00:0", "00:5"),
              "status": status, "host": "elsewhere", "pid": 1}
    return Meta(suite=SuiteRecord(name=name), start_time=start, runs=[record])


def test_run_records_assemble_into_the_meta_view(tmp_path):
    write_run(tmp_path, _run_meta("b", "2026-01-01T00:02:00", name="newer"))
    write_run(tmp_path, _run_meta("a", "2026-01-01T00:01:00"))
    dead = _run_meta("c", "2026-01-01T00:03:00", status="running")
    dead.runs[0].update(host=socket.gethostname(), pid=_dead_pid(), end_time=None)
    write_run(tmp_path, dead)
    meta = assemble_meta(tmp_path)
    assert [r["run_id"] for r in meta.runs] == ["a", "b", "c"]
    assert [r["status"] for r in meta.runs] == ["finished", "finished", "died"]
    assert meta.start_time == "2026-01-01T00:01:00" and meta.end_time == "2026-01-01T00:52:00"
    (tmp_path / "meta.json").write_text("[1, 2]")  # damaged: the records still give the view
    assert read_meta(tmp_path).runs == meta.runs
    store.write_cell(tmp_path, "x", _rows("x", [1.0]), {"status": "ok"})
    store.consolidate(tmp_path)  # rewrites meta.json from the records
    assert len(json.loads((tmp_path / "meta.json").read_text())["runs"]) == 3


def test_damaged_tables_are_rebuilt_from_cells(folder):
    store.consolidate(folder)
    for name in ("results.parquet", "summary.parquet"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])  # truncated
    tables = store.load_tables(folder)
    assert set(tables.results["cell"]) == set(tables.summary["cell"]) == {"a", "b"}
    assert any("results.parquet is unreadable" in n for n in tables.notes)
    assert tables.summary.set_index("cell").loc["b", "bias2"] == 0.25  # cross-seed stats kept
    assert store.repair_tables(folder) == [
        "results.parquet was missing or unreadable: rebuilt from cells/",
        "summary.parquet was missing or unreadable: rebuilt from cells/",
    ]
    assert not store.load_tables(folder).notes and store.repair_tables(folder) == []


def test_unreadable_cells_are_quarantined_by_writers_and_skipped_by_readers(folder, capsys):
    cells = store.cells_dir(folder)
    data = (cells / "a.parquet").read_bytes()
    (cells / "a.parquet").write_bytes(data[:100])  # truncated
    pd.DataFrame({"x": [1]}).to_parquet(cells / "stray.parquet")  # a parquet of another layout
    tables = store.load_tables(folder)  # a reader changes nothing
    assert set(tables.results["cell"]) == {"b"} and len(tables.notes) == 3
    assert (cells / "a.parquet").exists()
    store.consolidate(folder)  # a writer moves them aside, saying which
    err = capsys.readouterr().err
    assert "cells/a.parquet is unreadable" in err and "cells/stray.parquet is unreadable" in err
    assert sorted(store.cell_files(folder)) == ["b"]
    assert len(list((folder / "quarantine").iterdir())) == 2
    assert set(pd.read_parquet(folder / "results.parquet")["cell"]) == {"b"}


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "run"
    store.write_cell(out, "a", _rows("a", [1.0, 2.0, 4.0]), {"status": "ok", "bias2": 0.5})
    store.write_cell(out, "b", _rows("b", [3.0, 3.5]), {"status": "ok", "bias2": 0.25})
    return out
