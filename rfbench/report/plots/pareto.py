"""Error against time for every (estimator, m) at one L, with the non-dominated front."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfbench.report import METRICS, Run
from rfbench.report.analysis import (
    APPROXIMATE_BASELINES,
    baselines_for,
    describe_slice,
    estimators,
    has_metric,
    ok_rows,
    pareto_front,
    pick_slice,
    seeds_text,
    value_columns,
)
from rfbench.report.plots.style import (
    Figure,
    Options,
    Palette,
    Skip,
    baseline_style,
    new_figure,
    robust_limits,
    save,
    styled,
    value_axis,
)


@styled
def pareto(run: Run, opts: Options, name: str = "error_vs_time_pareto") -> Figure | Skip:
    """Error against time, every (estimator, m) at one L; the non-dominated front is marked."""
    title = "Error vs time (Pareto)"
    est = estimators(run.summary)
    metric = next((m for m in ("out_rel_err", "kernel_rel_mse") if has_metric(est, m)), None)
    if metric is None or not has_metric(est, "time_ms"):
        return Skip(name, title, "the run lacks either error or time measurements")
    ok = ok_rows(est, metric, "time_ms")
    ok = ok[pd.to_numeric(ok[value_columns(ok, metric)[0]]) > 0]
    if len(ok) < 2:
        return Skip(name, title, "fewer than two estimator cells have both error and time")
    rows, fixed = pick_slice(ok, ("num_features", "feature_map", "weight_matrix"), opts.prefer)
    pal = Palette(run.summary)
    ecol, tcol = value_columns(rows, metric)[0], value_columns(rows, "time_ms")[0]
    fig = new_figure(7.4, 4.4)
    ax = fig.subplots()
    m_min = max(float(rows["num_features"].min()), 1.0)
    for _, grp in rows.groupby("estimator", sort=True):
        grp = grp.sort_values("num_features")
        fm, wm = grp["feature_map"].iloc[0], grp["weight_matrix"].iloc[0]
        ax.plot(grp[tcol], grp[ecol], color=pal.line_colour(fm, wm), lw=0.8, alpha=0.45, zorder=2)
        sizes = 18 + 14 * np.log2(grp["num_features"].to_numpy(float) / m_min)
        ax.scatter(grp[tcol], grp[ecol], s=sizes, color=pal.line_colour(fm, wm), marker=pal.marker[fm],
                   edgecolor="white", linewidth=0.5, zorder=3)
    front = pareto_front(rows, tcol, ecol)
    ax.step(front[tcol], front[ecol], where="post", color="black", lw=1.1, zorder=4)
    for i, (_, r) in enumerate(front.head(8).iterrows()):  # staggered labels, each tied to its point
        ax.annotate(f"{r['estimator']} m={int(r['num_features'])}", (r[tcol], r[ecol]), fontsize=6.5,
                    xytext=(10, (18, -22, 34, -38)[i % 4]), textcoords="offset points", zorder=6,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="#555555", shrinkA=0, shrinkB=2))
    base = ok_rows(baselines_for(run.summary, fixed), "time_ms")
    exact_names, points = [], []
    for b, grp in base.groupby("estimator", sort=True):
        if fixed.get("seq_len") is None and grp["seq_len"].nunique() > 1:
            continue
        colour, marker = baseline_style(b)
        t = float(grp[value_columns(grp, "time_ms")[0]].iloc[0])
        err = float(pd.to_numeric(grp[ecol], errors="coerce").iloc[0]) if ecol in grp else np.nan
        if b in APPROXIMATE_BASELINES and np.isfinite(err):  # an error of its own: a point and a line
            ax.scatter([t], [err], s=70, color=colour, marker="*", zorder=5)
            ax.axhline(err, color=colour, ls="--", lw=1.1, zorder=1)
            points.append((b, t, err))
        else:  # exact attention: its error is float rounding (~1e-7), far below the estimators'
            ax.axvline(t, color=colour, ls="--", lw=1.1)
            exact_names.append((b, err))
    times = pd.concat([rows[tcol], base[value_columns(base, "time_ms")[0]]])
    value_axis(ax, times, "x")
    errors = pd.concat([rows[ecol], pd.Series([p[2] for p in points], dtype=float)])
    value_axis(ax, errors, "y")
    log_y = ax.get_yscale() == "log"
    clipped = ""
    if (lim := robust_limits(errors, log_y)) is not None:
        ax.set_ylim(*lim)
        out = rows[(rows[ecol] < lim[0]) | (rows[ecol] > lim[1])]
        clipped = (" Clipped (outside the y range, which is set to keep the rest readable): "
                   + ", ".join(f"{r['estimator']} m={int(r['num_features'])} ({r[ecol]:.3g})"
                               for _, r in out.head(6).iterrows()) + ".")
    ax.set_xlabel(METRICS["time_ms"].axis_label())
    ax.set_ylabel(METRICS[metric].axis_label())
    handles, labels = pal.legend_handles(rows, [b for b, _ in exact_names])
    from matplotlib.lines import Line2D

    for b, _, _ in points:
        colour, _ = baseline_style(b)
        handles.append(Line2D([], [], color=colour, marker="*", ls="--", markersize=9))
        labels.append(f"{b} (baseline)")
    handles.append(Line2D([], [], color="black", lw=1.1))
    labels.append("Pareto front")
    fig.legend(handles, labels, loc="outside right upper", title=pal.legend_title(rows))
    files = save(fig, name, opts)
    scales = {"log": "log", "linear": "linear"}
    caption = (f"{METRICS[metric].label} against median forward time ({scales[ax.get_xscale()]} x, "
               f"{scales[ax.get_yscale()]} y) for every estimator and feature count m "
               f"({describe_slice(fixed) or 'single slice'}; mean over {seeds_text(rows)}); marker size "
               "grows with m and thin lines join one estimator's m values. The black step is the Pareto "
               "front of the estimators: no other estimator point is both faster and more accurate. Down "
               "and left is better.")
    named = {b for b, _, _ in points}
    if "uniform" in named:
        caption += (" Star and dashed horizontal: the uniform baseline (every query gets the mean of the "
                    "values), its time and error; an estimator above that line is worse than knowing "
                    "nothing of q and k.")
    if "taylor2" in named:
        caption += (" Star and dashed horizontal in blue: the taylor2 baseline (Based's deterministic "
                    "Taylor-2 map, 1 + d + d(d+1)/2 features, biased: one run, no seeds).")
    if exact_names:
        errs = [e for _, e in exact_names if np.isfinite(e)]
        caption += (" Dashed verticals: the time of the exact-attention baselines ("
                    + ", ".join(b for b, _ in exact_names) + ")"
                    + (f", whose error (at most {max(errs):.1g}, float rounding) is below the axis" if errs
                       else "") + ".")
    caption += clipped
    return Figure(name, title, caption, files)
