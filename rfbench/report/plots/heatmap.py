"""The Spectraformer grid: the error of every feature map x weight matrix pair at one slice."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfbench.report import METRICS, Run
from rfbench.report.analysis import (
    describe_slice,
    error_grid,
    estimators,
    has_metric,
    heavy_tail_note,
    ok_rows,
    pick_slice,
    seeds_text,
    spans_decades,
)
from rfbench.report.plots.style import Figure, Options, Palette, Skip, new_figure, save, styled


@styled
def error_heatmap(run: Run, opts: Options, name: str = "error_heatmap") -> Figure | Skip:
    """Feature map x weight matrix grid of the error at one m (the Spectraformer grid)."""
    title = "Error grid: feature map × weight matrix"
    est = estimators(run.summary)
    metric = next((m for m in ("kernel_rel_mse", "out_rel_err") if has_metric(est, m)), None)
    if metric is None:
        return Skip(name, title, "the run has no kernel or output error values")
    rows, fixed = pick_slice(est, ("feature_map", "weight_matrix"), opts.prefer)
    pal = Palette(run.summary)
    fms, wms = pal.feature_maps(rows), pal.weight_matrices(rows)
    if len(fms) * len(wms) < 2:
        return Skip(name, title, "the run has a single feature map and weight matrix")
    values, notes = error_grid(rows, metric, fms, wms)
    import seaborn as sns
    from matplotlib.colors import LogNorm, Normalize

    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size == 0:
        return Skip(name, title, f"no estimator has a finite {metric} in the chosen slice")
    norm = (LogNorm if spans_decades(finite) else Normalize)(finite.min(), finite.max())
    fig = new_figure(0.75 * len(wms) + 2.6, 0.5 * len(fms) + 1.6)
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
    files = save(fig, name, opts)
    seeds = seeds_text(ok_rows(rows, metric))
    caption = (f"Mean {METRICS[metric].label} of every feature map × weight matrix pair in the run"
               f" ({describe_slice(fixed) or 'single slice'}; mean over {seeds}). "
               "Lighter is better; grey cells failed (their status is written in) or were not run (—).")
    caption += heavy_tail_note(ok_rows(rows, metric), run.results, metric, by_data=False)
    return Figure(name, title, caption, files)
