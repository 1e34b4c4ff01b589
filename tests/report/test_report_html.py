"""`rfbench report RUN_DIR`: the command end to end; report.html's links, metadata and sections."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from test_report_synthetic import SMALL, make_run

from rfbench.cli import main_entry


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.ids, self.stack_errors = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if "id" in a:
            self.ids.add(a["id"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("html")
    run = make_run(base / "run", **SMALL)
    out = base / "report"
    code = main_entry(["report", str(run), "--out", str(out), "--no-svg", "--dpi", "50"])
    return code, run, out


def test_report_command_writes_the_page_figures_and_tables(report):
    code, _, out = report
    assert code == 0
    assert (out / "report.html").is_file()
    assert len(list((out / "figures").glob("*.png"))) == 7 and not list((out / "figures").glob("*.svg"))
    for name in ("leaderboard.md", "leaderboard.tex", "leaderboard.html", "cells.csv"):
        assert (out / "tables" / name).stat().st_size > 200


def test_every_image_and_link_resolves_relative_to_the_page(report):
    _, _, out = report
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert len(page.images) == 7
    for src in page.images + [h for h in page.links if not h.startswith("#")]:
        assert not src.startswith(("/", "http")), src  # relative: the folder can move
        assert (out / src).is_file(), src
    for anchor in (h[1:] for h in page.links if h.startswith("#")):
        assert anchor in page.ids


def test_page_shows_metadata_guide_figures_and_tables(report):
    _, run, out = report
    html = (out / "report.html").read_text()
    for needle in ("suite <code>synthetic</code>", "torch 2.13.0", "testhost", "abc1234 (dirty)",
                   "Synthetic CPU @ 2 cores",
                   "2025-01-01T10:00:00+00:00 → 2025-01-01T10:03:20+00:00 (3.3 min)",
                   "How to read this report", "Leaderboard: isotropic", "Failed and skipped cells",
                   "oom: out of memory", "CPU: peak RSS growth", "[suite]"):
        assert needle in html, needle
    assert "<script" not in html  # nothing to run, nothing to fail


def test_embed_makes_a_single_file_page(tmp_path, report):
    _, run, _ = report
    out = tmp_path / "embedded"
    assert main_entry(["report", str(run), "--out", str(out), "--no-svg", "--dpi", "40", "--embed"]) == 0
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 7 and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_skipped_figures_are_listed_with_their_reason(tmp_path):
    run = make_run(tmp_path / "run", **SMALL)
    for name in ("results", "summary"):
        frame = pd.read_parquet(run / f"{name}.parquet")
        frame[frame["seq_len"] == 512].to_parquet(run / f"{name}.parquet")
    (run / "meta.json").unlink()
    assert main_entry(["report", str(run), "--no-svg", "--dpi", "40"]) == 0  # default --out: RUN_DIR
    html = (run / "report.html").read_text()
    assert "Not drawn, because the run lacks their data" in html
    assert "single sequence length" in html
    assert "meta.json is missing" in html


def test_a_broken_meta_json_without_run_records_still_reports(tmp_path):
    """The rows are intact, so a truncated meta.json of a folder with no runs/ to rebuild it from
    costs only the metadata, said in the report, not the report."""
    run = make_run(tmp_path / "run", **SMALL)
    shutil.rmtree(run / "runs", ignore_errors=True)
    (run / "meta.json").write_text('{"suite": {"name": "qu')
    assert main_entry(["report", str(run), "--no-svg", "--dpi", "40"]) == 0
    html = (run / "report.html").read_text()
    assert "meta.json cannot be read" in html and "--resume" in html


def test_missing_folder_and_bad_options_exit_2_with_one_line(tmp_path, capsys):
    assert main_entry(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    Path(tmp_path / "empty").mkdir()
    assert main_entry(["report", str(tmp_path / "empty")]) == 2
    assert "no results.parquet" in capsys.readouterr().err
    assert main_entry(["report", str(tmp_path / "empty"), "--dpi", "5"]) == 2
    assert "--dpi" in capsys.readouterr().err
