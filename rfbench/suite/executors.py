"""Where a suite's cells run: this process (inline), worker processes (local) or a Slurm job array.

    rfbench run SUITE --executor local            # one worker process per CPU core
    rfbench run SUITE --executor slurm --partition gpu --gpus 1 --time-min 120 [--no-wait]

``local`` and ``slurm`` go through submitit (``LocalExecutor``; ``AutoExecutor(cluster="slurm")``,
one job array). The plan's cells are grouped into n array tasks (``executor_spec.num_tasks``:
clusters cap arrays near 1000 tasks and submitit does not split them); task i runs
``run_suite(suite, out, resume=True, shard=(i, n))``, so every task writes its cells into the one
results folder, and a task run again skips the cells already there. submitit's files (pickles,
the task's stdout and stderr) go under ``OUT/logs/<job id>/``; ``OUT/logs/submission.json``
records the cells and jobs so that ``rfbench status OUT`` can count progress later.

Faults (bounded by ``retries``): a task timed out or preempted is requeued by submitit (the task
is checkpointable: its checkpoint is the same call, which resumes); a task that failed (an
exception, a killed process, a vanished job) is submitted again while the command waits. A task
killed mid-cell loses only that cell, which the next attempt computes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rfbench.errors import RFBenchError, SpecError
from rfbench.results.atomic import atomic_write
from rfbench.suite.executor_spec import ExecutorSpec
from rfbench.suite.plan import Cell, select_shard
from rfbench.suite.spec_types import Suite
from rfbench.suite.status import SUBMISSION_FILE, Counter, logs_dir, squeue

#: seconds between two looks at the results folder and the jobs while the command waits
POLL_S = 2.0
#: polls a slurm task may be missing from squeue without a result before it counts as lost
_LOST_POLLS = 3


# --------------------------------------------------------------------------- the array task
class ArrayTask:
    """One array task: ``run(suite, out, shard=(i, n), resume=True)`` into ``out`` (picklable).

    ``run`` is ``runner.run_suite``, passed in (pickled by reference) so that this module does
    not import the runner that imports it. submitit calls ``checkpoint`` when the scheduler times
    out or preempts the task; returning the same call requeues it (at most ``retries`` times:
    then None, and the task fails)."""

    def __init__(self, run, retries: int, threads: int = 0, attempt: int = 0):
        self.run = run
        self.retries = retries
        self.threads = threads  # torch CPU threads where the suite leaves them to torch (0: leave)
        self.attempt = attempt

    def __call__(self, suite: Suite, out: str, shard: tuple[int, int], device: str | None) -> dict:
        print(
            f"rfbench: array task {shard[0]}/{shard[1]} of {suite.name}, attempt {self.attempt + 1}",
            file=sys.stderr,
        )
        if self.threads and not suite.timing.threads:
            import torch

            torch.set_num_threads(self.threads)
        self.run(suite, out, device=device, resume=True, shard=shard, progress=False)
        return {"shard": list(shard), "attempt": self.attempt}

    def checkpoint(self, *args, **kwargs):
        if self.attempt >= self.retries:
            return None
        from submitit.helpers import DelayedSubmission

        again = ArrayTask(self.run, self.retries, self.threads, self.attempt + 1)
        return DelayedSubmission(again, *args, **kwargs)


def task_threads(spec: ExecutorSpec, num_tasks: int) -> int:
    """CPU threads per task: its CPUs on slurm; a share of this machine's cores for local tasks,
    which all run at once (torch's default, every core per process, would oversubscribe them)."""
    import os

    if spec.name == "slurm":
        return spec.cpus
    return max(1, (os.cpu_count() or 1) // max(1, min(num_tasks, os.cpu_count() or 1)))


# --------------------------------------------------------------------------- submitting
def _import_submitit():
    try:
        import submitit
    except ModuleNotFoundError:
        raise SpecError(
            "--executor local/slurm needs submitit: pip install 'rfbench[cluster]' (or pip install submitit)"
        ) from None
    return submitit


def make_executor(spec: ExecutorSpec, folder: Path, job_name: str):
    """A submitit executor for ``spec.name`` ("local" or "slurm") writing into ``folder``."""
    submitit = _import_submitit()
    pattern = str(folder / "%j")
    if spec.name == "local":
        ex = submitit.LocalExecutor(folder=pattern, max_num_timeout=spec.retries)
        ex.update_parameters(timeout_min=spec.time_min, gpus_per_node=spec.gpus)
        return ex
    if shutil.which("sbatch") is None:
        raise SpecError(
            "--executor slurm needs Slurm's sbatch on PATH (run it on the cluster's login node); "
            "use --executor local on this machine"
        )
    ex = submitit.AutoExecutor(folder=pattern, cluster="slurm", slurm_max_num_timeout=spec.retries)
    params = dict(
        name=job_name,
        timeout_min=spec.time_min,
        cpus_per_task=spec.cpus,
        mem_gb=spec.mem_gb,
        slurm_array_parallelism=spec.array_parallelism,
    )
    if spec.gpus:
        params["gpus_per_node"] = spec.gpus
    if spec.partition:
        params["slurm_partition"] = spec.partition
    if spec.account:
        params["slurm_account"] = spec.account
    if spec.sbatch:
        params["slurm_additional_parameters"] = spec.sbatch_parameters()
    if spec.setup:
        params["slurm_setup"] = list(spec.setup)
    ex.update_parameters(**params)
    return ex


@dataclass
class _Slot:
    """One shard's latest job and how often it was submitted."""

    shard: tuple[int, int]
    job: object
    attempts: int = 1
    missing: int = 0  # consecutive polls a slurm task was absent from squeue without a result
    error: str = ""


@dataclass
class Outcome:
    """What a submission ended with: the tasks that failed for good (their last error), jobs."""

    failed: dict[int, str] = field(default_factory=dict)  # shard index -> last error
    job_ids: list[str] = field(default_factory=list)
    waited: bool = True


def pending_shards(cells: list[Cell], n: int, finished: set[str]) -> list[int]:
    """The shard indices (1-based) of ``n`` that still hold a cell not in ``finished``."""
    return [i for i in range(1, n + 1) if any(c.cell not in finished for c in select_shard(cells, (i, n)))]


def submit(
    suite: Suite,
    out: Path,
    cells: list[Cell],
    spec: ExecutorSpec,
    *,
    run,
    device: str | None,
    finished: set[str],
    wait: bool = True,
    show: bool | None = None,
) -> Outcome:
    """Group ``cells`` into array tasks, submit those with work left, and (``wait``) watch them.

    ``run``: ``runner.run_suite``; ``finished``: cells already done in ``out`` (their tasks are
    not submitted again)."""
    n = spec.num_tasks(len(cells))
    shards = pending_shards(cells, n, finished)
    outcome = Outcome(waited=wait)
    if not shards:
        return outcome
    logs = logs_dir(out)
    logs.mkdir(parents=True, exist_ok=True)
    ex = make_executor(spec, logs, f"rfbench-{suite.name}")
    task = ArrayTask(run, spec.retries, task_threads(spec, len(shards)))
    jobs = _map(ex, task, suite, out, [(i, n) for i in shards], device)
    slots = [_Slot((i, n), job) for i, job in zip(shards, jobs)]
    record = {
        "executor": spec.name,
        "suite": suite.name,
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tasks": n,
        "cells": [c.cell for c in cells],
        "device": device,
        "jobs": [],
    }
    _write_record(out, record, slots)
    outcome.job_ids = [str(s.job.job_id) for s in slots]
    if not wait:
        return outcome
    _watch(suite, out, cells, spec, ex, task, slots, record, device, show, outcome)
    return outcome


class SubmitError(RFBenchError):
    """The scheduler refused the job array (sbatch failed: no cluster, a bad partition, ...)."""


def _map(ex, task: ArrayTask, suite: Suite, out: Path, shards: list[tuple[int, int]], device):
    k = len(shards)
    try:
        return ex.map_array(task, [suite] * k, [str(out)] * k, shards, [device] * k)
    except Exception as exc:  # noqa: BLE001  (submitit raises its own errors around sbatch's)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise SubmitError(
            f"submitting {k} array task(s) failed: {lines[-1] if lines else type(exc).__name__} "
            "(check the cluster settings: --partition, --account, --time-min, --mem-gb, --sbatch)"
        ) from None


def _tidy(out: Path) -> None:
    pattern = logs_dir(out) / "%j"  # submitit makes the folder pattern itself; the jobs use their own
    if pattern.is_dir() and not any(pattern.iterdir()):
        pattern.rmdir()


def _write_record(out: Path, record: dict, slots: list[_Slot]) -> None:
    _tidy(out)
    record["jobs"] = [
        {"shard": s.shard[0], "job_id": str(s.job.job_id), "attempts": s.attempts} for s in slots
    ]
    text = json.dumps(record, indent=1)
    atomic_write(logs_dir(out) / SUBMISSION_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- watching
def _queued(slots: list[_Slot]) -> set[str] | None:
    """Slurm task ids still in the queue (pending, running, requeued); None where squeue fails."""
    lines = squeue(sorted({str(s.job.job_id).split("_")[0] for s in slots}), "%i")
    return None if lines is None else set(lines)


def _finished(slot: _Slot, queued: set[str] | None) -> bool:
    """Whether a task is over (with or without a result)."""
    job = slot.job
    if job.paths.result_pickle.exists():
        return True
    if queued is None:  # local jobs, or squeue unavailable: submitit's own view
        return job.done()
    if str(job.job_id) in queued:
        slot.missing = 0
        return False
    # not queued and no result yet: the result file may still be on its way (shared file systems)
    slot.missing += 1
    return slot.missing >= _LOST_POLLS


def _error(job) -> str:
    """The error of a finished task ("" when it succeeded)."""
    if not job.paths.result_pickle.exists():
        return f"the task ended without a result (killed or lost); see {job.paths.stderr}"
    try:
        job.result()
    except Exception as exc:  # noqa: BLE001  (any failure of the task: it is retried or reported)
        return f"{_last_error_line(str(exc)) or type(exc).__name__} (log: {job.paths.stderr})"
    return ""


def _last_error_line(message: str) -> str:
    """The exception line of submitit's FailedJobError (its traceback sits between ---- rules)."""
    lines = [line.strip() for line in message.splitlines()]
    rules = [i for i, line in enumerate(lines) if line.startswith("-----")]
    block = lines[rules[0] + 1 : rules[1]] if len(rules) >= 2 else lines
    block = [line for line in block if line]
    return block[-1][:300] if block else ""


def _watch(suite, out, cells, spec, ex, task, slots, record, device, show, outcome) -> None:
    counter = Counter(out, [c.cell for c in cells])
    bar = _Bar(len(cells), suite.name, sys.stderr.isatty() if show is None else show)
    running = list(slots)
    try:
        while running:
            time.sleep(POLL_S)
            queued = _queued(running) if spec.name == "slurm" else None
            over = [s for s in running if _finished(s, queued)]
            retry = []
            for s in over:
                s.error = _error(s.job)
                if s.error and s.attempts <= spec.retries:
                    retry.append(s)
                elif s.error:
                    outcome.failed[s.shard[0]] = s.error
                running.remove(s)
            if retry:
                for s, job in zip(retry, _map(ex, task, suite, out, [s.shard for s in retry], device)):
                    s.job, s.attempts, s.missing = job, s.attempts + 1, 0
                    print(
                        f"rfbench run: task {s.shard[0]}/{s.shard[1]} failed ({s.error}); "
                        f"submitted again (attempt {s.attempts} of {spec.retries + 1})",
                        file=sys.stderr,
                    )
                    outcome.job_ids.append(str(job.job_id))
                running += retry
                _write_record(out, record, slots)
            bar.update(counter.counts(), len(running))
    except KeyboardInterrupt:
        bar.close()
        print(
            f"rfbench run: stopped watching; the tasks go on (rfbench status {out}). To stop them: "
            + (
                "scancel " + " ".join(sorted({str(s.job.job_id).split("_")[0] for s in running}))
                if spec.name == "slurm"
                else "they end with this process"
            ),
            file=sys.stderr,
        )
        raise
    bar.update(counter.counts(), 0)
    bar.close()
    _tidy(out)


class _Bar:
    """A progress bar of finished cells fed from the folder (quiet when not on a terminal)."""

    def __init__(self, total: int, name: str, show: bool):
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True, desc=name)

    def update(self, counts, tasks_running: int) -> None:
        if self.bar is None:
            return
        self.bar.n = counts.done + counts.failed
        self.bar.set_postfix_str(
            f"done {counts.done}, failed {counts.failed}, pending {counts.pending}; "
            f"tasks left {tasks_running}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def planned_devices(suite: Suite, device: str | None, spec: ExecutorSpec) -> list[str]:
    """The devices the array tasks will resolve, known before they start.

    ``auto`` is cuda where the tasks get a GPU (slurm with ``gpus``) or this machine has one
    (local), else cpu: the submitter's plan (cell ids) then matches the tasks' plans."""
    import torch

    wanted = [device] if device is not None else list(suite.sweep.device)
    has_gpu = spec.gpus > 0 if spec.name == "slurm" else torch.cuda.is_available()
    out = []
    for d in wanted:
        d = ("cuda" if has_gpu else "cpu") if d == "auto" else d
        if d not in out:
            out.append(d)
    return out


def tasks_note(spec: ExecutorSpec, num_cells: int) -> str:
    n = spec.num_tasks(num_cells)
    return f"{num_cells} cells in {n} array task(s) of about {math.ceil(num_cells / max(n, 1))} cell(s)"
