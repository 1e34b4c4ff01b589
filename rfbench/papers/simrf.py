"""Simplex random features (Reid et al., Simplex Random Features, ICML 2023, Theorem 3.3 and Fig. 3).

Claim: for positive random features, SimRF+ <= SimRF <= ORF <= iid in the pointwise MSE of the
softmax kernel estimate. Setting (suites/papers/simrf.toml): PosRF, queries and keys on the unit
sphere, d = 16, 32, 64, m = 16, 32, 64, read per (d, m); kernel_mse per seed is the pointwise MSE
averaged over all 256 x 256 pairs of the cell.
"""

from __future__ import annotations

from rfbench.papers.claims import Comparison

TITLE = "SimRF (ICML 2023): claims versus measured"
SOURCE = "Reid et al., ICML 2023, Thm. 3.3, Fig. 3"
_MSE = dict(metric="kernel_mse", by=("dim", "num_features"))

CLAIMS = [
    Comparison("SimRF+ <= SimRF (PosRF kernel MSE)", SOURCE,
               a={"estimator": "posrf-simrfplus"}, b={"estimator": "posrf-simrf"},
               label="kernel MSE simrfplus / simrf, geo. mean over (d, m)", **_MSE),
    Comparison("SimRF <= ORF (PosRF kernel MSE)", SOURCE,
               a={"estimator": "posrf-simrf"}, b={"estimator": "posrf-orf"},
               label="kernel MSE simrf / orf, geo. mean over (d, m)", **_MSE),
    Comparison("ORF <= iid (PosRF kernel MSE)", SOURCE,
               a={"estimator": "posrf-orf"}, b={"estimator": "posrf-iid"},
               label="kernel MSE orf / iid, geo. mean over (d, m)", **_MSE),
]


def notes(results) -> list[str]:
    ok = results[(results["status"] == "ok") & (results["kind"] == "estimator")]
    if ok.empty:
        return []
    seeds = int(ok.groupby("cell")["seed"].nunique().min())
    return [f"Measured on {', '.join(sorted(ok['data'].unique()))}, m = "
            f"{'/'.join(str(int(m)) for m in sorted(ok['num_features'].unique()))}, {seeds} seeds per "
            "cell. '<=' is read as the paper's strict improvement: two estimators whose interval "
            "contains 1 are indistinguishable here (inconclusive), not a failure."]
