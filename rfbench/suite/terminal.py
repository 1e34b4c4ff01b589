"""The table ``rfbench run`` prints at the end: per (data, L), the best estimators and the baselines."""

from __future__ import annotations

import math

from rfbench.results.schema import STATUSES


def format_summary(summary, *, top: int = 5, max_groups: int = 8) -> str:
    """A short ranked table: per (data, seq_len), the best estimator cells by kernel_rel_mse
    (by out_rel_err where the kernel was not measured, or where a [fit] section held tokens out:
    the held-out output error is then the headline), with their time and the baselines' times."""
    lines = []
    counts = summary["status"].value_counts().to_dict()
    lines.append("cells: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES if counts.get(s)))
    est = summary[(summary["kind"] == "estimator") & (summary["n_ok"] > 0)]
    base = summary[(summary["kind"] == "baseline") & (summary["n_ok"] > 0)]
    groups = list(est.groupby(["data", "seq_len", "causal", "device"], sort=False))
    for (data, L, causal, device), g in groups[:max_groups]:
        held_out = "fit_len" in g and bool((g["fit_len"] > 0).any())
        by_kernel = g["kernel_rel_mse_mean"].notna().any() and not held_out
        metric = "kernel_rel_mse_mean" if by_kernel else "out_rel_err_mean"
        g = g.sort_values(metric, na_position="last").head(top)
        title = f"{data}  L={L}{' causal' if causal else ''}  {device}  (ranked by {metric[:-5]})"
        lines.append("")
        lines.append(title)
        lines.append(f"  {'estimator':<18}{'m':>6}{'kernel_rel_mse':>16}{'out_rel_err':>13}{'time_ms':>10}")
        for _, r in g.iterrows():
            lines.append(
                f"  {r['estimator']:<18}{r['num_features']:>6}{_fmt(r['kernel_rel_mse_mean']):>16}"
                f"{_fmt(r['out_rel_err_mean']):>13}{_fmt(r['time_ms_mean'], '.3g'):>10}"
            )
        b = base[
            (base["data"] == data)
            & (base["seq_len"] == L)
            & (base["causal"] == causal)
            & (base["device"] == device)
        ]
        if len(b):
            lines.append(
                "  baselines: "
                + ", ".join(
                    f"{r['estimator']} {_fmt(r['time_ms_mean'], '.3g')} ms"
                    + (
                        f" (out_rel_err {_fmt(r['out_rel_err_mean'], '.3g')})"
                        if r["estimator"] == "uniform"
                        else ""
                    )
                    for _, r in b.iterrows()
                )
            )
    if len(groups) > max_groups:
        lines.append(f"\n... {len(groups) - max_groups} more groups in summary.parquet")
    failed = summary[summary["status"].isin(["error", "oom"])]
    for _, r in failed.head(3).iterrows():
        lines.append(
            f"{r['status']}: {r['estimator']} m={r['num_features']} {r['data']} L={r['seq_len']}: "
            f"{r['message'][:120]}"
        )
    if len(failed) > 3:
        lines.append(f"... and {len(failed) - 3} more failed cells (see the message column)")
    return "\n".join(lines)


def _fmt(x, spec: str = ".3e") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
