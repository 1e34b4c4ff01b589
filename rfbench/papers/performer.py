"""Performer (Choromanski et al., Rethinking Attention with Performers, ICLR 2021, section 4.1, Fig. 4).

Setting (suites/papers/performer.toml): L = 4,096, d = 16, q, k, v with N(0, 1) entries and the
attention scale 1/sqrt(d), m = 16 ... 192 in steps of 16, 15 seeds. The paper plots the MSE of the
attention output; out_rel_err squared is that MSE over a constant of the data (the exact output's
mean square, the same for every estimator), so its ratios are ratios of output MSEs.
"""

from __future__ import annotations

from rfbench.papers.claims import Comparison

TITLE = "Performer (ICLR 2021): claims versus measured"
SOURCE = "Choromanski et al., ICLR 2021, sec. 4.1, Fig. 4"
_MSE = dict(metric="out_rel_err", square=True, by=("num_features",))

CLAIMS = [
    Comparison("orthogonal rows below i.i.d. (positive features)", SOURCE,
               a={"estimator": "posrf-orf"}, b={"estimator": "posrf-iid"},
               label="output MSE posrf-orf / posrf-iid, geo. mean over m", **_MSE),
    Comparison("orthogonal rows below i.i.d. (trigonometric features)", SOURCE,
               a={"estimator": "trigrf-orf"}, b={"estimator": "trigrf-iid"},
               label="output MSE trigrf-orf / trigrf-iid, geo. mean over m", **_MSE),
    Comparison("positive features below trigonometric (i.i.d. rows)", SOURCE,
               a={"estimator": "posrf-iid"}, b={"estimator": "trigrf-iid"},
               label="output MSE posrf-iid / trigrf-iid, geo. mean over m", **_MSE),
    Comparison("positive features below trigonometric (orthogonal rows)", SOURCE,
               a={"estimator": "posrf-orf"}, b={"estimator": "trigrf-orf"},
               label="output MSE posrf-orf / trigrf-orf, geo. mean over m", **_MSE),
]


def notes(results) -> list[str]:
    """The setting as run (L, d, m range, seeds), so the table says what it measured."""
    ok = results[(results["status"] == "ok") & (results["kind"] == "estimator")]
    if ok.empty:
        return []
    ms = sorted(ok["num_features"].unique())
    seeds = int(ok.groupby("cell")["seed"].nunique().min())
    return [f"Measured at L = {_ints(ok, 'seq_len')}, d = {_ints(ok, 'dim')}, "
            f"m = {ms[0]}..{ms[-1]} ({len(ms)} values), {seeds} seeds per cell; output MSE = "
            "out_rel_err^2 (up to the data's constant)."]


def _ints(frame, column: str) -> str:
    return "/".join(str(int(v)) for v in sorted(frame[column].unique()))
