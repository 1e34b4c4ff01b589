"""DARKFormer's premise (Farzam et al., arXiv 2603.04127, 2026, sec. 3-4; paper-derived, no official
code): on anisotropic queries and keys, data-aware random features (the Sigma-aligned DARK, the
Sigma* importance-sampling proposal, learned DARK) have lower variance and attention error than
isotropic PosRF.

Suites: suites/papers/darkformer.toml (MiniLM-L6, bundled) and darkformer-llm.toml (SmolLM2-135M,
captured); each fits every estimator on the first 75% of a layer's tokens and measures on the
held-out 25%. Slices are (data source = layer, m). ``rfbench describe bundled`` / ``smollm2`` give
the eigen-spectra that say when the Sigma* proposal exists.
"""

from __future__ import annotations

from rfbench.papers.claims import Comparison

TITLE = "DARKFormer premise on real queries and keys: claims versus measured"
SOURCE = "Farzam et al. 2026 (DARKFormer), sec. 3-4"
_BY = ("data", "num_features")

CLAIMS = [
    Comparison("Sigma* importance sampling lowers PosRF's kernel error (real anisotropic q, k)", SOURCE,
               a={"estimator": "darkis-iid"}, b={"estimator": "posrf-iid"}, metric="kernel_rel_mse", by=_BY,
               label="held-out kernel rel. MSE darkis / posrf, geo. mean over (layer, m)"),
    Comparison("Sigma* importance sampling lowers PosRF's output error", SOURCE,
               a={"estimator": "darkis-iid"}, b={"estimator": "posrf-iid"}, metric="out_rel_err", by=_BY,
               label="held-out output rel. error darkis / posrf"),
    Comparison("DARK estimates its own kernel exp(q^T Sigma k) better than PosRF estimates softmax", SOURCE,
               a={"estimator": "dark-iid"}, b={"estimator": "posrf-iid"}, metric="target_kernel_rel_mse",
               metric_b="kernel_rel_mse", by=_BY,
               label="held-out kernel rel. MSE, dark (own kernel) / posrf (softmax)"),
    Comparison("Sigma-aligned DARK lowers the output error against softmax attention", SOURCE,
               a={"estimator": "dark-iid"}, b={"estimator": "posrf-iid"}, metric="out_rel_err", by=_BY,
               label="held-out output rel. error dark / posrf"),
    Comparison("learned DARK lowers the output error against softmax attention", SOURCE,
               a={"estimator": "darkl-iid"}, b={"estimator": "posrf-iid"}, metric="out_rel_err", by=_BY,
               label="held-out output rel. error darkl / posrf"),
    Comparison("learned DARK beats knowing nothing (uniform attention)", "rfbench baseline",
               a={"estimator": "darkl-iid"}, b={"estimator": "uniform"}, metric="out_rel_err", by=_BY,
               b_by=("data",),
               label="held-out output rel. error darkl / uniform"),
    Comparison("isotropic PosRF beats knowing nothing (uniform attention)", "rfbench baseline",
               a={"estimator": "posrf-iid"}, b={"estimator": "uniform"}, metric="out_rel_err", by=_BY,
               b_by=("data",),
               label="held-out output rel. error posrf / uniform"),
]


def notes(results) -> list[str]:
    ok = results[(results["status"] == "ok") & (results["kind"] == "estimator")]
    if ok.empty:
        return []
    seeds = int(ok.groupby("cell")["seed"].nunique().min())
    out = [f"Data: {', '.join(sorted(ok['data'].unique()))}; m = "
           f"{'/'.join(str(int(v)) for v in sorted(ok['num_features'].unique()))}; {seeds} seeds per "
           "cell; fitted on 75% of each layer's tokens, measured on the held-out 25% (all pairs)."]
    msg = results.get("message")
    if msg is not None:
        clipped = results[msg.fillna("").str.contains("clip", case=False)]
        if len(clipped):
            out.append(f"{clipped['cell'].nunique()} cells carry DARK's clipping warning (the Sigma* "
                       "proposal needs scaled eigenvalues below 1/2 and was clipped): see the rows' message.")
    out.append("The eigen-spectra that say when the Sigma* proposal exists: describe.txt beside this "
               "report (`rfbench describe bundled` / `rfbench describe smollm2`).")
    return out
