"""`rfbench compare`: the regression gate on synthetic results folders with controlled noise.

Each synthetic run draws its timing jitter (3% per seed, lognormal) from ``time_seed`` and its
Monte Carlo error noise (25% per seed) from ``error_seed``; two runs with the same
``error_seed`` have identical errors, as two runs of the same code with the same cell seeds do.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_report_synthetic import make_run as make_results_folder

from rfbench.cli import main_entry
from rfbench.errors import SpecError
from rfbench.report.compare import compare_runs, parse_threshold


def make_run(path, **kwargs):
    return make_results_folder(path, summary=False, **kwargs)  # compare reads only results.parquet


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {
        "base": make_run(root / "base", time_seed=1),
        # Pure noise: new timing jitter AND a new Monte Carlo stream for the errors.
        "noise": make_run(root / "noise", time_seed=2, error_seed=7),
        "slow": make_run(root / "slow", time_seed=3, time_factor=1.3),
        # Errors 30% worse on every seed (same seeds): the paired test must see it.
        "worse": make_run(root / "worse", time_seed=4, error_factor=1.3),
        # Errors 15% worse but from another Monte Carlo stream: within the noise of 4 seeds.
        "worse_noisy": make_run(root / "worse_noisy", time_seed=5, error_seed=8, error_factor=1.15),
        "other_suite": make_run(root / "other_suite", suite="other", time_seed=6),
        "disjoint": make_run(root / "disjoint", time_seed=6, data_sources=("bundled:L0-5",)),
    }


def _cli(capsys, *argv):
    code = main_entry(["compare", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_injected_30_percent_slowdown_fails(runs, capsys):
    code, out, _ = _cli(capsys, runs["base"], runs["slow"], "--threshold", "10%")
    assert code == 1
    table, _ = compare_runs(runs["base"], runs["slow"])
    bad = table[table["regression"]]
    # Every regression is a time regression near x1.3, and every estimator's all-cells row has it.
    assert set(bad["metric"]) == {"time_ms"}
    assert bad["ratio"].between(1.15, 1.5).all()
    # A 30 % change is below 3.6 units of the 10 % per-cell floor; every all-cells row sees it.
    groups = table[table["cell"].str.startswith("estimator:")]
    assert len(groups) > 5 and groups["regression"].all()
    assert "REGRESSION" in out and "regression(s) beyond 10%" in out


def test_pure_noise_passes(runs, capsys):
    code, out, _ = _cli(capsys, runs["base"], runs["noise"])
    assert code == 0, out
    table, z_crit = compare_runs(runs["base"], runs["noise"])
    # The noise is real (errors moved by tens of percent in some cells), yet nothing is flagged.
    err = table[table["metric"] == "kernel_rel_mse"]
    assert (abs(err["ratio"] - 1) > 0.10).sum() > 20
    assert not table["regression"].any()
    assert z_crit > 3  # Bonferroni over ~900 comparisons
    assert "no regression" in out


def test_paired_seeds_catch_an_error_regression(runs):
    table, _ = compare_runs(runs["base"], runs["worse"], metrics=["kernel_rel_mse"])
    baseline = table["label"].str.startswith(("exact", "sdpa"))  # exact: error 0 in both runs
    est = table[~baseline]
    assert len(est) > 100 and est["regression"].all() and est["paired"].all()
    assert est["ratio"].round(6).eq(1.3).all()
    assert (table.loc[baseline, "verdict"] == "same").all()


def test_an_error_change_within_monte_carlo_noise_is_not_a_regression(runs):
    table, _ = compare_runs(runs["base"], runs["worse_noisy"], metrics=["kernel_rel_mse"])
    assert not table["regression"].any()
    # ...but it is visible: beyond the threshold yet within the noise somewhere.
    assert (table["verdict"] == "noisy").any()


def test_threshold_parsing_and_effect(runs, capsys):
    assert parse_threshold("10%") == pytest.approx(0.10)
    assert parse_threshold("0.1") == pytest.approx(0.10)
    assert parse_threshold("7.5%") == pytest.approx(0.075)
    for bad in ("10", "ten", "-5%", "0"):
        with pytest.raises(SpecError):
            parse_threshold(bad)
    # A 30% slowdown passes a 50% threshold.
    code, out, _ = _cli(capsys, runs["base"], runs["slow"], "--threshold", "50%")
    assert code == 0, out


def test_a_cell_that_fails_now_is_a_regression(runs, tmp_path, capsys):
    new = make_run(tmp_path / "oom", time_seed=2)
    results = pd.read_parquet(new / "results.parquet")
    victim = results[(results["estimator"] == "posrf-orf") & (results["seq_len"] == 512)
                     & (results["num_features"] == 64) & (results["data"] == "isotropic")].index
    results.loc[victim[:1], ["status", "message", "time_ms"]] = ["oom", "out of memory", float("nan")]
    results.to_parquet(new / "results.parquet", index=False)
    code, out, _ = _cli(capsys, runs["base"], new, "--changes-only")
    assert code == 1
    row = [line for line in out.splitlines() if "fails now" in line and " status " in line]
    assert len(row) == 1 and "posrf-orf" in row[0] and "oom on 1/4 seeds" in row[0]


def test_metric_option_and_markdown_output(runs, capsys):
    code, out, _ = _cli(capsys, runs["base"], runs["slow"], "--metric", "kernel_rel_mse",
                        "--metric", "peak_mem_bytes", "--markdown")
    assert code == 0  # the slowdown is in time only
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| cell | metric |") and len(lines) > 100
    assert all(("kernel_rel_mse" in line or "peak_mem_bytes" in line) for line in lines[2:])


@pytest.mark.parametrize("case, extra, needle", [
    ("other_suite", [], "different suites"),
    ("disjoint", [], "share no cell"),
    ("noise", ["--metric", "target_kernel_rel_mse"], "not measured"),
    ("noise", ["--metric", "speed"], "unknown metric"),
    ("noise", ["--threshold", "10"], "ambiguous"),
])
def test_incompatible_runs_exit_2(runs, capsys, case, extra, needle):
    code, out, err = _cli(capsys, runs["base"], runs[case], *extra)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and out == ""


def test_missing_or_broken_folder_exits_2_with_one_line(runs, tmp_path, capsys):
    code, _, err = _cli(capsys, runs["base"], tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.parquet").write_bytes(b"PAR1 garbage")
    code, _, err = _cli(capsys, broken, runs["base"])
    assert code == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1


def test_the_suite_of_an_old_table_comes_from_meta_json(runs, tmp_path, capsys):
    """A results table without a suite column: the suites compared are meta.json's (typed Meta)."""
    import shutil

    folder = shutil.copytree(runs["other_suite"], tmp_path / "old")
    results = pd.read_parquet(folder / "results.parquet").drop(columns="suite")
    results.to_parquet(folder / "results.parquet", index=False)
    code, _, err = _cli(capsys, runs["base"], folder)
    assert code == 2 and "different suites (synthetic vs other)" in err


# ------------------------------------------------------------------------------ the noise model
def _retimed(src, dst, *, seed, slow=None, machine=1.0, scatter=0.03, mem=None, n_rep=5):
    """A copy of the synthetic run ``src`` at ``dst`` whose timed rows carry the timing detail of a
    real run: CPU time and a calibration kernel (``ref``), each with ``n_rep`` raw samples
    scattered by ``scatter`` (lognormal). ``machine`` scales every time and the calibration (a
    slower machine); ``slow`` = {estimator: factor} scales one estimator's times only (slower
    code); ``mem`` = {estimator: factor} its peak memory."""
    import json
    import shutil

    import numpy as np

    rng = np.random.default_rng(seed)
    shutil.copytree(src, dst)
    res = pd.read_parquet(dst / "results.parquet")
    res["cpu_samples_ms"] = ""
    for i in res.index[res["time_ms"].notna()]:
        est = res.at[i, "estimator"]
        f = machine * (slow or {}).get(est, 1.0)
        run = math.exp(rng.normal(0, 0.02))  # run-to-run drift of one cell, 2 %
        cpu = res.at[i, "time_ms"] * f * run * np.exp(rng.normal(0, scatter, n_rep))
        ref = 0.4 * machine * np.exp(rng.normal(0, scatter, n_rep + 1))
        res.loc[i, ["time_ms", "cpu_ms", "ref_cpu_ms", "ref_ms"]] = [
            float(np.median(cpu)) * 1.3, float(np.median(cpu)), float(np.median(ref)), float(np.median(ref))]
        res.at[i, "cpu_samples_ms"] = json.dumps(cpu.tolist())
        res.at[i, "n_rep"] = n_rep
        res.at[i, "peak_mem_bytes"] *= (mem or {}).get(est, 1.0)
    res.to_parquet(dst / "results.parquet", index=False)
    return dst


@pytest.fixture(scope="module")
def timed(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("timed")
    return {
        "a": _retimed(runs["base"], root / "a", seed=1),
        "b": _retimed(runs["base"], root / "b", seed=2),
        "a2": _retimed(runs["base"], root / "a2", seed=3),
        "b2": _retimed(runs["base"], root / "b2", seed=4),
        "busy": _retimed(runs["base"], root / "busy", seed=5, machine=1.6),
        "slow": _retimed(runs["base"], root / "slow", seed=6, slow={"posrf-orf": 1.5}),
        "scatter": _retimed(runs["base"], root / "scatter", seed=7, scatter=0.6, slow={"posrf-orf": 1.5}),
        "mem": _retimed(runs["base"], root / "mem", seed=8, mem={"posrf-orf": 2.0}),
    }


def test_the_noise_is_never_zero_and_z_never_infinite(runs, timed):
    """Two runs with identical memory and errors: every comparison still has a noise of at least
    its kind's floor, and a finite z (the old model gave ±0.0 % and z = inf)."""
    from rfbench.report.compare_time import GROUP_FLOOR, KINDS, REL_FLOOR

    table, _ = compare_runs(runs["base"], runs["base"])
    rows = table[table["metric"] != "status"]
    floors = rows["metric"].map(lambda m: REL_FLOOR[KINDS.get(m, "error")])
    floors[rows["cell"].str.startswith("estimator:")] = GROUP_FLOOR  # the all-cells time rows
    assert (rows["noise"] >= floors - 1e-15).all() and rows["z"].map(math.isfinite).all()
    assert (rows["verdict"] == "same").all()
    mem = rows[rows["metric"] == "peak_mem_bytes"]
    assert len(mem) > 50 and (mem["noise"] == REL_FLOOR["memory"]).all()  # identical: floor only


def test_two_runs_of_one_commit_pass_and_the_noise_is_measured(timed):
    table, _ = compare_runs(timed["a"], timed["b"])
    assert not table["regression"].any()
    from rfbench.report.compare_time import GROUP_FLOOR

    t = table[table["metric"] == "time_ms"]
    # Judged on CPU time against the calibration kernel; the cross-cell spread of ~4 % (2 %
    # drift per run and cell, sqrt 2) is below the 10 % floor per cell, the 6 % per estimator.
    cells = t[~t["cell"].str.startswith("estimator:")]
    assert cells["note"].str.contains("CPU time").all() and t["ratio_ref"].notna().all()
    groups = t.loc[~t.index.isin(cells.index)]
    assert (cells["noise"] >= 0.10).all() and (groups["noise"] >= GROUP_FLOOR).all()
    # above the floors only where the 30 us absolute jitter is large against the time
    above = cells[cells["noise"] > 0.10]
    assert len(above) and (above[["base", "new"]].min(axis=1) < 1.0).all()  # judged on CPU time
    above = groups[groups["noise"] > GROUP_FLOOR]
    assert len(above) <= 2 and (above[["base", "new"]].min(axis=1) < 0.3).all()


def test_a_slower_machine_is_not_a_regression(timed):
    """Every time and the calibration kernel 1.6x slower: the machine, not the code."""
    table, _ = compare_runs(timed["a"], timed["busy"])
    t = table[table["metric"] == "time_ms"]
    assert (t["ratio"] > 1.4).all() and t["ratio_ref"].between(0.85, 1.15).all()
    assert not table["regression"].any()
    assert (t["verdict"] == "noisy").sum() + (t["verdict"] == "same").sum() == len(t)


def test_a_slower_estimator_is_a_regression_naming_it(timed, capsys):
    code, out, _ = _cli(capsys, timed["a"], timed["slow"])
    assert code == 1
    table, _ = compare_runs(timed["a"], timed["slow"])
    bad = table[table["regression"]]
    assert set(bad["metric"]) == {"time_ms"} and bad["label"].str.startswith("posrf-orf").all()
    timed_cells = table[(table["metric"] == "time_ms") & table["label"].str.startswith("posrf-orf")]
    # the all-cells row is sure to; a single cell at x1.5 is ~4 units of the 10 % floor
    assert bad["cell"].eq("estimator:posrf-orf").any() and len(bad) >= 0.5 * len(timed_cells)
    assert "(posrf-orf)" in out


def test_scattered_repeats_are_noisy_not_a_regression(timed):
    table, _ = compare_runs(timed["a"], timed["scatter"])
    t = table[(table["metric"] == "time_ms") & table["label"].str.startswith("posrf-orf")]
    assert not table["regression"].any() and (t["verdict"] == "noisy").any()
    assert t["note"].str.contains("repeats scatter").any()


def test_twice_the_memory_is_a_regression(timed):
    table, _ = compare_runs(timed["a"], timed["mem"])
    bad = table[table["regression"]]
    assert set(bad["metric"]) == {"peak_mem_bytes"} and bad["label"].str.startswith("posrf-orf").all()
    assert bad["ratio"].round(6).eq(2.0).all() and (bad["z"] > 50).all()


def test_several_runs_per_side(timed, capsys):
    code, out, _ = _cli(capsys, "--base", timed["a"], timed["a2"], "--new", timed["b"], timed["b2"])
    assert code == 0, out
    code, out, _ = _cli(capsys, "--base", timed["a"], timed["a2"], "--new", timed["slow"])
    assert code == 1 and "(posrf-orf)" in out
    table, _ = compare_runs([timed["a"], timed["a2"]], [timed["b"], timed["b2"]])
    assert (table.loc[table["metric"] == "peak_mem_bytes", "verdict"] == "same").all()
    for argv in (["--base", timed["a"], timed["b"]], [timed["a"]], [timed["a"], "--new", timed["b"]]):
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1


def test_cross_cell_spread_is_robust_to_a_minority_of_regressions():
    import numpy as np

    from rfbench.report.compare_time import cell_spread

    rng = np.random.default_rng(0)
    base = {f"c{i}": ((np.array([0]), np.array([1.0]), 0.0),
                      (np.array([0]), np.array([math.exp(rng.normal(0, 0.1))]), 0.0)) for i in range(60)}
    quiet = cell_spread("peak_mem_bytes", base, {})["log"]
    assert 0.07 < quiet < 0.13  # the 10 % scatter, measured
    worse = {c: (vb, (vn[0], vn[1] * (3.0 if i < 10 else 1.0), 0.0))
             for i, (c, (vb, vn)) in enumerate(base.items())}
    logs = [math.log(vn[1][0]) for _, vn in worse.values()]
    # 1 cell in 6 three times slower: the standard deviation of the log-ratios quadruples, the
    # robust spread stays below twice the scatter, so the other cells keep a usable noise
    assert np.std(logs) > 0.35 and cell_spread("peak_mem_bytes", worse, {})["log"] < 0.2
    assert cell_spread("kernel_rel_mse", base, {})["log"] is None  # errors: per-seed spread instead


def test_a_lone_cell_time_verdict_needs_its_estimator_row():
    """One cell's time regression stands only when its estimator's all-cells row agrees, or when
    it lies beyond LONE_CELL_Z x the critical z (a cliff at one size); memory and error rows are
    never touched."""
    from rfbench.report.compare import LONE_CELL_Z, _corroborate

    def row(metric="time_ms", verdict="REGRESSION", z=5.0):
        return {"metric": metric, "verdict": verdict, "regression": verdict == "REGRESSION", "z": z,
                "note": ""}

    lone = row()
    _corroborate(lone, "same", z_crit=3.5)
    assert lone["verdict"] == "noisy" and not lone["regression"] and "all-cells time is same" in lone["note"]
    agreed = row()
    _corroborate(agreed, "REGRESSION", z_crit=3.5)
    assert agreed["verdict"] == "REGRESSION" and agreed["regression"]
    cliff = row(z=LONE_CELL_Z * 3.5 + 0.1)
    _corroborate(cliff, "same", z_crit=3.5)
    assert cliff["verdict"] == "REGRESSION"
    faster = row(verdict="improved", z=-5.0)
    _corroborate(faster, "same", z_crit=3.5)
    assert faster["verdict"] == "noisy"
    memory = row(metric="peak_mem_bytes")
    _corroborate(memory, "same", z_crit=3.5)
    assert memory["verdict"] == "REGRESSION"
    no_group = row()
    _corroborate(no_group, None, z_crit=3.5)
    assert no_group["verdict"] == "REGRESSION"


def test_a_time_near_the_absolute_floor_has_that_jitter_as_noise(runs):
    """A 25 us cell that reads x3.7 (what the uniform baseline did between two quiet CI runs) is within
    its absolute jitter (30 us / 25 us = 1.2 in log units): noisy, not a REGRESSION; the same ratio
    at 2 ms is far beyond the noise."""
    import numpy as np

    from rfbench.report.compare import _compare

    def cell(base_ms, ratio):
        vb = (np.array([0]), np.array([base_ms]), 0.0)
        vn = (np.array([0]), np.array([ratio * base_ms]), 0.0)
        clock = dict(clock="cpu", base=base_ms, new=ratio * base_ms, ref_base=1.0, ref_new=1.0, cv=0.02,
                     se=0.01)
        return _compare(vb, vn, "time_ms", {"paired": None, "unpaired": None}, (np.array([0.02]),) * 2,
                        0.10, 3.6, spread={"log": 0.05}, clock=clock)

    tiny = cell(0.025, 3.7)
    assert tiny["verdict"] == "noisy" and abs(tiny["noise"] - 0.03 / 0.025) < 1e-9
    real = cell(2.0, 3.7)
    assert real["verdict"] == "REGRESSION" and real["noise"] == 0.10


def test_an_estimator_row_below_the_absolute_floor_is_same():
    """An all-cells time row follows the cells' absolute floor: a baseline timed at 20 us that
    reads x1.5 with a tight spread is timer overhead ("same"), the same ratio at 2 ms regresses."""
    from rfbench.report.compare import ABS_FLOOR
    from rfbench.report.compare_time import group_row

    def members(base_ms):
        clock = dict(clock="cpu", base=base_ms, new=1.5 * base_ms, ref_base=1.0, ref_new=1.0,
                     cv=0.01, se=0.01)
        return [(dict(clock), {"log": 0.01}) for _ in range(12)]

    tiny = group_row("uniform", members(0.02), 0.10, 3.6, ABS_FLOOR["time_ms"])
    assert tiny["verdict"] == "same" and not tiny["regression"]
    real = group_row("posrf-iid", members(2.0), 0.10, 3.6, ABS_FLOOR["time_ms"])
    assert real["verdict"] == "REGRESSION" and real["z"] > 3.6
