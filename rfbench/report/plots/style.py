"""What every figure shares: its records (Figure, Skip, Options), colours and markers, the
seaborn rc, the canvas, and the axis helpers. Matplotlib and seaborn are imported inside the
functions, so importing the report layer does not import them."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rfbench.report.analysis import spans_decades

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "d")
BASELINE_STYLES = {"exact": ("#222222", "x"), "sdpa": ("#777777", "+"), "uniform": ("#aa7733", "1"),
                   "taylor2": ("#3366aa", "2")}
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
    tag: str = ""  # appended to file names when one figure is drawn per causal value


def baseline_style(name: str) -> tuple[str, str]:
    """(colour, marker) of a baseline's dashed line."""
    return BASELINE_STYLES.get(name, ("#444444", "1"))


# ------------------------------------------------------------------------------ style
def _rc() -> dict:
    import seaborn as sns

    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15)}
    rc.update({"axes.titlesize": 10, "axes.titleweight": "bold", "legend.fontsize": 8,
               "legend.title_fontsize": 8, "legend.frameon": False, "svg.fonttype": "none",
               "axes.spines.top": False, "axes.spines.right": False, "grid.linewidth": 0.6,
               "lines.linewidth": 1.6, "lines.markersize": 5})
    return rc


def registry_order() -> tuple[list[str], list[str]]:
    """Feature-map and weight-matrix names in registry order (fixes colours across reports)."""
    from rfbench import registry

    return registry.feature_maps(), registry.weight_matrices()


class Palette:
    """Colour per weight matrix, marker per feature map present, both in registry order.

    When the frame holds a single weight matrix, colour by feature map instead (the marker
    still names the feature map), so the lines of different estimators never share a colour.
    Draw with ``line_colour(fm, wm)``.
    """

    def __init__(self, frame: pd.DataFrame):
        fm_order, wm_order = registry_order()
        fms = [f for f in frame["feature_map"].unique() if f]
        wms = [w for w in frame["weight_matrix"].unique() if w]
        fm_all = fm_order + sorted(set(fms) - set(fm_order))
        wm_all = wm_order + sorted(set(wms) - set(wm_order))
        self.colour = {w: COLOURS[i % len(COLOURS)] for i, w in enumerate(wm_all)}
        self.fm_rank = {f: i for i, f in enumerate(fm_all)}
        self.wm_rank = {w: i for i, w in enumerate(wm_all)}
        self.by_feature_map = len(set(wms)) == 1 and len(set(fms)) > 1
        present = sorted(set(fms), key=self.fm_rank.get)
        # a marker per feature map in registry order, the same in every report, unless two maps
        # present would share one (more maps are registered than there are markers): then the
        # maps present take the markers in registry order, so no two in one figure look alike
        self.marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(fm_all)}
        if len({self.marker[f] for f in present}) < len(present):
            self.marker.update({f: MARKERS[i % len(MARKERS)] for i, f in enumerate(present)})
        self.fm_colour = {f: COLOURS[i % len(COLOURS)] for i, f in enumerate(present)}

    def line_colour(self, fm: str, wm: str) -> str:
        """The colour of estimator fm-wm's line."""
        return self.fm_colour.get(fm, "#555555") if self.by_feature_map else self.colour[wm]

    def feature_maps(self, frame) -> list[str]:
        return sorted({f for f in frame["feature_map"] if f}, key=self.fm_rank.get)

    def weight_matrices(self, frame) -> list[str]:
        return sorted({w for w in frame["weight_matrix"] if w}, key=self.wm_rank.get)

    def legend_handles(self, frame, baselines=(), markers: bool = True) -> tuple[list, list]:
        """Handles for what the figure shows: colours (weight matrices, or estimators when the
        colour is by feature map), markers per feature map unless ``markers`` is False (facets
        titled by feature map), and the baselines' dashed lines."""
        from matplotlib.lines import Line2D

        handles, labels = [], []
        wms, fms = self.weight_matrices(frame), self.feature_maps(frame)
        if self.by_feature_map:
            for f in fms:
                colour = self.fm_colour.get(f, "#555555")
                handles.append(Line2D([], [], color=colour, marker=self.marker[f], lw=2))
                labels.append(f"{f}-{wms[0]}" if wms else f)
            markers = False
        for w in wms if not self.by_feature_map else ():
            handles.append(Line2D([], [], color=self.colour[w], lw=2))
            labels.append(w)
        if markers and len(fms) > 1:
            for f in fms:
                handles.append(Line2D([], [], color="#555555", marker=self.marker[f], lw=0))
                labels.append(f)
        for b in baselines:
            colour, marker = baseline_style(b)
            handles.append(Line2D([], [], color=colour, marker=marker, ls="--"))
            labels.append(f"{b} (baseline)")
        return handles, labels

    def legend_title(self, frame=None, markers: bool = True) -> str:
        """The legend's title, naming what colour and (where ``legend_handles`` lists feature-map
        markers: ``markers`` and several feature maps in ``frame``) marker stand for."""
        if self.by_feature_map:
            return "estimator"
        if markers and frame is not None and len(self.feature_maps(frame)) > 1:
            return "colour: weight matrix · marker: feature map"
        return "colour: weight matrix"

    def key_text(self) -> str:
        """What colour and marker mean, for a caption."""
        return ("colour and marker: feature map (one weight matrix)" if self.by_feature_map
                else "colour: weight matrix; marker: feature map")


def styled(make):
    """Draw a figure function's output in rfbench's style (seaborn rc, text kept as text in SVG)."""

    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        from matplotlib import rc_context

        with rc_context(_rc()):
            return make(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), layout="constrained")


def save(fig, name: str, opts: Options) -> list[str]:
    """Write ``fig`` in every format of ``opts``; the paths relative to the report, PNG first."""
    from rfbench.report import safe_dir
    from rfbench.results.atomic import atomic_write

    safe_dir(opts.out_dir)
    files = []
    for fmt in opts.formats:
        path = opts.out_dir / f"{name}{opts.tag}.{fmt}"
        # atomic (a killed report leaves no half-written SVG) and never through a planted link
        atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=opts.dpi, facecolor="white"))
        files.append(f"{opts.rel_dir}/{path.name}")
    return files


# ------------------------------------------------------------------------------ axes
def sweep_axis(ax, values, which: str = "x") -> None:
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


def value_axis(ax, values, which: str = "y") -> None:
    """Log scale when the values span a decade or more, with plain 1-2-5 labels."""
    if spans_decades(values):
        (ax.set_yscale if which == "y" else ax.set_xscale)("log")
        log_labels(ax, values, which)


def log_labels(ax, values, which: str = "y") -> None:
    """Label a log axis 0.7, 0.8, 0.9 (narrow), 0.1, 0.2, 0.5, 1 (two decades) or 10⁻³, 10⁻² (more),
    judged on the axis limits; minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    decades = math.log10(v.max() / v.min()) if len(v) > 1 else 0.0
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()  # bands can reach past the values
    if lo > 0 and hi > lo:
        decades = max(decades, math.log10(hi / lo))
    # every 1..9 within half a decade, 1-2-3-5 within one, 1-2-5 within two, powers of ten
    # beyond (numticks thins them)
    subs = (tuple(range(1, 10)) if decades < 0.5 else (1.0, 2.0, 3.0, 5.0) if decades < 1
            else (1.0, 2.0, 5.0) if decades < 2 else (1.0,))
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=7))
    axis.set_major_formatter(FuncFormatter(_tick))
    axis.set_minor_formatter(NullFormatter())


def _tick(x, _pos=None) -> str:
    """0.5, 20, 1e+06 -> '0.5', '20', '10⁶': short labels on a log axis."""
    if x <= 0 or not np.isfinite(x):
        return ""
    e = math.log10(x)
    if -3 <= e < 4:
        return f"{x:g}"
    mant, exp = f"{x:.0e}".split("e")
    sup = str(int(exp)).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"10{sup}" if mant == "1" else f"{mant}·10{sup}"


def robust_limits(values, log: bool, factor: float = 30.0) -> tuple[float, float] | None:
    """y limits that keep the bulk of ``values`` readable: the range of the values near the
    median (log axis: within 4 decades; linear: within ``factor`` interquartile ranges), padded.
    None when nothing would be clipped (the caller then keeps matplotlib's limits)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if len(v) < 4:
        return None
    if log:
        med = np.median(np.log10(v))
        keep = v[np.abs(np.log10(v) - med) <= 4.0]
        if len(keep) == len(v):
            return None
        return float(keep.min()) / 1.5, float(keep.max()) * 1.5
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    span = max(q3 - q1, 1e-12 * max(abs(med), 1.0))
    keep = v[np.abs(v - med) <= factor * span]
    if len(keep) == len(v):
        return None
    pad = 0.05 * (keep.max() - keep.min() or 1.0)
    return float(keep.min() - pad), float(keep.max() + pad)


def band(ax, xs, mean, lo, hi, colour, log: bool) -> None:
    """95% CI band; on a log axis a lower bound <= 0 is drawn at mean/10, on a linear one at 0."""
    if lo is None or hi is None:
        return
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.sum() < 1:
        return
    lo = np.where(ok, lo, mean)
    hi = np.where(ok, hi, mean)
    if log:
        lo = np.where(lo > 0, lo, mean / 10)
    else:  # errors, times and memory are never negative: a t-interval below 0 is cut there
        lo = np.maximum(lo, 0.0) if np.all(mean >= 0) else lo
    ax.fill_between(xs, lo, hi, color=colour, alpha=0.18, lw=0)
