"""``meta.json``, typed: what ran (the suite), with what (versions, git, machine), when and how.

    meta = read_meta("reports/quick/meta.json")      # or load_meta(folder)
    meta.suite.name, meta.git.revision, meta.machine.cpu, meta.versions["torch"], meta.runs[-1]
    write_meta(path, meta)

Many writers share a folder, so none rewrites another's record: each run (a shard, an array
task, a resume) writes its own ``runs/<run id>.json`` (``write_run``: a meta document whose
``runs`` holds that one record) and ``assemble_meta`` builds the folder's view from all of them:
the latest run's suite and machine, the first start time, the latest end time, every record by
start time. A record still "running" whose process of this host is gone reads as "died".
``meta.json`` is that view, rewritten under the folder lock when results are consolidated;
``read_meta(folder)`` assembles it afresh when ``runs/`` exists, so a damaged or deleted
meta.json loses nothing.

The runner writes it (``rfbench.suite.provenance`` fills it); the report reads it through these
attributes, never by guessing keys. Keys this version does not know are kept in ``extra`` and
written back. Files written by older versions, whose layout was flat (``host``, ``cpu``,
``device``, ``git_revision`` at the top), still load: ``LEGACY`` names where each old key went.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rfbench.errors import DataError
from rfbench.results.atomic import write_text

META_FILE = "meta.json"
RUNS_DIR = "runs"


@dataclass
class SuiteRecord:
    """The suite as given (``toml``), as parsed (``parsed``) and as validated (``validated``)."""

    name: str = ""
    path: str | None = None
    toml: str = ""
    parsed: dict | None = None
    validated: dict = field(default_factory=dict)


@dataclass
class GitRecord:
    revision: str | None = None
    dirty: bool | None = None
    branch: str | None = None

    def describe(self) -> str:
        """'abc1234 (dirty)', or '' when the revision is unknown."""
        if not self.revision:
            return ""
        return f"{self.revision}{' (dirty)' if self.dirty else ''}"


@dataclass
class Machine:
    host: str = ""
    platform: str = ""
    cpu: str = ""
    cpu_count: int | None = None
    torch_threads: int | None = None
    devices: list[dict] = field(default_factory=list)  # {"device": "cpu"|"cuda", "name": ..., ...}
    float32_matmul_precision: str = ""

    def device_names(self) -> list[str]:
        return [str(d.get("name") or d.get("device")) for d in self.devices]


@dataclass
class Meta:
    rfbench_version: str = ""
    suite: SuiteRecord = field(default_factory=SuiteRecord)
    git: GitRecord = field(default_factory=GitRecord)
    versions: dict[str, str | None] = field(default_factory=dict)  # python, torch, numpy, ...
    machine: Machine = field(default_factory=Machine)
    timing: dict = field(default_factory=dict)  # the suite's [timing] and how times are taken
    peak_memory: dict[str, str] = field(default_factory=dict)  # device -> what peak_mem_bytes means
    metrics: dict = field(default_factory=dict)  # the suite's [metrics] and their definitions
    seeds: dict = field(default_factory=dict)  # count, base and the derivation rule
    start_time: str | None = None  # ISO 8601, of the first run into the folder
    end_time: str | None = None  # of the latest run
    command: list[str] = field(default_factory=list)  # argv of the latest run
    runs: list[dict] = field(default_factory=list)  # one record per writer (run, resume, shard)
    extra: dict = field(default_factory=dict)  # keys this version does not know
    #: The document as read (None for a Meta built in memory): what report.html shows verbatim.
    document: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls, doc: dict, where: str = META_FILE) -> Meta:
        """A Meta from a parsed meta.json (this layout or an older flat one)."""
        if not isinstance(doc, dict):
            raise DataError(f"{where} must hold a JSON object, got {type(doc).__name__}")
        original, doc = doc, dict(doc)
        legacy = {
            new: doc.pop(old) for old, new in LEGACY.items() if old in doc and doc[old] not in (None, "")
        }
        try:
            suite = doc.pop("suite", {})
            suite = _record(SuiteRecord, suite if isinstance(suite, dict) else {"name": str(suite)})
            git = doc.pop("git", {})
            git = _record(GitRecord, git if isinstance(git, dict) else {"revision": str(git)})
            machine = _record(Machine, doc.pop("machine", {}) or {})
            command = doc.pop("command", [])
            peak = doc.pop("peak_memory", {})
            meta = cls(
                rfbench_version=str(doc.pop("rfbench_version", "") or ""),
                suite=suite,
                git=git,
                versions=dict(doc.pop("versions", {}) or {}),
                machine=machine,
                timing=dict(doc.pop("timing", {}) or {}),
                peak_memory=peak if isinstance(peak, dict) else {"*": str(peak)},
                metrics=dict(doc.pop("metrics", {}) or {}),
                seeds=dict(doc.pop("seeds", {}) or {}),
                start_time=doc.pop("start_time", None),
                end_time=doc.pop("end_time", None),
                command=command.split() if isinstance(command, str) else list(command),
                runs=list(doc.pop("runs", []) or []),
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: not an rfbench meta.json ({exc})") from None
        for target, value in legacy.items():
            _apply_legacy(meta, target, value)
        meta.extra = doc
        meta.document = original
        return meta

    def to_dict(self) -> dict:
        """The JSON document (the layout ``from_dict`` reads back)."""
        doc = dataclasses.asdict(self)
        extra = doc.pop("extra")
        doc.pop("document")
        return {**doc, **extra}

    def device_text(self) -> str:
        """The devices the run used, by name ("AMD EPYC", "NVIDIA H100 80GB HBM3")."""
        return ", ".join(self.machine.device_names())

    def peak_memory_note(self, devices) -> str:
        """What peak memory means on ``devices`` (e.g. the devices in a summary); "" if unknown."""
        if "*" in self.peak_memory:
            return self.peak_memory["*"]
        parts = []
        for d in devices:
            note = self.peak_memory.get(d)
            if note:
                parts.append(note if note.lower().startswith(d) else f"{d}: {note}")
        return "; ".join(parts)


#: Flat keys of meta.json files from before this layout, and the attribute each now fills.
LEGACY: dict[str, str] = {
    "suite_name": "suite.name",
    "toml": "suite.toml",
    "git_revision": "git.revision",
    "revision": "git.revision",
    "dirty": "git.dirty",
    "host": "machine.host",
    "hostname": "machine.host",
    "cpu": "machine.cpu",
    "cpu_name": "machine.cpu",
    "cpu_count": "machine.cpu_count",
    "torch_threads": "machine.torch_threads",
    "device": "machine.devices",
    "device_name": "machine.devices",
    "started": "start_time",
    "finished": "end_time",
    "command_line": "command",
    **{f"{name}_version": f"versions.{name}" for name in ("python", "torch", "triton", "numpy")},
}


def _record(cls, table: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in table.items() if k in names})


def _apply_legacy(meta: Meta, target: str, value: Any) -> None:
    if target == "machine.devices":
        if not meta.machine.devices:
            meta.machine.devices = [{"device": str(value), "name": str(value)}]
        return
    if target == "command":
        meta.command = value.split() if isinstance(value, str) else list(value)
        return
    head, _, attr = target.partition(".")
    if not attr:
        if getattr(meta, head) in (None, ""):
            setattr(meta, head, value)
    elif head == "versions":
        meta.versions.setdefault(attr, value)
    else:
        record = getattr(meta, head)
        if getattr(record, attr) in (None, "", []):
            setattr(record, attr, value)


def read_meta(path: str | os.PathLike) -> Meta:
    """Read a meta.json file, or the view of a results folder (``assemble_meta`` when it has run
    records, else its meta.json); DataError when missing or broken."""
    path = Path(path)
    if path.is_dir():
        assembled = assemble_meta(path)
        if assembled is not None:
            return assembled
        path = path / META_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path.parent}: no {META_FILE}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return Meta.from_dict(doc, str(path))


def write_meta(path: str | os.PathLike, meta: Meta) -> Path:
    """Write ``meta`` to ``path`` (a file, or a results folder) atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / META_FILE
    return write_text(path, json.dumps(meta.to_dict(), indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------- run records
def new_run_id() -> str:
    """A run id unique across hosts and time: ``<UTC time>-<host>-<pid>-<random>``."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return f"{stamp}-{host}-{os.getpid()}-{secrets.token_hex(3)}"


def run_path(out: str | os.PathLike, run_id: str) -> Path:
    return Path(out) / RUNS_DIR / f"{run_id}.json"


def write_run(out: str | os.PathLike, meta: Meta) -> Path:
    """Write this writer's record (``meta.runs == [record]``, ``record["run_id"]``) atomically."""
    (record,) = meta.runs
    return write_meta(run_path(out, record["run_id"]), meta)


def read_runs(out: str | os.PathLike) -> tuple[list[Meta], list[str]]:
    """The readable run records of a folder, and a note per unreadable one."""
    folder = Path(out) / RUNS_DIR
    metas, notes = [], []
    if not folder.is_dir():
        return metas, notes
    for p in sorted(folder.glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            metas.append(read_meta(p))
        except (DataError, OSError) as exc:
            notes.append(f"run record {p.name} is unreadable and was left out ({exc})")
    return metas, notes


def _status(record: dict) -> dict:
    from rfbench.results.claims import host, pid_alive

    if record.get("status") == "running" and record.get("host") == host():
        pid = record.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid):
            return {**record, "status": "died"}
    return record


def assemble_meta(out: str | os.PathLike) -> Meta | None:
    """The folder's meta view from its run records (None when it has none); see the module doc."""
    metas, _ = read_runs(out)
    if not metas:
        return None
    def started(r: dict) -> tuple:  # ISO time to the second; ``start_unix`` breaks ties
        unix = r.get("start_unix")
        return str(r.get("start_time") or ""), unix if isinstance(unix, (int, float)) else 0.0

    metas.sort(key=lambda m: max((started(r) for r in m.runs), default=(str(m.start_time or ""), 0.0)))
    runs = sorted((_status(r) for m in metas for r in m.runs), key=started)
    view = dataclasses.replace(metas[-1], runs=runs, document=None)
    starts = [m.start_time for m in metas if m.start_time]
    ends = [r.get("end_time") for r in runs if r.get("end_time")]
    view.start_time = min(starts) if starts else None
    view.end_time = max(ends) if ends else None
    view.document = view.to_dict()
    return view
