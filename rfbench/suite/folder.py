"""The out folder of a run: what it may hold, what ``--resume`` skips, and which edits it takes.

A folder holds the results of one suite, written by any number of writers (runs, resumes,
shards, array tasks; ``rfbench.results.claims`` keeps them apart). ``--resume`` skips cells
already written with status ok, skipped or oom and with the suite's seed count, and re-runs
cells that ended in ``error`` (a missing module or a bug fixed since).

A suite may grow in its folder: estimators, baselines, data sources, sweep values and seeds
may be added (``--resume`` then runs only the new cells; a cell whose seed count grew is run
again whole, since its cross-seed bias² and variance need all seeds together). An edit that
changes what an existing cell means is refused, naming the edit: the suite's name, its
``[metrics]`` or ``[timing]`` settings, ``seeds.base``, fewer seeds, or a cell whose label
(estimator, data label, L, m, causal, dtype, device) is kept while its definition changed (an
estimator's parameters, a data source's parameters under the same label, the ``[fit]`` settings).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rfbench.errors import DataError, SpecError
from rfbench.results import store
from rfbench.results.meta import META_FILE, RUNS_DIR, Meta, read_meta, read_runs, write_meta
from rfbench.suite.plan import Cell
from rfbench.suite.spec_types import Suite

#: Statuses of a finished cell that ``--resume`` keeps (``error`` cells are run again).
KEPT_ON_RESUME = ("ok", "skipped", "oom")


@dataclass
class FolderState:
    """What a run found in its out folder."""

    previous: Meta | None  # the folder's meta view before this run (None: new or unknown)
    done: set[str] = field(default_factory=set)  # cells resume skips
    seen: dict[str, str | None] = field(default_factory=dict)  # cell -> run id of its file, if any
    notes: list[str] = field(default_factory=list)  # what was repaired or could not be read


def open_folder(out: Path, suite: Suite, cells: list[Cell], mine: list[Cell], resume: bool) -> FolderState:
    """Check ``out`` for a run of ``mine`` (of the suite's ``cells``) and repair what is damaged.

    SpecError when the folder holds something else, results that need ``--resume``, or results
    that the suite's edits would change the meaning of. Nothing is written to a folder whose
    cells are all done (a read-only folder can be resumed with nothing left to do).
    """
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out} exists and is not a folder")
    # logs/: what --executor local|slurm writes before the first task records its run
    entries = (
        [p for p in out.iterdir() if not p.name.startswith(".") and p.name != "logs"] if out.is_dir() else []
    )
    if not entries:
        return FolderState(None)
    if not any((out / name).exists() for name in (META_FILE, RUNS_DIR, "cells")):
        raise SpecError(
            f"--out {out} is not empty and is not an rfbench results folder; choose another --out"
        )
    state = FolderState(_previous(out))
    infos, state.notes = store.scan_cells(out)
    _check_suite(out, suite, state.previous, resume)
    _check_cells(out, cells, infos)
    if not resume and any(c.cell in infos for c in mine):
        raise SpecError(
            f"{out} already holds results of this suite; pass --resume to finish it, "
            "or --out to write elsewhere"
        )
    state.seen = {c: i.meta.get("run_id") for c, i in infos.items()}
    state.done = {c.cell for c in mine if is_done(infos.get(c.cell), c)} if resume else set()
    return state


def is_done(info: store.CellInfo | None, cell: Cell) -> bool:
    """Whether a cell file finishes ``cell``: a kept status and all of the cell's seeds."""
    return info is not None and info.status in KEPT_ON_RESUME and info.num_rows == len(cell.seeds)


def repair(out: Path) -> list[str]:
    """Before writing into ``out``: quarantine unreadable cells, delete temporaries whose writer
    is gone, and keep the records of a folder written before run records existed."""
    out.mkdir(parents=True, exist_ok=True)
    _, notes = store.scan_cells(out, quarantine=True)
    store.remove_stale_temporaries(out)
    runs, _ = read_runs(out)
    if not runs and (out / META_FILE).is_file():
        try:
            old = read_meta(out / META_FILE)
        except DataError:
            pass
        else:
            write_meta(out / RUNS_DIR / "legacy.json", old)
    return notes


def _previous(out: Path) -> Meta | None:
    """The folder's meta view (from its run records, else meta.json); None when unreadable."""
    try:
        return read_meta(out)
    except DataError as exc:
        if (out / META_FILE).exists():
            print(f"rfbench: {exc}; it is rebuilt from the run records and cells", file=sys.stderr)
        return None


def _check_suite(out: Path, suite: Suite, previous: Meta | None, resume: bool) -> None:
    if previous is None or not previous.suite.validated:
        return
    old, new = previous.suite.validated, json.loads(json.dumps(suite.to_dict(), default=str))
    where = (
        f"{out} holds results of a different suite definition ({previous.suite.path or previous.suite.name})"
    )
    fix = "use another --out (or delete that folder)"
    if old.get("name") != new["name"]:
        raise SpecError(f"{where}: the suite name changed ({old.get('name')!r} -> {new['name']!r}); {fix}")
    if not resume and _comparable(old) != _comparable(new):
        raise SpecError(f"{where}; pass --resume to extend it with the new cells, or {fix}")
    for section in ("metrics", "timing"):
        edits = _diff(old.get(section), new[section], section)
        if edits:
            raise SpecError(
                f"{where}: [{section}] changed ({'; '.join(edits[:3])}), which changes what its "
                f"finished cells mean; {fix}"
            )
    seeds_old, seeds_new = old.get("seeds") or {}, new["seeds"]
    if seeds_old.get("base", seeds_new["base"]) != seeds_new["base"]:
        raise SpecError(
            f"{where}: seeds.base changed ({seeds_old['base']} -> {seeds_new['base']}), which changes "
            f"every cell's seeds; {fix}"
        )
    if seeds_old.get("count", 0) > seeds_new["count"]:
        raise SpecError(
            f"{where}: seeds.count went down ({seeds_old['count']} -> {seeds_new['count']}); a results "
            f"folder only grows: {fix}"
        )


def _comparable(validated: dict) -> dict:
    """The parts of a validated suite that identify it (not where its file lies, nor its prose, nor
    where it runs: ``[executor]`` changes no cell)."""
    return {k: v for k, v in validated.items() if k not in ("path", "source", "description", "executor")}


def _identity(key: dict, data_label: str) -> tuple:
    est = key.get("estimator")
    name = est.get("name") if isinstance(est, dict) else est
    return (
        key.get("kind"),
        name,
        data_label,
        key.get("seq_len"),
        key.get("num_features"),
        key.get("causal"),
        key.get("dtype"),
        key.get("device"),
    )


def _check_cells(out: Path, cells: list[Cell], infos: dict[str, store.CellInfo]) -> None:
    """Refuse a planned cell that keeps an existing cell's label but not its definition."""
    existing = {}
    for cell, info in infos.items():
        key = info.meta.get("key")
        if isinstance(key, dict):
            existing[_identity(key, _data_label(info))] = (cell, key)
    for c in cells:
        if c.cell in infos:
            continue
        hit = existing.get(_identity(c.key, c.source.label))
        if hit is None:
            continue
        edits = _diff(hit[1], c.key, "")
        if not edits:
            continue  # the same cell under another file name: a copy, not an edit
        raise SpecError(
            f"{out}: the suite changes what finished cell {c.label()} means ({'; '.join(edits[:3])}); "
            "give the changed estimator or data source another label, or use another --out"
        )


def _data_label(info: store.CellInfo) -> str:
    label = info.meta.get("data")
    if isinstance(label, str):
        return label
    try:  # cells written before their label rode in the metadata
        rows, _ = store.read_cell(info.path)
        return str(rows["data"].iloc[0]) if len(rows) else ""
    except (DataError, OSError, KeyError):
        return ""


def _diff(old, new, where: str) -> list[str]:
    """Readable differences between two JSON values: ``path: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{where}.{k}" if where else str(k)
            if k not in old:
                out.append(f"{path} added ({new[k]!r})")
            elif k not in new:
                out.append(f"{path} removed (was {old[k]!r})")
            else:
                out.extend(_diff(old[k], new[k], path))
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]
