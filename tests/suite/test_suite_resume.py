"""Resume after a kill: `rfbench run` is SIGKILLed mid-sweep, then resumed; no cell is lost or
duplicated, finished cells are not redone, and the numbers equal those of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from rfbench import cli
from rfbench import results as R
from rfbench.errors import SpecError
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


# --------------------------------------------------------------------------- extending, repairing
TINY = """
[suite]
name = "tiny"
[estimators]
names = ["gerf-iid"]
baselines = ["exact"]
[[data]]
kind = "isotropic"
dim = 8
label = "iso"
[sweep]
seq_len = [16]
num_features = [4]
[seeds]
count = 2
[metrics]
kernel_max_tokens = 16
[timing]
enabled = false
threads = 1
"""


@pytest.fixture
def counted(monkeypatch):
    """The cells computed (by id), in this process."""
    calls = []
    real = cells.run_cell
    monkeypatch.setattr(
        cells, "run_cell", lambda cell, holder, suite: calls.append(cell.cell) or real(cell, holder, suite)
    )
    return calls


def _run(text, out, **kw):
    return runner.run_suite(parse_suite(text), out, progress=False, **kw)


def test_extending_a_sweep_runs_only_the_new_cells(tmp_path, counted):
    out = _run(TINY, tmp_path / "o")
    first = set(store.cell_files(out))
    assert len(first) == 2
    wider = TINY.replace('names = ["gerf-iid"]', 'names = ["gerf-iid", "hyprf-orf"]')
    wider = wider.replace("seq_len = [16]", "seq_len = [16, 24]")
    wider = wider.replace("num_features = [4]", "num_features = [4, 8]")
    wider += '[[data]]\nkind = "isotropic"\ndim = 8\nlabel = "iso2"\nseed = 3\n'
    counted.clear()
    _run(wider, out, resume=True)
    assert len(counted) == len(set(counted)) == 2 * 2 * (1 + 2 * 2) - 2 and not set(counted) & first
    counted.clear()
    _run(wider.replace("count = 2", "count = 3"), out, resume=True)  # more seeds: estimator cells again
    df = R.load_results(out)
    assert len(counted) == 2 * 2 * 2 * 2 and len(df) == 2 * 2 * (1 + 2 * 2 * 3)
    assert not df.duplicated(["cell", "seed_index"]).any() and set(df["status"]) == {"ok"}
    counted.clear()
    _run(wider.replace("count = 2", "count = 3"), out, resume=True)
    assert counted == []
    assert [r["cells_this_run"] for r in R.load_meta(out).runs] == [2, 18, 16, 0]  # the last: nothing to do


def test_a_resume_says_what_it_kept(tmp_path, capsys):
    out = _run(TINY, tmp_path / "o")
    wider = TINY.replace("num_features = [4]", "num_features = [4, 8]")
    capsys.readouterr()
    runner.run_suite(parse_suite(wider), out, progress=None, resume=True)
    assert "2 of 3 cell(s) finished and kept, 1 to run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, named",
    [
        (("kernel_max_tokens = 16", "kernel_max_tokens = 8"),
         r"\[metrics\] changed \(metrics.kernel_max_tokens: 16 -> 8"),
        (("enabled = false", "enabled = true"), r"\[timing\] changed \(timing.enabled: False -> True"),
        (("count = 2", "count = 1"), "seeds.count went down"),
        (("[seeds]", "[seeds]\nbase = 7"), "seeds.base changed"),
        (('label = "iso"', 'label = "iso"\nseed = 5'), r"data.seed: 0 -> 5"),
        (('baselines = ["exact"]', 'baselines = ["exact"]\n[estimators.params]\ngerf = { A = -0.1 }'),
         r"finished cell gerf-iid m=4 iso L=16 float32 cpu means "
         r"\(estimator.feature_params added \(\{'A': -0.1\}\)"),
        (('name = "tiny"', 'name = "other"'), "different suite"),
    ],
)
def test_edits_that_change_finished_cells_are_refused_by_name(tmp_path, edit, named):
    out = _run(TINY, tmp_path / "o")
    with pytest.raises(SpecError, match=named):
        _run(TINY.replace(*edit), out, resume=True)


def test_a_damaged_cell_is_quarantined_and_computed_again(tmp_path, counted, capsys):
    out = _run(TINY, tmp_path / "o")
    victim = sorted(store.cell_files(out))[0]
    path = store.cell_path(out, victim)
    path.write_bytes(path.read_bytes()[:50])
    pd.DataFrame({"x": [1]}).to_parquet(store.cells_dir(out) / "stray.parquet")
    counted.clear()
    _run(TINY, out, resume=True)
    assert counted == [victim]
    err = capsys.readouterr().err
    assert f"cells/{victim}.parquet is unreadable" in err and "stray.parquet is unreadable" in err
    assert len(list((out / "quarantine").iterdir())) == 2 and len(R.load_results(out)) == 3


@pytest.mark.parametrize("damage", ["list", "truncated", "deleted"])
def test_a_damaged_meta_json_does_not_block_resume(tmp_path, counted, damage):
    out = _run(TINY, tmp_path / "o")
    store.cell_path(out, sorted(store.cell_files(out))[0]).unlink()
    meta = out / "meta.json"
    if damage == "deleted":
        meta.unlink()
    else:
        meta.write_text("[1, 2]" if damage == "list" else meta.read_text()[:40])
    counted.clear()
    _run(TINY, out, resume=True)
    assert len(counted) == 1
    assert [r["status"] for r in R.load_meta(out).runs] == ["finished", "finished"]
    assert json.loads(meta.read_text())["suite"]["name"] == "tiny"  # rebuilt from the run records


def _read_only(monkeypatch):
    """Make every write fail as on a read-only file system (root ignores permission bits)."""
    real_open = os.open

    def fail(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def ro_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_open(path, flags, *a, **kw)

    def ro_mkdir(path, *a, **kw):
        if os.path.exists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        fail(path)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    for name in ("replace", "rename", "unlink", "utime"):
        monkeypatch.setattr(os, name, lambda p, *a, **kw: fail(p))
    monkeypatch.setattr("builtins.open", _ro_builtin_open(fail))


def _ro_builtin_open(fail):
    import builtins

    real = builtins.open

    def ro(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+"):
            fail(file)
        return real(file, mode, *a, **kw)

    return ro


def test_a_read_only_folder(tmp_path, monkeypatch, capsys):
    out = _run(TINY, tmp_path / "o")
    (out / "results.parquet").unlink()  # stale tables are rebuilt in memory, not on disk
    victim = store.cell_path(out, sorted(store.cell_files(out))[0])
    victim.rename(tmp_path / "aside.parquet")
    with monkeypatch.context() as m:
        _read_only(m)
        assert cli.main_entry(["run", "--quiet", "--out", str(out), "--resume", _file(tmp_path, TINY)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err and "Traceback" not in err
    assert [r["status"] for r in R.load_meta(out).runs] == ["finished"]  # no record left running
    (tmp_path / "aside.parquet").rename(victim)
    with monkeypatch.context() as m:
        _read_only(m)
        assert cli.main_entry(["run", "--quiet", "--out", str(out), "--resume", _file(tmp_path, TINY)]) == 0
    assert "nothing left to do" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_closes_the_run_record(tmp_path, monkeypatch, capsys):
    real = store.write_cell

    def full(out, cell, rows, stats):
        if store.cell_files(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store.cell_path(out, cell)))
        return real(out, cell, rows, stats)

    monkeypatch.setattr(store, "write_cell", full)
    out = tmp_path / "o"
    assert cli.main_entry(["run", "--quiet", "--out", str(out), _file(tmp_path, TINY)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "free some space" in err
    (run,) = R.load_meta(out).runs
    assert run["status"] == "failed" and "No space" in run["message"] and len(store.cell_files(out)) == 1
    monkeypatch.setattr(store, "write_cell", real)
    assert cli.main_entry(["run", "--quiet", "--out", str(out), "--resume", _file(tmp_path, TINY)]) == 0
    assert len(R.load_results(out)) == 3


def _file(tmp_path, text) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return str(path)


def test_a_run_waits_for_a_live_claim_and_takes_over_a_silent_one(tmp_path, counted, monkeypatch):
    from rfbench.results import claims as CL

    out = _run(TINY, tmp_path / "o")
    victims = sorted(store.cell_files(out))
    for v in victims:
        store.cell_path(out, v).unlink()
    # one cell held by a writer elsewhere that stopped beating, one by a live writer that finishes it
    (out / "claims").mkdir(exist_ok=True)
    (out / "claims" / f"{victims[0]}.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    live = CL.Claims(out, "live-run", heartbeat_s=0.05).__enter__()  # its heartbeat keeps beating
    assert live.claim(victims[1])
    monkeypatch.setattr(CL, "STALE_AFTER_S", 0.5)

    def finish_later():
        time.sleep(1.0)
        store.write_cell(out, victims[1], [], {"status": "ok", "run_id": "live-run"})
        live.release(victims[1])
        live.__exit__(None, None, None)

    helper = threading.Thread(target=finish_later)
    helper.start()
    counted.clear()
    _run(TINY, out, resume=True)
    helper.join()
    assert counted == [victims[0]]  # taken over once silent; the live writer's cell left to it
    run = R.load_meta(out).runs[-1]
    assert run["cells_computed"] == [victims[0]] and run["cells_done_by_others"] == 1
    assert CL.list_claims(out) == {}
