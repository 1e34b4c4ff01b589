"""Error against time for every (estimator, m) at one L, with the non-dominated front."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfbench.report import METRICS, Run
from rfbench.report.analysis import (
    baselines_for,
    describe_slice,
    estimators,
    has_metric,
    ok_rows,
    pareto_front,
    pick_slice,
    value_columns,
)
from rfbench.report.plots.style import (
    Figure,
    Options,
    Palette,
    Skip,
    baseline_style,
    new_figure,
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
        ax.plot(grp[tcol], grp[ecol], color=pal.colour[wm], lw=0.8, alpha=0.45, zorder=2)
        sizes = 18 + 14 * np.log2(grp["num_features"].to_numpy(float) / m_min)
        ax.scatter(grp[tcol], grp[ecol], s=sizes, color=pal.colour[wm], marker=pal.marker[fm],
                   edgecolor="white", linewidth=0.5, zorder=3)
    front = pareto_front(rows, tcol, ecol)
    ax.step(front[tcol], front[ecol], where="post", color="black", lw=1.1, zorder=4)
    for i, (_, r) in enumerate(front.head(8).iterrows()):
        ax.annotate(f"{r['estimator']} m={int(r['num_features'])}", (r[tcol], r[ecol]), fontsize=6.5,
                    xytext=(5, 5 if i % 2 == 0 else -11), textcoords="offset points", zorder=6)
    base = ok_rows(baselines_for(run.summary, fixed), "time_ms")
    base_names = []
    for b, grp in base.groupby("estimator", sort=True):
        if fixed.get("seq_len") is None and grp["seq_len"].nunique() > 1:
            continue
        colour, _ = baseline_style(b)
        ax.axvline(float(grp[value_columns(grp, "time_ms")[0]].iloc[0]), color=colour, ls="--", lw=1.1)
        base_names.append(b)
    value_axis(ax, pd.concat([rows[tcol], base[value_columns(base, "time_ms")[0]]]), "x")
    value_axis(ax, rows[ecol], "y")
    ax.set_xlabel(METRICS["time_ms"].axis_label())
    ax.set_ylabel(METRICS[metric].axis_label())
    handles, labels = pal.legend_handles(rows, base_names)
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", lw=1.1))
    labels.append("Pareto front")
    fig.legend(handles, labels, loc="outside right upper")
    files = save(fig, name, opts)
    caption = (f"{METRICS[metric].label} against forward time for every estimator and feature count m "
               f"({describe_slice(fixed) or 'single slice'}); marker size grows with m and thin lines "
               "join one estimator's m values. The black step is the Pareto front: no other point is both "
               "faster and more accurate. Down and left is better. Dashed verticals: exact baselines' "
               "time (their error is zero).")
    return Figure(name, title, caption, files)
