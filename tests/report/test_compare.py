"""`rfbench compare`: the regression gate on synthetic results folders with controlled noise.

Each synthetic run draws its timing jitter (3% per seed, lognormal) from ``time_seed`` and its
Monte Carlo error noise (25% per seed) from ``error_seed``; two runs with the same
``error_seed`` have identical errors, as two runs of the same code with the same cell seeds do.
"""

from __future__ import annotations

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
    # Every regression is a time regression near x1.3, and (almost) every timed cell is caught.
    assert set(bad["metric"]) == {"time_ms"}
    assert bad["ratio"].between(1.15, 1.5).all()
    timed = table[table["metric"] == "time_ms"]
    assert len(bad) >= 0.9 * len(timed)
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
