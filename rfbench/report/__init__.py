"""The report layer: read a results folder and render figures, tables and report.html.

A results folder (see the runner) holds ``results.parquet`` (one row per cell and seed),
``summary.parquet`` (one row per cell: mean, std and 95% CI over seeds, cross-seed bias^2 and
Monte Carlo variance) and ``meta.json``. This module reads it (parquet and JSON only, never
pickle) and holds what the figures and tables share: metric labels and units, and the choice of
the slice a figure shows when the run sweeps more axes than the figure has.

    run = load_run("reports/quick")
    run.results, run.summary, run.meta
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rfbench.errors import DataError
from rfbench.suite.store import STATUSES  # in order of severity; re-exported for the report modules

#: Key columns of a cell, besides the estimator identity (schema: RESULTS_SCHEMA.md).
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


METRICS: dict[str, Metric] = {
    "kernel_rel_mse": Metric("kernel relative MSE", short="kernel rel. MSE"),
    "kernel_mse": Metric("kernel MSE"),
    "attn_mse": Metric("attention-matrix MSE", short="attn. MSE"),
    "out_rel_err": Metric("attention-output relative error", short="output rel. error"),
    "target_kernel_rel_mse": Metric("own-kernel relative MSE"),
    "target_out_rel_err": Metric("own-kernel output relative error"),
    "time_ms": Metric("forward time", "ms", short="time"),
    "tokens_per_s": Metric("throughput", "tokens/s", lower_is_better=False),
    "peak_mem_bytes": Metric("peak memory", "MiB", scale=1 / 2**20, short="peak mem."),
    "draw_ms": Metric("weight draw time", "ms"),
    "fit_ms": Metric("fit time", "ms"),
    "bias2_rel": Metric("relative bias²"),
    "mc_variance_rel": Metric("relative MC variance"),
}


@dataclass
class Run:
    """A loaded results folder."""

    path: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was missing or repaired on load

    @property
    def suite(self) -> str:
        for frame in (self.summary, self.results):
            if "suite" in frame and len(frame):
                return str(frame["suite"].iloc[0])
        suite = self.meta.get("suite")
        if isinstance(suite, dict):
            return str(suite.get("name") or suite.get("parsed", {}).get("name") or "?")
        return str(self.meta.get("suite_name") or "?")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}; re-run the suite") from None


def load_run(path: str | Path, with_summary: bool = True) -> Run:
    """Read a results folder; DataError (one line) when it is missing or broken.

    ``with_summary=False`` skips summary.parquet (``run.summary`` is then empty), for readers
    that need only the per-seed rows.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"results folder {str(path)!r} does not exist; give the --out folder of "
                        "`rfbench run`")
    rfile, sfile = path / "results.parquet", path / "summary.parquet"
    notes: list[str] = []
    if not rfile.is_file() and any((path / "cells").glob("*.parquet")):
        # A run that was killed before consolidating: the store reads its finished cells.
        from rfbench.suite import store

        results = normalise(store.load_results(path), str(path / "cells"))
        summary = normalise(store.load_summary(path), str(path / "cells")) if with_summary else None
        notes.append("the run did not finish: this report shows the cells it completed")
    elif not rfile.is_file():
        raise DataError(f"{path} holds no results.parquet; is it the output folder of `rfbench run`?")
    else:
        results = normalise(_read_parquet(rfile), str(rfile))
        summary = normalise(_read_parquet(sfile), str(sfile)) if with_summary and sfile.is_file() else None
        from rfbench.suite import store

        if set(store.cell_files(path)) - set(results["cell"]):
            # results.parquet predates cells finished since (a resumed run killed before it
            # consolidated): read the cells, as the store's loaders do.
            results = normalise(store.load_results(path), str(path / "cells"))
            summary = normalise(store.load_summary(path), str(path / "cells")) if with_summary else None
            notes.append("results.parquet was older than the finished cells: they were read from cells/")
    if not with_summary:
        summary = pd.DataFrame(columns=results.columns)
    elif summary is None:
        summary = summarise(results)
        notes.append("summary.parquet is missing: means and CIs were recomputed from results.parquet "
                     "(no cross-seed bias²/variance)")
    meta: dict = {}
    mfile = path / "meta.json"
    if mfile.is_file():
        try:
            meta = json.loads(mfile.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {mfile}: {exc}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{mfile} must hold a JSON object, got {type(meta).__name__}")
    else:
        notes.append("meta.json is missing: versions, device and times are unknown")
    return Run(path=path, results=results, summary=summary, meta=meta, notes=notes)


def normalise(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check the columns every reader needs and fill the optional identity columns."""
    missing = [c for c in ("cell", "estimator", "status") if c not in df]
    if missing:
        raise DataError(f"{where} lacks column(s) {', '.join(missing)}; it is not an rfbench results table")
    df = df.copy()
    est = df["estimator"].astype(str)
    is_pair = est.str.count("-") == 1
    if "feature_map" not in df:
        df["feature_map"] = np.where(is_pair, est.str.split("-").str[0], "")
    if "weight_matrix" not in df:
        df["weight_matrix"] = np.where(is_pair, est.str.split("-").str[-1], "")
    if "kind" not in df:
        df["kind"] = np.where(df["feature_map"].astype(str) != "", "estimator", "baseline")
    if "message" not in df:
        df["message"] = ""
    df["message"] = df["message"].fillna("").astype(str)
    df["status"] = df["status"].fillna("error").astype(str)
    for col in ("feature_map", "weight_matrix", "kind"):
        df[col] = df[col].fillna("").astype(str)
    return df


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per-cell mean, std and 95% t-interval of every metric over its ok seeds.

    Used only when summary.parquet is absent; the runner's summary is preferred.
    """
    from scipy import stats

    keys = [c for c in ("suite", *IDENTITY, *SLICE_KEYS, "feature_dim") if c in results]
    by_cell = results.groupby("cell", sort=False)
    out = by_cell[keys].first() if keys else pd.DataFrame(index=list(by_cell.groups))
    out["n_seeds"] = by_cell.size()
    rank = {s: i for i, s in enumerate(STATUSES)}
    out["status"] = by_cell["status"].agg(lambda s: max(s, key=lambda v: rank.get(v, len(rank))))
    out["message"] = by_cell["message"].agg(lambda m: next((x for x in m if x), ""))
    ok = results[results["status"] == "ok"].groupby("cell", sort=False)
    out["n_ok"] = ok.size().reindex(out.index, fill_value=0)
    for name in METRICS:
        if name not in results:
            continue
        values = pd.to_numeric(results[name], errors="coerce")[results["status"] == "ok"]
        g = values.groupby(results.loc[values.index, "cell"], sort=False)
        n = g.count().reindex(out.index, fill_value=0).to_numpy(float)
        mean = g.mean().reindex(out.index).to_numpy(float)
        std = g.std(ddof=1).reindex(out.index).to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            half = np.where(n > 1, stats.t.ppf(0.975, np.maximum(n - 1, 1)) * std / np.sqrt(n), np.nan)
        out[f"{name}_mean"] = np.where(n > 0, mean, np.nan)
        out[f"{name}_std"] = np.where(n > 1, std, np.nan)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = mean - half, mean + half
    return out.rename_axis("cell").reset_index()


def value_columns(frame: pd.DataFrame, metric: str) -> tuple[str, str | None, str | None]:
    """(mean, ci_low, ci_high) column names of ``metric`` in a summary (CI None if absent)."""
    mean = f"{metric}_mean" if f"{metric}_mean" in frame else metric
    lo, hi = f"{metric}_ci_low", f"{metric}_ci_high"
    return mean, (lo if lo in frame else None), (hi if hi in frame else None)


def has_metric(frame: pd.DataFrame, metric: str) -> bool:
    col = value_columns(frame, metric)[0]
    return col in frame and bool(np.isfinite(pd.to_numeric(frame[col], errors="coerce")).any())


def pick_slice(
    frame: pd.DataFrame, vary: tuple[str, ...], prefer: dict | None = None
) -> tuple[pd.DataFrame, dict]:
    """The rows of the most complete slice in which every key but ``vary`` is fixed.

    A run may sweep more axes than a figure shows. Among the combinations of the other keys,
    pick the one that covers the most distinct values of ``vary`` (ties: the most rows, then
    the values most frequent in the run, then the largest values), after keeping only the
    ``prefer`` values (e.g. ``{"num_features": 128}``) where they occur. Returns the rows and the
    fixed values that the run varies or that were preferred (for captions).
    """
    preferred = {}
    for key, value in (prefer or {}).items():
        if key in frame and key not in vary and (frame[key] == value).any():
            varied = frame[key].nunique() > 1
            frame = frame[frame[key] == value]
            if varied:
                preferred[key] = value
    fixed = [c for c in SLICE_KEYS if c in frame and c not in vary and frame[c].nunique(dropna=False) > 1]
    if not fixed or frame.empty:
        return frame, preferred
    vary_cols = [c for c in vary if c in frame] or ["estimator"]
    freq = {c: frame[c].value_counts(dropna=False) for c in fixed}
    best, best_score = None, None
    for values, grp in frame.groupby(fixed, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        cover = len(grp[vary_cols].drop_duplicates())
        common = sum(int(freq[c].get(v, 0)) for c, v in zip(fixed, values))
        score = (cover, len(grp), common, tuple(_sortable(v) for v in values))
        if best_score is None or score > best_score:
            best, best_score = values, score
    chosen = {**preferred, **dict(zip(fixed, best))}
    mask = np.ones(len(frame), bool)
    for key, value in chosen.items():
        mask &= (frame[key] == value).to_numpy()
    return frame[mask], chosen


def _sortable(v):
    return (0, float(v), "") if isinstance(v, (int, float, np.number)) else (1, 0.0, str(v))


def describe_slice(fixed: dict) -> str:
    """'L=512, m=64, data=isotropic' from a pick_slice result."""
    names = {"seq_len": "L", "num_features": "m", "dim": "d", "batch": "B", "heads": "H"}
    return ", ".join(f"{names.get(k, k)}={_plain(v)}" for k, v in fixed.items())


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def baselines_for(frame: pd.DataFrame, fixed: dict) -> pd.DataFrame:
    """Baseline rows matching a slice of estimator rows (baselines have no m)."""
    rows = frame[frame["kind"] == "baseline"]
    for key, value in fixed.items():
        if key in ("num_features", "feature_dim") or key not in rows:
            continue
        rows = rows[rows[key] == value]
    return rows


def meta_lookup(meta: dict, *names: str, default=None):
    """The first value found under any of ``names`` (exact key), searching nested dicts.

    The runner's meta.json layout may nest versions or device details; readers ask by name.
    """
    for name in names:
        stack = [meta]  # breadth first: a top-level key wins over a nested one
        while stack:
            node = stack.pop(0)
            if not isinstance(node, dict):
                continue
            if name in node and node[name] not in (None, "", [], {}):
                return node[name]
            stack.extend(v for v in node.values() if isinstance(v, dict))
    return default


def registry_order() -> tuple[list[str], list[str]]:
    """Feature-map and weight-matrix names in registry order (fixes colours across reports)."""
    from rfbench import registry

    return registry.feature_maps(), registry.weight_matrices()


def peak_memory_note(run: Run) -> str | None:
    """What peak memory means for the run's devices (meta.json's note, per device if it has one)."""
    note = meta_lookup(run.meta, "peak_memory", "peak_mem", "memory_note", "peak_memory_meaning")
    if isinstance(note, dict):
        devices = sorted(set(map(str, run.summary["device"]))) if "device" in run.summary else list(note)
        parts = [str(note[d]) if str(note[d]).lower().startswith(d) else f"{d}: {note[d]}"
                 for d in devices if d in note]
        return "; ".join(parts) or None
    return str(note) if note else None
