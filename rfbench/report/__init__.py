"""The report layer: read a results folder and render figures, tables and report.html.

A results folder (see the runner) holds ``results.parquet`` (one row per cell and seed),
``summary.parquet`` (one row per cell: mean, std and 95% CI over seeds, cross-seed bias^2 and
Monte Carlo variance) and ``meta.json``. This module reads it (parquet and JSON only, never
pickle) and holds what the figures and tables share: metric labels and units. What they compute
from it (slices, the C/m law, the Pareto front, floors) is in ``rfbench.report.analysis``.

    run = load_run("reports/quick")
    run.results, run.summary, run.meta
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rfbench.errors import DataError, SpecError
from rfbench.results import store
from rfbench.results.meta import META_FILE, Meta, read_meta
from rfbench.results.schema import KEY_COLUMNS, column
from rfbench.results.schema import STATUSES as STATUSES  # best to worst; re-exported for the report

#: Key columns of a cell, besides the estimator identity (schema: docs/results.md).
SLICE_KEYS = ("data", "seq_len", "num_features", "dim", "batch", "heads", "causal", "dtype", "device")
IDENTITY = ("kind", "estimator", "feature_map", "weight_matrix")


@dataclass(frozen=True)
class Metric:
    """How a metric column is labelled and scaled for display."""

    label: str
    unit: str = ""
    scale: float = 1.0  # display value = column value * scale
    lower_is_better: bool = True
    short: str = ""  # column header in tables

    def header(self) -> str:
        arrow = "↓" if self.lower_is_better else "↑"
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.short or self.label}{unit} {arrow}"

    def axis_label(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @classmethod
    def of(cls, name: str) -> Metric:
        """The display of results column ``name``, from its declaration (rfbench.results.schema)."""
        c = column(name)
        unit = c.unit if c.display_unit is None else c.display_unit
        return cls(c.label, unit, c.display_scale, c.direction != "higher", c.short)


#: The metrics the report shows, in this order (labels, units, directions: the results schema).
SHOWN_METRICS = (
    "kernel_rel_mse", "kernel_mse", "attn_mse", "out_rel_err", "target_kernel_rel_mse",
    "target_out_rel_err", "time_ms", "tokens_per_s", "peak_mem_bytes", "draw_ms", "fit_ms",
    "bias2_rel", "mc_variance_rel",
)
METRICS: dict[str, Metric] = {name: Metric.of(name) for name in SHOWN_METRICS}


@dataclass
class Run:
    """A loaded results folder."""

    path: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    meta: Meta = field(default_factory=lambda: Meta(document={}))
    notes: list[str] = field(default_factory=list)  # what was missing or repaired on load

    @property
    def suite(self) -> str:
        for frame in (self.summary, self.results):
            if "suite" in frame and len(frame):
                return str(frame["suite"].iloc[0])
        return self.meta.suite.name or "?"


def load_run(path: str | Path, with_summary: bool = True) -> Run:
    """Read a results folder through ``rfbench.results``; DataError (one line) when it is
    missing or broken. Cells finished after results.parquet was written are read from cells/
    (the store's stale-table rule); what was missing or rebuilt is listed in ``run.notes``.

    ``with_summary=False`` skips summary.parquet (``run.summary`` is then empty), for readers
    that need only the per-seed rows.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"results folder {str(path)!r} does not exist; give the --out folder of "
                        "`rfbench run`")
    tables = store.load_tables(path, with_summary)
    notes = list(tables.notes)
    summary = tables.summary if with_summary else pd.DataFrame(columns=tables.results.columns)
    meta = Meta(document={})
    try:
        meta = read_meta(path)
    except DataError as exc:  # the rows are intact: report them, and say what is unknown
        broken = "is missing" if not (path / META_FILE).exists() else f"cannot be read ({exc})"
        notes.append(f"meta.json {broken}: versions, device and times are unknown "
                     "(`rfbench run SUITE --out DIR --resume` writes it again)")
    return Run(path=path, results=tables.results, summary=summary, meta=meta, notes=notes)


def load_runs(paths, where: dict | None = None) -> Run:
    """Read one or more results folders as one run, keeping the rows that match ``where``.

    Folders are merged in the order given. A cell (the ``cell`` key, else its key columns) found
    in more than one folder is taken from the last folder that has it, all its seed rows
    together, and ``run.notes`` says how many cells were replaced; the metadata shown is the
    first folder's. ``where``: {key column: [values]} (``analysis.apply_where``).
    """
    runs = [load_run(p) for p in paths]
    run = runs[0]
    if len(runs) > 1:
        run = _merge(runs)
    if where:
        what = "the results" if len(runs) == 1 else "the merged results"
        summary = apply_where(run.summary, where, what)
        results = apply_where(run.results, where, what) if len(run.results) else run.results
        shown = ", ".join(f"{k}={'|'.join(v)}" for k, v in where.items())
        run = Run(path=run.path, results=results, summary=summary, meta=run.meta,
                  notes=[*run.notes, f"only cells with {shown} are shown (--where)"])
    return run


def _cell_key(frame: pd.DataFrame) -> list[str]:
    if "cell" in frame:
        return ["cell"]
    return [c for c in ("suite", *IDENTITY, *SLICE_KEYS) if c in frame]


def _merge(runs: list[Run]) -> Run:
    summaries, results, replaced = [], [], 0
    seen: set = set()
    for run in reversed(runs):  # the last folder wins a cell that several folders hold
        key = _cell_key(run.summary)
        cells = list(map(tuple, run.summary[key].astype(str).to_numpy()))
        keep = [c not in seen for c in cells]
        replaced += len(cells) - sum(keep)
        summaries.append(run.summary[keep])
        if len(run.results):
            rkeys = list(map(tuple, run.results[key].astype(str).to_numpy()))
            results.append(run.results[[c not in seen for c in rkeys]])
        seen.update(cells)
    notes = [f"merged {len(runs)} folders: " + ", ".join(str(r.path) for r in runs)]
    if replaced:
        notes.append(f"{replaced} cell(s) held by more than one folder were taken from the last "
                     "folder given that holds them")
    notes += [f"{r.path}: {n}" for r in runs for n in r.notes]
    summary = pd.concat(summaries[::-1], ignore_index=True)
    result = pd.concat(results[::-1], ignore_index=True) if results else runs[0].results
    return Run(path=runs[0].path, results=result, summary=summary, meta=runs[0].meta, notes=notes)


def parse_where(items) -> dict:
    """``["causal=true", "data=isotropic"]`` -> {"causal": "true", ...} (values matched later)."""
    out: dict[str, list[str]] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--where takes key=value (e.g. --where causal=true), got {item!r}")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def apply_where(frame: pd.DataFrame, where: dict, what: str = "the run") -> pd.DataFrame:
    """Rows of ``frame`` whose key columns equal the ``where`` values (several values of one key:
    any of them). SpecError naming the known keys or values when one does not occur."""
    keys = [k for k in KEY_COLUMNS if k in frame]
    for key, wanted in where.items():
        if key not in keys:
            raise SpecError(f"--where: unknown key {key!r}; key columns: {', '.join(keys)}")
        present = {_as_text(v): v for v in frame[key].dropna().unique()}
        missing = [w for w in wanted if w.lower() not in {p.lower() for p in present}]
        if missing:
            shown = ", ".join(sorted(present)[:20])
            raise SpecError(f"--where: {key}={missing[0]!r} is not in {what}; its {key} values: {shown}")
        match = frame[key].map(lambda v: _as_text(v).lower()).isin([w.lower() for w in wanted])
        frame = frame[match]
    return frame


def _as_text(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def safe_dir(path: str | Path) -> Path:
    """Create the output folder ``path`` (and its parents); DataError if it, or a folder the
    report writes into, is a symbolic link: the report never writes through a link."""
    path = Path(path)
    if path.is_symlink():  # its parents are the user's own choice (e.g. /tmp -> /private/tmp)
        raise DataError(f"{path} is a symbolic link; rfbench report does not write through links "
                            "(remove it or give another --out)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def normalise(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check the columns every reader needs and fill those an older table lacks (``store.conform``)."""
    return store.conform(df, where, summary="n_seeds" in df)


def peak_memory_note(run: Run) -> str | None:
    """What peak memory means for the run's devices (meta.json's note, per device if it has one)."""
    s = run.summary
    devices = sorted(set(map(str, s["device"]))) if "device" in s else list(run.meta.peak_memory)
    return run.meta.peak_memory_note(devices) or None
