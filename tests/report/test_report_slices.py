"""Leaderboard slices per data source, noise-respecting ranks, --where, merged folders, the
uniform marker, escaping of labels, and writes that never go through a planted link."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from test_report_synthetic import SMALL, make_run

from rfbench.errors import DataError, SpecError
from rfbench.report import Run, apply_where, load_runs, parse_where
from rfbench.report.analysis import board_slices, noise_ranks
from rfbench.report.tables import RANK_RULE, build_tables, to_html, to_markdown, write_tables


def _cell(est, data, L, m, err, lo=None, hi=None, status="ok", kind="estimator", message="", **extra):
    fm, _, wm = est.partition("-")
    lo = err if lo is None else lo
    hi = err if hi is None else hi
    return dict(suite="s", cell=f"{est}|{data}|{L}|{m}", kind=kind, estimator=est, feature_map=fm,
                weight_matrix=wm, data=data, seq_len=L, num_features=m, dim=32, batch=1, heads=1,
                causal=False, dtype="float32", device="cpu", n_seeds=5, n_ok=5 if status == "ok" else 0,
                status=status, message=message,
                out_rel_err_mean=err, out_rel_err_ci_low=lo, out_rel_err_ci_high=hi, **extra)


def _run(rows) -> Run:
    summary = pd.DataFrame(rows)
    return Run(path=".", results=summary.iloc[:0], summary=summary)


def test_each_source_gets_its_largest_L_and_m():
    rows = [_cell("posrf-iid", "long", L, m, 1.0 / m) for L in (256, 1024) for m in (32, 128)]
    rows += [_cell("posrf-iid", "short", 256, m, 1.0 / m) for m in (32, 64)]  # never run at L=1024
    rows.append(_cell("posrf-iid", "long", 2048, 128, np.nan, status="oom"))  # failed: not the slice
    slices = board_slices(pd.DataFrame(rows))
    fixed = {f["data"]: (f["seq_len"], f["num_features"]) for _, f in slices}
    assert fixed == {"long": (1024, 128), "short": (256, 64)}
    assert all(len(r) == 1 for r, _ in slices)
    titles = [t.title for t in build_tables(_run(rows))]
    assert "Leaderboard: short" in titles and all("?" not in t.caption for t in build_tables(_run(rows)))


def test_noise_ranks_count_intervals_wholly_below_and_never_fall_down_the_table():
    mean = [1.0, 1.1, 2.0, 2.05, 5.0]
    lo = [0.9, 0.8, 1.9, 1.0, 4.9]
    hi = [1.1, 1.4, 2.1, 3.0, 5.1]
    # 2.0's interval lies wholly above the first two (rank 3); no interval lies below 2.05's, whose
    # own count (1) is raised to the rank above it (3); 5.0 is above all four
    assert noise_ranks(mean, lo, hi).tolist() == [1, 1, 3, 3, 5]
    assert noise_ranks([1, 2, 3], [np.nan] * 3, [np.nan] * 3).tolist() == [1, 2, 3]  # one seed: by mean


def test_overlapping_intervals_need_not_share_a_rank():
    """The caption's sentence: [1.2, 1.6] overlaps [0.8, 1.4] (rank 1=) yet ranks 2, as
    [0.9, 1.1] lies wholly below it but not below [0.8, 1.4]."""
    ranks = noise_ranks([1.0, 1.1, 1.4], [0.9, 0.8, 1.2], [1.1, 1.4, 1.6]).tolist()
    assert ranks == [1, 1, 2]
    board = build_tables(_run([_cell("a-iid", "d", 512, 64, 1.0, 0.9, 1.1),
                               _cell("b-iid", "d", 512, 64, 1.1, 0.8, 1.4),
                               _cell("c-iid", "d", 512, 64, 1.4, 1.2, 1.6)]))[0]
    assert [r[0] for r in board.rows] == ["1=", "1=", "2"]
    assert RANK_RULE in board.caption and "raised where needed" in RANK_RULE
    assert "need not share a rank" in RANK_RULE


def test_leaderboard_marks_shared_ranks_seeds_and_estimators_worse_than_uniform():
    rows = [_cell("posrf-orf", "d", 512, 64, 0.5, 0.45, 0.55),
            _cell("posrf-iid", "d", 512, 64, 0.52, 0.4, 0.6),
            _cell("trigrf-iid", "d", 512, 64, 3.0, 2.5, 3.5),
            _cell("uniform", "d", 512, 0, 0.8, kind="baseline")]
    rows[0]["n_ok"], rows[0]["n_seeds"] = 4, 5
    board = build_tables(_run(rows))[0]
    ranked = {r[1]: r for r in board.rows}
    assert [ranked[e][0] for e in ("posrf-orf", "posrf-iid", "trigrf-iid")] == ["1=", "1=", "3"]
    assert ranked["posrf-orf"][-2] == "4/5" and ranked["posrf-iid"][-2] == "5"
    assert "above uniform" in ranked["trigrf-iid"][-1] and "uniform" not in ranked["posrf-orf"][-1]
    assert "1 of 3 ranked estimators" in board.caption


def test_leaderboard_names_the_estimators_whose_kernel_mse_one_seed_decides():
    """oprf-orf's 10 seeds: nine at 1 and one at 91 (91% of the sum), as the quick suite's heavy
    tails give; posrf-orf's are all 2. Only oprf-orf is named, and output error is pointed to."""
    seeds = {"oprf-orf": [1.0] * 9 + [91.0], "posrf-orf": [2.0] * 10}
    rows = [{**_cell(e, "d", 512, 64, 0.5 + i, kernel_rel_mse_mean=float(np.mean(v))),
             "n_ok": 10, "n_seeds": 10} for i, (e, v) in enumerate(seeds.items())]
    results = pd.DataFrame([dict(cell=f"{e}|d|512|64", status="ok", kernel_rel_mse=x)
                            for e, v in seeds.items() for x in v])
    board = build_tables(Run(path=".", results=results, summary=pd.DataFrame(rows)))[0]
    assert "Unreliable kernel relative MSE: in 1 of 2 cells (oprf-orf m=64) one seed holds" in board.caption
    assert "by output error" in board.caption
    posrf_only = results[results["cell"].str.startswith("posrf")]
    light = Run(path=".", results=posrf_only, summary=pd.DataFrame(rows))
    assert "Unreliable" not in build_tables(light)[0].caption


def test_failures_group_identical_reasons_with_a_count():
    rows = [_cell(f"posrf-{w}", d, L, 16, np.nan, status="skipped", message="needs m >= d")
            for w in ("qmc", "sorf") for d in ("a", "b") for L in (128, 256, 512)]
    rows.append(_cell("trigrf-iid", "a", 128, 16, np.nan, status="error", message="NaN"))
    fails = build_tables(_run(rows))[-1]
    want = [("error", "1", "NaN"), ("skipped", "12", "needs m >= d")]
    assert [(r[0], r[1], r[-1]) for r in fails.rows] == want
    assert fails.rows[1][2] == "posrf-qmc, posrf-sorf" and fails.rows[1][4] == "128/256/512"


def test_where_filters_any_key_and_names_what_is_known():
    frame = pd.DataFrame([_cell("posrf-iid", d, 256, 32, 1.0) for d in ("iso", "aniso")])
    assert parse_where(["data=iso", "causal=false"]) == {"data": ["iso"], "causal": ["false"]}
    assert apply_where(frame, {"data": ["iso"], "causal": ["False"]})["data"].tolist() == ["iso"]
    assert len(apply_where(frame, {"seq_len": ["256"]})) == 2
    with pytest.raises(SpecError, match="unknown key 'colour'.*key columns: .*data"):
        apply_where(frame, {"colour": ["red"]})
    with pytest.raises(SpecError, match="data=.lowrank. is not in .*aniso, iso"):
        apply_where(frame, {"data": ["lowrank"]})
    with pytest.raises(SpecError, match="key=value"):
        parse_where(["causal"])


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("merge")
    a = make_run(base / "a", n_seeds=3, **SMALL)
    b = make_run(base / "b", n_seeds=3, error_factor=2.0, **SMALL)
    return a, b


def test_several_folders_merge_and_the_last_wins_a_shared_cell(two_folders):
    a, b = two_folders
    one, merged = load_runs([a]), load_runs([a, b])
    assert len(merged.summary) == len(one.summary)  # the same cells: b replaces every one
    assert len(merged.results) == len(one.results)
    assert any("taken from the last folder" in n for n in merged.notes)
    col = "kernel_rel_mse_mean"
    got = merged.summary.set_index("cell")[col].dropna().sort_index()
    want = load_runs([b]).summary.set_index("cell")[col].dropna().sort_index()
    pd.testing.assert_series_equal(got, want)
    sub = load_runs([a, b], where={"estimator": ["posrf-iid"]})
    assert set(sub.summary["estimator"]) == {"posrf-iid"}


def test_labels_are_escaped_in_markdown_and_html():
    evil = "<img src=x onerror=alert(1)>"
    rows = [_cell("posrf-iid", evil, 256, 32, 0.5), _cell("posrf-orf", evil, 256, 32, 0.4)]
    for table in build_tables(_run(rows)):
        assert "<img" not in to_markdown(table) and "<img" not in to_html(table)
        assert "&lt;img" in to_markdown(table)


def test_report_outputs_never_follow_a_planted_link(two_folders, tmp_path):
    a, _ = two_folders
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    out = tmp_path / "tables"
    out.mkdir()
    os.symlink(target, out / "leaderboard.md")
    with pytest.raises(DataError, match="symbolic link"):
        write_tables(load_runs([a]), out)
    assert target.read_text() == "keep me"
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    os.symlink(linked, tmp_path / "tables2")
    with pytest.raises(DataError, match="symbolic link"):
        write_tables(load_runs([a]), tmp_path / "tables2")
    assert not any(linked.iterdir())
    tmp = tmp_path / "ok"
    write_tables(load_runs([a]), tmp)
    assert not [p for p in tmp.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_each_causal_value_gets_its_figures(two_folders, tmp_path):
    from rfbench.report.plots import Figure, Options, render_figures

    run = load_runs([two_folders[0]])
    both = [run.summary, run.summary.assign(causal=True, cell=run.summary["cell"] + "c")]
    results = [run.results, run.results.assign(causal=True, cell=run.results["cell"] + "c")]
    mixed = Run(path=run.path, results=pd.concat(results), summary=pd.concat(both), meta=run.meta)
    figures = render_figures(mixed, Options(out_dir=tmp_path, formats=("png",), dpi=30))
    drawn = [f for f in figures if isinstance(f, Figure)]
    names = {f.name for f in drawn}
    assert "error_heatmap_causal" in names and "error_heatmap_noncausal" in names
    assert all((tmp_path / f.files[0].split("/")[-1]).is_file() for f in drawn)
    assert all(("(causal)" in f.title) != ("(non-causal)" in f.title) for f in figures)


def test_cli_where_errors_are_one_line_with_exit_2(two_folders, capsys, tmp_path):
    from rfbench.cli import main_entry

    a, b = two_folders
    assert main_entry(["report", str(a), "--where", "colour=red", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'colour'" in err[0]
    before = (a / "report.html").read_bytes() if (a / "report.html").exists() else None
    assert main_entry(["report", str(a), str(b)]) == 2  # merged folders: --out is required
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --out DIR" in err[0]
    assert ((a / "report.html").read_bytes() if (a / "report.html").exists() else None) == before
