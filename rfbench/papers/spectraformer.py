"""The Spectraformer grid (Nguyen et al., Spectraformer: a unified random feature framework for
transformer, 2024, sec. 3-5) at its LRA setting: d = 32, m = 128, L = 1K, 2K, 4K.

Spectraformer's results are LRA accuracies, time and memory after training; rfbench measures the
grid untrained (suites/papers/spectraformer.toml). The claims checked are the premises the grid
rests on, each from the paper that made it: orthogonal and quasi-Monte Carlo weight matrices lower
the kernel error of i.i.d. ones (Yu et al. 2016; Choromanski et al. 2021), OPRF lowers PosRF's
(FAVOR++), and random-feature attention is cheaper than exact attention at these lengths (the
efficiency claim behind every linear-attention row of Spectraformer's tables).
"""

from __future__ import annotations

from rfbench.papers.claims import Comparison

TITLE = "Spectraformer grid (d = 32, m = 128, L = 1K-4K): claims versus measured"
SF = "Spectraformer (Nguyen et al. 2024), sec. 3"
EFF = f"{SF}, sec. 5 (efficiency)"
_K = dict(metric="kernel_rel_mse", by=("feature_map", "seq_len"))

CLAIMS = [
    Comparison("ORF below iid (kernel error), every component function", f"{SF}; Yu et al. 2016",
               a={"weight_matrix": "orf"}, b={"weight_matrix": "iid"},
               label="kernel rel. MSE orf / iid, geo. mean over (map, L)", **_K),
    Comparison("QMC below iid (kernel error), every component function", f"{SF}; Choromanski et al. 2021",
               a={"weight_matrix": "qmc"}, b={"weight_matrix": "iid"},
               label="kernel rel. MSE qmc / iid, geo. mean over (map, L)", **_K),
    Comparison("SORF below iid (kernel error), every component function", f"{SF}; Yu et al. 2016",
               a={"weight_matrix": "sorf"}, b={"weight_matrix": "iid"},
               label="kernel rel. MSE sorf / iid, geo. mean over (map, L)", **_K),
    Comparison("FastFood below iid (kernel error), every component function", f"{SF}; Le et al. 2013",
               a={"weight_matrix": "fastfood"}, b={"weight_matrix": "iid"},
               label="kernel rel. MSE fastfood / iid, geo. mean over (map, L)", **_K),
    Comparison("OPRF below PosRF (kernel error), every weight matrix", f"{SF}; Likhosherstov et al. 2022",
               a={"feature_map": "oprf"}, b={"feature_map": "posrf"}, metric="kernel_rel_mse",
               by=("weight_matrix", "seq_len"),
               label="kernel rel. MSE oprf / posrf, geo. mean over (weights, L)"),
    Comparison("random-feature attention faster than exact at L = 4K (posrf-iid)", EFF,
               a={"estimator": "posrf-iid"}, b={"estimator": "exact"}, metric="time_ms", by=("seq_len",),
               where={"seq_len": 4096}, label="forward time posrf-iid / exact, L = 4096"),
    Comparison("random-feature attention faster than exact at L = 4K (oprf-fastfood)", EFF,
               a={"estimator": "oprf-fastfood"}, b={"estimator": "exact"}, metric="time_ms", by=("seq_len",),
               where={"seq_len": 4096}, label="forward time oprf-fastfood / exact, L = 4096"),
]


def notes(results) -> list[str]:
    ok = results[(results["status"] == "ok") & (results["kind"] == "estimator")]
    if ok.empty:
        return []
    seeds = int(ok.groupby("cell")["seed"].nunique().min())
    return [f"{ok['estimator'].nunique()} estimators, L = "
            f"{'/'.join(str(int(v)) for v in sorted(ok['seq_len'].unique()))}, {seeds} seeds per cell, every "
            "seed timed; exact attention is one timed run per L (taken as fixed in the time ratio). "
            "Times are of this machine's CPU; the heatmap and Pareto plot follow in the figures."]
