"""Suites with a [fit] section: estimators are fitted on one part of each cell's tokens and every
metric (baselines included) is measured on the held-out part only; fit time, kernel labels,
training curves, seed sharing of learned distributions, and the report's held-out table.

The checks recompute a cell's numbers directly (make_estimator, fit on the fit part, measure on
the held-out part) and compare with the runner's rows; each also shows that the alternative
(measuring on every token, or fitting on the held-out tokens too) gives a different number, so
the comparison could fail.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import rfbench as rb
from rfbench import exact
from rfbench import metrics as M
from rfbench import results as R
from rfbench.data.io import load_bundled
from rfbench.errors import SpecError
from rfbench.learning import FitConfig, fit_estimator, split_tokens, target_attention
from rfbench.report import Run, load_run
from rfbench.report.tables import held_out_tables, is_held_out, to_markdown
from rfbench.results import store
from rfbench.results.schema import LATER_COLUMNS
from rfbench.suite import baselines, runner
from rfbench.suite.sources import prepare_sources
from rfbench.suite.spec import parse_suite

pytestmark = pytest.mark.usefixtures("one_thread")

L, HOLD, STEPS = 64, 0.25, 6
SUITE = f"""
[suite]
name = "fit-tiny"
[estimators]
names = ["posrf-iid", "dark-iid", "darkl-iid", "oprf-fastfoodl", "hedgehog-iid"]
baselines = ["exact", "uniform", "taylor2"]
[estimators.params]
darkl = {{ init = "identity" }}
[[data]]
source = "bundled"
layers = [1]
heads = [0, 1]
[sweep]
seq_len = [{L}]
num_features = [4, 8]
causal = [false]
[seeds]
count = 3
[metrics]
kernel_max_tokens = 0
[timing]
enabled = false
threads = 1
[fit]
holdout = {HOLD}
steps = {STEPS}
eval_every = 2
batch_tokens = 32
val_draws = 2
[fit.estimators."oprf-fastfoodl"]
objective = "kernel"
[fit.estimators."hedgehog-iid"]
objective = "crossentropy"
"""


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    suite = parse_suite(SUITE, source="fit-tiny.toml")
    out = runner.run_suite(suite, tmp_path_factory.mktemp("fit") / "run", progress=False)
    return suite, out, R.load_results(out)


def _data():
    cap = load_bundled().to(torch.float32)
    q, k, v = (x[1, 0:2, :L] for x in (cap.q, cap.k, cap.v))  # layer 1, heads 0-1: [H, L, d]
    return q, k, v, float(cap.scale)


def _parts():
    q, k, v, scale = _data()
    fit_idx, held_idx = split_tokens(L, HOLD, split="tail")
    fit = tuple(x.index_select(-2, fit_idx) for x in (q, k, v))
    held = tuple(x.index_select(-2, held_idx) for x in (q, k, v))
    return fit, held, (q, k, v), scale


def _row(df, name, seed_index=0, m=8):
    r = df[(df["estimator"] == name) & (df["seed_index"] == seed_index) & df["num_features"].isin([0, m])]
    assert len(r) == 1
    return r.iloc[0]


def _rel(out, ref):
    return M.relative_error(out, ref)


# --------------------------------------------------------------------------- the spec
def test_fit_section_is_validated():
    suite = parse_suite(SUITE, source="fit-tiny.toml")
    assert suite.fit.holdout == HOLD and suite.fit.config.steps == STEPS
    assert suite.fit.config_for("oprf-fastfoodl").objective == "kernel"
    assert suite.fit.config_for("darkl-iid").objective == "attention"
    assert suite.to_dict()["fit"]["config"]["steps"] == STEPS  # meta.json carries it
    assert parse_suite(SUITE.split("[fit]")[0], source="x.toml").fit is None
    bad = [
        ("steps = 6", "steps = 0", r"fit-tiny\.toml: fit\.steps: must be an integer >= 1, got 0"),
        (
            "eval_every = 2",
            "eval_every = 2\nn_blocks = 2\nval_fraction = 0.9",
            r"fit\.val_fraction: .*no training block",
        ),
        ("holdout = 0.25", "holdout = 1.5", r"fit\.holdout"),
        ("eval_every = 2", "eval_every = 2\nlearning_rate = 0.1", r"unknown key.*learning_rate"),
        (
            '[fit.estimators."oprf-fastfoodl"]',
            '[fit.estimators."oprf-fastfod"]',
            r"fit\.estimators\.oprf-fastfod: not an estimator of this suite",
        ),
        ('objective = "kernel"', 'objective = "mse"', r"fit\.estimators\.oprf-fastfoodl.*objective"),
    ]
    for old, new, match in bad:
        with pytest.raises(SpecError, match=match):
            parse_suite(SUITE.replace(old, new), source="fit-tiny.toml")


def test_the_token_split_is_computed_once_per_length(monkeypatch):
    """The plan splits each L once; the cells' rows, skips and data all use that split."""
    suite = parse_suite(SUITE.replace(f"seq_len = [{L}]", f"seq_len = [{L}, 2]"), source="x.toml")
    calls = []
    real = type(suite.fit).split
    monkeypatch.setattr(type(suite.fit), "split", lambda self, n: calls.append(n) or real(self, n))
    cells = runner.plan(suite, prepare_sources(suite), ["cpu"])
    assert sorted(calls) == [2, L]
    held = int(L * HOLD)
    for c in cells:
        if c.seq_len == L:
            assert c.split.sizes(L, True) == {"fit_len": L - held, "eval_len": held} and not c.skip
        else:  # two tokens cannot be split: skipped with the reason, no sizes
            assert c.split.error and c.skip.startswith("[fit] holdout")
            assert c.split.sizes(2, True) == {"fit_len": 0, "eval_len": 0}


def test_held_out_cells_are_other_cells():
    """[fit] changes what a cell measures, so it changes the cell ids (a resumed run never mixes
    them); an estimator's own fit settings change its ids only."""

    def ids(text):
        suite = parse_suite(text, source="x.toml")
        cells = runner.plan(suite, prepare_sources(suite), ["cpu"])
        return {c.name: c.cell for c in cells}

    with_fit, without = ids(SUITE), ids(SUITE.split("[fit]")[0])
    assert not set(with_fit.values()) & set(without.values())
    other = ids(SUITE.replace('objective = "kernel"', 'objective = "attention"'))
    changed = {name for name in with_fit if with_fit[name] != other[name]}
    assert changed == {"oprf-fastfoodl"}
    # training settings key the learners' cells only: the others are fitted the plain way
    steps = ids(SUITE.replace(f"steps = {STEPS}", f"steps = {STEPS + 1}"))
    assert {name for name in with_fit if with_fit[name] != steps[name]} == {
        "oprf-fastfoodl", "darkl-iid", "hedgehog-iid"}
    # one number, one spelling: lr = 1 is lr = 1.0
    assert ids(SUITE.replace("eval_every = 2", "eval_every = 2\nlr = 1")) == ids(
        SUITE.replace("eval_every = 2", "eval_every = 2\nlr = 1.0")
    )


def test_configs_that_cannot_train_a_learner_are_refused_before_running(tmp_path):
    text = SUITE.replace('objective = "kernel"', 'objective = "kernel"\nredraw = true')
    with pytest.raises(SpecError, match=r'fit\.estimators\."oprf-fastfoodl": .*redraw=true'):
        runner.run_suite(parse_suite(text, source="x.toml"), tmp_path / "r", progress=False)
    text = SUITE.replace("eval_every = 2", 'eval_every = 2\nobjective = "variance"')
    with pytest.raises(SpecError, match=r"x\.toml: fit: .*variance"):  # darkl aligned learns its kernel
        runner.run_suite(parse_suite(text, source="x.toml"), tmp_path / "r2", progress=False)
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


@pytest.mark.filterwarnings("ignore:DARK whitening")  # 6 tokens of d = 32: rank-deficient, knowingly
def test_too_short_sequences_are_skipped_with_the_reason(tmp_path):
    text = SUITE.replace(f"seq_len = [{L}]", "seq_len = [2]").replace("holdout = 0.25", "holdout = 0.1")
    out = runner.run_suite(parse_suite(text, source="x.toml"), tmp_path / "r", progress=False)
    df = R.load_results(out)
    assert (df["status"] == "skipped").all()
    assert df["message"].str.contains(r"\[fit\] holdout = 0.1").all()
    # 8 tokens: 6 to fit on, too few for the learners' 8 validation blocks; the rest still run
    text = SUITE.replace(f"seq_len = [{L}]", "seq_len = [8]").replace(
        "num_features = [4, 8]", "num_features = [4]"
    )
    df = R.load_results(runner.run_suite(parse_suite(text, source="x.toml"), tmp_path / "s", progress=False))
    learners = df["estimator"].isin(["darkl-iid", "oprf-fastfoodl", "hedgehog-iid"])
    assert (df.loc[learners, "status"] == "skipped").all() and (df.loc[~learners, "status"] == "ok").all()
    assert df.loc[learners, "message"].str.contains("cannot be split for validation").all()


# --------------------------------------------------------------------------- what is measured where
def test_columns_and_labels(fit_run):
    _, out, df = fit_run
    assert list(df.columns) == list(R.COLUMNS)
    assert set(df["status"]) == {"ok"}
    n_fit, n_held = L - round(L * HOLD), round(L * HOLD)
    assert (df["fit_len"] == n_fit).all() and (df["eval_len"] == n_held).all()
    assert (df["seq_len"] == L).all()  # the cell's L; eval_len is what was measured
    est = df[df["kind"] == "estimator"]
    m8 = est[est["num_features"] == 8]  # every learner's training improved on its start there
    targets = dict(zip(m8["estimator"], m8["target"]))
    assert targets["posrf-iid"] == "softmax"
    assert targets["dark-iid"] == "exp(q^T Sigma k)"
    assert targets["darkl-iid"].startswith("learned") and targets["oprf-fastfoodl"].startswith("learned")
    # fit_ms: where something is fitted (whitening, or training), not for a fixed map
    assert est.loc[est["estimator"] == "posrf-iid", "fit_ms"].isna().all()
    assert est.loc[est["estimator"] != "posrf-iid", "fit_ms"].gt(0).all()
    learners = est[est["estimator"].isin(["darkl-iid", "oprf-fastfoodl"])]
    assert set(learners["fit_stopped"]) <= {"steps", "patience"}
    assert learners.loc[learners["num_features"] == 8, "fit_best_step"].gt(0).all()
    # a learner whose training never beat its start keeps its start, and says so: not "learned"
    kept = learners[learners["fit_best_step"] == 0]
    assert len(kept) and not kept["target"].str.startswith("learned").any()
    assert learners.loc[learners["fit_best_step"] > 0, "target"].str.startswith("learned").all()
    assert set(est.loc[est["estimator"] == "dark-iid", "fit_stopped"]) == {"not trainable"}
    # own-kernel metrics: DARK and learned DARK have one; a trained FastFood-L's kernel has no
    # closed form (NaN), and a softmax-target estimator has none to report
    for name in ("dark-iid", "darkl-iid"):
        assert (
            est.loc[est["estimator"] == name, ["target_out_rel_err", "target_kernel_rel_mse"]]
            .notna()
            .all()
            .all()
        )
    for name in ("oprf-fastfoodl", "posrf-iid", "hedgehog-iid"):  # hedgehog: no kernel at all
        assert (
            est.loc[est["estimator"] == name, ["target_out_rel_err", "target_kernel_rel_mse"]]
            .isna()
            .all()
            .all()
        )
    summary = store.load_summary(out)
    assert (summary["eval_len"] == n_held).all() and "target" in summary


def test_estimator_is_measured_on_held_out_tokens_only(fit_run):
    _, _, df = fit_run
    (_, held, full, scale) = _parts()
    qh, kh, vh = held
    row = _row(df, "posrf-iid", 1)
    est = rb.make_estimator("posrf-iid", 32, 8, seed=int(row["seed"]))
    with torch.no_grad():
        ref = exact.attention(qh, kh, vh, scale=scale, dtype=torch.float64)
        expected = _rel(est.attention(qh, kh, vh, scale=scale), ref)
        ke = M.kernel_errors([est], qh, kh, scale=scale)
        everything = _rel(
            est.attention(*full, scale=scale), exact.attention(*full, scale=scale, dtype=torch.float64)
        )
    assert row["out_rel_err"] == pytest.approx(expected, rel=1e-6)
    assert row["kernel_rel_mse"] == pytest.approx(ke.kernel_rel_mse[0], rel=1e-6)
    assert abs(everything - expected) > 1e-3  # measuring on every token would differ


def test_data_dependent_estimator_is_fitted_on_the_fit_part_only(fit_run):
    _, _, df = fit_run
    fit, held, full, scale = _parts()
    row = _row(df, "dark-iid", 2)

    def measured(fit_q, fit_k):
        est = rb.make_estimator("dark-iid", 32, 8, seed=int(row["seed"])).fit(fit_q, fit_k, scale=scale)
        with torch.no_grad():
            out = est.attention(*held, scale=scale)
            return _rel(out, exact.attention(*held, scale=scale, dtype=torch.float64)), est

    value, est = measured(fit[0], fit[1])
    assert row["out_rel_err"] == pytest.approx(value, rel=1e-6)
    own = target_attention(est, *held, scale=scale, dtype=torch.float64)
    with torch.no_grad():
        assert row["target_out_rel_err"] == pytest.approx(
            _rel(est.attention(*held, scale=scale), own), rel=1e-6
        )
    leaked, _ = measured(full[0], full[1])  # whitening fitted on the held-out tokens too
    assert abs(leaked - value) > 1e-4


def test_learned_estimator_matches_a_direct_fit(fit_run):
    suite, _, df = fit_run
    fit, held, _, scale = _parts()
    for name in ("oprf-fastfoodl", "darkl-iid", "hedgehog-iid"):
        row = _row(df, name, 1)
        params = {"init": "identity"} if name == "darkl-iid" else {}
        est = rb.make_estimator(name, 32, 8, seed=int(row["seed"]), **params)
        res = fit_estimator(est, *fit, suite.fit.config_for(name), scale=scale, progress=False)
        with torch.no_grad():
            value = _rel(
                est.attention(*held, scale=scale), exact.attention(*held, scale=scale, dtype=torch.float64)
            )
        assert row["out_rel_err"] == pytest.approx(value, rel=1e-5), name
        assert row["fit_best_step"] == res.best_step


def test_learned_distribution_is_fitted_once_per_cell(fit_run):
    """darkl's M depends on the training seed only: the runner fits it once and redraws per seed,
    which gives what fitting each seed anew gives (checked above for seed 1); FastFood-L learns
    its own seed's draw and is fitted per seed."""
    _, out, df = fit_run
    curves = store.load_fit_curves(out)
    assert list(curves.columns[:7]) == [
        "cell",
        "estimator",
        "data",
        "num_features",
        "seed",
        "seed_index",
        "step",
    ]
    per = curves[curves["num_features"] == 8].groupby("estimator")["seed_index"].unique()
    assert sorted(per["darkl-iid"]) == [0] and sorted(per["oprf-fastfoodl"]) == [0, 1, 2]
    assert sorted(per["hedgehog-iid"]) == [0, 1, 2]  # its init is its seed's draw: fitted per seed
    assert set(curves["estimator"]) == {"darkl-iid", "oprf-fastfoodl", "hedgehog-iid"}
    for _, g in curves.groupby(["cell", "seed_index"]):
        assert g["step"].tolist() == list(range(len(g))) and math.isnan(g["train_loss"].iloc[0])
        assert g["val_loss"].notna().sum() >= 2
    for _, darkl in df[df["estimator"] == "darkl-iid"].groupby("cell"):
        assert darkl["fit_ms"].nunique() == 1 and darkl["out_rel_err"].nunique() == 3  # one fit, 3 draws


def test_baselines_are_measured_on_held_out_tokens(fit_run):
    _, _, df = fit_run
    _, (qh, kh, vh), _, scale = _parts()
    ref = exact.attention(qh, kh, vh, scale=scale, dtype=torch.float64)
    uniform = vh.mean(dim=-2, keepdim=True).expand_as(vh)
    assert _row(df, "uniform")["out_rel_err"] == pytest.approx(_rel(uniform, ref), rel=1e-6)
    assert _row(df, "exact")["out_rel_err"] < 1e-5
    # taylor2: Based's 1 + t + t^2/2 weights (t = q . k * scale), row-normalised, by hand
    t = (qh.double() @ kh.double().transpose(-1, -2)) * scale
    w = 1 + t + t * t / 2
    taylor = (w / w.sum(-1, keepdim=True)) @ vh.double()
    assert _row(df, "taylor2")["out_rel_err"] == pytest.approx(_rel(taylor, ref), rel=1e-5)


def test_uniform_baseline_causal_is_a_prefix_mean():
    v = torch.randn(2, 5, 3, dtype=torch.float64)
    out = baselines.uniform_attention(v, causal=True)
    for i in range(5):
        assert torch.allclose(out[:, i], v[:, : i + 1].mean(dim=1))
    mean = v.mean(dim=1, keepdim=True).expand_as(v)
    assert torch.allclose(baselines.uniform_attention(v, causal=False), mean)
    # bf16 cannot count past 256: the prefix means are computed in float32
    long = torch.randn(1, 2048, 4, dtype=torch.float64)
    half = baselines.uniform_attention(long.bfloat16(), causal=True).double()
    ref = baselines.uniform_attention(long.bfloat16().double(), causal=True)
    assert float((half - ref).norm() / ref.norm()) < 4e-3  # bf16 rounding of the result only


def test_fit_run_is_reproducible(fit_run, tmp_path):
    suite, _, df = fit_run
    again = R.load_results(runner.run_suite(suite, tmp_path / "again", progress=False))
    cols = ["out_rel_err", "kernel_rel_mse", "target_out_rel_err", "target_kernel_rel_mse", "fit_best_step"]
    a = df.sort_values(["cell", "seed_index"])[cols].to_numpy(float)
    b = again.sort_values(["cell", "seed_index"])[cols].to_numpy(float)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- store and report
def test_curves_of_unfinished_cells_are_not_loaded(fit_run, tmp_path):
    import shutil

    _, out, _ = fit_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    n = len(store.load_fit_curves(copy))
    victim = next(iter(store.fits_dir(copy).glob("*.parquet")))
    store.cell_path(copy, victim.stem).unlink()  # killed after its curves, before its cell
    assert 0 < len(store.load_fit_curves(copy)) < n


def test_cell_files_written_before_the_new_columns_still_load(fit_run, tmp_path):
    _, out, _ = fit_run
    path = next(iter(store.cell_files(out).values()))
    tab = pq.read_table(path)
    old = tab.drop_columns([c for c in LATER_COLUMNS if c in tab.column_names])
    target = tmp_path / "cells" / path.name
    target.parent.mkdir()
    pq.write_table(old, target)
    rows, _ = store.read_cell(target)
    assert list(rows.columns) == list(R.COLUMNS)
    assert (rows["eval_len"] == rows["seq_len"]).all() and (rows["target"] == "").all()


def test_report_leads_with_the_held_out_table(fit_run):
    _, out, df = fit_run
    run = load_run(out)
    assert is_held_out(run)
    tables = held_out_tables(run)
    assert len(tables) == 1
    t = tables[0]
    assert t.columns == ["estimator", "kernel", "m=4", "m=8", "fit (ms)"]
    rows = {r[0]: r for r in t.rows}
    assert set(rows) == {
        "posrf-iid",
        "dark-iid",
        "darkl-iid",
        "oprf-fastfoodl",
        "hedgehog-iid",
        "exact (baseline)",
        "uniform (baseline)",
        "taylor2 (baseline)",
    }
    x = df[(df["estimator"] == "dark-iid") & (df["num_features"] == 8)].sort_values("seed_index")
    x = x["out_rel_err"].to_numpy()
    from scipy import stats

    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert rows["dark-iid"][3] == f"{x.mean():.3g} ± {half:.3g}"
    own = held_out_tables(run, "target_out_rel_err")[0]
    assert {r[0] for r in own.rows} == {"dark-iid", "darkl-iid"}
    md = to_markdown(t)
    assert "held-out tokens (16 per cell, after fitting on the other 48)" in md
    from rfbench.report.tables import build_tables

    assert build_tables(run)[0].title.startswith("Held-out attention-output error")
    board = next(t for t in build_tables(run) if t.title.startswith("Leaderboard"))
    assert "above the taylor2 baseline's" in board.caption  # a biased map's level, beside uniform's
    assert any(r[1] == "taylor2 (baseline)" and r[0] == "ref" for r in board.rows)
    assert rows["taylor2 (baseline)"][1] == "1 + t + t^2/2 (Taylor-2)"
    assert rows["uniform (baseline)"][1] == "constant"
    assert not is_held_out(Run(out, df.assign(fit_len=0), pd.DataFrame()))  # a run without [fit]


def test_fit_estimator_works_under_inference_mode():
    """The runner measures without autograd; fitting turns it back on for itself."""
    fit, _, _, scale = _parts()
    with torch.inference_mode():
        q, k, v = (x.clone() for x in fit)
        est = rb.make_estimator("oprf-fastfoodl", 32, 8, seed=0)
        res = fit_estimator(
            est, q, k, v, FitConfig(steps=3, eval_every=1, batch_tokens=16), scale=scale, progress=False
        )
    assert res.trained and res.curve["train_loss"].notna().sum() == 3


def test_output_error_figure_draws_the_uniform_floor(fit_run, tmp_path):
    from rfbench.report.plots import Options, render_figures

    _, out, _ = fit_run
    figures = render_figures(load_run(out), Options(out_dir=tmp_path))
    fig = next(f for f in figures if f.name == "output_error_vs_features")
    assert "Dashed: the uniform baseline" in fig.caption
    assert "uniform (baseline)" in (tmp_path / "output_error_vs_features.svg").read_text()


def test_report_reads_cells_newer_than_results_parquet(fit_run, tmp_path):
    """A resumed run killed before it consolidated leaves an old results.parquet beside newer
    cells: the report must show them all, and say so."""
    import shutil

    _, out, df = fit_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    old = df[df["cell"] != df["cell"].iloc[-1]]
    store.write_parquet(copy / "results.parquet", store.table(old.to_dict("records")))
    run = load_run(copy)
    assert set(run.results["cell"]) == set(df["cell"]) and len(run.results) == len(df)
    assert any("older than the finished cells" in n for n in run.notes)
