"""Figures of a results folder: seaborn style on matplotlib's object API (Agg canvas, no pyplot).

Every figure reads the per-cell summary (mean and 95% t-interval over seeds) and shows one
slice of the run when the run sweeps more axes than the figure has (``analysis.pick_slice``; the
caption names the slice). Colours are fixed per weight matrix and markers per feature map, in
registry order, so the same estimator looks the same in every figure and every report. The
numbers a figure shows beyond the summary's (the C/m law, the Pareto front, floors) come from
``rfbench.report.analysis``; the modules here only draw.

    figures = render_figures(run, Options(out_dir=Path("out/figures")))   # [Figure | Skip, ...]

A figure whose data the run lacks is returned as a ``Skip`` with the reason, for the report.
Matplotlib and seaborn are imported only when a figure is drawn.

    style.py          Figure, Skip, Options, Palette, rc, canvas and axis helpers
    features.py       error vs m (kernel and output error)
    seqlen.py         error and time vs L, memory vs L (one shared panel)
    heatmap.py        feature map x weight matrix grid
    pareto.py         error vs time with the Pareto front
    bias_variance.py  cross-seed bias² and variance
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from rfbench.report import Run
from rfbench.report.plots.bias_variance import bias_variance
from rfbench.report.plots.features import error_vs_features
from rfbench.report.plots.heatmap import error_heatmap
from rfbench.report.plots.pareto import pareto
from rfbench.report.plots.seqlen import error_time_vs_seqlen, memory_vs_seqlen
from rfbench.report.plots.style import Figure, Options, Palette, Skip

__all__ = ["FIGURES", "Figure", "Options", "Palette", "Skip", "bias_variance", "error_heatmap",
           "error_time_vs_seqlen", "error_vs_features", "memory_vs_seqlen", "pareto", "render_figures"]

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
    """Every figure the run has data for (saved under ``opts.out_dir``), and a Skip for the rest.

    A run with both causal and non-causal cells gets each figure once per causal value (file
    names end in ``_causal`` / ``_noncausal``, titles say which), so neither is hidden.
    """
    s = run.summary
    values = sorted(s["causal"].dropna().unique()) if "causal" in s and len(s) else []
    if len(values) < 2:
        return [make(run, opts) for _, make in FIGURES]
    out = []
    for value in values:
        part = Run(path=run.path, results=run.results[run.results["causal"] == value]
                   if "causal" in run.results else run.results,
                   summary=s[s["causal"] == value], meta=run.meta, notes=run.notes)
        word = "causal" if bool(value) else "non-causal"
        tagged = replace(opts, tag="_" + word.replace("-", ""))
        for _, make in FIGURES:
            fig = make(part, tagged)
            fig = replace(fig, name=fig.name + tagged.tag, title=f"{fig.title} ({word})")
            if isinstance(fig, Figure):
                fig = replace(fig, caption=f"{word.capitalize()} attention only. {fig.caption}")
            out.append(fig)
    return out
