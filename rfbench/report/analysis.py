"""The numbers behind the report: slices, the C/m law, the Pareto front, overlays and floors.

Pure pandas and numpy, no plotting library: the figure modules (``rfbench.report.plots``) and
the tables call these functions and only draw or format what they return, and the tests check
each of them directly on hand-made rows.

Every function reads a per-cell summary frame (one row per cell: ``<metric>_mean``,
``<metric>_ci_low``, ``<metric>_ci_high``, or a bare ``<metric>`` column), as ``load_run`` gives.

    rows, fixed = pick_slice(summary, ("num_features", "feature_map", "weight_matrix"))
    describe_slice(fixed)                     # 'L=1024, data=isotropic', for the caption
    fit_inverse_m(m, mse)                     # C of mse ~ C / m
    pareto_front(rows, "time_ms_mean", "out_rel_err_mean")
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rfbench.report import METRICS, SLICE_KEYS


# ------------------------------------------------------------------------------ columns
def value_columns(frame: pd.DataFrame, metric: str) -> tuple[str, str | None, str | None]:
    """(mean, ci_low, ci_high) column names of ``metric`` in a summary (CI None if absent)."""
    mean = f"{metric}_mean" if f"{metric}_mean" in frame else metric
    lo, hi = f"{metric}_ci_low", f"{metric}_ci_high"
    return mean, (lo if lo in frame else None), (hi if hi in frame else None)


def has_metric(frame: pd.DataFrame, metric: str) -> bool:
    """Whether any row of ``frame`` has a finite value of ``metric``."""
    col = value_columns(frame, metric)[0]
    return col in frame and bool(np.isfinite(pd.to_numeric(frame[col], errors="coerce")).any())


def estimators(summary: pd.DataFrame) -> pd.DataFrame:
    """The estimator rows of a summary (not the baselines)."""
    return summary[summary["kind"] == "estimator"]


def ok_rows(frame: pd.DataFrame, *metrics: str) -> pd.DataFrame:
    """Rows with status ok and a finite value of every one of ``metrics``."""
    mask = frame["status"] == "ok"
    for metric in metrics:
        col = value_columns(frame, metric)[0]
        mask &= np.isfinite(pd.to_numeric(frame[col], errors="coerce")) if col in frame else False
    return frame[mask]


# ------------------------------------------------------------------------------ slices
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


def in_slice(frame: pd.DataFrame, fixed: dict, ignore=()) -> pd.DataFrame:
    """Rows of ``frame`` matching the fixed values of a slice, except the keys in ``ignore``."""
    for key, value in fixed.items():
        if key not in ignore and key in frame:
            frame = frame[frame[key] == value]
    return frame


def baselines_for(frame: pd.DataFrame, fixed: dict) -> pd.DataFrame:
    """Baseline rows matching a slice of estimator rows (baselines have no m)."""
    rows = frame[frame["kind"] == "baseline"]
    for key, value in fixed.items():
        if key in ("num_features", "feature_dim") or key not in rows:
            continue
        rows = rows[rows[key] == value]
    return rows


# ------------------------------------------------------------------------------ series
def series(frame: pd.DataFrame, metric: str, x: str):
    """x, mean, ci_low, ci_high of one line in display units (``METRICS[metric].scale``), sorted
    by x; points without a finite mean are left out (the CI arrays are None without CI columns)."""
    mean_col, lo_col, hi_col = value_columns(frame, metric)
    scale = METRICS[metric].scale if metric in METRICS else 1.0
    frame = frame.sort_values(x)
    xs = frame[x].to_numpy(float)
    mean = pd.to_numeric(frame[mean_col], errors="coerce").to_numpy(float) * scale
    lo = pd.to_numeric(frame[lo_col], errors="coerce").to_numpy(float) * scale if lo_col else None
    hi = pd.to_numeric(frame[hi_col], errors="coerce").to_numpy(float) * scale if hi_col else None
    keep = np.isfinite(mean)
    lo, hi = (lo[keep] if lo is not None else None), (hi[keep] if hi is not None else None)
    return xs[keep], mean[keep], lo, hi


def spans_decades(values) -> bool:
    """Whether the finite positive ``values`` span a factor of ten or more (a log axis then)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() >= 10


# ------------------------------------------------------------------------------ the 1/m law
@dataclass(frozen=True)
class Overlay:
    """A reference curve over m for an error-vs-m panel, with its legend label."""

    x: np.ndarray
    y: np.ndarray
    label: str


def fit_inverse_m(m, values) -> float | None:
    """C of ``values ~ C / m``: least squares in log space with the slope fixed at -1.

    log v_i = log C - log m_i, so log C is the mean of log(v_i m_i) over the points with v, m > 0.
    An unbiased average of m i.i.d. terms has expected MSE Var_1 / m, so on i.i.d. weights C
    estimates the one-feature variance Var_1, as well as the measured means estimate their
    expectations (poorly where the squared error is heavy-tailed: ``unreliable_means``). None with
    fewer than two usable points.
    """
    m, values = np.asarray(m, float), np.asarray(values, float)
    keep = (values > 0) & (m > 0)
    if keep.sum() < 2:
        return None
    return math.exp(float(np.mean(np.log(values[keep] * m[keep]))))


def iid_overlay(panel: pd.DataFrame, metric: str) -> Overlay | None:
    """The i.i.d. reference of one panel (one feature map, one data source) over its m grid.

    If the summary stores ``<metric>_theory`` (rfbench.theory's closed-form expectation on the
    cell's data, i.i.d. weights), that curve, averaged per m. Otherwise C/m with C fitted to the
    panel's i.i.d. points (``fit_inverse_m``): the closed form's shape, its level from the run.
    None when neither is available.
    """
    theory_col = next((c for c in (f"{metric}_theory_mean", f"{metric}_theory") if c in panel), None)
    if theory_col is not None:
        th = panel.groupby("num_features")[theory_col].mean().dropna()
        if len(th) > 1:
            label = "closed form, i.i.d. (rfbench.theory)"
            return Overlay(th.index.to_numpy(float), th.to_numpy(float), label)
    xs, mean, _, _ = series(panel[panel["weight_matrix"] == "iid"], metric, "num_features")
    c = fit_inverse_m(xs, mean)
    if c is None:
        return None
    grid = np.array(sorted(set(panel["num_features"].astype(float))))
    return Overlay(grid, c / grid, "i.i.d. law C/m (C fitted to iid)")


#: Baselines that approximate attention with an error of their own (drawn as reference levels);
#: the others (exact, sdpa, flash) are exact attention, whose error is float rounding.
APPROXIMATE_BASELINES = ("uniform", "taylor2")


def uniform_floor(summary: pd.DataFrame, metric: str, fixed: dict) -> float | None:
    """The uniform baseline's output error in a slice (None: not run, failed, or another metric).

    The uniform baseline gives every query the mean of the values it attends to: the error of an
    estimator that knows nothing of q and k, a floor every useful estimator should beat.
    """
    return baseline_level(summary, metric, fixed, "uniform")


def baseline_level(summary: pd.DataFrame, metric: str, fixed: dict, name: str) -> float | None:
    """Baseline ``name``'s output error in a slice (None: not run, failed, or another metric);
    e.g. ``taylor2``, Based's deterministic Taylor-2 attention, the level of a biased map."""
    if metric != "out_rel_err":
        return None
    base = baselines_for(summary, fixed)
    base = base[(base["estimator"] == name) & (base["status"] == "ok")]
    col = value_columns(base, metric)[0]
    if len(base) != 1 or col not in base or not np.isfinite(float(base[col].iloc[0])):
        return None
    return float(base[col].iloc[0])


# ------------------------------------------------------------------------------ fronts and grids
def pareto_front(rows: pd.DataFrame, xcol: str, ycol: str) -> pd.DataFrame:
    """Rows not dominated in (x, y), both lower-is-better, sorted by x (ties: by y).

    A row is on the front when no other row has x <= its x and y < its y; of rows with equal
    (x, y) the first in x-then-y order is kept.
    """
    ordered = rows.sort_values([xcol, ycol])
    best, keep = math.inf, []
    for idx, y in zip(ordered.index, ordered[ycol]):
        if y < best:
            best = y
            keep.append(idx)
    return ordered.loc[keep]


def error_grid(rows: pd.DataFrame, metric: str, fms: list[str], wms: list[str]):
    """(values, notes) of a feature map x weight matrix grid, each of shape [len(fms), len(wms)].

    values: the mean ``metric`` of ok cells (NaN elsewhere); notes: the value to 2 significant
    figures, the status of a failed cell, or '—' for a pair the run did not measure.
    """
    mean_col = value_columns(rows, metric)[0]
    values = np.full((len(fms), len(wms)), np.nan)
    notes = np.full((len(fms), len(wms)), "", dtype=object)
    for _, r in rows.iterrows():
        i, j = fms.index(r["feature_map"]), wms.index(r["weight_matrix"])
        v = float(r[mean_col]) if pd.notna(r[mean_col]) else math.nan
        if r["status"] == "ok" and np.isfinite(v):
            values[i, j] = v
            notes[i, j] = f"{v:.2g}"
        else:
            notes[i, j] = str(r["status"])
    notes[notes == ""] = "—"
    return values, notes


def bias2_noise_floor(variance, n_seeds) -> np.ndarray:
    """The bias² an unbiased estimator still shows when its mean is taken over n seeds.

    The squared bias is measured from the mean of n independent estimates, whose own variance is
    Var / n: that is its expected value with no bias at all. [rows] -> [rows]
    """
    return np.asarray(variance, float) / np.maximum(np.asarray(n_seeds, float), 1)


def seed_means_over_data(rows: pd.DataFrame, col: str) -> np.ndarray:
    """Per seed index, the mean of ``col`` over the data sources of ``rows``. [n_seeds]

    ``rows``: one cell per data source (every other key fixed), one row per seed index. A seed
    counts only where every data source of ``rows`` is ok with a finite value, so each mean is
    over the same sources; seeds that failed somewhere are left out (the caller says how many).
    """
    ok = rows[(rows["status"] == "ok") & rows[col].notna()]
    per_seed = ok.groupby("seed_index")[col].agg(["mean", "count"])
    return per_seed[per_seed["count"] == rows["data"].nunique()]["mean"].to_numpy(float)


# ------------------------------------------------------------------------------ caption counts
def seeds_text(frame: pd.DataFrame) -> str:
    """'4 seeds' or '3–4 seeds': the ok seeds behind the rows' means."""
    col = "n_ok" if "n_ok" in frame else ("n_seeds" if "n_seeds" in frame else None)
    if col is None or frame.empty:
        return "seeds"
    lo, hi = int(frame[col].min()), int(frame[col].max())
    return f"{lo} seeds" if lo == hi else f"{lo}–{hi} seeds"


def failed_note(frame: pd.DataFrame) -> str:
    """' Not shown: posrf-sorf m=16 (error), exact L=4096 (oom).' for a figure's caption."""
    bad = frame[frame["status"] != "ok"]
    items = []
    for (est, status), grp in bad.groupby(["estimator", "status"], sort=True):
        where = ""
        for col, sym in (("num_features", "m"), ("seq_len", "L")):
            vals = sorted({int(v) for v in grp[col]}) if col in grp else []
            if vals and vals != [0] and len(vals) <= 3:
                where += f" {sym}={'/'.join(map(str, vals))}"
        items.append(f"{est}{where} ({status})")
    if not items:
        return ""
    more = f" and {len(items) - 6} more" if len(items) > 6 else ""
    return " Not shown: " + ", ".join(items[:6]) + more + " (see the failures table)."


# ------------------------------------------------------------------------------ leaderboard slices
def board_slices(est: pd.DataFrame, prefer: dict | None = None) -> list[tuple[pd.DataFrame, dict]]:
    """One (rows, fixed) slice per data source (and per causal value, where both were run).

    Each source is shown at the largest L that has an ok cell, then the largest m that has an ok
    cell at that L (``prefer`` values win where the source has them), the other keys picked as in
    ``pick_slice``. So a source that was run only at short L still gets its own, full table.
    ``fixed`` always names the data source, L and m.
    """
    prefer = dict(prefer or {})
    out = []
    groups = ["data"] + (["causal"] if "causal" in est and est["causal"].nunique() > 1 else [])
    order = list(est["data"].value_counts().index)
    for values, rows in sorted(est.groupby(groups, sort=False, dropna=False),
                               key=lambda g: (order.index(_first(g[0])), str(g[0]))):
        values = values if isinstance(values, tuple) else (values,)
        ok = rows[rows["status"] == "ok"]
        pick = {}
        for key in ("seq_len", "num_features"):
            if key not in rows:
                continue
            source = ok if len(ok) else rows
            if prefer.get(key) is not None and (source[key] == prefer[key]).any():
                pick[key] = prefer[key]
            elif len(source):
                pick[key] = source[key].max()
            ok, rows = ok[ok[key] == pick[key]], rows[rows[key] == pick[key]]
        rest = {k: v for k, v in prefer.items() if k not in pick}
        chosen, fixed = pick_slice(rows, ("feature_map", "weight_matrix"), rest)
        fixed = {**dict(zip(groups, values)), **pick, **{k: v for k, v in fixed.items() if k not in pick}}
        out.append((chosen, fixed))
    return out


def _first(v):
    return v[0] if isinstance(v, tuple) else v


def noise_ranks(mean, lo, hi) -> np.ndarray:
    """Ranks that respect the 95% intervals, for rows sorted by mean (best first).

    A row's rank is 1 + the number of rows whose interval lies wholly below its own
    (hi_j < lo_i), raised where needed to the rank of the row above it, so that ranks never fall
    down the table (a wide interval low in the table can have fewer intervals below it than a narrow
    one above it). Overlapping intervals need not share a rank: of [0.9, 1.1], [0.8, 1.4] and
    [1.2, 1.6] the last overlaps the second but ranks 2 (the first lies below it), the others 1=.
    A row without an interval (one seed) counts as its mean. [n] -> [n] ints
    """
    mean = np.asarray(mean, float)
    lo = np.where(np.isfinite(np.asarray(lo, float)), lo, mean)
    hi = np.where(np.isfinite(np.asarray(hi, float)), hi, mean)
    raw = np.array([1 + int(np.sum(hi < lo[i])) for i in range(len(mean))], dtype=int)
    return np.maximum.accumulate(raw) if len(raw) else raw


# ------------------------------------------------------------------------------ heavy tails
#: A closed-form expectation this many times the seeds' mean: the seeds have missed its tail.
THEORY_GAP = 10.0
#: One seed holding more than this share of the seeds' sum: the mean is mostly that seed.
TOP_SEED_SHARE = 0.5
#: Fewer seeds than this say nothing by one seed's share (of 2 seeds, one always holds over half).
MIN_TAIL_SEEDS = 5


def unreliable_means(rows: pd.DataFrame, results: pd.DataFrame | None,
                     metric: str = "kernel_rel_mse") -> pd.DataFrame:
    """The summary ``rows`` whose mean of ``metric`` over seeds does not estimate its expectation,
    with a ``tail_reason`` column ('closed form 3.1e+09 vs measured 8.2', 'one seed holds 93%').

    A squared kernel error can be heavy-tailed over seeds: PosRF's one-feature variance of a pair is
    e^(2x.y)(e^(|x+y|^2) - 1) (Performer, Choromanski et al. 2021, Lemma 2), and its average over
    Gaussian pairs is infinite once an eigenvalue of their second moment reaches 1/6 (docs/theory.md
    §3.1). The mean of a few seeds is then set by rare draws: it can sit far below the expectation
    and even rise with m. A cell is flagged where the summary holds the closed-form expectation
    (``<metric>_theory_mean`` or ``<metric>_theory``) and it is infinite or more than THEORY_GAP
    times the measured mean; or where, over at least MIN_TAIL_SEEDS ok seeds of ``results``, the
    largest value holds more than TOP_SEED_SHARE of their sum. A cell not flagged is not thereby
    shown reliable: a tail that no seed reached leaves no trace in the seeds.
    """
    mean_col = value_columns(rows, metric)[0]
    theory_col = next((c for c in (f"{metric}_theory_mean", f"{metric}_theory") if c in rows), None)
    share = pd.Series(dtype=float)
    if results is not None and metric in results and "cell" in results and "cell" in rows:
        ok = results[(results["status"] == "ok") & results["cell"].isin(rows["cell"])]
        v = pd.to_numeric(ok[metric], errors="coerce")
        v = v[np.isfinite(v) & (v >= 0)]
        grouped = v.groupby(ok.loc[v.index, "cell"])
        stats = grouped.agg(["max", "sum", "count"])
        stats = stats[(stats["count"] >= MIN_TAIL_SEEDS) & (stats["sum"] > 0)]
        share = stats["max"] / stats["sum"]
    reasons = []
    for _, r in rows.iterrows():
        mean, theory = _number(r.get(mean_col)), _number(r.get(theory_col)) if theory_col else math.nan
        reason = ""
        if r.get("status") == "ok" and np.isfinite(mean) and mean > 0:
            if theory == np.inf or (np.isfinite(theory) and theory > THEORY_GAP * mean):
                reason = f"closed form {theory:.2g} vs measured {mean:.2g}"
            elif r.get("cell") in share.index and share[r["cell"]] > TOP_SEED_SHARE:
                reason = f"one seed holds {share[r['cell']]:.0%}"
        reasons.append(reason)
    out = rows.assign(tail_reason=reasons)
    return out[out["tail_reason"] != ""]


def _number(v) -> float:
    """``v`` as a float (NaN where it is missing or not a number)."""
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def cells_text(flagged: pd.DataFrame, by_data: bool = True, limit: int = 8) -> str:
    """'posrf-iid m=32/128, oprf-orf m=128' of summary rows; where ``by_data``, the m values per data
    source: 'posrf-iid (isotropic m=32/128; bundled m=128)'. The first ``limit`` estimators."""
    def ms(g: pd.DataFrame) -> str:
        values = sorted({int(m) for m in g["num_features"]}) if "num_features" in g else []
        return f"m={'/'.join(map(str, values))}" if values and values != [0] else ""

    items = []
    for est, g in flagged.groupby("estimator", sort=True):
        if by_data and "data" in g:
            parts = [" ".join(filter(None, (str(d), ms(gd)))) for d, gd in g.groupby("data", sort=True)]
            items.append(f"{est} ({'; '.join(parts)})")
        else:
            items.append(" ".join(filter(None, (str(est), ms(g)))))
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def heavy_tail_note(rows: pd.DataFrame, results: pd.DataFrame | None, metric: str = "kernel_rel_mse",
                    by_data: bool = True) -> str:
    """A caption sentence naming the ``rows`` whose mean ``metric`` the seeds cannot estimate
    (``unreliable_means``), and pointing to output error; '' when none is flagged."""
    flagged = unreliable_means(rows, results, metric)
    if flagged.empty:
        return ""
    shown = rows[rows["status"] == "ok"] if "status" in rows else rows
    label = METRICS[metric].label if metric in METRICS else metric
    by_theory = flagged["tail_reason"].str.startswith("closed form")
    why = []
    if by_theory.any():
        why.append(f"the closed-form expectation is infinite or over {THEORY_GAP:g}x the measured mean")
    if not by_theory.all():
        why.append(f"one seed holds over {TOP_SEED_SHARE:.0%} of the seeds' sum")
    return (f" Unreliable {label}: in {len(flagged)} of {len(shown)} cells ({cells_text(flagged, by_data)}) "
            f"{' or '.join(why)}. There the squared error is heavy-tailed over seeds, and its Monte Carlo "
            f"mean over {seeds_text(flagged)} is set by rare draws: it can sit far below the expectation "
            "and even rise with m. Compare these estimators by output error instead. Cells not flagged "
            "may still have a tail no seed reached.")
