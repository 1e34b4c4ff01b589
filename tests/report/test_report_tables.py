"""Leaderboards and the failures table: ranking, CIs, failed rows kept with their reason, and the
Markdown / LaTeX (booktabs) / HTML renderings."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from test_report_synthetic import make_run

from rfbench.report import load_run
from rfbench.report.tables import (
    build_tables,
    fmt,
    fmt_ci,
    latex_escape,
    to_html,
    to_latex,
    to_markdown,
    write_tables,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(make_run(tmp_path_factory.mktemp("tables") / "run"))


@pytest.fixture(scope="module")
def tables(run):
    return build_tables(run)


def test_one_leaderboard_per_data_source_then_failures(tables):
    assert [t.title for t in tables] == ["Leaderboard: isotropic", "Leaderboard: anisotropic(cond=100)",
                                         "Failed and skipped cells"]


def test_leaderboard_is_ranked_by_mean_kernel_error_with_its_ci(run, tables):
    board = tables[0]  # ranked by output error, which here grows with the kernel error
    assert board.columns[:4] == ["rank", "estimator", "m", "kernel rel. MSE ↓"]
    ranked = [row for row, status in zip(board.rows, board.row_status) if status == "ok"]
    ranks = [int(r[0].rstrip("=")) for r in ranked]
    assert ranks == sorted(ranks) and ranks[0] == 1  # equal ranks are marked =
    assert all(r[0].endswith("=") == (ranks.count(int(r[0].rstrip("="))) > 1) for r in ranked)
    means = [float(r[3].split(" ± ")[0]) for r in ranked]
    assert means == sorted(means) and len(ranked) == 11
    # The first row's numbers are the summary's mean and 95% CI half-width of that cell.
    s = run.summary
    first = ranked[0]
    cell = s[(s["estimator"] == first[1]) & (s["data"] == "isotropic") & (s["num_features"] == int(first[2]))]
    cell = cell[cell["seq_len"] == cell["seq_len"].max()]  # the caption names the slice (L=1024)
    assert "L=1024" in board.caption and "m=128" in board.caption
    mean, lo, hi = cell[["kernel_rel_mse_mean", "kernel_rel_mse_ci_low", "kernel_rel_mse_ci_high"]].iloc[0]
    assert first[3] == f"{mean:.3g} ± {(hi - lo) / 2:.3g}"


def test_failed_skipped_and_oom_rows_are_kept_with_their_reason(tables):
    board = tables[0]
    text = {row[1]: row for row in board.rows}
    assert text["hyprf-qmc"][0] == "–" and text["hyprf-qmc"][-1].startswith("skipped: qmc: needs m >= d")
    assert text["exact (baseline)"][-1].startswith("oom: out of memory")
    assert text["exact (baseline)"][3] == "—"
    assert text["sdpa (baseline)"][0] == "ref"
    fails = tables[-1]
    assert fails.columns[:2] == ["status", "cells"]
    assert fails.rows[0][0] == "error"  # worst status first
    trig = next(r for r in fails.rows if "trigrf-sorf" in r[2])
    assert trig[0] == "error" and "isotropic" in trig[3] and trig[4] == "128/256/512/1024"
    assert any(r[0] == "oom" and "exact" in r[2] for r in fails.rows)
    reasons = [(r[0], r[7]) for r in fails.rows]
    assert len(reasons) == len(set(reasons))  # one row per distinct reason


def test_partial_failures_show_the_seed_count(run):
    summary = run.summary.copy()
    i = summary.index[(summary["estimator"] == "posrf-orf") & (summary["data"] == "isotropic")
                      & (summary["seq_len"] == 1024) & (summary["num_features"] == 128)][0]
    summary.loc[i, ["status", "message", "n_ok"]] = ["error", "RuntimeError: NaN", 3]
    partial = type(run)(path=run.path, results=run.results, summary=summary, meta=run.meta)
    board = build_tables(partial)[0]
    row = next(r for r in board.rows if r[1] == "posrf-orf")
    assert row[0] == "–" and row[-1] == "error in 1 of 4 seeds: RuntimeError: NaN" and row[-2] == "3/4"
    assert row[3] != "—"  # the three good seeds still give numbers


def test_markdown_table_is_well_formed(tables):
    md = to_markdown(tables[0])
    lines = [line for line in md.splitlines() if line.startswith("|")]
    widths = {line.count(" | ") for line in lines if not line.startswith("|-") and not line.startswith("|:")}
    assert len(widths) == 1  # every row has as many cells as the header
    assert lines[1].startswith("|---:|:---|---:|")


def test_latex_uses_booktabs_and_escapes(tables):
    tex = to_latex(tables[-1])
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrllllrl}"):
        assert rule in tex
    assert tex.count(r"\\") == len(tables[-1].rows) + 1
    escaped = r"50\% of x\_1 \& \{y\} \#2 \textasciitilde{} \textasciicircum{}"
    assert latex_escape("50% of x_1 & {y} #2 ~ ^") == escaped
    assert latex_escape("0.1 ± 0.02 ↓") == r"0.1 $\pm$ 0.02 $\downarrow$"
    board = to_latex(tables[0])
    assert board.count(r"\midrule") == 3  # header, then ranked | failed | baselines


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.classes = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append(0)
            self.classes.append(dict(attrs).get("class", ""))
        elif tag in ("td", "th"):
            self.rows[-1] += 1


def test_html_table_has_a_header_and_one_row_per_entry(tables):
    parser = _Cells()
    parser.feed(to_html(tables[0]))
    assert len(parser.rows) == len(tables[0].rows) + 1
    assert set(parser.rows) == {len(tables[0].columns)}
    assert "status-skipped" in parser.classes and "status-oom" in parser.classes


def test_write_tables_writes_every_format(run, tmp_path):
    _, paths = write_tables(run, tmp_path)
    names = {p.name for p in paths}
    assert names == {"leaderboard.md", "leaderboard.tex", "leaderboard.html", "cells.csv"}
    assert "% needs \\usepackage{booktabs}" in (tmp_path / "leaderboard.tex").read_text()
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert len(cells) == len(run.summary) and "kernel_rel_mse_ci_high" in cells


def test_number_formatting():
    assert fmt(0.012345) == "0.0123" and fmt(1.5e-7) == "1.50e-07" and fmt(123456.0) == "1.23e+05"
    assert fmt(0) == "0" and fmt(np.nan) == "—"
    assert fmt_ci(0.5, 0.4, 0.6) == "0.5 ± 0.1"
    assert fmt_ci(0.5, np.nan, np.nan) == "0.5" and fmt_ci(np.nan, 0, 1) == "—"
