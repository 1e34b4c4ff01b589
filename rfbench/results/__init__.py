"""The results contract: columns, the folder's files, the one summary, meta.json.

    import rfbench.results as R
    R.load_results(folder)   # DataFrame, one row per cell and seed (results.parquet)
    R.load_summary(folder)   # one row per cell: mean, std, 95% CI per metric; bias2, mc_variance
    R.load_meta(folder)      # rfbench.results.meta.Meta (typed meta.json)

Modules: ``schema`` (the column registry), ``atomic`` (the one atomic write), ``store`` (cell
files, consolidation, the stale-table rule, quarantine, fit curves), ``summary`` (``summarise``,
``mean_ci``), ``meta`` (``Meta``, ``read_meta``, ``write_meta``, run records), ``claims`` (cell
claims and the folder lock, for many writers). The runner writes through
this package and the report reads through it. Names are imported lazily, so that
``rfbench.results.schema`` (which the suite parser uses) costs no pandas import.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "COLUMNS": "schema",
    "KEY_COLUMNS": "schema",
    "METRICS": "schema",
    "STATUSES": "schema",
    "SUMMARY_KEYS": "schema",
    "CELL_STATS": "schema",
    "TIMED_COLUMNS": "schema",
    "Column": "schema",
    "summarise": "summary",
    "mean_ci": "summary",
    "load_results": "store",
    "load_summary": "store",
    "load_tables": "store",
    "Meta": "meta",
    "read_meta": "meta",
    "write_meta": "meta",
}

__all__ = [*_NAMES, "load_meta"]


def load_meta(path):
    """The typed meta.json of a results folder (DataError when missing or broken)."""
    from rfbench.results.meta import read_meta
    from rfbench.results.store import folder_of

    return read_meta(folder_of(path))


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"rfbench.results.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'rfbench.results' has no attribute {name!r}")
