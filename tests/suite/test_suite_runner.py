"""The suite runner: results contract, seeds independent of order and sharding, failures recorded,
refusing to overwrite, load_results round trip, and agreement with a direct metric computation."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
import torch

import rfbench as rb
from rfbench import cli
from rfbench import metrics as M
from rfbench import results as R
from rfbench.errors import SpecError
from rfbench.results import store
from rfbench.suite import cells, runner, terminal
from rfbench.suite.plan import cell_id, derive_seed
from rfbench.suite.sources import prepare_sources
from rfbench.suite.spec import parse_suite

SUITE = """
[suite]
name = "tiny"
[estimators]
names = ["posrf-iid", "hyprf-orf", "darkis-iid"]
baselines = ["exact", "sdpa"]
[[data]]
kind = "isotropic"
dim = 8
heads = 2
[[data]]
kind = "anisotropic"
params = { cond = 10.0 }
dim = 8
[sweep]
seq_len = [24, 40]
num_features = [4, 8]
causal = [false, true]
[seeds]
count = 3
[metrics]
kernel_max_tokens = 30
tile = 16
[timing]
enabled = false
threads = 1       # many tiny ops: one thread avoids waiting on a busy machine's second core
"""


def _suite(text=SUITE):
    return parse_suite(text, source="tiny.toml")


def _stable(df: pd.DataFrame) -> pd.DataFrame:
    stable = df.drop(columns=list(R.TIMED_COLUMNS))
    return stable.sort_values(["cell", "seed_index"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = runner.run_suite(_suite(), tmp_path_factory.mktemp("runs") / "full", progress=False)
    return out, R.load_results(out)


def test_results_contract(full_run):
    out, df = full_run
    assert list(df.columns) == list(R.COLUMNS)
    n_cells = 2 * 2 * 2 * (2 + 2 * 3)  # data x L x causal x (baselines + m x estimators)
    assert df["cell"].nunique() == n_cells
    assert len(df) == 2 * 2 * 2 * (2 + 2 * 3 * 3)  # estimators: one row per seed
    assert not df.duplicated(["cell", "seed_index"]).any()
    assert set(df["status"]) == {"ok"}
    # the only messages of ok rows: darkis saying its proposal's eigenvalues were clipped
    notes = df.loc[df["message"] != ""]
    assert set(notes["estimator"]) <= {"darkis-iid"} and notes["message"].str.contains("clipped").all()
    est = df[df["kind"] == "estimator"]
    assert est[["kernel_mse", "kernel_rel_mse", "attn_mse", "out_rel_err"]].notna().all().all()
    assert est["time_ms"].isna().all()  # timing switched off
    hyp = est[est["estimator"] == "hyprf-orf"]
    assert (hyp["feature_dim"] == 2 * hyp["num_features"]).all()
    assert set(est["data"]) == {"isotropic", "anisotropic(cond=10)"}
    base = df[df["kind"] == "baseline"]
    assert set(base["estimator"]) == {"exact", "sdpa"} and (base["num_features"] == 0).all()
    assert (base["out_rel_err"] < 1e-5).all() and base["kernel_mse"].isna().all()
    assert (
        (df["device"] == "cpu").all() and (df["dtype"] == "float32").all() and (df["suite"] == "tiny").all()
    )
    # Fitting is timed for the data-dependent map only.
    assert est.loc[est["estimator"] == "darkis-iid", "fit_ms"].notna().all()
    assert est.loc[est["estimator"] == "posrf-iid", "fit_ms"].isna().all()

    summary = store.load_summary(out)
    assert len(summary) == n_cells and (summary["n_ok"] == summary["n_seeds"]).all()
    for col in (
        "kernel_rel_mse_mean",
        "kernel_rel_mse_std",
        "kernel_rel_mse_ci_low",
        "kernel_rel_mse_ci_high",
        "bias2",
        "mc_variance",
        "bias2_rel",
        "mc_variance_rel",
        "n_seeds",
        "status",
        "message",
    ):
        assert col in summary
    s = summary[summary["kind"] == "estimator"]
    assert (s["kernel_rel_mse_ci_low"] <= s["kernel_rel_mse_mean"]).all()
    assert s[["bias2", "mc_variance"]].notna().all().all()
    b = summary[summary["kind"] == "baseline"]
    assert b["out_rel_err_std"].isna().all() and b["bias2"].isna().all()  # one run: no spread

    meta = R.load_meta(out)
    assert meta.suite.toml == SUITE and meta.suite.parsed["suite"]["name"] == "tiny"
    for key in (
        "rfbench_version",
        "git",
        "versions",
        "machine",
        "start_time",
        "end_time",
        "timing",
        "peak_memory",
        "command",
        "runs",
        "seeds",
    ):
        assert key in meta.to_dict()
    assert meta.runs[-1]["status"] == "finished" and "TorchDispatchMode" in meta.peak_memory["cpu"]


def test_meta_states_the_threads_the_cells_ran_with(full_run):
    """timing.threads = 1: the machine record says 1, whatever torch's default was before the run."""
    import json

    doc = json.loads((full_run[0] / "meta.json").read_text())
    assert doc["machine"]["torch_threads"] == 1


def test_metrics_agree_with_a_direct_computation(full_run):
    """The stored numbers of one cell are what metrics.kernel_errors gives for its seeds and data."""
    out, df = full_run
    rows = df[
        (df["estimator"] == "darkis-iid")
        & (df["data"] == "anisotropic(cond=10)")
        & (df["seq_len"] == 40)
        & (df["num_features"] == 8)
        & df["causal"]
    ].sort_values("seed_index")
    from rfbench.data import synthetic

    q, k, v = synthetic.make("anisotropic", seq_len=40, dim=8, cond=10.0)
    scale = 1 / math.sqrt(8)
    ests = [rb.make_estimator("darkis-iid", 8, 8, seed=int(s)).fit(q, k, scale=scale) for s in rows["seed"]]
    source = next(s for s in prepare_sources(_suite()) if s.label == "anisotropic(cond=10)")
    sample = M.sample_rows(40, 30, seed=derive_seed({"data": source.key, "seq_len": 40}, 0, 0))
    ke = M.kernel_errors(ests, q, k, scale=scale, rows=sample, causal=True, tile=16)
    assert rows["kernel_rel_mse"].tolist() == pytest.approx(ke.kernel_rel_mse, rel=1e-12)
    assert rows["attn_mse"].tolist() == pytest.approx(ke.attn_mse, rel=1e-12)
    ref = rb.exact.attention(q, k, v, True, scale=scale, dtype=torch.float64)
    errs = [M.relative_error(e.attention(q, k, v, True, scale=scale), ref) for e in ests]
    assert rows["out_rel_err"].tolist() == pytest.approx(errs, rel=1e-12)
    cell_stats = store.read_cell(store.cell_path(out, rows["cell"].iloc[0]))[1]
    assert cell_stats["bias2"] == pytest.approx(ke.bias2, rel=1e-12)
    assert cell_stats["mc_variance"] == pytest.approx(ke.mc_variance, rel=1e-12)


def test_closed_form_expectation_is_stored_per_cell(full_run):
    """posrf-iid cells store E[kernel_rel_mse] (the same in each seed row, = metrics.expected on the
    cell's data and scored rows) and the summary names it kernel_rel_mse_theory_mean, the column the
    report's heavy-tail flag reads; coupled (hyprf-orf) and fitted (darkis-iid) cells store NaN."""
    out, df = full_run
    est = df[df["kind"] == "estimator"]
    theory = est.groupby("cell")["kernel_rel_mse_theory"]
    assert (theory.nunique(dropna=False) == 1).all()
    posrf = est["estimator"] == "posrf-iid"
    assert est.loc[posrf, "kernel_rel_mse_theory"].gt(0).all()
    assert est.loc[~posrf, "kernel_rel_mse_theory"].isna().all()
    assert df.loc[df["kind"] == "baseline", "kernel_rel_mse_theory"].isna().all()
    rows = est[posrf & (est["data"] == "isotropic") & (est["seq_len"] == 40) & (est["num_features"] == 8)
               & ~est["causal"]]
    from rfbench.data import synthetic

    q, k, _ = synthetic.make("isotropic", seq_len=40, dim=8, heads=2)
    source = next(s for s in prepare_sources(_suite()) if s.label == "isotropic")
    sample = M.sample_rows(40, 30, seed=derive_seed({"data": source.key, "seq_len": 40}, 0, 0))
    e = rb.make_estimator("posrf-iid", 8, 8)
    assert rows["kernel_rel_mse_theory"].iloc[0] == pytest.approx(
        M.expected_kernel_rel_mse(e, q, k, scale=8**-0.5, rows=sample), rel=1e-12)
    summary = pd.read_parquet(out / "summary.parquet")
    got = summary.set_index("cell").loc[rows["cell"].iloc[0], "kernel_rel_mse_theory_mean"]
    assert got == pytest.approx(rows["kernel_rel_mse_theory"].iloc[0], rel=1e-12)


def test_seeds_do_not_depend_on_order_or_sharding(full_run, tmp_path, monkeypatch):
    _, full = full_run
    shards = [
        R.load_results(runner.run_suite(_suite(), tmp_path / f"s{i}", shard=f"{i}/3", progress=False))
        for i in (1, 2, 3)
    ]
    assert sum(len(s) for s in shards) == len(full)
    pd.testing.assert_frame_equal(_stable(pd.concat(shards)), _stable(full))

    plan = runner.plan
    monkeypatch.setattr(runner, "plan", lambda *a: plan(*a)[::-1])  # every cell in the opposite order
    backwards = R.load_results(runner.run_suite(_suite(), tmp_path / "rev", progress=False))
    pd.testing.assert_frame_equal(_stable(backwards), _stable(full))


def test_derived_seeds():
    key = {"kind": "estimator", "estimator": {"name": "posrf-iid"}, "seq_len": 8}
    seeds = [derive_seed(key, 0, i) for i in range(4)]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [
        derive_seed(dict(reversed(list(key.items()))), 0, i) for i in range(4)
    ]  # key order
    assert derive_seed(key, 1, 0) != seeds[0]
    assert derive_seed({**key, "seq_len": 9}, 0, 0) != seeds[0]
    assert cell_id(key) == cell_id(dict(reversed(list(key.items()))))


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    text = SUITE.replace(
        'names = ["posrf-iid", "hyprf-orf", "darkis-iid"]',
        'names = ["posrf-iid", "hyprf-orf", "darkis-iid", "poisrf-orf"]',
    )
    text = text.replace("causal = [false, true]", "causal = [false]")
    real = cells.run_estimator_cell

    def flaky(cell, ctx, suite):
        if cell.name == "hyprf-orf" and cell.num_features == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if cell.name == "hyprf-orf" and cell.num_features == 8 and cell.seq_len == 24:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        if cell.name == "darkis-iid" and cell.seq_len == 40:
            raise ValueError("boom in the cell")
        return real(cell, ctx, suite)

    monkeypatch.setattr(cells, "run_estimator_cell", flaky)
    out = runner.run_suite(_suite(text), tmp_path / "out", progress=False)
    df = R.load_results(out)
    by = df.groupby("estimator")
    hyp = df[df["estimator"] == "hyprf-orf"]
    assert set(hyp.loc[hyp["num_features"] == 4, "status"]) == {"oom"}
    assert set(hyp.loc[(hyp["num_features"] == 8) & (hyp["seq_len"] == 24), "status"]) == {"oom"}
    assert set(hyp.loc[(hyp["num_features"] == 8) & (hyp["seq_len"] == 40), "status"]) == {"ok"}
    assert hyp.loc[hyp["status"] == "oom", "message"].str.contains("out of memory").all()
    dark = df[df["estimator"] == "darkis-iid"]
    assert set(dark.loc[dark["seq_len"] == 40, "status"]) == {"error"}
    assert set(dark.loc[dark["seq_len"] == 40, "message"]) == {"ValueError: boom in the cell"}
    assert set(by.get_group("poisrf-orf")["status"]) == {"skipped"}
    assert by.get_group("poisrf-orf")["message"].str.contains("does not apply").all()
    assert set(by.get_group("posrf-iid")["status"]) == {"ok"}  # the rest of the sweep ran
    failed = df[df["status"] != "ok"]
    assert failed[["kernel_mse", "out_rel_err"]].isna().all().all()
    assert not df.duplicated(["cell", "seed_index"]).any()
    summary = store.load_summary(out)
    assert set(summary.loc[summary["estimator"] == "poisrf-orf", "status"]) == {"skipped"}
    counts = summary["status"].value_counts()
    assert (counts["oom"], counts["error"], counts["skipped"]) == (6, 4, 8)  # cells, from the rules above
    text = terminal.format_summary(summary)
    assert "8 skipped, 6 oom, 4 error" in text and "see the message column" in text
    # the reasons come grouped with a count under the cells line, not only in the report
    assert "  skipped x8: poisrf-orf:" in text and "does not apply" in text
    assert "  error x4: ValueError: boom in the cell" in text


def _console_rows(kernel, output):
    """A summary of three estimator cells of one group with the given metric means (NaN: absent)."""
    names = ["darkis-iid", "posrf-orf", "oprf-orf"]
    return pd.DataFrame({
        "kind": "estimator", "status": "ok", "n_ok": 10, "data": "isotropic", "seq_len": 512,
        "causal": False, "device": "cpu", "fit_len": 0, "message": "", "estimator": names,
        "num_features": [32, 128, 128], "kernel_rel_mse_mean": kernel, "out_rel_err_mean": output,
        "time_ms_mean": [0.7, 2.0, 1.5]})


def _console_order(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.startswith("  ") and "-" in line.split()[0]]


def test_console_summary_ranks_like_the_leaderboards():
    """darkis-iid's kernel relative MSE 1.01 (what predicting zero scores) would lead a kernel
    ranking; by output error, the leaderboards' first metric, it comes last."""
    from rfbench.results.schema import RANK_ORDER

    assert RANK_ORDER[0] == "out_rel_err"
    text = terminal.format_summary(_console_rows([1.01, 5.0, 114.0], [3.29, 2.30, 2.40]))
    order = _console_order(text)
    assert order == ["posrf-orf", "oprf-orf", "darkis-iid"]
    assert "(ranked by mean out_rel_err, as the report's leaderboards)" in text
    nan = float("nan")
    text = terminal.format_summary(_console_rows([1.01, 5.0, 114.0], [nan] * 3))  # no output error
    assert "ranked by mean kernel_rel_mse" in text
    text = terminal.format_summary(_console_rows([nan] * 3, [nan] * 3))  # time only
    order = _console_order(text)
    assert "ranked by mean time_ms" in text and order == ["darkis-iid", "oprf-orf", "posrf-orf"]


def test_cli_exit_code_and_summary(tmp_path, monkeypatch, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(
        SUITE.replace("seq_len = [24, 40]", "seq_len = [24]").replace("causal = [false, true]", "")
    )
    assert cli.main_entry(["run", str(path), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "ranked by mean out_rel_err, as the report's leaderboards" in out
    assert "posrf-iid" in out and "baselines: exact" in out
    monkeypatch.setattr(cells, "run_estimator_cell", lambda *a: 1 / 0)
    assert cli.main_entry(["run", str(path), "--out", str(tmp_path / "b"), "--quiet"]) == 1
    assert "ended in error" in capsys.readouterr().err


def test_never_overwrites(tmp_path):
    small = SUITE.replace("seq_len = [24, 40]", "seq_len = [24]").replace("causal = [false, true]", "")
    out = runner.run_suite(_suite(small), tmp_path / "o", progress=False)
    with pytest.raises(SpecError, match="pass --resume"):
        runner.run_suite(_suite(small), out, progress=False)
    other = small.replace('name = "tiny"', 'name = "other"')
    with pytest.raises(SpecError, match="different suite"):
        runner.run_suite(_suite(other), out, resume=True, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SpecError, match="not an rfbench results folder"):
        runner.run_suite(_suite(), tmp_path / "mine", progress=False)
    with pytest.raises(SpecError, match="I/N"):
        runner.run_suite(_suite(), tmp_path / "x", shard="3/2", progress=False)


def test_resume_reruns_only_failed_cells(tmp_path, monkeypatch):
    text = SUITE.replace("seq_len = [24, 40]", "seq_len = [24]").replace("causal = [false, true]", "")
    real = cells.run_estimator_cell
    monkeypatch.setattr(
        cells,
        "run_estimator_cell",
        lambda cell, ctx, suite: (
            (_ for _ in ()).throw(ValueError("x")) if cell.name == "hyprf-orf" else real(cell, ctx, suite)
        ),
    )
    out = runner.run_suite(_suite(text), tmp_path / "o", progress=False)
    first = R.load_results(out)
    assert set(first.loc[first["estimator"] == "hyprf-orf", "status"]) == {"error"}
    calls = []
    monkeypatch.setattr(
        cells,
        "run_estimator_cell",
        lambda cell, ctx, suite: calls.append(cell.name) or real(cell, ctx, suite),
    )
    runner.run_suite(_suite(text), out, resume=True, progress=False)
    assert set(calls) == {"hyprf-orf"}  # the ok cells were not run again
    again = R.load_results(out)
    assert set(again["status"]) == {"ok"} and len(again) == len(first)
    kept = first[first["status"] == "ok"]
    pd.testing.assert_frame_equal(
        again[again["cell"].isin(kept["cell"])].reset_index(drop=True), kept.reset_index(drop=True)
    )
    meta = R.load_meta(out)
    assert [r["resume"] for r in meta.runs] == [False, True]


def test_load_results_round_trip(full_run, tmp_path):
    out, df = full_run
    assert R.load_results(out / "results.parquet").equals(df)
    copy = tmp_path / "copy"
    (copy / "cells").mkdir(parents=True)
    for path in store.cell_files(out).values():
        (copy / "cells" / path.name).write_bytes(path.read_bytes())
    # A killed run has cells but no consolidated tables yet: rows come from cells/.
    pd.testing.assert_frame_equal(_stable(R.load_results(copy)), _stable(df))
    summary = store.load_summary(copy)
    assert len(summary) == df["cell"].nunique()
    (copy / "cells" / ".x.parquet.123.tmp").write_bytes(b"half a file")
    os.utime(copy / "cells" / ".x.parquet.123.tmp", (0, 0))  # its writer is long gone
    assert store.remove_stale_temporaries(copy) == 1
    with pytest.raises(rb.DataError):
        R.load_results(tmp_path / "nothing-here")


def test_capture_source_per_layer_and_too_long(tmp_path):
    text = """
    [estimators]
    names = ["posrf-iid"]
    baselines = []
    [[data]]
    source = "bundled"
    layers = [1, 4]
    heads = [0, 2]
    per_layer = true
    [sweep]
    seq_len = [16, 600]
    num_features = [4]
    [seeds]
    count = 2
    [metrics]
    kernel_max_tokens = 16
    [timing]
    enabled = false
    """
    import textwrap

    out = runner.run_suite(parse_suite(textwrap.dedent(text)), tmp_path / "cap", progress=False)
    df = R.load_results(out)
    assert set(df["data"]) == {"bundled:L1:H0,2", "bundled:L4:H0,2"}
    assert (df["batch"] == 1).all() and (df["heads"] == 2).all() and (df["dim"] == 32).all()
    assert set(df.loc[df["seq_len"] == 16, "status"]) == {"ok"}
    long = df[df["seq_len"] == 600]
    assert set(long["status"]) == {"skipped"} and long["message"].str.contains("exceeds the 512 tokens").all()
    bad = textwrap.dedent(text).replace("layers = [1, 4]", "layers = [1, 9]")
    with pytest.raises(SpecError, match=r"data\[0\]: layer 9 is not in this capture"):
        runner.run_suite(parse_suite(bad, source="cap.toml"), tmp_path / "bad", progress=False)


def test_timing_and_memory_columns(tmp_path):
    text = SUITE.replace("[timing]\nenabled = false", "[timing]\nwarmup = 0\nrepeats = 3\nmax_seconds = 0.05")
    assert text != SUITE
    text = text.replace("seq_len = [24, 40]", "seq_len = [24]").replace("causal = [false, true]", "")
    text = text.replace('names = ["posrf-iid", "hyprf-orf", "darkis-iid"]', 'names = ["posrf-iid"]')
    df = R.load_results(runner.run_suite(_suite(text), tmp_path / "t", progress=False))
    est = df[df["kind"] == "estimator"]
    first = est[est["seed_index"] == 0]
    assert (first["n_rep"] == 3).all() and (first["time_ms_p20"] <= first["time_ms"]).all()
    assert (first["time_ms"] <= first["time_ms_p80"]).all() and (first["peak_mem_bytes"] >= 0).all()
    assert first["tokens_per_s"].tolist() == pytest.approx(
        (2 * 24 / (first["time_ms"] / 1e3))
        .where(first["data"] == "isotropic", 24 / (first["time_ms"] / 1e3))
        .tolist()
    )
    assert est.loc[est["seed_index"] > 0, "time_ms"].isna().all()  # only the first seed is timed
    assert est["draw_ms"].notna().all()
    base = df[df["kind"] == "baseline"]
    assert base["time_ms"].notna().all()
    assert (
        json.loads((tmp_path / "t" / "meta.json").read_text())["timing"]["timed_seeds"] == "seed_index 0 only"
    )


def test_baselines_say_why_they_cannot_run():
    from rfbench.suite import baselines

    assert baselines.get("exact").supports("float32", "cpu") == []
    reasons = baselines.get("flash").supports("float32", "cpu")
    assert reasons == [
        "FlashAttention runs on CUDA only",
        "FlashAttention needs float16 or bfloat16, not float32",
    ]
    assert baselines.get("flash").supports("bfloat16", "cuda") == []
    with pytest.raises(SpecError, match="known: exact, sdpa, flash, uniform"):
        baselines.get("nope")


def test_clipped_proposal_eigenvalues_are_recorded_in_the_message(tmp_path):
    """darkis on the bundled MiniLM capture (scaled second-moment eigenvalues 2.5-12, far above the
    1/2 that Sigma* needs): the cells stay ok, and each row's message says what was clipped."""
    text = """
[suite]
name = "clip"
[estimators]
names = ["darkis-iid", "posrf-iid"]
[[data]]
source = "bundled"
layers = [0]
[sweep]
seq_len = [32]
num_features = [8]
[seeds]
count = 2
[timing]
enabled = false
"""
    rows = R.load_results(runner.run_suite(_suite(text), tmp_path / "o", progress=False))
    assert set(rows["status"]) == {"ok"}
    dark = rows[rows["estimator"] == "darkis-iid"]
    assert dark["message"].str.contains(r"eigenvalues of the queries/keys second moment clipped").all()
    assert dark["message"].str.contains("max_eig=").all()
    assert (rows.loc[rows["estimator"] == "posrf-iid", "message"] == "").all()
