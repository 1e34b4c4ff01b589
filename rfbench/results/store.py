"""The results folder: one Parquet file per finished cell, consolidated tables, fit curves.

    <out>/cells/<cell>.parquet   rows of one cell (one per seed), written atomically when the
                                 cell finishes; the cell's cross-seed statistics (bias2,
                                 mc_variance, ...), status and key ride in the file's schema metadata
    <out>/results.parquet        every row of every finished cell (consolidated)
    <out>/summary.parquet        one row per cell: mean, std and 95% CI of each metric over seeds
    <out>/meta.json              the suite, versions, machine, times, command line (meta.py)
    <out>/fits/<cell>.parquet    suites with [fit]: the training curves of a cell's learned
                                 estimators (cell, estimator, data, num_features, seed,
                                 seed_index, step, train_loss, val_loss), written just before
                                 the cell's own file; ``load_fit_curves`` reads them all

Every file is written with ``atomic.atomic_write``. Nothing is pickled.

Many writers may share the folder (``rfbench.results.claims``): consolidation runs under the
folder lock and always reads every cell file, so the last writer to finish leaves complete
tables. Damage is repaired, never fatal: a cell file that cannot be read (truncated, or a stray
parquet of another layout) is moved to ``<out>/quarantine/`` by a writer (``quarantine_cell``; it
says which) and computed again by ``--resume``; readers skip it with a note. A consolidated
table that cannot be read is rebuilt from ``cells/`` (``load_tables`` in memory,
``repair_tables`` on disk).

The stale-table rule (``missing_cells``): a consolidated table is stale when ``cells/`` holds a
finished cell it lacks (a run killed, or a resumed run, before it consolidated); readers then
rebuild it from ``cells/`` in memory. It is the only such rule: ``load_results``,
``load_summary`` and ``load_tables`` (the report's reader) all apply it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rfbench.errors import DataError
from rfbench.results.atomic import atomic_write, is_temporary, temporary_owner
from rfbench.results.claims import STALE_AFTER_S, folder_lock, owner_gone
from rfbench.results.schema import COLUMNS, LATER_COLUMNS
from rfbench.results.summary import summarise

_META_KEY = b"rfbench.cell"
_ARROW = {"object": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
_EMPTY = {"object": "", "int64": 0, "float64": math.nan, "bool": False}
#: The Arrow schema of results.parquet and of every cell file.
SCHEMA = pa.schema([(name, _ARROW[col.dtype]) for name, col in COLUMNS.items()])
RESULTS_FILE, SUMMARY_FILE = "results.parquet", "summary.parquet"
QUARANTINE_DIR = "quarantine"


def _value(v, dt: str):
    if v is None or (dt != "float64" and isinstance(v, float) and math.isnan(v)):
        return _EMPTY[dt]  # a failed cell never got this value
    if dt == "float64":
        return float(v)
    if dt == "int64":
        return int(v)
    if dt == "bool":
        return bool(v)
    return str(v)


def table(rows: Iterable[dict]) -> pa.Table:
    """Rows (dicts) as an Arrow table with exactly the results columns, in order, typed."""
    rows = list(rows)
    return pa.table(
        [
            pa.array([_value(r.get(n), c.dtype) for r in rows], type=_ARROW[c.dtype])
            for n, c in COLUMNS.items()
        ],
        schema=SCHEMA,
    )


def frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows (dicts) as a DataFrame with exactly the results columns, in order, typed."""
    return table(rows).to_pandas()


REQUIRED = ("cell", "estimator", "status")


def conform(df: pd.DataFrame, where: str = "results", *, summary: bool = False) -> pd.DataFrame:
    """``df`` (a results table, or with ``summary`` a summary) as every reader expects it.

    DataError (one line) when it lacks the columns no table can do without (REQUIRED). Tables
    written before a column existed get it: the identity columns are derived from the estimator
    name ("posrf-orf": feature map posrf, weight matrix orf, kind estimator; a name without a
    hyphen is a baseline), messages and statuses are filled, and in a results table every other
    missing column gets its empty value (``eval_len``: every token was measured).
    """
    missing = [c for c in REQUIRED if c not in df]
    if missing:
        raise DataError(f"{where} lacks column(s) {', '.join(missing)}; it is not an rfbench results table")
    df = df.copy()
    est = df["estimator"].astype(str)
    is_pair = (est.str.count("-") == 1).to_numpy()
    if "feature_map" not in df:
        df["feature_map"] = np.where(is_pair, est.str.split("-").str[0], "")
    if "weight_matrix" not in df:
        df["weight_matrix"] = np.where(is_pair, est.str.split("-").str[-1], "")
    if "kind" not in df:
        df["kind"] = np.where(df["feature_map"].astype(str) != "", "estimator", "baseline")
    df["message"] = df["message"].fillna("").astype(str) if "message" in df else ""
    df["status"] = df["status"].fillna("error").astype(str)
    for col in ("feature_map", "weight_matrix", "kind"):
        df[col] = df[col].fillna("").astype(str)
    if not summary:
        for name, col in COLUMNS.items():
            if name in df or col.role == "key":
                continue
            if name == "eval_len" and "seq_len" in df:
                df[name] = df["seq_len"].astype("int64")
            else:
                df[name] = _EMPTY[col.dtype]
    return df


# --------------------------------------------------------------------------- writing
def write_parquet(path: Path, data: pd.DataFrame | pa.Table, metadata: dict | None = None) -> Path:
    tab = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    if metadata is not None:
        tab = tab.replace_schema_metadata(
            {**(tab.schema.metadata or {}), _META_KEY: json.dumps(metadata, sort_keys=True).encode()}
        )
    return atomic_write(path, lambda tmp: pq.write_table(tab, tmp))


def cells_dir(out: Path) -> Path:
    return Path(out) / "cells"


def cell_path(out: Path, cell: str) -> Path:
    return cells_dir(out) / f"{cell}.parquet"


def write_cell(out: Path, cell: str, rows: list[dict], stats: dict) -> Path:
    """Write one finished cell: its rows and its cross-seed ``stats`` (and key) as metadata."""
    return write_parquet(cell_path(out, cell), table(rows), metadata=stats)


def fits_dir(out: Path) -> Path:
    return Path(out) / "fits"


def write_fit_curves(out: Path, cell: str, curves: pd.DataFrame) -> Path:
    """Write the training curves of one cell (atomically; a re-run cell replaces them)."""
    return write_parquet(fits_dir(out) / f"{cell}.parquet", curves.reset_index(drop=True))


def remove_stale_temporaries(out: Path, stale_after_s: float = STALE_AFTER_S) -> int:
    """Delete temporary files of killed writes; returns how many. A temporary is deleted only
    when its writer is gone (a dead process of this host, or no change for ``stale_after_s``):
    another live writer's file in progress is left alone."""
    n = 0
    for folder in (Path(out), cells_dir(out), fits_dir(out), Path(out) / "runs"):
        if not folder.is_dir():
            continue
        for p in folder.glob(".*"):
            if not is_temporary(p):
                continue
            owner = temporary_owner(p)
            try:
                mtime = p.stat().st_mtime
            except FileNotFoundError:
                continue  # its writer finished meanwhile
            if owner_gone(*(owner or (None, None)), mtime, stale_after_s):
                p.unlink(missing_ok=True)
                n += 1
    return n


def quarantine_cell(out: Path, path: Path, reason: str) -> str:
    """Move an unreadable cell file to ``<out>/quarantine/`` (so it is computed again); the note
    printed, also returned."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = Path(out) / QUARANTINE_DIR / f"{path.stem}.{stamp}.{os.getpid()}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another writer moved it first
        return ""
    note = (
        f"rfbench: {path.parent.name}/{path.name} is unreadable ({reason}); "
        f"moved to {target}, it will be computed again"
    )
    print(note, file=sys.stderr)
    return note


# --------------------------------------------------------------------------- reading cells
def _parquet_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.parquet")) if not p.name.startswith(".")}


def cell_files(out: Path) -> dict[str, Path]:
    """``{cell: path}`` of the finished cells (temporary files of an interrupted write are ignored)."""
    return _parquet_files(cells_dir(out))


def _read_table(path: Path) -> tuple[pa.Table, dict]:
    try:
        tab = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable cell file ({exc})") from None
    meta = (tab.schema.metadata or {}).get(_META_KEY)
    for col in LATER_COLUMNS:
        if col not in tab.column_names:
            if col == "eval_len" and "seq_len" in tab.column_names:  # every token was measured
                filled = tab.column("seq_len").cast(pa.int64())
            else:
                dt = COLUMNS[col].dtype
                filled = pa.array([_EMPTY[dt]] * tab.num_rows, type=_ARROW[dt])
            tab = tab.append_column(col, filled)
    try:
        tab = tab.select(list(COLUMNS)).cast(SCHEMA)
    except (KeyError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not an rfbench cell file ({exc})") from None
    return tab, (json.loads(meta) if meta else {})


def read_cell_meta(path: Path) -> dict:
    """The metadata of one cell file (status, key, cross-seed statistics), without its rows."""
    try:
        meta = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable cell file ({exc})") from None
    return json.loads(meta) if meta else {}


def read_cell(path: Path) -> tuple[pd.DataFrame, dict]:
    """Rows and metadata (cross-seed statistics, status, key) of one cell file."""
    tab, meta = _read_table(path)
    return tab.to_pandas(), meta


def finished_cells(out: Path, statuses: tuple[str, ...] = ("ok", "skipped", "oom")) -> dict[str, str]:
    """``{cell: status}`` of the cells written with one of ``statuses`` (an unreadable file is
    not finished: it is run again)."""
    infos, _ = scan_cells(out)
    return {c: i.status for c, i in infos.items() if i.status in statuses}


@dataclass
class CellInfo:
    """What a cell file says without reading its rows: metadata (status, key, run id) and rows."""

    path: Path
    meta: dict
    num_rows: int

    @property
    def status(self) -> str | None:
        return self.meta.get("status")


def cell_info(path: Path) -> CellInfo:
    """The metadata and row count of one cell file (its footer only); DataError when it is not
    a readable rfbench cell file."""
    try:
        md = pq.read_metadata(path)
        raw = (md.schema.to_arrow_schema().metadata or {}).get(_META_KEY)
        meta = json.loads(raw) if raw else {}
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable cell file ({exc})") from None
    names = set(md.schema.names)
    if not isinstance(meta, dict) or "status" not in meta or not set(REQUIRED) <= names:
        raise DataError(f"{path}: not an rfbench cell file (no cell metadata or columns)")
    return CellInfo(path, meta, md.num_rows)


def scan_cells(out: Path, *, quarantine: bool = False) -> tuple[dict[str, CellInfo], list[str]]:
    """``{cell: CellInfo}`` of every readable cell file, and a note per unreadable one (moved to
    quarantine/ when ``quarantine``, else skipped)."""
    infos, notes = {}, []
    for cell, path in cell_files(out).items():
        try:
            infos[cell] = cell_info(path)
        except DataError as exc:
            notes.append(_bad_cell(out, path, exc, quarantine))
        except FileNotFoundError:
            continue  # quarantined by another writer meanwhile
    return infos, [n for n in notes if n]


def _bad_cell(out: Path, path: Path, exc: Exception, quarantine: bool) -> str:
    reason = str(exc).split(": ", 1)[-1]
    if quarantine:
        return quarantine_cell(out, path, reason)
    return f"{path.name} in cells/ is unreadable and was left out ({reason})"


# --------------------------------------------------------------------------- consolidation
def collect(
    out: Path, order: list[str] | None = None, *, notes: list[str] | None = None, quarantine: bool = False
) -> tuple[pd.DataFrame, dict[str, dict]]:
    """All readable cells' rows (ordered by ``order``, then by cell id) and their metadata; an
    unreadable cell file is left out with a note in ``notes`` (moved to quarantine/ when
    ``quarantine``)."""
    files = cell_files(out)
    rank = {c: i for i, c in enumerate(order or [])}
    tables, metas = [], {}
    for cell in sorted(files, key=lambda c: (rank.get(c, len(rank)), c)):
        try:
            tab, meta = _read_table(files[cell])
        except FileNotFoundError:
            continue
        except DataError as exc:
            note = _bad_cell(out, files[cell], exc, quarantine)
            if notes is not None and note:
                notes.append(note)
            continue
        tables.append(tab)
        metas[cell] = meta
    rows = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return rows.to_pandas(), metas


def consolidate(out: Path, order: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(Re)write results.parquet, summary.parquet and meta.json from every cell file and run
    record, under the folder lock (so the last writer leaves them complete); return both tables.
    Unreadable cell files are quarantined."""
    from rfbench.results.meta import META_FILE, assemble_meta, write_meta

    with folder_lock(out):
        results, stats = collect(out, order, quarantine=True)
        summary = summarise(results, stats)
        write_parquet(Path(out) / RESULTS_FILE, results)
        write_parquet(Path(out) / SUMMARY_FILE, summary)
        meta = assemble_meta(out)
        if meta is not None:
            write_meta(Path(out) / META_FILE, meta)
    return results, summary


def repair_tables(path) -> list[str]:
    """Rewrite the consolidated tables of a folder when they are missing, unreadable or stale
    (``consolidate``); return what was repaired (empty when nothing was). The folder must be
    writable; a report on a read-only folder needs only ``load_tables``, which rebuilds in memory."""
    folder = folder_of(path)
    files = cell_files(folder)
    if not files:
        return []
    broken = []
    for name in (RESULTS_FILE, SUMMARY_FILE):
        try:
            tab = pd.read_parquet(folder / name, columns=["cell"])
        except Exception:  # missing or damaged: pyarrow raises many types
            broken.append(f"{name} was missing or unreadable")
            continue
        if missing_cells(tab, files):
            broken.append(f"{name} was older than the finished cells")
    if broken:
        consolidate(folder)
        return [f"{b}: rebuilt from cells/" for b in broken]
    return []


# --------------------------------------------------------------------------- loading
def folder_of(path) -> Path:
    """The results folder of ``path`` (a folder, or one of its parquet files)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        return p.parent
    if not p.is_dir():
        raise DataError(f"{p}: no such results folder (run `rfbench run SUITE --out {p}` first)")
    return p


def missing_cells(tab: pd.DataFrame, files: dict[str, Path]) -> set[str]:
    """The stale-table rule: finished cells (``files``) that the table ``tab`` lacks."""
    if not files:
        return set()
    have = set(tab["cell"]) if "cell" in tab else set()
    return set(files) - have


def read_table(path: Path) -> pd.DataFrame:
    """A consolidated table (results or summary) as written; DataError (one line) when broken."""
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}; re-run the suite") from None


@dataclass
class Tables:
    """The tables of a results folder as ``load_tables`` found them (both ``conform``-ed)."""

    results: pd.DataFrame
    summary: pd.DataFrame | None  # None when not asked for
    notes: list[str] = field(default_factory=list)  # what was missing or rebuilt on load


def load_tables(path, with_summary: bool = True) -> Tables:
    """Results (and summary) of a folder, rebuilt from cells/ by the stale-table rule.

    A folder without results.parquet but with finished cells (a run killed before it
    consolidated) is read from its cells. Without summary.parquet the summary is rebuilt from
    the cells, or with none from results.parquet (no cross-seed statistics then).
    """
    folder = folder_of(path)
    rfile, sfile = folder / RESULTS_FILE, folder / SUMMARY_FILE
    files = cell_files(folder)
    notes: list[str] = []
    stats = summary = results = None
    if not rfile.is_file():
        if not files:
            raise DataError(f"{folder} holds no {RESULTS_FILE}; is it the output folder of `rfbench run`?")
        notes.append("the run did not finish: this report shows the cells it completed")
    else:
        try:
            results = conform(read_table(rfile), str(rfile))
        except DataError:
            if not files:
                raise
            notes.append(f"{RESULTS_FILE} is unreadable: the rows were read from cells/")
        else:
            if missing_cells(results, files):
                results = None
                notes.append("results.parquet was older than the finished cells: they were read from cells/")
    if results is None:
        results, stats = collect(folder, notes=notes)
    elif with_summary and sfile.is_file():
        try:
            summary = conform(read_table(sfile), str(sfile), summary=True)
        except DataError:
            source = "cells/" if files else RESULTS_FILE
            notes.append(f"{SUMMARY_FILE} is unreadable: it was rebuilt from {source}")
        else:
            if missing_cells(summary, files):
                summary = None
    elif with_summary:
        notes.append(
            "summary.parquet is missing: it was rebuilt from cells/"
            if files
            else "summary.parquet is missing: means and CIs were recomputed from results.parquet "
            "(no cross-seed bias²/variance)"
        )
    if with_summary and summary is None:
        if stats is None and files:
            infos, _ = scan_cells(folder)
            stats = {c: i.meta for c, i in infos.items()}
        summary = summarise(results, stats)
    return Tables(results, summary, notes)


def load_results(path) -> pd.DataFrame:
    """Rows of a results folder (or of its results.parquet), one per cell and seed.

    When the folder's cells/ holds cells that results.parquet lacks (a run that was killed),
    the rows are consolidated from cells/ in memory instead, so nothing finished is missed.
    """
    return load_tables(path, with_summary=False).results


def load_summary(path) -> pd.DataFrame:
    """One row per cell (summary.parquet), rebuilt from cells/ when it is out of date."""
    return load_tables(path).summary


def load_fit_curves(path) -> pd.DataFrame:
    """Every training curve of a results folder (empty when its suite fitted nothing)."""
    folder = folder_of(path)
    finished = set(cell_files(folder))  # a run killed between the two writes leaves curves alone
    files = [p for c, p in _parquet_files(fits_dir(folder)).items() if not finished or c in finished]
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{f}: not a readable fit-curve file ({exc})") from None
    if not frames:
        cols = ["cell", "estimator", "data", "num_features", "seed", "seed_index", "step"]
        return pd.DataFrame(columns=[*cols, "train_loss", "val_loss"])
    return pd.concat(frames, ignore_index=True)
