"""Figures of a results folder: seaborn style on matplotlib's object API (Agg canvas, no pyplot).

Every figure reads the per-cell summary (mean and 95% t-interval over seeds) and shows one
slice of the run when the run sweeps more axes than the figure has (``pick_slice``; the
caption names the slice). Colours are fixed per weight matrix and markers per feature map, in
registry order, so the same estimator looks the same in every figure and every report.

    figures = render_figures(run, Options(out_dir=Path("out/figures")))   # [Figure | Skip, ...]

A figure whose data the run lacks is returned as a ``Skip`` with the reason, for the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rfbench.report import (
    METRICS,
    Run,
    baselines_for,
    describe_slice,
    has_metric,
    peak_memory_note,
    pick_slice,
    registry_order,
    value_columns,
)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "d")
BASELINE_STYLES = {"exact": ("#222222", "x"), "sdpa": ("#777777", "+"), "uniform": ("#aa7733", "1")}
# 16 weight matrices: tab10 then six of Dark2, so the first ten keep the familiar colours.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")
PANEL_W, PANEL_H = 3.3, 2.7  # inches per facet


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    files: list[str]  # paths relative to the report folder, PNG first


@dataclass
class Skip:
    name: str
    title: str
    reason: str


@dataclass
class Options:
    out_dir: Path  # where figure files go
    rel_dir: str = "figures"  # their path relative to the report
    formats: tuple[str, ...] = ("png", "svg")
    dpi: int = 150
    prefer: dict = field(default_factory=dict)  # e.g. {"num_features": 128, "seq_len": 1024}


# ------------------------------------------------------------------------------ style
def _rc() -> dict:
    import seaborn as sns

    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15)}
    rc.update({"axes.titlesize": 10, "axes.titleweight": "bold", "legend.fontsize": 8,
               "legend.title_fontsize": 8, "legend.frameon": False, "svg.fonttype": "none",
               "axes.spines.top": False, "axes.spines.right": False, "grid.linewidth": 0.6,
               "lines.linewidth": 1.6, "lines.markersize": 5})
    return rc


class Palette:
    """Colour per weight matrix, marker per feature map, both in registry order."""

    def __init__(self, frame: pd.DataFrame):
        fm_order, wm_order = registry_order()
        fms = [f for f in frame["feature_map"].unique() if f]
        wms = [w for w in frame["weight_matrix"].unique() if w]
        fm_all = fm_order + sorted(set(fms) - set(fm_order))
        wm_all = wm_order + sorted(set(wms) - set(wm_order))
        self.colour = {w: COLOURS[i % len(COLOURS)] for i, w in enumerate(wm_all)}
        self.marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(fm_all)}
        self.fm_rank = {f: i for i, f in enumerate(fm_all)}
        self.wm_rank = {w: i for i, w in enumerate(wm_all)}

    def feature_maps(self, frame) -> list[str]:
        return sorted({f for f in frame["feature_map"] if f}, key=self.fm_rank.get)

    def weight_matrices(self, frame) -> list[str]:
        return sorted({w for w in frame["weight_matrix"] if w}, key=self.wm_rank.get)

    def legend_handles(self, frame, baselines=()) -> tuple[list, list]:
        from matplotlib.lines import Line2D

        handles, labels = [], []
        wms, fms = self.weight_matrices(frame), self.feature_maps(frame)
        for w in wms:
            handles.append(Line2D([], [], color=self.colour[w], lw=2))
            labels.append(w)
        if len(fms) > 1:
            for f in fms:
                handles.append(Line2D([], [], color="#555555", marker=self.marker[f], lw=0))
                labels.append(f)
        for b in baselines:
            colour, marker = BASELINE_STYLES.get(b, ("#444444", "1"))
            handles.append(Line2D([], [], color=colour, marker=marker, ls="--"))
            labels.append(f"{b} (baseline)")
        return handles, labels


def styled(make):
    """Draw a figure function's output in rfbench's style (seaborn rc, text kept as text in SVG)."""
    import functools

    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        from matplotlib import rc_context

        with rc_context(_rc()):
            return make(*args, **kwargs)

    return wrapper


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), layout="constrained")


def _save(fig, name: str, opts: Options) -> list[str]:
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for fmt in opts.formats:
        path = opts.out_dir / f"{name}.{fmt}"
        fig.savefig(path, dpi=opts.dpi, facecolor="white")
        files.append(f"{opts.rel_dir}/{path.name}")
    return files


def _spans_decades(values) -> bool:
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() >= 10


def _sweep_axis(ax, values, which: str = "x") -> None:
    """Log2 axis with the swept values as tick labels (m and L are usually powers of two)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    vals = sorted({int(v) for v in values if v > 0})
    axis = ax.xaxis if which == "x" else ax.yaxis
    if len(vals) > 1 and vals[-1] / vals[0] >= 4:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2)
    if len(vals) <= 10:
        axis.set_major_locator(FixedLocator(vals))
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(ScalarFormatter())


def _value_axis(ax, values, which: str = "y") -> None:
    """Log scale when the values span a decade or more, with plain 1-2-5 labels."""
    if _spans_decades(values):
        (ax.set_yscale if which == "y" else ax.set_xscale)("log")
        _log_labels(ax, values, which)


def _log_labels(ax, values, which: str = "y") -> None:
    """Label a log axis 0.1, 0.2, 0.5, 1 (or 1e-3, 1e-2 over many decades), minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    decades = math.log10(v.max() / v.min()) if len(v) > 1 else 0.0
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def _series(frame: pd.DataFrame, metric: str, x: str):
    """x, mean, ci_low, ci_high (display units), sorted by x, for one line."""
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


def _band(ax, xs, mean, lo, hi, colour, log: bool) -> None:
    """95% CI band; on a log axis a lower bound <= 0 is drawn at mean/10 (stated in captions)."""
    if lo is None or hi is None:
        return
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.sum() < 1:
        return
    lo = np.where(ok, lo, mean)
    hi = np.where(ok, hi, mean)
    if log:
        lo = np.where(lo > 0, lo, mean / 10)
    ax.fill_between(xs, lo, hi, color=colour, alpha=0.18, lw=0)


def _ok(frame: pd.DataFrame, *metrics: str) -> pd.DataFrame:
    mask = frame["status"] == "ok"
    for metric in metrics:
        col = value_columns(frame, metric)[0]
        mask &= np.isfinite(pd.to_numeric(frame[col], errors="coerce")) if col in frame else False
    return frame[mask]


def _failed_note(frame: pd.DataFrame) -> str:
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


def _in_slice(frame: pd.DataFrame, fixed: dict, ignore=()) -> pd.DataFrame:
    """Rows of ``frame`` matching the fixed values of a slice, except the keys in ``ignore``."""
    for key, value in fixed.items():
        if key not in ignore and key in frame:
            frame = frame[frame[key] == value]
    return frame


def _n_seeds(frame: pd.DataFrame) -> str:
    col = "n_ok" if "n_ok" in frame else ("n_seeds" if "n_seeds" in frame else None)
    if col is None or frame.empty:
        return "seeds"
    lo, hi = int(frame[col].min()), int(frame[col].max())
    return f"{lo} seeds" if lo == hi else f"{lo}–{hi} seeds"


def _estimators(run: Run) -> pd.DataFrame:
    return run.summary[run.summary["kind"] == "estimator"]


# ------------------------------------------------------------------------------ figures
@styled
def error_vs_features(run: Run, opts: Options, metric: str, name: str) -> Figure | Skip:
    """Error vs m, one panel per feature map (rows: data sources), one line per weight matrix."""
    label = METRICS[metric].label
    title = f"{label[0].upper()}{label[1:]} vs number of features"
    est = _estimators(run)
    if est.empty or not has_metric(est, metric):
        return Skip(name, title, f"the run has no {metric} values for estimators")
    ok = _ok(est, metric)
    if "num_features" not in ok or ok["num_features"].nunique() < 2:
        return Skip(name, title, "the run measures a single feature count m, so there is no curve over m")
    # One row of panels per data source (the three most measured), each at its own best slice.
    prefer = {k: v for k, v in opts.prefer.items() if k != "num_features"}
    datas = list(ok["data"].value_counts().index[:3]) if "data" in ok else [None]
    slices = [pick_slice(ok if d is None else ok[ok["data"] == d],
                         ("num_features", "feature_map", "weight_matrix"), prefer) for d in datas]
    rows = pd.concat([r for r, _ in slices])
    pal = Palette(run.summary)
    fms = pal.feature_maps(rows)
    # The panel grid: one data source per row and a feature map per column, transposed when there
    # are more feature maps than data sources (a tall figure reads better in a page); one data
    # source: feature maps wrapped four to a row. Panels of one data source share their y axis.
    if len(datas) == 1:
        ncols = min(len(fms), 4)
        cells = [(i // ncols, i % ncols, datas[0], fm) for i, fm in enumerate(fms)]
    elif len(fms) > len(datas):
        cells = [(i, j, d, fm) for i, fm in enumerate(fms) for j, d in enumerate(datas)]
    else:
        cells = [(i, j, d, fm) for i, d in enumerate(datas) for j, fm in enumerate(fms)]
    nrows, ncols = max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1
    data_on_cols = len(datas) > 1 and len(fms) > len(datas)
    sharey = True if len(datas) == 1 else ("col" if data_on_cols else "row")
    fig = _new_figure(PANEL_W * ncols + 1.6, PANEL_H * nrows)
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=sharey, squeeze=False)
    log_y = _spans_decades(rows[value_columns(rows, metric)[0]])
    overlay_label = None
    floors = {
        d: _floor(run, metric, fixed if d is None else {**fixed, "data": d})
        for d, (_, fixed) in zip(datas, slices)
    }
    for r, c, data, fm in cells:
        ax = grid[r, c]
        panel = rows[(rows["feature_map"] == fm) & ((rows["data"] == data) if data is not None else True)]
        for wm in pal.weight_matrices(panel):
            xs, mean, lo, hi = _series(panel[panel["weight_matrix"] == wm], metric, "num_features")
            ax.plot(xs, mean, color=pal.colour[wm], marker=pal.marker[fm], label=wm)
            _band(ax, xs, mean, lo, hi, pal.colour[wm], log_y)
        if metric == "kernel_rel_mse":
            overlay_label = _theory_overlay(ax, panel, metric) or overlay_label
        if floors.get(data) is not None:
            colour, _ = BASELINE_STYLES["uniform"]
            ax.axhline(floors[data], color=colour, ls="--", lw=1.3)
        ax.set_title(fm if len(datas) == 1 or data is None else f"{fm} · {data}")
        _sweep_axis(ax, rows["num_features"])
        if log_y:
            ax.set_yscale("log")
            same = rows if data is None else rows[rows["data"] == data]
            _log_labels(ax, same[value_columns(same, metric)[0]])
    used = {(r, c) for r, c, _, _ in cells}
    for (r, c), ax in np.ndenumerate(grid):
        if (r, c) not in used:
            ax.set_visible(False)
    for (r, c), ax in np.ndenumerate(grid):
        if (r, c) in used and (r + 1, c) not in used:  # the lowest panel of its column
            ax.set_xlabel("random features m")
            ax.xaxis.set_tick_params(labelbottom=True)
        if (r, c) in used and c == 0:
            ax.set_ylabel(METRICS[metric].axis_label())
    has_floor = any(v is not None for v in floors.values())
    handles, labels = pal.legend_handles(rows, ["uniform"] if has_floor else [])
    if overlay_label:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", ls=":", lw=1.4))
        labels.append(overlay_label)
    fig.legend(handles, labels, loc="outside right upper")
    files = _save(fig, name, opts)
    where = [describe_slice({k: v for k, v in fixed.items() if k != "data"}) for _, fixed in slices]
    if len(set(where)) == 1:
        slice_txt = where[0]
    else:
        slice_txt = "; ".join(f"{d}: {w}" for d, w in zip(datas, where))
    caption = (f"{METRICS[metric].label} against the number of random vectors m (log-log), mean over "
               f"{_n_seeds(rows)} with 95% t-interval bands"
               + (f" ({slice_txt})" if slice_txt else "") + ". Lower is better.")
    if overlay_label:
        caption += (" Dotted: " + overlay_label + "; i.i.d. weights give an unbiased mean of m i.i.d. "
                    "terms, so their expected MSE is exactly Var₁/m: a weight matrix below the line "
                    "beats i.i.d. sampling.")
    if has_floor:
        caption += (" Dashed: the uniform baseline (every query gets the mean of the values it sees), "
                    "the error of an estimator that knows nothing of q and k.")
    if len(datas) > 1:
        caption += f" {'Columns' if data_on_cols else 'Rows'}: data sources."
    shown = [_in_slice(est if d is None else est[est["data"] == d], fixed)
             for d, (_, fixed) in zip(datas, slices)]
    caption += _failed_note(pd.concat(shown))
    return Figure(name, title, caption, files)


def _floor(run: Run, metric: str, fixed: dict) -> float | None:
    """The uniform baseline's output error in a slice (None: not run, failed, or another metric)."""
    if metric != "out_rel_err":
        return None
    base = baselines_for(run.summary, fixed)
    base = base[(base["estimator"] == "uniform") & (base["status"] == "ok")]
    col = value_columns(base, metric)[0]
    if len(base) != 1 or col not in base or not np.isfinite(float(base[col].iloc[0])):
        return None
    return float(base[col].iloc[0])


def _theory_overlay(ax, panel: pd.DataFrame, metric: str) -> str | None:
    """Draw the i.i.d. closed form over m in one panel; return its legend label (None: none drawn).

    If the runner stored ``<metric>_theory`` (rfbench.theory's closed-form expectation on the
    cell's data, i.i.d. weights), draw it. Otherwise draw C/m with C fitted to the i.i.d. points
    (least squares in log space with the slope fixed at -1): the closed form's shape, its level
    estimated from the run.
    """
    theory_col = next((c for c in (f"{metric}_theory_mean", f"{metric}_theory") if c in panel), None)
    if theory_col is not None:
        th = panel.groupby("num_features")[theory_col].mean().dropna()
        if len(th) > 1:
            ax.plot(th.index.to_numpy(float), th.to_numpy(float), color="black", ls=":", lw=1.4, zorder=5)
            return "closed form, i.i.d. (rfbench.theory)"
    iid = panel[panel["weight_matrix"] == "iid"]
    xs, mean, _, _ = _series(iid, metric, "num_features")
    keep = mean > 0
    if keep.sum() < 2:
        return None
    c = math.exp(float(np.mean(np.log(mean[keep] * xs[keep]))))
    grid = np.array(sorted(set(panel["num_features"].astype(float))))
    ax.plot(grid, c / grid, color="black", ls=":", lw=1.4, zorder=5)
    return "i.i.d. law C/m (C fitted to iid)"


@styled
def error_time_vs_seqlen(run: Run, opts: Options, name: str = "error_time_vs_seqlen") -> Figure | Skip:
    """Error and time against L at one m, with the exact-attention baselines on the time panel."""
    title = "Error and time vs sequence length"
    est = _estimators(run)
    err_metric = next((m for m in ("out_rel_err", "kernel_rel_mse") if has_metric(est, m)), None)
    have_time = has_metric(run.summary, "time_ms")
    if err_metric is None and not have_time:
        return Skip(name, title, "the run has neither error nor time measurements")
    ok = _ok(est, err_metric or "time_ms")
    if "seq_len" not in ok or ok["seq_len"].nunique() < 2:
        return Skip(name, title, "the run measures a single sequence length, so there is no curve over L")
    rows, fixed = pick_slice(ok, ("seq_len", "feature_map", "weight_matrix"), opts.prefer)
    base = _ok(baselines_for(run.summary, fixed), "time_ms") if have_time else rows.iloc[:0]
    panels = [m for m in (err_metric, "time_ms" if have_time else None) if m]
    pal = Palette(run.summary)
    fig = _new_figure(4.2 * len(panels) + 1.6, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for ax, metric in zip(axes, panels):
        lines = rows if metric == err_metric else _ok(rows, "time_ms")
        log_y = _spans_decades(pd.concat([lines[value_columns(lines, metric)[0]],
                                          base[value_columns(base, metric)[0]] if metric == "time_ms"
                                          else pd.Series(dtype=float)]))
        for _, grp in lines.groupby("estimator", sort=True):
            fm, wm = grp["feature_map"].iloc[0], grp["weight_matrix"].iloc[0]
            xs, mean, lo, hi = _series(grp, metric, "seq_len")
            ax.plot(xs, mean, color=pal.colour[wm], marker=pal.marker[fm], lw=1.3)
            _band(ax, xs, mean, lo, hi, pal.colour[wm], log_y)
        if metric == "time_ms":
            for b, grp in base.groupby("estimator", sort=True):
                colour, marker = BASELINE_STYLES.get(b, ("#444444", "1"))
                xs, mean, lo, hi = _series(grp, metric, "seq_len")
                ax.plot(xs, mean, color=colour, marker=marker, ls="--", lw=1.6)
                _band(ax, xs, mean, lo, hi, colour, log_y)
        _sweep_axis(ax, rows["seq_len"])
        if log_y:
            ax.set_yscale("log")
            _log_labels(ax, [v for line in ax.get_lines() for v in line.get_ydata()])
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(METRICS[metric].axis_label())
        ax.set_title(METRICS[metric].label)
    handles, labels = pal.legend_handles(rows, sorted(base["estimator"].unique()))
    fig.legend(handles, labels, loc="outside right upper")
    files = _save(fig, name, opts)
    slice_txt = describe_slice(fixed)
    caption = (f"Left: {METRICS[err_metric].label if err_metric else ''} against L; right: median forward "
               f"time per call (mean over {_n_seeds(rows)}, 95% bands). Colour: weight matrix; marker: "
               "feature map; dashed: exact-attention baselines"
               + (f"; {slice_txt}" if slice_txt else "") + ". Lower is better in both panels. "
               "Random-feature attention is linear in L, exact attention quadratic: where the dashed "
               "lines cross the solid ones is the break-even length.")
    caption += _failed_note(pd.concat([_in_slice(est, fixed), baselines_for(run.summary, fixed)]))
    return Figure(name, title, caption, files)


@styled
def memory_vs_seqlen(run: Run, opts: Options, name: str = "memory_vs_seqlen") -> Figure | Skip:
    """Peak memory (MiB) against L at one m, with the baselines."""
    title = "Peak memory vs sequence length"
    if not has_metric(run.summary, "peak_mem_bytes"):
        return Skip(name, title, "the run recorded no peak memory")
    ok = _ok(_estimators(run), "peak_mem_bytes")
    if ok.empty or ok["seq_len"].nunique() < 2:
        return Skip(name, title, "the run measures memory at a single sequence length")
    rows, fixed = pick_slice(ok, ("seq_len", "feature_map", "weight_matrix"), opts.prefer)
    base = _ok(baselines_for(run.summary, fixed), "peak_mem_bytes")
    pal = Palette(run.summary)
    fig = _new_figure(6.4, 3.6)
    ax = fig.subplots()
    col = value_columns(rows, "peak_mem_bytes")[0]
    log_y = _spans_decades(pd.concat([rows[col], base[col]]))
    for _, grp in rows.groupby("estimator", sort=True):
        fm, wm = grp["feature_map"].iloc[0], grp["weight_matrix"].iloc[0]
        xs, mean, lo, hi = _series(grp, "peak_mem_bytes", "seq_len")
        ax.plot(xs, mean, color=pal.colour[wm], marker=pal.marker[fm], lw=1.3)
        _band(ax, xs, mean, lo, hi, pal.colour[wm], log_y)
    for b, grp in base.groupby("estimator", sort=True):
        colour, marker = BASELINE_STYLES.get(b, ("#444444", "1"))
        xs, mean, _, _ = _series(grp, "peak_mem_bytes", "seq_len")
        ax.plot(xs, mean, color=colour, marker=marker, ls="--")
    _sweep_axis(ax, rows["seq_len"])
    if log_y:
        ax.set_yscale("log")
        _log_labels(ax, [v for line in ax.get_lines() for v in line.get_ydata()])
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel(METRICS["peak_mem_bytes"].axis_label())
    handles, labels = pal.legend_handles(rows, sorted(base["estimator"].unique()))
    fig.legend(handles, labels, loc="outside right upper")
    files = _save(fig, name, opts)
    meaning = peak_memory_note(run)
    caption = ("Peak memory of one forward attention call against L (log-log), mean over "
               f"{_n_seeds(rows)}; {describe_slice(fixed) or 'all cells'}. Dashed: exact baselines "
               "(their L×L score matrix grows quadratically). Lower is better."
               + (f" Measured as {meaning.rstrip('.')}." if meaning else ""))
    caption += _failed_note(baselines_for(run.summary, fixed))
    return Figure(name, title, caption, files)


@styled
def error_heatmap(run: Run, opts: Options, name: str = "error_heatmap") -> Figure | Skip:
    """Feature map x weight matrix grid of the error at one m (the Spectraformer grid)."""
    title = "Error grid: feature map × weight matrix"
    est = _estimators(run)
    metric = next((m for m in ("kernel_rel_mse", "out_rel_err") if has_metric(est, m)), None)
    if metric is None:
        return Skip(name, title, "the run has no kernel or output error values")
    rows, fixed = pick_slice(est, ("feature_map", "weight_matrix"), opts.prefer)
    pal = Palette(run.summary)
    fms, wms = pal.feature_maps(rows), pal.weight_matrices(rows)
    if len(fms) * len(wms) < 2:
        return Skip(name, title, "the run has a single feature map and weight matrix")
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
    for i in range(len(fms)):
        for j in range(len(wms)):
            if not notes[i, j]:
                notes[i, j] = "—"
    import seaborn as sns
    from matplotlib.colors import LogNorm, Normalize

    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size == 0:
        return Skip(name, title, f"no estimator has a finite {metric} in the chosen slice")
    norm = (LogNorm if _spans_decades(finite) else Normalize)(finite.min(), finite.max())
    fig = _new_figure(0.75 * len(wms) + 2.6, 0.5 * len(fms) + 1.6)
    ax = fig.subplots()
    frame = pd.DataFrame(values, index=fms, columns=wms)
    sns.heatmap(frame, ax=ax, cmap="rocket_r", norm=norm, annot=notes, fmt="", linewidths=0.6,
                linecolor="white", annot_kws={"fontsize": 7.5},
                cbar_kws={"label": METRICS[metric].label + (" (log)" if isinstance(norm, LogNorm) else "")})
    ax.set_facecolor("#e6e6e6")  # cells without a value (failed or not run) show grey
    ax.grid(False)
    for i, j in zip(*np.nonzero(~np.isfinite(values))):  # seaborn leaves NaN cells unannotated
        ax.text(j + 0.5, i + 0.5, notes[i, j], ha="center", va="center", fontsize=7.5, color="#555555")
    ax.set_xlabel("weight matrix")
    ax.set_ylabel("feature map")
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    files = _save(fig, name, opts)
    caption = (f"Mean {METRICS[metric].label} of every feature map × weight matrix pair in the run"
               f" ({describe_slice(fixed) or 'single slice'}; mean over {_n_seeds(_ok(rows, metric))}). "
               "Lighter is better; grey cells failed (their status is written in) or were not run (—).")
    return Figure(name, title, caption, files)


@styled
def pareto(run: Run, opts: Options, name: str = "error_vs_time_pareto") -> Figure | Skip:
    """Error against time, every (estimator, m) at one L; the non-dominated front is marked."""
    title = "Error vs time (Pareto)"
    est = _estimators(run)
    metric = next((m for m in ("out_rel_err", "kernel_rel_mse") if has_metric(est, m)), None)
    if metric is None or not has_metric(est, "time_ms"):
        return Skip(name, title, "the run lacks either error or time measurements")
    ok = _ok(est, metric, "time_ms")
    ok = ok[pd.to_numeric(ok[value_columns(ok, metric)[0]]) > 0]
    if len(ok) < 2:
        return Skip(name, title, "fewer than two estimator cells have both error and time")
    rows, fixed = pick_slice(ok, ("num_features", "feature_map", "weight_matrix"), opts.prefer)
    pal = Palette(run.summary)
    ecol, tcol = value_columns(rows, metric)[0], value_columns(rows, "time_ms")[0]
    fig = _new_figure(7.4, 4.4)
    ax = fig.subplots()
    m_min = max(float(rows["num_features"].min()), 1.0)
    for _, grp in rows.groupby("estimator", sort=True):
        grp = grp.sort_values("num_features")
        fm, wm = grp["feature_map"].iloc[0], grp["weight_matrix"].iloc[0]
        ax.plot(grp[tcol], grp[ecol], color=pal.colour[wm], lw=0.8, alpha=0.45, zorder=2)
        sizes = 18 + 14 * np.log2(grp["num_features"].to_numpy(float) / m_min)
        ax.scatter(grp[tcol], grp[ecol], s=sizes, color=pal.colour[wm], marker=pal.marker[fm],
                   edgecolor="white", linewidth=0.5, zorder=3)
    front = _pareto_front(rows, tcol, ecol)
    ax.step(front[tcol], front[ecol], where="post", color="black", lw=1.1, zorder=4)
    for i, (_, r) in enumerate(front.head(8).iterrows()):
        ax.annotate(f"{r['estimator']} m={int(r['num_features'])}", (r[tcol], r[ecol]), fontsize=6.5,
                    xytext=(5, 5 if i % 2 == 0 else -11), textcoords="offset points", zorder=6)
    base = _ok(baselines_for(run.summary, fixed), "time_ms")
    base_names = []
    for b, grp in base.groupby("estimator", sort=True):
        if fixed.get("seq_len") is None and grp["seq_len"].nunique() > 1:
            continue
        colour, _ = BASELINE_STYLES.get(b, ("#444444", "1"))
        ax.axvline(float(grp[value_columns(grp, "time_ms")[0]].iloc[0]), color=colour, ls="--", lw=1.1)
        base_names.append(b)
    _value_axis(ax, pd.concat([rows[tcol], base[value_columns(base, "time_ms")[0]]]), "x")
    _value_axis(ax, rows[ecol], "y")
    ax.set_xlabel(METRICS["time_ms"].axis_label())
    ax.set_ylabel(METRICS[metric].axis_label())
    handles, labels = pal.legend_handles(rows, base_names)
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", lw=1.1))
    labels.append("Pareto front")
    fig.legend(handles, labels, loc="outside right upper")
    files = _save(fig, name, opts)
    caption = (f"{METRICS[metric].label} against forward time for every estimator and feature count m "
               f"({describe_slice(fixed) or 'single slice'}); marker size grows with m and thin lines "
               "join one estimator's m values. The black step is the Pareto front: no other point is both "
               "faster and more accurate. Down and left is better. Dashed verticals: exact baselines' "
               "time (their error is zero).")
    return Figure(name, title, caption, files)


def _pareto_front(rows: pd.DataFrame, tcol: str, ecol: str) -> pd.DataFrame:
    """Points not dominated in (time, error), sorted by time."""
    ordered = rows.sort_values([tcol, ecol])
    best, keep = math.inf, []
    for idx, err in zip(ordered.index, ordered[ecol]):
        if err < best:
            best = err
            keep.append(idx)
    return ordered.loc[keep]


@styled
def bias_variance(run: Run, opts: Options, name: str = "bias_variance") -> Figure | Skip:
    """Relative bias^2 and Monte Carlo variance bars per estimator at one (m, L)."""
    title = "Bias² vs variance per estimator"
    est = _estimators(run)
    pairs = [("bias2_rel", "mc_variance_rel"), ("bias2", "mc_variance")]
    cols = next((p for p in pairs if all(c in est and np.isfinite(est[c]).any() for c in p)), None)
    if cols is None:
        return Skip(name, title, "the summary has no cross-seed bias²/variance (it needs summary.parquet "
                                 "from a run with at least two seeds)")
    bcol, vcol = cols
    ok = est[(est["status"] == "ok") & np.isfinite(est[vcol]) & np.isfinite(est[bcol])]
    rows, fixed = pick_slice(ok, ("feature_map", "weight_matrix"), opts.prefer)
    rows = rows.sort_values(vcol, ascending=False)
    n = rows["n_ok"] if "n_ok" in rows else rows.get("n_seeds", pd.Series(1, index=rows.index))
    fig = _new_figure(6.6, 0.26 * len(rows) + 1.5)
    ax = fig.subplots()
    y = np.arange(len(rows))
    rel = bcol.endswith("_rel")
    ax.barh(y - 0.2, rows[bcol], height=0.38, color="#dd8452", label="bias²" + (" / K²" if rel else ""))
    ax.barh(y + 0.2, rows[vcol], height=0.38, color="#4c72b0", label="MC variance" + (" / K²" if rel else ""))
    floor = rows[vcol].to_numpy(float) / np.maximum(n.to_numpy(float), 1)
    ax.scatter(floor, y - 0.2, marker="|", s=110, color="black", zorder=4, label="variance / n seeds")
    ax.set_yticks(y, rows["estimator"])
    ax.invert_yaxis()
    values = pd.concat([rows[vcol], rows[bcol]])
    _value_axis(ax, values[values > 0], "x")
    ax.set_xlabel(("relative " if rel else "") + "bias² and variance of the kernel estimate"
                  + (" (÷ mean K²)" if rel else ""))
    fig.legend(loc="outside right upper")
    files = _save(fig, name, opts)
    caption = ("Cross-seed decomposition of the kernel-estimate error "
               f"({describe_slice(fixed) or 'single slice'}): variance over seeds and squared bias of "
               "the seed-averaged estimate, averaged over all query-key pairs. The bias² is measured "
               "from a mean over n seeds, so an unbiased estimator still shows about variance/n (the "
               "black tick); only a bias² bar well past its tick indicates real bias. Shorter is better.")
    return Figure(name, title, caption, files)


FIGURES: list[tuple[str, Callable[[Run, Options], Figure | Skip]]] = [
    ("kernel_error_vs_features",
     lambda r, o: error_vs_features(r, o, "kernel_rel_mse", "kernel_error_vs_features")),
    ("output_error_vs_features",
     lambda r, o: error_vs_features(r, o, "out_rel_err", "output_error_vs_features")),
    ("error_time_vs_seqlen", error_time_vs_seqlen),
    ("memory_vs_seqlen", memory_vs_seqlen),
    ("error_heatmap", error_heatmap),
    ("error_vs_time_pareto", pareto),
    ("bias_variance", bias_variance),
]


def render_figures(run: Run, opts: Options) -> list[Figure | Skip]:
    """Every figure the run has data for (saved under ``opts.out_dir``), and a Skip for the rest."""
    return [make(run, opts) for _, make in FIGURES]
