"""Error against the number of random features m: one panel per feature map (and data source),
one line per weight matrix, with the i.i.d. reference and the uniform-baseline floor."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfbench.report import METRICS, Run
from rfbench.report.analysis import (
    describe_slice,
    estimators,
    failed_note,
    has_metric,
    heavy_tail_note,
    iid_overlay,
    in_slice,
    ok_rows,
    pick_slice,
    seeds_text,
    series,
    spans_decades,
    uniform_floor,
    value_columns,
)
from rfbench.report.plots.style import (
    PANEL_H,
    PANEL_W,
    Figure,
    Options,
    Palette,
    Skip,
    band,
    baseline_style,
    log_labels,
    new_figure,
    save,
    styled,
    sweep_axis,
)


def _panel_grid(datas: list, fms: list[str]) -> tuple[list[tuple], bool]:
    """(row, column, data source, feature map) of each panel, and whether data sources are columns.

    One data source per row and a feature map per column, transposed when there are more feature
    maps than data sources (a tall figure reads better in a page); one data source: feature maps
    wrapped four to a row.
    """
    if len(datas) == 1:
        ncols = min(len(fms), 4)
        return [(i // ncols, i % ncols, datas[0], fm) for i, fm in enumerate(fms)], False
    if len(fms) > len(datas):
        return [(i, j, d, fm) for i, fm in enumerate(fms) for j, d in enumerate(datas)], True
    return [(i, j, d, fm) for i, d in enumerate(datas) for j, fm in enumerate(fms)], False


@styled
def error_vs_features(run: Run, opts: Options, metric: str, name: str) -> Figure | Skip:
    """Error vs m, one panel per feature map (rows: data sources), one line per weight matrix."""
    label = METRICS[metric].label
    title = f"{label[0].upper()}{label[1:]} vs number of features"
    est = estimators(run.summary)
    if est.empty or not has_metric(est, metric):
        return Skip(name, title, f"the run has no {metric} values for estimators")
    ok = ok_rows(est, metric)
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
    cells, data_on_cols = _panel_grid(datas, fms)
    nrows, ncols = max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1
    # Each panel has its own y range: one feature map's error (trigrf's, say) can sit many
    # decades above the others', and a shared axis would flatten them.
    fig = new_figure(PANEL_W * ncols + 1.6, PANEL_H * nrows)
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=False, squeeze=False)
    overlays: dict[str, str] = {}  # label -> line style: the closed form and the fitted C/m differ
    floors = {
        d: uniform_floor(run.summary, metric, fixed if d is None else {**fixed, "data": d})
        for d, (_, fixed) in zip(datas, slices)
    }
    # One scale for the figure (log when its values span a decade), limits per panel.
    log_y = spans_decades(list(rows[value_columns(rows, metric)[0]])
                          + [v for v in floors.values() if v is not None])
    for r, c, data, fm in cells:
        ax = grid[r, c]
        panel = rows[(rows["feature_map"] == fm) & ((rows["data"] == data) if data is not None else True)]
        values = list(panel[value_columns(panel, metric)[0]])
        if floors.get(data) is not None:
            values.append(floors[data])
        for wm in pal.weight_matrices(panel):
            xs, mean, lo, hi = series(panel[panel["weight_matrix"] == wm], metric, "num_features")
            ax.plot(xs, mean, color=pal.line_colour(fm, wm), marker=pal.marker[fm], label=wm)
            band(ax, xs, mean, lo, hi, pal.line_colour(fm, wm), log_y)
        if metric == "kernel_rel_mse" and (overlay := iid_overlay(panel, metric)) is not None:
            style = overlays.setdefault(overlay.label, ":" if overlay.label.startswith("closed") else "-.")
            ax.plot(overlay.x, overlay.y, color="black", ls=style, lw=1.4, zorder=5)
        if floors.get(data) is not None:
            colour, _ = baseline_style("uniform")
            ax.axhline(floors[data], color=colour, ls="--", lw=1.3)
        ax.set_title(fm if len(datas) == 1 or data is None else f"{fm} · {data}")
        sweep_axis(ax, rows["num_features"])
        if log_y:
            ax.set_yscale("log")
            log_labels(ax, values)
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
    # Panel titles name the feature map, so the legend lists colours (and baselines) only.
    handles, labels = pal.legend_handles(rows, ["uniform"] if has_floor else [], markers=False)
    if overlays:
        from matplotlib.lines import Line2D

        for label, style in overlays.items():
            handles.append(Line2D([], [], color="black", ls=style, lw=1.4))
            labels.append(label)
    fig.legend(handles, labels, loc="outside right upper", title=pal.legend_title(rows, markers=False))
    files = save(fig, name, opts)
    where = [describe_slice({k: v for k, v in fixed.items() if k != "data"}) for _, fixed in slices]
    if len(set(where)) == 1:
        slice_txt = where[0]
    else:
        slice_txt = "; ".join(f"{d}: {w}" for d, w in zip(datas, where))
    y_txt = "log y" if log_y else "linear y"
    x_txt = "log₂ x" if grid[0, 0].get_xscale() == "log" else "linear x"
    caption = (f"{METRICS[metric].label} against the number of random vectors m ({x_txt}, {y_txt}; each "
               f"panel has its own y range), mean over {seeds_text(rows)} with 95% t-interval bands"
               + (f" ({slice_txt})" if slice_txt else "") + ". One panel per feature map"
               + (", one colour per weight matrix" if not pal.by_feature_map else "") + ". Lower is better.")
    if overlays:
        kinds = {":": "dotted", "-.": "dash-dotted"}
        named = "; ".join(f"{kinds[style]}: {label}" for label, style in overlays.items())
        caption += (" Black " + named + " (in the panels where it is available); i.i.d. weights give "
                    "an unbiased mean of m i.i.d. "
                    "terms, so their expected MSE is Var₁/m (an expectation: the mean over a few seeds "
                    "can fall far below it), and a weight matrix whose expected MSE lies below the line "
                    "beats i.i.d. sampling.")
    if metric in ("kernel_rel_mse", "kernel_mse"):
        caption += heavy_tail_note(rows, run.results, metric, by_data=len(datas) > 1)
    if has_floor:
        caption += (" Dashed: the uniform baseline (every query gets the mean of the values it sees), "
                    "the error of an estimator that knows nothing of q and k.")
    if len(datas) > 1:
        caption += f" {'Columns' if data_on_cols else 'Rows'}: data sources."
    shown = [in_slice(est if d is None else est[est["data"] == d], fixed)
             for d, (_, fixed) in zip(datas, slices)]
    caption += failed_note(pd.concat(shown))
    return Figure(name, title, caption, files)
