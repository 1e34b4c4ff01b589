"""The table ``rfbench run`` prints at the end: per (data, L), the best estimators and the baselines."""

from __future__ import annotations

import math

from rfbench.results.schema import RANK_ORDER, STATUSES


def format_summary(summary, *, top: int = 5, max_groups: int = 8) -> str:
    """A short ranked table: per (data, seq_len), the best estimator cells by mean out_rel_err
    (else kernel_rel_mse, else time_ms: RANK_ORDER, the report's leaderboards' order), with their
    time and the baselines' times. The title of each group says which metric orders it."""
    lines = []
    counts = summary["status"].value_counts().to_dict()
    lines.append("cells: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES if counts.get(s)))
    if "message" in summary:  # why cells did not run, grouped (the report lists them too)
        for status in ("skipped", "error", "oom", "nonfinite"):
            why = summary.loc[summary["status"] == status, "message"].fillna("").astype(str)
            for reason, n in why.value_counts().head(5).items():
                lines.append(f"  {status} x{n}: {reason[:160] or '(no message)'}")
    est = summary[(summary["kind"] == "estimator") & (summary["n_ok"] > 0)]
    base = summary[(summary["kind"] == "baseline") & (summary["n_ok"] > 0)]
    groups = list(est.groupby(["data", "seq_len", "causal", "device"], sort=False))
    for (data, L, causal, device), g in groups[:max_groups]:
        metric = next((f"{m}_mean" for m in RANK_ORDER if g[f"{m}_mean"].notna().any()), None)
        g = g.sort_values(metric, na_position="last").head(top) if metric else g.head(top)
        order = f"ranked by mean {metric[:-5]}, as the report's leaderboards" if metric else "unranked"
        title = f"{data}  L={L}{' causal' if causal else ''}  {device}  ({order})"
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
