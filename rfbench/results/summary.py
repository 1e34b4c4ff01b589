"""The one summary of a results table: per cell, mean, std and 95% CI of each metric over seeds.

    summary = summarise(results, stats)    # stats: {cell: cross-seed statistics} (cell files)

The interval is Student's t over the cell's ok seeds (``mean_ci``); the cross-seed ``bias2`` and
``mc_variance`` of a cell are computed by the runner over all seeds together and carried in its
cell file, so a summary rebuilt from results.parquet alone has them NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from rfbench.results.schema import (
    CELL_STATS,
    COLUMNS,
    METRIC_STATS,
    METRICS,
    STATUSES,
    SUMMARY_KEYS,
    SUMMARY_OTHER,
    summary_columns,
)


def mean_ci(x: np.ndarray) -> tuple[float, float, float, float]:
    """``(mean, std, ci_low, ci_high)`` of samples ``x``: the 95% Student-t interval of the mean
    (NaN where it needs more samples: std and interval below 2, everything below 1)."""
    from scipy.special import stdtrit  # Student t quantile; scipy.stats would cost seconds to import

    x = np.asarray(x, dtype=np.float64)
    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stdtrit(x.size - 1, 0.975) * std / math.sqrt(x.size))
    return mean, std, mean - half, mean + half


def worst_status(statuses: Iterable[str]) -> str:
    """The worst of ``statuses`` in STATUSES order (an unknown one is worse than all)."""
    rank = {s: i for i, s in enumerate(STATUSES)}
    return max(statuses, key=lambda s: rank.get(s, len(STATUSES)), default="ok")


def summarise(results: pd.DataFrame, stats: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per cell: key columns, n_seeds, n_ok, worst status, first message, and for each
    metric M: M_mean, M_std, M_ci_low, M_ci_high (95% CI of the mean, Student t over the ok
    seeds; NaN when fewer than 2), plus the cell's cross-seed ``stats`` (NaN where absent).

    ``results`` must have the results columns (``rfbench.results.store.conform`` fills those an
    older table lacks).
    """
    stats = stats or {}
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
            x = pd.to_numeric(ok[m], errors="coerce").to_numpy(dtype=np.float64)
            values = mean_ci(x[~np.isnan(x)])
            row.update({f"{m}_{s}": v for s, v in zip(METRIC_STATS, values)})
        cell_stats = stats.get(cell, {})
        for s in CELL_STATS:
            value = cell_stats.get(s)
            row[s] = math.nan if value is None else float(value)
        out.append(row)
    columns = summary_columns()
    df = pd.DataFrame(out, columns=columns)
    for col in columns:
        if col in SUMMARY_KEYS:
            df[col] = df[col].astype(COLUMNS[col].dtype)
        elif col in SUMMARY_OTHER:
            df[col] = df[col].astype(str if SUMMARY_OTHER[col] == "object" else SUMMARY_OTHER[col])
        else:
            df[col] = df[col].astype("float64")
    return df
