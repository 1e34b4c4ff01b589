"""``rfbench status DIR``: cells done / failed / pending of a run, read from its folder.

    rfbench status reports/quick
    quick: 108 cells: 96 done, 2 failed, 10 pending (89% finished)
    slurm array 4242: 3 task(s) queued or running

*done* cells are written with status ok, skipped or oom; *failed* ones with status error (a
``--resume`` runs them again); *pending* cells have no file yet. The planned cells come from
``logs/submission.json`` (written by ``--executor local|slurm``), else from the suite recorded in
meta.json. Works the same while the tasks run, after they ended, and on a copied folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rfbench.errors import DataError, SpecError
from rfbench.results import store
from rfbench.results.meta import META_FILE, read_meta

LOGS = "logs"
SUBMISSION_FILE = "submission.json"
#: statuses of a cell that count as done (``--resume`` keeps them); ``error`` counts as failed
DONE = ("ok", "skipped", "oom")


def logs_dir(out: Path) -> Path:
    return Path(out) / LOGS


@dataclass(frozen=True)
class Counts:
    total: int
    done: int
    failed: int

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    def line(self) -> str:
        share = (self.done + self.failed) / self.total if self.total else 1.0
        return (
            f"{self.total} cells: {self.done} done, {self.failed} failed, {self.pending} pending "
            f"({share:.0%} finished)"
        )


class Counter:
    """Counts the planned ``cells`` by the status of their files; a file is read again only when
    it changed (so a 10,000-cell folder can be polled every few seconds)."""

    def __init__(self, out: Path, cells: list[str]):
        self.out = Path(out)
        self.cells = list(dict.fromkeys(cells))
        self._seen: dict[str, tuple[int, str]] = {}  # cell -> (mtime_ns, status)

    def counts(self) -> Counts:
        files = store.cell_files(self.out)
        done = failed = 0
        for cell in self.cells:
            path = files.get(cell)
            if path is None:
                continue
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:  # replaced or removed while we look: counted at the next poll
                continue
            seen = self._seen.get(cell)
            if seen is None or seen[0] != mtime:
                try:
                    status = store.read_cell_meta(path).get("status", "")
                except DataError:
                    status = ""
                seen = self._seen[cell] = (mtime, status)
            done += seen[1] in DONE
            failed += seen[1] == "error"
        return Counts(len(self.cells), done, failed)


def submission(out: Path) -> dict | None:
    path = logs_dir(out) / SUBMISSION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable submission record ({exc}); delete it") from None


def planned_cells(out: Path) -> tuple[str, list[str]]:
    """(suite name, cell ids in canonical order) of the run in ``out``."""
    out = Path(out)
    record = submission(out)
    if record is not None:
        return record.get("suite", out.name), list(record["cells"])
    if not (out / META_FILE).is_file():
        raise DataError(f"{out}: not an rfbench results folder (no {META_FILE}); give the --out of a run")
    meta = read_meta(out)
    if meta.suite.parsed is None:
        raise DataError(f"{out}/{META_FILE} does not record its suite; cannot list the planned cells")
    from rfbench.suite.plan import plan, resolve_devices
    from rfbench.suite.sources import prepare_sources
    from rfbench.suite.spec import suite_from_dict

    path = Path(meta.suite.path) if meta.suite.path else None
    suite = suite_from_dict(meta.suite.parsed, source=str(path or out / META_FILE), path=path)
    # the devices the runs resolved (their records), else what this machine resolves
    devices = list(dict.fromkeys(d for run in meta.runs for d in run.get("devices") or []))
    try:
        devices = devices or resolve_devices(suite, None)
    except SpecError:
        devices = ["cpu"]
    return suite.name, [c.cell for c in plan(suite, prepare_sources(suite), devices)]


def squeue(arrays: list[str], fmt: str) -> list[str] | None:
    """``squeue`` lines (one per task, in ``fmt``) of the job arrays ``arrays``; None where
    squeue cannot answer. Jobs the controller no longer knows (long finished) are no lines."""
    if shutil.which("squeue") is None:
        return None
    try:
        r = subprocess.run(
            ["squeue", "-h", "-r", "-o", fmt, "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return [] if "invalid job id" in r.stderr.lower() else None
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def queued_tasks(record: dict | None) -> str:
    """A line on the slurm tasks still queued or running ("" where unknown)."""
    if not record or record.get("executor") != "slurm":
        return ""
    arrays = sorted({str(j["job_id"]).split("_")[0] for j in record.get("jobs", [])})
    if not arrays:
        return ""
    states = squeue(arrays, "%T")
    if states is None:
        return f"slurm job(s) {', '.join(arrays)}: squeue did not answer"
    if not states:
        return f"slurm job(s) {', '.join(arrays)}: no task queued or running"
    by = {s: states.count(s) for s in sorted(set(states))}
    return f"slurm job(s) {', '.join(arrays)}: " + ", ".join(f"{n} {s.lower()}" for s, n in by.items())


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a results folder (the --out of rfbench run)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if not out.is_dir():
        raise DataError(f"{out}: no such results folder")
    name, cells = planned_cells(out)
    counts = Counter(out, cells).counts()
    print(f"{name}: {counts.line()}")
    line = queued_tasks(submission(out))
    if line:
        print(line)
    if counts.failed:
        print(f"failed cells: see the message column of {out}/results.parquet; rerun them with --resume")
    return 0
