"""Figures of `rfbench report` on a small synthetic run: each exists, is a real image, carries its
labels and units, and a figure whose data the run lacks is skipped with a reason."""

from __future__ import annotations

import re
import struct
from dataclasses import replace

import pandas as pd
import pytest
from test_report_synthetic import SMALL, make_run, summarise

from rfbench.report import load_run
from rfbench.report.plots import Figure, Options, Palette, Skip, render_figures

# name -> texts its SVG must contain (axis labels with units, legend entries, annotations)
EXPECTED = {
    "kernel_error_vs_features": ["kernel relative MSE", "random features m", "i.i.d. law C/m", "orf",
                                 "posrf"],
    "output_error_vs_features": ["attention-output relative error", "random features m"],
    "error_time_vs_seqlen": ["forward time (ms)", "sequence length L (tokens)", "exact (baseline)"],
    "memory_vs_seqlen": ["peak memory (MiB)", "sequence length L (tokens)", "sdpa (baseline)"],
    "error_heatmap": ["feature map", "weight matrix", "skipped", "kernel relative MSE"],
    "error_vs_time_pareto": ["forward time (ms)", "Pareto front", "attention-output relative error"],
    "bias_variance": ["bias²", "MC variance", "variance / n seeds", "posrf-orf"],
}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def svg_text(path) -> str:
    """The text of an SVG (svg.fonttype='none' keeps labels as <text>), entities decoded."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", " ", path.read_text()))


# Two data sources (facet rows), two feature maps, three weight matrices; hyprf-qmc is skipped and
# exact attention runs out of memory at L=1024.
GRID = dict(feature_maps={"posrf": 2.0, "hyprf": 1.2}, weights={"iid": 1.0, "orf": 0.7, "qmc": 0.6})


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    base = tmp_path_factory.mktemp("plots")
    run = load_run(make_run(base / "run", **GRID))
    opts = Options(out_dir=base / "out" / "figures", dpi=60)
    return run, opts, {f.name: f for f in render_figures(run, opts)}


def test_every_figure_is_drawn_as_png_and_svg(rendered):
    _, opts, figures = rendered
    assert set(figures) == set(EXPECTED)
    for name, fig in figures.items():
        assert isinstance(fig, Figure), f"{name} skipped: {getattr(fig, 'reason', '')}"
        png, svg = (opts.out_dir.parent / f for f in fig.files)
        width, height = png_size(png)
        assert width >= 250 and height >= 150 and png.stat().st_size > 8_000, name
        text = svg_text(svg)
        for needle in EXPECTED[name]:
            assert needle in text, f"{name}: {needle!r} missing from the figure"
        assert len(fig.caption) > 80 and fig.title


def test_error_axes_are_logarithmic_when_the_values_span_decades(rendered):
    _, opts, figures = rendered
    # Log axes get 1-2-5 / decade tick labels from rfbench; a linear axis would print 0.2, 0.4...
    text = svg_text(opts.out_dir.parent / figures["kernel_error_vs_features"].files[1])
    assert "0.01" in text and "0.1" in text


def test_captions_name_the_slice_and_what_was_left_out(rendered):
    _, _, figures = rendered
    assert "L=256" in figures["kernel_error_vs_features"].caption
    time_caption = figures["error_time_vs_seqlen"].caption
    assert "m=128" in time_caption and "exact L=1024 (oom)" in time_caption
    assert "95%" in figures["kernel_error_vs_features"].caption


def test_legend_titles_say_what_colour_and_marker_stand_for(rendered):
    """Where markers stand for feature maps (the Pareto plot, two maps) the title says so; on the
    error-vs-m figure the panels are titled by feature map and the legend lists colours only."""
    _, opts, figures = rendered
    pareto = svg_text(opts.out_dir.parent / figures["error_vs_time_pareto"].files[1])
    per_m = svg_text(opts.out_dir.parent / figures["kernel_error_vs_features"].files[1])
    assert "colour: weight matrix · marker: feature map" in pareto
    assert "colour: weight matrix" in per_m and "marker: feature map" not in per_m
    one_map = pd.DataFrame({"feature_map": ["posrf", "posrf"], "weight_matrix": ["iid", "orf"]})
    assert Palette(one_map).legend_title(one_map) == "colour: weight matrix"


def test_var1_over_m_is_called_an_expectation_and_heavy_tails_are_named(tmp_path):
    """A run of 10 seeds where one seed of posrf-iid at m=64 is 200 times the others: the kernel
    figure's caption names that cell and says the seeds' mean is unreliable there."""
    path = make_run(tmp_path / "run", n_seeds=10, **SMALL)
    results = pd.read_parquet(path / "results.parquet")
    hit = ((results["estimator"] == "posrf-iid") & (results["num_features"] == 64)
           & (results["seq_len"] == 256) & (results["seed_index"] == 3))
    results.loc[hit, "kernel_rel_mse"] *= 200
    results.to_parquet(path / "results.parquet", index=False)
    summarise(results, 10).to_parquet(path / "summary.parquet", index=False)
    opts = Options(out_dir=tmp_path / "figs", formats=("png",), dpi=40, prefer={"seq_len": 256})
    from rfbench.report.plots import error_heatmap, error_vs_features

    caption = error_vs_features(load_run(path), opts, "kernel_rel_mse", "k").caption
    assert "expected MSE is Var₁/m (an expectation" in caption and "exactly" not in caption
    assert "Unreliable kernel relative MSE: in 1 of" in caption and "(posrf-iid m=64)" in caption
    assert "by output error" in caption
    grid = error_heatmap(load_run(path), replace(opts, prefer={"seq_len": 256, "num_features": 64}))
    assert "(posrf-iid m=64)" in grid.caption


def test_colours_follow_the_weight_matrix_not_the_run():
    a = Palette(pd.DataFrame({"feature_map": ["posrf", "trigrf"], "weight_matrix": ["orf", "iid"]}))
    b = Palette(pd.DataFrame({"feature_map": ["hyprf"], "weight_matrix": ["orf"]}))
    assert a.colour["orf"] == b.colour["orf"] and a.colour["iid"] != a.colour["orf"]
    assert a.marker["posrf"] == b.marker["posrf"]


def test_feature_maps_of_one_run_never_share_a_marker():
    """19 maps are registered and 13 markers exist: posrf and maclaurin shared a square."""
    fms = ["posrf", "maclaurin", "hybrid", "lara", "taylor2", "hedgehog"]
    pal = Palette(pd.DataFrame({"feature_map": fms, "weight_matrix": ["iid"] * len(fms)}))
    assert len({pal.marker[f] for f in fms}) == len(fms)


def test_closed_form_overlay_is_drawn_when_the_run_stores_it(tmp_path):
    path = make_run(tmp_path / "run", **SMALL)
    summary = pd.read_parquet(path / "summary.parquet")
    c = {"posrf": 2.0, "hyprf": 1.2, "trigrf": 8.0}
    summary["kernel_rel_mse_theory"] = [c.get(fm, float("nan")) / max(m, 1) for fm, m in
                                        zip(summary["feature_map"], summary["num_features"])]
    summary.to_parquet(path / "summary.parquet")
    opts = Options(out_dir=tmp_path / "figs", formats=("svg",), dpi=50)
    from rfbench.report.plots import error_vs_features

    fig = error_vs_features(load_run(path), opts, "kernel_rel_mse", "k")
    assert "closed form, i.i.d. (rfbench.theory)" in svg_text(tmp_path / "figs" / "k.svg")
    assert "Var₁/m" in fig.caption
    # panels without a closed form fall back to the fitted C/m: both are named, each its own style
    summary.loc[summary["feature_map"] == "hyprf", "kernel_rel_mse_theory"] = float("nan")
    summary.to_parquet(path / "summary.parquet")
    fig = error_vs_features(load_run(path), opts, "kernel_rel_mse", "k2")
    assert "dotted: closed form, i.i.d. (rfbench.theory)" in fig.caption
    assert "dash-dotted: i.i.d. law C/m (C fitted to iid)" in fig.caption
    svg = svg_text(tmp_path / "figs" / "k2.svg")
    assert "closed form, i.i.d." in svg and "C fitted to iid" in svg


def test_figures_without_data_are_skipped_with_a_reason(tmp_path):
    """One L, no memory, no cross-seed statistics: three figures are skipped, each saying why."""
    path = make_run(tmp_path / "run", **SMALL)
    for name in ("results", "summary"):
        frame = pd.read_parquet(path / f"{name}.parquet")
        frame = frame[frame["seq_len"] == 256].copy()
        frame["peak_mem_bytes" if name == "results" else "peak_mem_bytes_mean"] = float("nan")
        if name == "summary":
            frame = frame.drop(columns=["bias2", "bias2_rel", "mc_variance", "mc_variance_rel"])
        frame.to_parquet(path / f"{name}.parquet")
    out = {f.name: f for f in render_figures(load_run(path), Options(out_dir=tmp_path / "f", formats=("png",),
                                                                     dpi=50))}
    skipped = {n: f.reason for n, f in out.items() if isinstance(f, Skip)}
    assert set(skipped) == {"error_time_vs_seqlen", "memory_vs_seqlen", "bias_variance"}
    assert "single sequence length" in skipped["error_time_vs_seqlen"]
    assert "no peak memory" in skipped["memory_vs_seqlen"]
    assert "bias²/variance" in skipped["bias_variance"]
    assert isinstance(out["error_heatmap"], Figure) and isinstance(out["error_vs_time_pareto"], Figure)


def test_a_preferred_m_fixes_the_heatmap_slice(tmp_path):
    path = make_run(tmp_path / "run", **SMALL)
    from rfbench.report.plots import error_heatmap

    fig = error_heatmap(load_run(path), Options(out_dir=tmp_path / "f", formats=("png",), dpi=50,
                                                prefer={"num_features": 32}))
    assert "m=32" in fig.caption
