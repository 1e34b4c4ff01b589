"""The results folder: one Parquet file per finished cell, consolidated tables, metadata.

    <out>/cells/<cell>.parquet   rows of one cell (one per seed), written atomically when the
                                 cell finishes; the cell's cross-seed statistics (bias2,
                                 mc_variance, ...) ride in the file's schema metadata
    <out>/results.parquet        every row of every finished cell (consolidated)
    <out>/summary.parquet        one row per cell: mean, std and 95% CI of each metric over seeds
    <out>/meta.json              the suite, versions, machine, times, command line
    <out>/fits/<cell>.parquet    suites with [fit]: the training curves of a cell's learned
                                 estimators (cell, estimator, data, num_features, seed,
                                 seed_index, step, train_loss, val_loss), written just before
                                 the cell's own file; ``load_fit_curves`` reads them all

Every file is written to a temporary name in its own folder, flushed, fsync'ed and moved into
place with ``os.replace`` (atomic on POSIX), so a killed run leaves either the old file or the
new one, never half of one. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rfbench.errors import DataError

#: Key columns of results.parquet, in order, with their pandas dtypes.
KEY_COLUMNS: dict[str, str] = {
    "suite": "object",
    "cell": "object",
    "kind": "object",
    "estimator": "object",
    "feature_map": "object",
    "weight_matrix": "object",
    "data": "object",
    "seq_len": "int64",
    "num_features": "int64",
    "feature_dim": "int64",
    "dim": "int64",
    "batch": "int64",
    "heads": "int64",
    "causal": "bool",
    "dtype": "object",
    "device": "object",
    "seed": "int64",
    "seed_index": "int64",
}
#: Metric columns (float, NaN when not measured), in order.
METRICS: tuple[str, ...] = (
    "kernel_mse",
    "kernel_rel_mse",
    "attn_mse",
    "out_rel_err",
    "target_kernel_rel_mse",
    "target_out_rel_err",
    "time_ms",
    "time_ms_p20",
    "time_ms_p80",
    "tokens_per_s",
    "peak_mem_bytes",
    "draw_ms",
    "fit_ms",
)
#: Columns that change from run to run of the same cells: the wall-clock measurements, which
#: close METRICS (from time_ms on), and the repeat count they chose.
TIMED_COLUMNS: tuple[str, ...] = (*METRICS[METRICS.index("time_ms") :], "n_rep")
OTHER_COLUMNS: dict[str, str] = {
    "n_rep": "int64",
    "target": "object",  # the kernel the estimator approximates ("softmax", or e.g. a learned one)
    "fit_len": "int64",  # tokens fitted on ([fit] suites; 0 otherwise)
    "eval_len": "int64",  # tokens measured (seq_len, or its held-out part)
    "fit_best_step": "int64",  # training step whose parameters were kept (0: the initial ones)
    "fit_stopped": "object",  # steps | patience | diverged | not trainable ("" without [fit])
    "status": "object",
    "message": "object",
}
#: Columns a cell file may lack (written before they existed): filled with their empty value.
LATER_COLUMNS: tuple[str, ...] = ("target", "fit_len", "eval_len", "fit_best_step", "fit_stopped")
COLUMNS: dict[str, str] = {**KEY_COLUMNS, **{m: "float64" for m in METRICS}, **OTHER_COLUMNS}
#: Cross-seed statistics of a cell (summary.parquet only).
CELL_STATS: tuple[str, ...] = ("bias2", "mc_variance", "bias2_rel", "mc_variance_rel")
STATUSES: tuple[str, ...] = ("ok", "skipped", "oom", "error")  # best to worst
SUMMARY_KEYS: tuple[str, ...] = tuple(c for c in KEY_COLUMNS if c not in ("seed", "seed_index"))
_META_KEY = b"rfbench.cell"


_ARROW = {"object": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
_EMPTY = {"object": "", "int64": 0, "float64": math.nan, "bool": False}
#: The Arrow schema of results.parquet and of every cell file.
SCHEMA = pa.schema([(col, _ARROW[dt]) for col, dt in COLUMNS.items()])


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
        [pa.array([_value(r.get(col), dt) for r in rows], type=_ARROW[dt]) for col, dt in COLUMNS.items()],
        schema=SCHEMA,
    )


def frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows (dicts) as a DataFrame with exactly the results columns, in order, typed."""
    return table(rows).to_pandas()


# --------------------------------------------------------------------------- atomic writes
def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every filesystem lets a folder be fsync'ed
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_parquet(path: Path, data: pd.DataFrame | pa.Table, metadata: dict | None = None) -> None:
    tab = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    if metadata is not None:
        tab = tab.replace_schema_metadata(
            {**(tab.schema.metadata or {}), _META_KEY: json.dumps(metadata, sort_keys=True).encode()}
        )
    _atomic_write(Path(path), lambda tmp: pq.write_table(tab, tmp))


def write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(Path(path), write)


# --------------------------------------------------------------------------- cells
def cells_dir(out: Path) -> Path:
    return Path(out) / "cells"


def cell_path(out: Path, cell: str) -> Path:
    return cells_dir(out) / f"{cell}.parquet"


def write_cell(out: Path, cell: str, rows: list[dict], stats: dict) -> Path:
    """Write one finished cell: its rows and its cross-seed ``stats`` (and key) as metadata."""
    path = cell_path(out, cell)
    write_parquet(path, table(rows), metadata=stats)
    return path


def fits_dir(out: Path) -> Path:
    return Path(out) / "fits"


def write_fit_curves(out: Path, cell: str, curves: pd.DataFrame) -> Path:
    """Write the training curves of one cell (atomically; a re-run cell replaces them)."""
    path = fits_dir(out) / f"{cell}.parquet"
    write_parquet(path, curves.reset_index(drop=True))
    return path


def load_fit_curves(path) -> pd.DataFrame:
    """Every training curve of a results folder (empty when its suite fitted nothing)."""
    folder = _folder(path)
    finished = set(cell_files(folder))  # a run killed between the two writes leaves curves alone
    files = sorted(p for p in fits_dir(folder).glob("*.parquet") if not p.name.startswith("."))
    if finished:
        files = [p for p in files if p.stem in finished]
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


def cell_files(out: Path) -> dict[str, Path]:
    """``{cell: path}`` of the finished cells (temporary files of an interrupted write are ignored)."""
    folder = cells_dir(out)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.parquet")) if not p.name.startswith(".")}


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
                filled = pa.array([_EMPTY[COLUMNS[col]]] * tab.num_rows, type=_ARROW[COLUMNS[col]])
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


def remove_stale_temporaries(out: Path) -> int:
    """Delete temporary files left by a killed write; returns how many."""
    n = 0
    for folder in (Path(out), cells_dir(out), fits_dir(out)):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
    return n


def worst_status(statuses: Iterable[str]) -> str:
    rank = {s: i for i, s in enumerate(STATUSES)}
    return max(statuses, key=lambda s: rank.get(s, len(STATUSES)), default="ok")


# --------------------------------------------------------------------------- consolidation
def collect(out: Path, order: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, dict]]:
    """All finished cells' rows (ordered by ``order``, then by cell id) and their metadata."""
    files = cell_files(out)
    rank = {c: i for i, c in enumerate(order or [])}
    tables, metas = [], {}
    for cell in sorted(files, key=lambda c: (rank.get(c, len(rank)), c)):
        tab, meta = _read_table(files[cell])
        tables.append(tab)
        metas[cell] = meta
    rows = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return rows.to_pandas(), metas


def mean_ci(x: np.ndarray) -> tuple[float, float, float, float]:
    """``(mean, std, ci_low, ci_high)`` of samples ``x``: the 95% Student-t interval of the mean
    (NaN where it needs more samples: std and interval below 2, everything below 1)."""
    from scipy.special import stdtrit  # Student t quantile; scipy.stats would cost seconds to import

    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stdtrit(x.size - 1, 0.975) * std / math.sqrt(x.size))
    return mean, std, mean - half, mean + half


def summarise(results: pd.DataFrame, stats: dict[str, dict]) -> pd.DataFrame:
    """One row per cell: key columns, n_seeds, n_ok, worst status, first message, and for each
    metric M: M_mean, M_std, M_ci_low, M_ci_high (95% CI of the mean, Student t over the ok
    seeds; NaN when fewer than 2), plus the cell's cross-seed bias2 / mc_variance."""
    out = []
    for cell, g in results.groupby("cell", sort=False):
        first = g.iloc[0]
        row = {k: first[k] for k in SUMMARY_KEYS}
        ok = g[g["status"] == "ok"]
        row["target"] = next((t for t in g["target"] if t), "")
        row["fit_len"], row["eval_len"] = int(first["fit_len"]), int(first["eval_len"])
        row["n_seeds"] = len(g)
        row["n_ok"] = len(ok)
        row["status"] = worst_status(g["status"])
        row["message"] = next((m for m in g["message"] if m), "")
        for m in METRICS:
            x = ok[m].to_numpy(dtype=np.float64)
            mean, std, lo, hi = mean_ci(x[~np.isnan(x)])
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo, hi
        cell_stats = stats.get(cell, {})
        for s in CELL_STATS:
            value = cell_stats.get(s)
            row[s] = math.nan if value is None else float(value)
        out.append(row)
    columns = [*SUMMARY_KEYS, "target", "fit_len", "eval_len", "n_seeds", "n_ok", "status", "message"]
    columns += [f"{m}_{p}" for m in METRICS for p in ("mean", "std", "ci_low", "ci_high")]
    columns += list(CELL_STATS)
    df = pd.DataFrame(out, columns=columns)
    for col in columns:
        if col in KEY_COLUMNS:
            df[col] = df[col].astype(KEY_COLUMNS[col])
        elif col in ("n_seeds", "n_ok", "fit_len", "eval_len"):
            df[col] = df[col].astype("int64")
        elif col in ("status", "message", "target"):
            df[col] = df[col].astype(str)
        else:
            df[col] = df[col].astype("float64")
    return df


def consolidate(out: Path, order: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(Re)write results.parquet and summary.parquet from cells/ (atomically); return both."""
    results, stats = collect(out, order)
    summary = summarise(results, stats)
    write_parquet(Path(out) / "results.parquet", results)
    write_parquet(Path(out) / "summary.parquet", summary)
    return results, summary


# --------------------------------------------------------------------------- loading
def _folder(path) -> Path:
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        return p.parent
    if not p.is_dir():
        raise DataError(f"{p}: no such results folder (run `rfbench run SUITE --out {p}` first)")
    return p


def _load_table(path, name: str, rebuild) -> pd.DataFrame:
    """``name`` of a results folder, rebuilt from cells/ when it lacks finished cells."""
    folder = _folder(path)
    table = folder / name
    files = cell_files(folder)
    if table.is_file():
        df = pd.read_parquet(table)
        if not files or set(df["cell"]) >= set(files):
            return df
    if files:
        return rebuild(folder)
    raise DataError(f"{folder}: no {name} and no finished cells; is this a results folder?")


def load_results(path) -> pd.DataFrame:
    """Rows of a results folder (or of its results.parquet), one per cell and seed.

    When the folder's cells/ holds cells that results.parquet lacks (a run that was killed),
    the rows are consolidated from cells/ in memory instead, so nothing finished is missed.
    """
    return _load_table(path, "results.parquet", lambda folder: collect(folder)[0])


def load_summary(path) -> pd.DataFrame:
    """One row per cell (summary.parquet), rebuilt from cells/ when it is out of date."""
    return _load_table(path, "summary.parquet", lambda folder: summarise(*collect(folder)))


def load_meta(path) -> dict:
    folder = _folder(path)
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: no meta.json") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{folder}/meta.json: not valid JSON ({exc})") from None
