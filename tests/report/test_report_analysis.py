"""rfbench.report.analysis on hand-made rows: the numbers the figures draw, checked without drawing.

Each test builds a small summary frame whose answer is known by construction (a C/m law with a
known C, points whose Pareto front is known, a slice grid with one obvious best slice).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rfbench.report.analysis import (
    baselines_for,
    bias2_noise_floor,
    describe_slice,
    error_grid,
    failed_note,
    fit_inverse_m,
    has_metric,
    heavy_tail_note,
    iid_overlay,
    in_slice,
    ok_rows,
    pareto_front,
    pick_slice,
    seed_means_over_data,
    seeds_text,
    series,
    spans_decades,
    uniform_floor,
    unreliable_means,
    value_columns,
)

MS = (16, 32, 64, 128, 256)


def summary_rows(rows: list[dict]) -> pd.DataFrame:
    """A summary frame: defaults for the columns every reader expects."""
    base = dict(kind="estimator", status="ok", data="isotropic", seq_len=256, n_ok=4, n_seeds=4)
    return pd.DataFrame([{**base, **r} for r in rows])


def law_rows(c: float, wm: str = "iid", fm: str = "posrf", noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for m in MS:
        v = c / m * math.exp(noise * rng.standard_normal())
        out.append(dict(estimator=f"{fm}-{wm}", feature_map=fm, weight_matrix=wm, num_features=m,
                        kernel_rel_mse_mean=v, kernel_rel_mse_ci_low=0.9 * v, kernel_rel_mse_ci_high=1.1 * v))
    return out


# ------------------------------------------------------------------------------ the C/m law
def test_fit_inverse_m_returns_the_known_constant():
    m = np.array(MS, float)
    assert fit_inverse_m(m, 2.5 / m) == pytest.approx(2.5, rel=1e-12)
    # Multiplicative noise: log C is the mean of log(v m), so C is the geometric mean of v m.
    noise = np.exp([0.1, -0.1, 0.2, -0.2, 0.0])
    assert fit_inverse_m(m, 2.5 / m * noise) == pytest.approx(2.5, rel=1e-12)


def test_fit_inverse_m_ignores_unusable_points_and_needs_two():
    m = np.array([16.0, 32.0, 64.0, 0.0])
    assert fit_inverse_m(m, np.array([3 / 16, 0.0, 3 / 64, 5.0])) == pytest.approx(3.0)
    assert fit_inverse_m(np.array([16.0, 32.0]), np.array([0.1, -1.0])) is None
    assert fit_inverse_m(np.array([]), np.array([])) is None


def test_iid_overlay_fits_the_iid_rows_only_and_spans_the_panel_grid():
    panel = summary_rows(law_rows(2.0, "iid") + law_rows(0.5, "orf")[1:])
    overlay = iid_overlay(panel, "kernel_rel_mse")
    assert overlay.label == "i.i.d. law C/m (C fitted to iid)"
    np.testing.assert_allclose(overlay.x, MS)
    np.testing.assert_allclose(overlay.y, 2.0 / np.array(MS, float), rtol=1e-12)
    assert iid_overlay(summary_rows(law_rows(0.5, "orf")), "kernel_rel_mse") is None


def test_iid_overlay_prefers_the_stored_closed_form():
    rows = law_rows(2.0, "iid") + law_rows(0.5, "orf")
    panel = summary_rows(rows).assign(kernel_rel_mse_theory=lambda f: 3.0 / f["num_features"])
    overlay = iid_overlay(panel, "kernel_rel_mse")
    assert overlay.label == "closed form, i.i.d. (rfbench.theory)"
    np.testing.assert_allclose(overlay.y, 3.0 / np.array(MS, float))  # averaged over the two maps per m


# ------------------------------------------------------------------------------ Pareto front
def test_pareto_front_of_hand_made_points():
    #            a    b    c     d    e    f
    t = [1.0, 2.0, 3.0, 2.5, 4.0, 0.5]
    e = [0.5, 0.3, 0.35, 0.2, 0.2, 0.9]
    rows = pd.DataFrame({"t": t, "e": e}, index=list("abcdef"))
    front = pareto_front(rows, "t", "e")
    assert list(front.index) == ["f", "a", "b", "d"]  # c is beaten by d; e only ties d's error, later
    assert list(front["t"]) == sorted(front["t"]) and list(front["e"]) == sorted(front["e"], reverse=True)


def test_pareto_front_brute_force_on_random_points():
    rng = np.random.default_rng(3)
    rows = pd.DataFrame({"t": rng.random(60), "e": rng.random(60)})
    dominated = {i for i in rows.index for j in rows.index
                 if rows.t[j] <= rows.t[i] and rows.e[j] <= rows.e[i]
                 and (rows.t[j], rows.e[j]) != (rows.t[i], rows.e[i])}
    assert set(pareto_front(rows, "t", "e").index) == set(rows.index) - dominated


# ------------------------------------------------------------------------------ slices
def grid_rows() -> pd.DataFrame:
    """posrf-{iid,orf} at L in {256, 1024}; only L=1024 has both estimators at every m."""
    rows = []
    for L, wms in ((256, ("iid",)), (1024, ("iid", "orf"))):
        for wm in wms:
            rows += [dict(r, seq_len=L) for r in law_rows(2.0 if wm == "iid" else 1.0, wm)]
    rows.append(dict(kind="baseline", estimator="exact", feature_map="", weight_matrix="", num_features=0,
                     seq_len=1024, time_ms_mean=3.0, status="ok"))
    rows.append(dict(kind="baseline", estimator="uniform", feature_map="", weight_matrix="", num_features=0,
                     seq_len=1024, out_rel_err_mean=0.8, status="ok"))
    return summary_rows(rows)


def test_pick_slice_takes_the_most_complete_slice_and_names_it():
    frame = grid_rows()
    est = frame[frame["kind"] == "estimator"]
    rows, fixed = pick_slice(est, ("num_features", "feature_map", "weight_matrix"))
    assert fixed == {"seq_len": 1024} and len(rows) == 2 * len(MS)
    assert describe_slice(fixed) == "L=1024"
    rows, fixed = pick_slice(est, ("feature_map", "weight_matrix"), prefer={"num_features": 64})
    assert fixed == {"num_features": 64, "seq_len": 1024}
    assert describe_slice({"num_features": np.int64(64), "causal": np.bool_(True)}) == "m=64, causal=True"


def test_baselines_and_slice_membership_ignore_m():
    frame = grid_rows()
    base = baselines_for(frame, {"seq_len": 1024, "num_features": 64})
    assert list(base["estimator"]) == ["exact", "uniform"]
    assert baselines_for(frame, {"seq_len": 256}).empty
    assert len(in_slice(frame, {"seq_len": 1024, "num_features": 64}, ignore=("num_features",))) == 12


def test_uniform_floor_is_the_uniform_baselines_output_error():
    frame = grid_rows()
    assert uniform_floor(frame, "out_rel_err", {"seq_len": 1024}) == 0.8
    assert uniform_floor(frame, "kernel_rel_mse", {"seq_len": 1024}) is None  # a floor of output error only
    assert uniform_floor(frame, "out_rel_err", {"seq_len": 256}) is None


def test_series_sorts_scales_and_drops_missing_means():
    frame = pd.DataFrame({"seq_len": [512, 128, 256], "peak_mem_bytes_mean": [2.0 * 2**20, 2**20, np.nan]})
    xs, mean, lo, hi = series(frame, "peak_mem_bytes", "seq_len")
    np.testing.assert_array_equal(xs, [128, 512])
    np.testing.assert_allclose(mean, [1.0, 2.0])  # MiB, the metric's display unit
    assert lo is None and hi is None


def test_columns_and_ok_rows():
    frame = pd.DataFrame({"status": ["ok", "ok", "oom"], "out_rel_err_mean": [0.1, np.nan, 0.2],
                          "out_rel_err_ci_low": [0.0, 0.0, 0.0]})
    assert value_columns(frame, "out_rel_err") == ("out_rel_err_mean", "out_rel_err_ci_low", None)
    assert value_columns(frame, "time_ms")[0] == "time_ms"
    assert has_metric(frame, "out_rel_err") and not has_metric(frame, "time_ms")
    assert list(ok_rows(frame, "out_rel_err").index) == [0]
    assert spans_decades([0.01, 0.2]) and not spans_decades([0.3, 0.9])
    assert not spans_decades([0.0, 5.0, float("nan")])


# ------------------------------------------------------------------------------ grids, floors, captions
def test_error_grid_marks_failed_and_missing_pairs():
    rows = summary_rows([
        dict(feature_map="posrf", weight_matrix="iid", kernel_rel_mse_mean=0.0123),
        dict(feature_map="posrf", weight_matrix="orf", kernel_rel_mse_mean=np.nan, status="oom"),
        dict(feature_map="hyprf", weight_matrix="iid", kernel_rel_mse_mean=0.5),
    ])
    values, notes = error_grid(rows, "kernel_rel_mse", ["posrf", "hyprf"], ["iid", "orf"])
    np.testing.assert_array_equal(values, [[0.0123, np.nan], [0.5, np.nan]])
    assert notes.tolist() == [["0.012", "oom"], ["0.5", "—"]]


def test_seed_means_over_data_keep_only_seeds_ok_on_every_source():
    rows = pd.DataFrame({
        "data": ["layer0", "layer1"] * 3,
        "seed_index": [0, 0, 1, 1, 2, 2],
        "status": ["ok", "ok", "ok", "error", "ok", "ok"],
        "v": [1.0, 3.0, 5.0, np.nan, 2.0, np.nan],
    })
    # seed 1 failed on layer1, seed 2 lacks its layer1 value
    np.testing.assert_array_equal(seed_means_over_data(rows, "v"), [2.0])
    assert seed_means_over_data(rows.iloc[:2], "v").tolist() == [2.0]


def test_bias2_noise_floor_is_variance_over_seeds():
    np.testing.assert_allclose(bias2_noise_floor([4.0, 1.0, 2.0], [4, 2, 0]), [1.0, 0.5, 2.0])


def test_caption_counts():
    frame = summary_rows([dict(estimator="posrf-orf", num_features=16, status="error", n_ok=2),
                          dict(estimator="exact", num_features=0, seq_len=4096, status="oom"),
                          dict(estimator="posrf-iid", num_features=16)])
    assert seeds_text(frame) == "2–4 seeds" and seeds_text(frame.iloc[1:]) == "4 seeds"
    assert failed_note(frame) == (" Not shown: exact L=4096 (oom), posrf-orf m=16 L=256 (error) "
                                  "(see the failures table).")
    assert failed_note(frame.iloc[2:]) == ""


def test_analysis_imports_no_plotting_library():
    code = ("import sys, rfbench.report.analysis, rfbench.report.tables, rfbench.report.plots; "
            "bad = [m for m in ('matplotlib', 'seaborn') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ heavy tails
def seed_rows(draws: np.ndarray, estimator: str = "posrf-iid") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, results) of one cell per row of ``draws`` [cells, seeds]: per-seed kernel_rel_mse."""
    summary, results = [], []
    for i, x in enumerate(draws):
        cell = f"c{i}"
        summary.append(dict(cell=cell, estimator=estimator, num_features=32 * (1 + i % 2), n_ok=len(x),
                            n_seeds=len(x), kernel_rel_mse_mean=float(np.mean(x))))
        results += [dict(cell=cell, status="ok", seed_index=j, kernel_rel_mse=float(v))
                    for j, v in enumerate(x)]
    return summary_rows(summary), pd.DataFrame(results)


def test_one_dominant_seed_flags_heavy_tails_and_not_light_ones():
    """Of 10 i.i.d. exponential seeds (a light tail), the largest exceeds the other nine's sum with
    probability exactly 10 * 2^-9 = 1.95% (each seed beats the sum of nine others with chance 2^-9);
    Pareto draws of index 1/2 (infinite mean, like a squared error whose expectation diverges) do
    so in most cells. 400 cells each: the light rate is bounded 3 binomial standard errors (0.7%)
    above 1.95%, the heavy one far below Pareto's (about 70%)."""
    rng = np.random.default_rng(1)
    light = unreliable_means(*seed_rows(rng.exponential(size=(400, 10))))
    heavy = unreliable_means(*seed_rows(rng.pareto(0.5, size=(400, 10)) + 1))
    assert len(light) / 400 < 0.04
    assert len(heavy) / 400 > 0.5
    assert heavy["tail_reason"].str.fullmatch(r"one seed holds \d+%").all()


def test_one_seed_share_needs_five_seeds_and_a_planted_seed_is_found():
    x = np.ones((2, 10))
    x[1, 3] = 50.0  # one seed holds 50/59 of the sum
    flagged = unreliable_means(*seed_rows(x))
    assert flagged["cell"].tolist() == ["c1"] and flagged["tail_reason"].iloc[0] == "one seed holds 85%"
    few = np.array([[1.0, 1.0, 1.0, 100.0]])  # four seeds: one always could hold half; not judged
    assert unreliable_means(*seed_rows(few)).empty
    assert unreliable_means(seed_rows(x)[0], None).empty  # no per-seed rows: nothing to judge by


def test_a_closed_form_far_above_the_measured_mean_flags_the_cell():
    summary, results = seed_rows(np.ones((4, 10)))  # no dominant seed anywhere
    summary["kernel_rel_mse_theory"] = [np.inf, 11.0, 9.0, np.nan]  # measured mean 1 in each
    flagged = unreliable_means(summary, results)
    assert flagged["cell"].tolist() == ["c0", "c1"]
    assert flagged["tail_reason"].tolist() == ["closed form inf vs measured 1",
                                               "closed form 11 vs measured 1"]


def test_heavy_tail_note_names_the_cells_and_points_to_output_error():
    x = np.ones((3, 10))
    x[0, 0] = x[2, 5] = 40.0
    summary, results = seed_rows(x)
    summary.loc[2, "estimator"] = "oprf-orf"
    note = heavy_tail_note(summary, results, by_data=False)
    assert "in 2 of 3 cells (oprf-orf m=32, posrf-iid m=32)" in note
    assert "one seed holds over 50%" in note and "by output error" in note and "10 seeds" in note
    assert heavy_tail_note(*seed_rows(np.ones((3, 10)))) == ""
    assert "(posrf-iid (isotropic m=32))" in heavy_tail_note(*seed_rows(x[:1]))
