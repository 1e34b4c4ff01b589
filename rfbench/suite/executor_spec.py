"""The ``[executor]`` section of a suite: where and how ``rfbench run`` runs its cells.

    [executor]
    name = "slurm"              # inline (default: this process) | local (worker processes) | slurm
    tasks = 0                   # array tasks (0: from cells_per_task; local: one per CPU core)
    cells_per_task = 0          # cells per array task (0: slurm groups 10 cells per task)
    max_array_size = 1000       # the cluster's MaxArraySize: more tasks than this is refused
    retries = 2                 # a failed or preempted task is run again at most this many times
    partition = "gpu"           # slurm: sbatch --partition
    account = "my-lab"          # slurm: sbatch --account
    time_min = 60               # minutes per task (sbatch --time; local: the task's time limit)
    cpus = 2                    # CPUs per task
    mem_gb = 8.0                # memory per task (GB)
    gpus = 1                    # GPUs per task (cells on device "auto" then plan for cuda)
    array_parallelism = 256     # at most this many tasks of the array at once (sbatch --array=...%N)
    sbatch = ["--qos=high"]     # further sbatch flags, "--key=value" or "--flag"
    setup = ["module load cuda"]  # shell lines run before each task

Every setting may be given on the command line too (``rfbench run --partition gpu ...``); the
command line wins. Executor settings never change a cell's key, seeds or numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass

from rfbench.errors import SpecError

EXECUTORS = ("inline", "local", "slurm")

#: slurm's default grouping when neither ``tasks`` nor ``cells_per_task`` is given: a task pays
#: interpreter start-up, imports and data preparation once, so one cell per task wastes it.
SLURM_CELLS_PER_TASK = 10

_SBATCH_FLAG = re.compile(r"^--([A-Za-z][A-Za-z0-9-]*)(?:=(.+))?$")


@dataclass(frozen=True)
class ExecutorSpec:
    name: str = "inline"
    tasks: int = 0
    cells_per_task: int = 0
    max_array_size: int = 1000
    retries: int = 2
    partition: str = ""
    account: str = ""
    time_min: int = 60
    cpus: int = 1
    mem_gb: float = 4.0
    gpus: int = 0
    array_parallelism: int = 256
    sbatch: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    def sbatch_parameters(self) -> dict:
        """``sbatch`` flags as submitit's ``slurm_additional_parameters`` (``--qos=x`` -> qos: x)."""
        out: dict = {}
        for flag in self.sbatch:
            key, value = _SBATCH_FLAG.match(flag).groups()
            out[key.replace("-", "_")] = True if value is None else value
        return out

    def num_tasks(self, num_cells: int) -> int:
        """How many array tasks ``num_cells`` cells are grouped into (SpecError over max_array_size)."""
        import os

        if num_cells == 0:
            return 0
        if self.tasks:
            n, why = self.tasks, f"executor.tasks = {self.tasks}"
        elif self.cells_per_task:
            n = math.ceil(num_cells / self.cells_per_task)
            why = f"executor.cells_per_task = {self.cells_per_task} over {num_cells} cells"
        elif self.name == "local":
            return min(num_cells, os.cpu_count() or 1)
        else:  # slurm: group cells, and never ask for more tasks than the cluster takes
            n = min(math.ceil(num_cells / SLURM_CELLS_PER_TASK), self.max_array_size)
            why = ""
        n = min(n, num_cells)
        if n > self.max_array_size:
            need = math.ceil(num_cells / self.max_array_size)
            raise SpecError(
                f"{why} gives {n} array tasks, over executor.max_array_size = {self.max_array_size} "
                f"(clusters cap job arrays); set cells_per_task >= {need} or tasks <= {self.max_array_size}"
            )
        return n


def _close(name: str, known) -> str:
    match = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check(key: str, value, default):
    """``value`` checked against the type of the field's ``default``: (value, problem or "")."""
    if key == "name":
        ok = isinstance(value, str) and value in EXECUTORS
        return (
            value,
            "" if ok else f"expected one of {', '.join(EXECUTORS)}, got {value!r}{_close(value, EXECUTORS)}",
        )
    if isinstance(default, tuple):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in values):
            return default, f"expected a list of non-empty strings, got {value!r}"
        if key == "sbatch":
            bad = [v for v in values if not _SBATCH_FLAG.match(v)]
            if bad:
                return default, f'{bad[0]!r} is not an sbatch flag; write it as "--key=value" or "--flag"'
        return tuple(values), ""
    if isinstance(default, str):
        ok = isinstance(value, str) and not any(c.isspace() for c in value)
        return value, "" if ok else f"expected a name without spaces, got {value!r}"
    if isinstance(default, float):
        ok = (
            not isinstance(value, bool)
            and isinstance(value, (int, float))
            and math.isfinite(value)
            and value > 0
        )
        return (float(value) if ok else default), "" if ok else f"expected a positive number, got {value!r}"
    low = 0 if key in ("tasks", "cells_per_task", "retries", "gpus") else 1
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= low
    what = "a positive integer" if low == 1 else "an integer >= 0"
    return value, "" if ok else f"expected {what}, got {value!r}"


_FIELDS = {f.name: f.default for f in dataclasses.fields(ExecutorSpec)}


def read_executor(value, where: str = "executor") -> tuple[ExecutorSpec, list[str]]:
    """The ``[executor]`` table (a dict, or None when absent) validated: (spec, problems).

    Each problem reads "<key path>: <what>"; the suite reader prefixes the file name."""
    if value is None:
        return ExecutorSpec(), []
    if not isinstance(value, dict):
        return ExecutorSpec(), [f"{where}: expected a table, got {value!r}"]
    problems, given = [], {}
    for key, v in value.items():
        if key not in _FIELDS:
            problems.append(
                f"{where}.{key}: unknown key{_close(key, _FIELDS)}; allowed: {', '.join(_FIELDS)}"
            )
            continue
        checked, problem = _check(key, v, _FIELDS[key])
        if problem:
            problems.append(f"{where}.{key}: {problem}")
        else:
            given[key] = checked
    if given.get("tasks") and given.get("cells_per_task"):
        problems.append(f"{where}: give tasks or cells_per_task, not both")
    return ExecutorSpec(**given), problems


def with_overrides(spec: ExecutorSpec, overrides: dict) -> ExecutorSpec:
    """``spec`` with the command line's settings (None: not given); SpecError names the flag."""
    given = {}
    for key, v in overrides.items():
        if v is None:
            continue
        checked, problem = _check(key, v, _FIELDS[key])
        if problem:
            raise SpecError(f"--{key.replace('_', '-')}: {problem}")
        given[key] = checked
    if given.get("tasks"):  # the command line's grouping replaces the suite's
        given.setdefault("cells_per_task", 0)
    elif given.get("cells_per_task"):
        given.setdefault("tasks", 0)
    return dataclasses.replace(spec, **given)
