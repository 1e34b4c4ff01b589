"""The cross-seed decomposition of the kernel-estimate error: bias² and Monte Carlo variance."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rfbench.report import Run
from rfbench.report.analysis import bias2_noise_floor, describe_slice, estimators, pick_slice
from rfbench.report.plots.style import Figure, Options, Skip, new_figure, save, styled, value_axis


@styled
def bias_variance(run: Run, opts: Options, name: str = "bias_variance") -> Figure | Skip:
    """Relative bias^2 and Monte Carlo variance bars per estimator at one (m, L)."""
    title = "Bias² vs variance per estimator"
    est = estimators(run.summary)
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
    fig = new_figure(6.6, 0.26 * len(rows) + 1.5)
    ax = fig.subplots()
    y = np.arange(len(rows))
    rel = bcol.endswith("_rel")
    ax.barh(y - 0.2, rows[bcol], height=0.38, color="#dd8452", label="bias²" + (" / K²" if rel else ""))
    ax.barh(y + 0.2, rows[vcol], height=0.38, color="#4c72b0", label="MC variance" + (" / K²" if rel else ""))
    floor = bias2_noise_floor(rows[vcol], n)
    ax.scatter(floor, y - 0.2, marker="|", s=110, color="black", zorder=4, label="variance / n seeds")
    ax.set_yticks(y, rows["estimator"])
    ax.invert_yaxis()
    values = pd.concat([rows[vcol], rows[bcol]])
    value_axis(ax, values[values > 0], "x")
    ax.set_xlabel(("relative " if rel else "") + "bias² and variance of the kernel estimate"
                  + (" (÷ mean K²)" if rel else ""))
    fig.legend(loc="outside right upper")
    files = save(fig, name, opts)
    caption = ("Cross-seed decomposition of the kernel-estimate error "
               f"({describe_slice(fixed) or 'single slice'}): variance over seeds and squared bias of "
               "the seed-averaged estimate, averaged over all query-key pairs. The bias² is measured "
               "from a mean over n seeds, so an unbiased estimator still shows about variance/n (the "
               "black tick); only a bias² bar well past its tick indicates real bias. Shorter is better.")
    return Figure(name, title, caption, files)
