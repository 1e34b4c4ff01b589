"""Against the sequence length L at one m: error and time (with the exact-attention baselines),
and peak memory. Both figures draw their panels with ``seqlen_panel``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfbench.report import METRICS, Run, peak_memory_note
from rfbench.report.analysis import (
    APPROXIMATE_BASELINES,
    baselines_for,
    describe_slice,
    estimators,
    failed_note,
    has_metric,
    in_slice,
    ok_rows,
    pick_slice,
    seeds_text,
    series,
    spans_decades,
    value_columns,
)
from rfbench.report.plots.style import (
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


def seqlen_panel(ax, pal: Palette, lines: pd.DataFrame, base: pd.DataFrame, metric: str, seq_lens,
                 *, baseline_bands: bool = True, title: bool = True) -> None:
    """One panel of ``metric`` against L: a solid line per estimator, a dashed one per baseline.

    ``lines``/``base``: summary rows of the estimators and baselines (either may be empty);
    ``seq_lens``: the L values of the axis ticks. The y axis is logarithmic when the values of
    both span a decade.
    """
    col = value_columns(lines, metric)[0]
    log_y = spans_decades(pd.concat([lines[col], base[value_columns(base, metric)[0]]]))
    for _, grp in lines.groupby("estimator", sort=True):
        fm, wm = grp["feature_map"].iloc[0], grp["weight_matrix"].iloc[0]
        xs, mean, lo, hi = series(grp, metric, "seq_len")
        ax.plot(xs, mean, color=pal.line_colour(fm, wm), marker=pal.marker[fm], lw=1.3)
        band(ax, xs, mean, lo, hi, pal.line_colour(fm, wm), log_y)
    for b, grp in base.groupby("estimator", sort=True):
        colour, marker = baseline_style(b)
        xs, mean, lo, hi = series(grp, metric, "seq_len")
        ax.plot(xs, mean, color=colour, marker=marker, ls="--", lw=1.6)
        if baseline_bands:
            band(ax, xs, mean, lo, hi, colour, log_y)
    sweep_axis(ax, seq_lens)
    if log_y:
        ax.set_yscale("log")
        log_labels(ax, [v for line in ax.get_lines() for v in line.get_ydata()])
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel(METRICS[metric].axis_label())
    if title:
        ax.set_title(METRICS[metric].label)


@styled
def error_time_vs_seqlen(run: Run, opts: Options, name: str = "error_time_vs_seqlen") -> Figure | Skip:
    """Error and time against L at one m, with the exact-attention baselines on the time panel."""
    title = "Error and time vs sequence length"
    est = estimators(run.summary)
    err_metric = next((m for m in ("out_rel_err", "kernel_rel_mse") if has_metric(est, m)), None)
    have_time = has_metric(run.summary, "time_ms")
    if err_metric is None and not have_time:
        return Skip(name, title, "the run has neither error nor time measurements")
    ok = ok_rows(est, err_metric or "time_ms")
    if "seq_len" not in ok or ok["seq_len"].nunique() < 2:
        return Skip(name, title, "the run measures a single sequence length, so there is no curve over L")
    rows, fixed = pick_slice(ok, ("seq_len", "feature_map", "weight_matrix"), opts.prefer)
    base = ok_rows(baselines_for(run.summary, fixed), "time_ms") if have_time else rows.iloc[:0]
    panels = [m for m in (err_metric, "time_ms" if have_time else None) if m]
    pal = Palette(run.summary)
    fig = new_figure(4.2 * len(panels) + 1.6, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    approx = baselines_for(run.summary, fixed)  # uniform and taylor2: errors of their own
    approx = approx[approx["estimator"].isin(APPROXIMATE_BASELINES)]
    approx = ok_rows(approx, err_metric) if err_metric else approx.iloc[:0]
    for ax, metric in zip(axes, panels):
        if metric == err_metric:  # exact attention's error is float rounding: only uniform, taylor2 drawn
            seqlen_panel(ax, pal, rows, approx, metric, rows["seq_len"], baseline_bands=False)
        else:
            seqlen_panel(ax, pal, ok_rows(rows, "time_ms"), base, metric, rows["seq_len"])
    drawn = set(approx["estimator"])  # the approximate baselines on the error panel
    names = sorted(set(base["estimator"]) | drawn)
    handles, labels = pal.legend_handles(rows, names)
    fig.legend(handles, labels, loc="outside right upper", title=pal.legend_title(rows))
    files = save(fig, name, opts)
    slice_txt = describe_slice(fixed)
    caption = (f"Left: {METRICS[err_metric].label if err_metric else ''} against L; right: median forward "
               f"time per call (mean over {seeds_text(rows)}, 95% bands; log₂ x, y log where a panel "
               "spans a decade). "
               f"{pal.key_text().capitalize()}; dashed: baselines (exact, sdpa: exact attention)"
               + (f"; {slice_txt}" if slice_txt else "") + ". Lower is better in both panels. "
               "Random-feature attention is linear in L, exact attention quadratic: where the dashed "
               "lines cross the solid ones is the break-even length."
               + (" Dashed on the error panel: the uniform baseline (every query gets the mean of the "
                  "values), the error of knowing nothing of q and k." if "uniform" in drawn else "")
               + (" Dashed taylor2: Based's deterministic Taylor-2 map (biased, no seeds)."
                  if "taylor2" in drawn else ""))
    caption += failed_note(pd.concat([in_slice(est, fixed), baselines_for(run.summary, fixed)]))
    return Figure(name, title, caption, files)


@styled
def memory_vs_seqlen(run: Run, opts: Options, name: str = "memory_vs_seqlen") -> Figure | Skip:
    """Peak memory (MiB) against L at one m, with the baselines."""
    title = "Peak memory vs sequence length"
    if not has_metric(run.summary, "peak_mem_bytes"):
        return Skip(name, title, "the run recorded no peak memory")
    ok = ok_rows(estimators(run.summary), "peak_mem_bytes")
    if ok.empty or ok["seq_len"].nunique() < 2:
        return Skip(name, title, "the run measures memory at a single sequence length")
    rows, fixed = pick_slice(ok, ("seq_len", "feature_map", "weight_matrix"), opts.prefer)
    base = ok_rows(baselines_for(run.summary, fixed), "peak_mem_bytes")
    pal = Palette(run.summary)
    fig = new_figure(6.4, 3.6)
    seqlen_panel(fig.subplots(), pal, rows, base, "peak_mem_bytes", rows["seq_len"],
                 baseline_bands=False, title=False)
    handles, labels = pal.legend_handles(rows, sorted(base["estimator"].unique()))
    fig.legend(handles, labels, loc="outside right upper", title=pal.legend_title(rows))
    files = save(fig, name, opts)
    meaning = peak_memory_note(run)
    scale = "log-log" if fig.axes[0].get_yscale() == "log" else "log₂ x, linear y"
    caption = (f"Peak memory of one forward attention call against L ({scale}), mean over "
               f"{seeds_text(rows)}; {describe_slice(fixed) or 'all cells'}. Dashed: baselines (exact "
               "and sdpa hold an L×L score matrix, which grows quadratically). Lower is better."
               + (f" Measured as {meaning.rstrip('.')}." if meaning else ""))
    caption += failed_note(baselines_for(run.summary, fixed))
    return Figure(name, title, caption, files)
