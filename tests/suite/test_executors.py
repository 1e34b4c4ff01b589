"""``rfbench run --executor local``: worker processes through submitit give the inline run's
numbers; the [executor] section and its flags are validated; failed tasks are retried, boundedly."""

from __future__ import annotations

import json
from pathlib import Path

import pandas.testing as pdt
import pytest

from rfbench import results as R
from rfbench.cli import main_entry
from rfbench.errors import SpecError
from rfbench.results import store
from rfbench.suite import executors, runner, status
from rfbench.suite.executor_spec import ExecutorSpec, read_executor, with_overrides
from rfbench.suite.plan import plan
from rfbench.suite.sources import prepare_sources
from rfbench.suite.spec import parse_suite

TINY = """
[suite]
name = "tiny"
[estimators]
names = ["posrf-iid", "hyprf-orf"]
baselines = ["exact"]
[[data]]
kind = "isotropic"
dim = 8
[sweep]
seq_len = [32, 48]
num_features = [4, 8]
device = ["cpu"]
[seeds]
count = 2
[metrics]
kernel_max_tokens = 32
[timing]
warmup = 0
repeats = 3
max_seconds = 0.02
memory = false
threads = 1
"""
N_TINY = 2 * (1 + 2 * 2)  # seq_len x (exact + 2 estimators x 2 num_features)


def stable(df):
    """Every column but the wall-clock ones, in a fixed row order."""
    return df.drop(columns=list(R.TIMED_COLUMNS)).sort_values(["cell", "seed_index"]).reset_index(drop=True)


def _rfbench(capsys, *args) -> tuple[int, str, str]:
    """``rfbench ARGS`` in this process (the local executor's tasks are processes of their own)."""
    capsys.readouterr()
    code = main_entry([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_local_executor_matches_inline(tmp_path, capsys):
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(TINY)
    inline = runner.run_suite(suite_file, tmp_path / "inline", progress=False)
    out = tmp_path / "local"
    code, _, err = _rfbench(
        capsys, "run", suite_file, "--out", out, "--executor", "local", "--tasks", 2, "--quiet"
    )
    assert code == 0, err[-2000:]
    a, b = store.load_results(inline), store.load_results(out)
    assert len(b) == len(a) and b["cell"].nunique() == N_TINY
    assert not b.duplicated(["cell", "seed_index"]).any()
    pdt.assert_frame_equal(stable(b), stable(a))
    record = json.loads((out / "logs" / "submission.json").read_text())
    assert record["executor"] == "local" and record["tasks"] == 2 and len(record["jobs"]) == 2
    assert len(record["cells"]) == N_TINY
    # every task left its submitit log under the run folder
    assert len(list((out / "logs").glob("*/*_log.err"))) == 2
    code, text, _ = _rfbench(capsys, "status", out)
    assert code == 0 and f"{N_TINY} cells: {N_TINY} done, 0 failed, 0 pending" in text
    # resuming a finished folder submits nothing
    code, _, err = _rfbench(
        capsys, "run", suite_file, "--out", out, "--executor", "local", "--resume", "--quiet"
    )
    assert code == 0, err[-2000:]
    assert len(list((out / "logs").glob("*/*_log.err"))) == 2
    # without --resume, a folder with results is refused before anything is submitted
    code, _, err = _rfbench(capsys, "run", suite_file, "--out", out, "--executor", "local")
    assert code == 2 and "pass --resume" in err


def test_status_of_an_inline_folder(tmp_path):
    """Without a submission record, status plans the suite recorded in meta.json."""
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(TINY)
    out = runner.run_suite(suite_file, tmp_path / "half", shard=(1, 2), progress=False)
    name, cells = status.planned_cells(out)
    assert name == "tiny" and len(cells) == N_TINY
    counts = status.Counter(out, cells).counts()
    assert (counts.done, counts.failed, counts.pending) == (N_TINY // 2, 0, N_TINY // 2)


# --------------------------------------------------------------------------- the [executor] section
def test_executor_section_and_flags():
    suite = parse_suite(
        TINY
        + '[executor]\nname = "slurm"\ncells_per_task = 3\npartition = "gpu"\n'
        + 'sbatch = ["--qos=high", "--exclusive"]\n'
    )
    spec = suite.executor
    assert (spec.name, spec.cells_per_task, spec.partition) == ("slurm", 3, "gpu")
    assert spec.sbatch_parameters() == {"qos": "high", "exclusive": True}
    assert spec.num_tasks(N_TINY) == 4  # ceil(10 / 3)
    # the command line wins, and a task count replaces the suite's cells_per_task
    cli = with_overrides(spec, {"name": "local", "tasks": 2, "partition": None})
    assert (cli.name, cli.tasks, cli.cells_per_task, cli.partition) == ("local", 2, 0, "gpu")
    assert parse_suite(TINY).executor == ExecutorSpec()  # no section: inline


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"nme": "slurm"}, "executor.nme: unknown key (did you mean 'name'?)"),
        ({"name": "slurn"}, "did you mean 'slurm'?"),
        ({"tasks": -1}, "executor.tasks: expected an integer >= 0, got -1"),
        ({"cpus": 0}, "executor.cpus: expected a positive integer"),
        ({"mem_gb": "4G"}, "executor.mem_gb: expected a positive number"),
        ({"sbatch": ["qos=high"]}, 'write it as "--key=value"'),
        ({"partition": "a b"}, "expected a name without spaces"),
        ({"tasks": 4, "cells_per_task": 2}, "give tasks or cells_per_task, not both"),
    ],
)
def test_executor_section_errors(table, expected):
    _, problems = read_executor(table)
    assert any(expected in p for p in problems), problems
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    with pytest.raises(SpecError, match="executor"):
        parse_suite(TINY + "[executor]\n" + lines + "\n")


def test_flag_errors_name_the_flag():
    with pytest.raises(SpecError, match="--cpus: expected a positive integer"):
        with_overrides(ExecutorSpec(), {"cpus": 0})


def test_grouping_respects_the_array_cap():
    assert ExecutorSpec(name="slurm").num_tasks(10_000) == 1000  # 10 cells per task by default
    assert ExecutorSpec(name="slurm").num_tasks(25_000) == 1000  # grouped more, never over the cap
    assert ExecutorSpec(name="slurm", cells_per_task=20).num_tasks(10_000) == 500
    assert ExecutorSpec(name="slurm", tasks=50).num_tasks(20) == 20  # never an empty task
    with pytest.raises(SpecError, match="set cells_per_task >= 10"):
        ExecutorSpec(name="slurm", cells_per_task=1).num_tasks(10_000)


# --------------------------------------------------------------------------- retries
class _FakeJob:
    """A job that fails (no result: killed) while its shard's failure budget lasts."""

    def __init__(self, folder: Path, job_id: str, fail: bool):
        self.job_id = job_id
        self.fail = fail
        self.paths = type("P", (), {})()
        self.paths.result_pickle = folder / f"{job_id}_result.pkl"
        self.paths.stderr = folder / f"{job_id}_log.err"
        if not fail:
            self.paths.result_pickle.write_text("ok")

    def done(self):
        return True

    def result(self):
        return {}


class _FakeExecutor:
    def __init__(self, folder: Path, failures: dict[int, int]):
        self.folder, self.failures, self.calls = folder, dict(failures), []

    def map_array(self, task, suites, outs, shards, devices):
        self.calls.append([s[0] for s in shards])
        jobs = []
        for s in shards:
            left = self.failures.get(s[0], 0)
            self.failures[s[0]] = left - 1
            jobs.append(_FakeJob(self.folder, f"{len(self.calls)}_{s[0]}", fail=left > 0))
        return jobs


@pytest.mark.parametrize("failures, retries, failed", [({2: 1}, 2, set()), ({2: 5, 3: 2}, 2, {2})])
def test_failed_tasks_are_resubmitted_at_most_retries_times(tmp_path, monkeypatch, failures, retries, failed):
    suite = parse_suite(TINY)
    cells = plan(suite, prepare_sources(suite), ["cpu"])
    fake = _FakeExecutor(tmp_path, failures)
    monkeypatch.setattr(executors, "make_executor", lambda *a: fake)
    monkeypatch.setattr(executors, "POLL_S", 0.0)
    spec = ExecutorSpec(name="local", tasks=3, retries=retries)
    outcome = executors.submit(
        suite, tmp_path / "out", cells, spec, run=runner.run_suite, device=None, finished=set(), show=False
    )
    assert set(outcome.failed) == failed
    assert all("without a result" in e for e in outcome.failed.values())
    submitted = [i for call in fake.calls for i in call]
    for shard in (1, 2, 3):  # first submission plus at most `retries` more
        assert submitted.count(shard) == min(failures.get(shard, 0), retries) + 1
    record = json.loads((tmp_path / "out" / "logs" / "submission.json").read_text())
    assert {j["shard"]: j["attempts"] for j in record["jobs"]}[2] == min(failures[2], retries) + 1


def test_only_shards_with_work_left_are_submitted(tmp_path, monkeypatch):
    suite = parse_suite(TINY)
    cells = plan(suite, prepare_sources(suite), ["cpu"])
    fake = _FakeExecutor(tmp_path, {})
    monkeypatch.setattr(executors, "make_executor", lambda *a: fake)
    monkeypatch.setattr(executors, "POLL_S", 0.0)
    shard2 = {c.cell for c in cells[1::2]}
    spec = ExecutorSpec(name="local", tasks=2)
    executors.submit(
        suite, tmp_path / "out", cells, spec, run=runner.run_suite, device=None, finished=shard2, show=False
    )
    assert fake.calls == [[1]]
    everything = {c.cell for c in cells}
    assert (
        executors.submit(
            suite, tmp_path / "o2", cells, spec, run=runner.run_suite, device=None, finished=everything
        ).job_ids
        == []
    )


def test_checkpoint_requeues_a_bounded_number_of_times():
    pytest.importorskip("submitit")
    task = executors.ArrayTask(runner.run_suite, retries=2)
    for attempt in (1, 2):
        delayed = task.checkpoint("suite", "out", (1, 2), None)
        task = delayed.function
        assert task.attempt == attempt and delayed.args == ("suite", "out", (1, 2), None)
    assert task.checkpoint("suite", "out", (1, 2), None) is None


def test_a_refused_submission_is_one_clear_error(tmp_path, monkeypatch):
    class Refusing:
        def map_array(self, *args):
            raise RuntimeError(
                "sbatch: error: invalid partition specified: gpux\nsbatch: error: Batch job submission failed"
            )

    suite = parse_suite(TINY)
    cells = plan(suite, prepare_sources(suite), ["cpu"])
    monkeypatch.setattr(executors, "make_executor", lambda *a: Refusing())
    spec = ExecutorSpec(name="slurm", tasks=2)
    with pytest.raises(executors.SubmitError, match="2 array task.*Batch job submission failed.*--partition"):
        executors.submit(
            suite, tmp_path / "out", cells, spec, run=runner.run_suite, device=None, finished=set()
        )


SLOW = TINY.replace("max_seconds = 0.02", "max_seconds = 0.25").replace("repeats = 3", "repeats = 100000")


@pytest.mark.slow
def test_a_preempted_local_task_is_requeued_and_completes(tmp_path):
    """SIGUSR2 (submitit's preemption / time-out signal) to a running task: it is requeued, resumes,
    and the folder ends complete with the inline run's numbers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    suite_file = tmp_path / "slow.toml"
    suite_file.write_text(SLOW)
    out = tmp_path / "preempted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rfbench.cli", "run", str(suite_file), "--out", str(out)]
        + ["--executor", "local", "--tasks", "1", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(store.cell_files(out)) < 2:
            time.sleep(0.2)
        assert len(store.cell_files(out)) >= 2, "the task wrote no cell within 120 s"
        record = json.loads((out / "logs" / "submission.json").read_text())
        controller = int(record["jobs"][0]["job_id"])  # a local job's id is its controller's pid
        children = subprocess.run(
            ["pgrep", "-P", str(controller)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGUSR2)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    log = next((out / "logs").glob("*/*_log.err")).read_text()
    assert "preempted" in log and "attempt 1" in log and "attempt 2" in log, log
    inline = runner.run_suite(suite_file, tmp_path / "inline", progress=False)
    pdt.assert_frame_equal(stable(store.load_results(out)), stable(store.load_results(inline)))
