"""A synthetic results folder in the runner's schema, for the report and compare tests.

``make_run`` writes results.parquet, summary.parquet and meta.json for a small grid whose
metrics follow known laws (kernel MSE = C_fm * f_wm / m, time linear in L*m, exact attention
quadratic in L) with seeded multiplicative noise, plus one cell of each failure status. The
tests below check that the report layer reads it back as written.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rfbench.errors import DataError
from rfbench.report import load_run
from rfbench.report.analysis import pick_slice

FEATURE_MAPS = {"posrf": 2.0, "hyprf": 1.2, "trigrf": 8.0}  # kernel rel. MSE constant C_fm
WEIGHTS = {"iid": 1.0, "orf": 0.7, "sorf": 0.75, "qmc": 0.6}  # variance factor vs i.i.d.
FEATURES = (16, 32, 64, 128)
SEQ_LENS = (128, 256, 512, 1024)
T975 = {dof: float(stats.t.ppf(0.975, dof)) for dof in range(1, 64)}  # 95% two-sided t quantiles
METRIC_NAMES = ("kernel_mse", "kernel_rel_mse", "attn_mse", "out_rel_err", "time_ms", "time_ms_p20",
                "time_ms_p80", "n_rep", "tokens_per_s", "peak_mem_bytes", "draw_ms", "fit_ms")


def cell_hash(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _row(suite, kind, est, fm, wm, data, L, m, seed_index, **metrics):
    key = dict(suite=suite, kind=kind, estimator=est, feature_map=fm, weight_matrix=wm, data=data,
               seq_len=L, num_features=m, feature_dim=m * (2 if fm in ("hyprf", "trigrf") else 1),
               dim=32, batch=1, heads=2, causal=False, dtype="float32", device="cpu")
    cell = cell_hash({k: v for k, v in key.items() if k != "suite"})
    row = dict(key, cell=cell, seed=int(cell[:6], 16) + seed_index, seed_index=seed_index,
               status="ok", message="")
    row.update({name: math.nan for name in METRIC_NAMES})
    row.update(metrics)
    return row


def make_results(
    *,
    suite: str = "synthetic",
    n_seeds: int = 4,
    time_factor: float = 1.0,
    error_factor: float = 1.0,
    time_noise: float = 0.03,
    time_seed: int = 0,
    error_seed: int = 0,
    data_sources: tuple[str, ...] = ("isotropic", "anisotropic(cond=100)"),
    feature_maps: dict[str, float] | None = None,
    weights: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Rows of a synthetic run. Time noise and error noise come from separate seeded streams,
    so two runs with the same ``error_seed`` have identical errors (as two runs of the same code
    with the same cell seeds do) while ``time_seed`` changes only the timing jitter.
    ``feature_maps`` / ``weights`` pick a smaller grid (name -> error constant)."""
    rt, re_ = np.random.default_rng(time_seed), np.random.default_rng(error_seed)
    rows = []
    for data in data_sources:
        data_factor = 1.0 if data == "isotropic" else 3.0
        # The second data source is only measured at one length, like a real run's side study.
        seq_lens = SEQ_LENS if data == "isotropic" else (256,)
        for L in seq_lens:
            for fm, c_fm in (feature_maps or FEATURE_MAPS).items():
                for wm, f_wm in (weights or WEIGHTS).items():
                    for m in FEATURES:
                        for s in range(n_seeds):
                            est = f"{fm}-{wm}"
                            if est == "trigrf-sorf" and m == 16:
                                rows.append(_row(suite, "estimator", est, fm, wm, data, L, m, s,
                                                 status="error", message="RuntimeError: NaN in features"))
                                continue
                            if est == "hyprf-qmc":
                                rows.append(_row(suite, "estimator", est, fm, wm, data, L, m, s,
                                                 status="skipped", message="qmc: needs m >= d for this map"))
                                continue
                            rel = data_factor * c_fm * f_wm / m * math.exp(re_.normal(0, 0.25)) * error_factor
                            t = (0.05 + 2e-5 * L * m) * (1.6 if fm != "posrf" else 1.0)
                            t *= time_factor * math.exp(rt.normal(0, time_noise))
                            rows.append(_row(
                                suite, "estimator", est, fm, wm, data, L, m, s,
                                kernel_mse=rel * 4.0, kernel_rel_mse=rel, attn_mse=rel * 1e-4,
                                out_rel_err=0.5 * math.sqrt(rel), time_ms=t, time_ms_p20=0.97 * t,
                                time_ms_p80=1.04 * t, n_rep=20, tokens_per_s=2 * L / (t / 1e3),
                                peak_mem_bytes=float(12 * L * m + 2**20), draw_ms=0.1, fit_ms=0.0))
            for base, cost in (("exact", 1.0), ("sdpa", 0.4)):
                for s in range(n_seeds):
                    if base == "exact" and L == 1024:
                        rows.append(_row(suite, "baseline", base, "", "", data, L, 0, s, status="oom",
                                         message="out of memory: needs 8.0 GiB, 4.0 GiB free"))
                        continue
                    t = cost * (0.02 + 4e-6 * L * L) * time_factor * math.exp(rt.normal(0, time_noise))
                    rows.append(_row(
                        suite, "baseline", base, "", "", data, L, 0, s,
                        kernel_mse=0.0, kernel_rel_mse=0.0, attn_mse=0.0,
                        out_rel_err=0.0 if base == "exact" else 1e-7, time_ms=t, time_ms_p20=0.97 * t,
                        time_ms_p80=1.04 * t, n_rep=20, tokens_per_s=2 * L / (t / 1e3),
                        peak_mem_bytes=float(8 * L * L + 2**20)))
    return pd.DataFrame(rows)


def summarise(results: pd.DataFrame, n_seeds: int) -> pd.DataFrame:
    """The summary table as the schema defines it (t-interval over ok seeds, cross-seed bias/var)."""
    keys = ["suite", "cell", "kind", "estimator", "feature_map", "weight_matrix", "data", "seq_len",
            "num_features", "feature_dim", "dim", "batch", "heads", "causal", "dtype", "device"]
    rows = []
    for _, grp in results.groupby("cell", sort=False):
        ok = grp[grp.status == "ok"]
        row = {k: grp[k].iloc[0] for k in keys}
        row.update(n_seeds=len(grp), n_ok=len(ok), status=grp.status.iloc[0], message=grp.message.iloc[0])
        for name in METRIC_NAMES:
            v = ok[name].to_numpy(float)
            n = len(v)
            mean = v.mean() if n else math.nan
            std = v.std(ddof=1) if n > 1 else math.nan
            half = T975[n - 1] * std / math.sqrt(n) if n > 1 else math.nan
            row.update({f"{name}_mean": mean, f"{name}_std": std, f"{name}_ci_low": mean - half,
                        f"{name}_ci_high": mean + half})
        if row["kind"] == "estimator" and len(ok):
            var = row["kernel_rel_mse_mean"]
            biased = row["weight_matrix"] == "qmc"  # a biased estimator: bias^2 above the floor
            row["mc_variance_rel"] = var
            row["bias2_rel"] = var / n_seeds * (1.05 if not biased else 6.0)
            row["mc_variance"], row["bias2"] = 4 * row["mc_variance_rel"], 4 * row["bias2_rel"]
        rows.append(row)
    return pd.DataFrame(rows)


def make_run(path: Path, *, n_seeds: int = 4, summary: bool = True, **kwargs) -> Path:
    """Write a synthetic results folder at ``path`` and return it."""
    path.mkdir(parents=True, exist_ok=True)
    results = make_results(n_seeds=n_seeds, **kwargs)
    results.to_parquet(path / "results.parquet", index=False)
    if summary:
        summarise(results, n_seeds).to_parquet(path / "summary.parquet", index=False)
    meta = {
        "suite": {"name": kwargs.get("suite", "synthetic"), "toml": "[suite]\nname = 'synthetic'\n",
                  "parsed": {"name": kwargs.get("suite", "synthetic")}},
        "rfbench_version": "0.1.0", "git": {"revision": "abc1234", "dirty": True},
        "versions": {"python": "3.11.7", "torch": "2.13.0", "numpy": "2.4"},
        "device": "cpu", "cpu": "Synthetic CPU @ 2 cores", "host": "testhost",
        "start_time": "2025-01-01T10:00:00+00:00", "end_time": "2025-01-01T10:03:20+00:00",
        "command": "rfbench run synthetic.toml", "peak_memory": "CPU: peak RSS growth of the forward",
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


SMALL = dict(data_sources=("isotropic",), feature_maps={"posrf": 2.0, "hyprf": 1.2},
             weights={"iid": 1.0, "qmc": 0.6})  # 4 estimators (hyprf-qmc skipped), one data source


# ------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("synthetic") / "run")


def test_load_run_reads_the_three_files(folder):
    run = load_run(folder)
    assert len(run.results) == len(make_results())
    assert run.summary["cell"].is_unique
    assert set(run.results["cell"]) == set(run.summary["cell"])
    assert run.suite == "synthetic" and run.meta.machine.host == "testhost" and run.notes == []


def test_load_run_recomputes_a_missing_summary(folder, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.parquet").write_bytes((folder / "results.parquet").read_bytes())
    run = load_run(tmp_path / "run")
    want = summarise(run.results, 4).set_index("cell")
    got = run.summary.set_index("cell").loc[want.index]
    ok = want["status"] == "ok"
    for col in ("kernel_rel_mse_mean", "time_ms_ci_low", "time_ms_ci_high"):
        np.testing.assert_allclose(got.loc[ok, col], want.loc[ok, col], rtol=1e-12)
    assert (got.loc[~ok, "status"] == want.loc[~ok, "status"]).all()
    assert any("summary.parquet is missing" in n for n in run.notes)


@pytest.mark.parametrize("breakage", ["missing", "empty_dir", "garbage", "columns"])
def test_load_run_rejects_broken_folders(tmp_path, breakage):
    path = tmp_path / "run"
    if breakage != "missing":
        path.mkdir()
    if breakage == "garbage":
        (path / "results.parquet").write_bytes(b"not a parquet file")
    if breakage == "columns":
        pd.DataFrame({"x": [1]}).to_parquet(path / "results.parquet")
    with pytest.raises(DataError) as info:
        load_run(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_pick_slice_prefers_the_most_complete_slice(folder):
    run = load_run(folder)
    est = run.summary[run.summary.kind == "estimator"]
    # Sweeping m, every (data, L) slice covers all 4 m x 12 estimators: the tie goes to the
    # values the run measures most: isotropic data, and L=256 (the one length both sources share).
    rows, fixed = pick_slice(est, ("num_features", "feature_map", "weight_matrix"))
    assert fixed["data"] == "isotropic" and rows["num_features"].nunique() == len(FEATURES)
    assert fixed["seq_len"] == 256 and set(rows["seq_len"]) == {256}
    rows, fixed = pick_slice(est, ("feature_map", "weight_matrix"), prefer={"num_features": 32})
    assert set(rows["num_features"]) == {32} and fixed["num_features"] == 32
    assert rows[["seq_len", "data"]].drop_duplicates().shape[0] == 1
