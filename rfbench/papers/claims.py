"""Published claims as data, their evaluation on a results frame, and the claim-versus-measured table.

A ``Comparison`` says: on the rows ``a`` selects, the mean of ``metric`` (squared when
``square``) is below (``relation = "<"``) or above (``">"``) its mean on the rows ``b`` selects,
slice by slice (``by``: the columns a slice shares, such as ``num_features``). What is measured
is the ratio of means A / B per slice and, pooled over the slices, their geometric mean; each
has a 95% percentile-bootstrap interval (seeds resampled within each cell, 2,000 replicates,
fixed generator). The verdict is read off the interval against the boundary 1:

    holds         the whole interval is on the claimed side
    fails         the whole interval is on the other side
    inconclusive  the interval straddles 1

Closed-form claims (``rfbench.papers.lemma2``, ``rfbench.papers.favorpp``) build their
``Outcome`` rows themselves; every paper's rows go through the same ``markdown`` / ``html``.
"""

from __future__ import annotations

import html as _html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rfbench.errors import SpecError

VERDICTS = ("holds", "fails", "inconclusive")
N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Comparison:
    """One published claim, as which rows to compare on which metric (see the module docstring)."""

    claim: str  # the claim in words, as the paper makes it
    source: str  # paper, figure or section
    metric: str  # a results column
    a: dict  # column -> value (or tuple of values) selecting the rows claimed lower (for "<")
    b: dict  # the rows they are compared with
    relation: str = "<"
    square: bool = False  # compare metric**2 (out_rel_err**2 is the output MSE up to a constant)
    by: tuple[str, ...] = ("num_features",)
    where: dict = field(default_factory=dict)  # filter applied to both sides first
    label: str = ""  # what A / B is, for the table ("posrf-orf / posrf-iid, output MSE")
    metric_b: str = ""  # B's column when it differs (DARK's own-kernel error against PosRF's softmax one)

    def __post_init__(self):
        if self.relation not in ("<", ">"):
            raise SpecError(f"claim {self.claim!r}: relation must be '<' or '>', got {self.relation!r}")


@dataclass(frozen=True)
class Outcome:
    """One row of the claim table: the claim, what was measured, its 95% interval and the verdict."""

    claim: str
    source: str
    measured: str  # what the number is ("ratio of means posrf-orf / posrf-iid")
    value: float
    low: float
    high: float
    verdict: str
    detail: str = ""  # e.g. "holds at 10 of 12 m, inconclusive at 2"
    slices: tuple = ()  # (slice label, value, low, high, verdict) per slice


def verdict(low: float, high: float, relation: str = "<", boundary: float = 1.0) -> str:
    """holds / fails / inconclusive for an interval [low, high] against ``relation boundary``."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    below, above = high < boundary, low > boundary
    if relation == "<":
        return "holds" if below else "fails" if above else "inconclusive"
    return "holds" if above else "fails" if below else "inconclusive"


def _select(frame: pd.DataFrame, sel: dict) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for col, want in sel.items():
        if col not in frame:
            return frame.iloc[0:0]
        values = want if isinstance(want, (tuple, list)) else (want,)
        mask &= frame[col].isin(values).to_numpy()
    return frame[mask]


def _boot_means(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """Bootstrap replicates of the mean of ``values`` (seeds resampled with replacement)."""
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return values[idx].mean(axis=1)


def evaluate(claims, results: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> list[Outcome]:
    """Each Comparison of ``claims`` on ``results`` (rows with status ok), as an Outcome."""
    ok = results[results["status"] == "ok"] if "status" in results else results
    rng = np.random.default_rng(seed)
    alpha = (1 - LEVEL) / 2
    outcomes = []
    for c in claims:
        frame = _select(ok, c.where)
        side_a, side_b = _select(frame, c.a), _select(frame, c.b)
        metric_b = c.metric_b or c.metric
        if c.metric not in frame or metric_b not in frame or side_a.empty or side_b.empty:
            outcomes.append(Outcome(c.claim, c.source, c.label or c.metric, np.nan, np.nan, np.nan,
                                    "inconclusive", "no rows to compare: the run lacks them"))
            continue
        slices, logs = [], []
        keys = list(c.by)
        groups_b = {k: g for k, g in side_b.groupby(keys, sort=True)} if keys else {(): side_b}
        groups_a = side_a.groupby(keys, sort=True) if keys else [((), side_a)]
        for key, ga in groups_a:
            gb = groups_b.get(key)
            va = ga[c.metric].dropna().to_numpy(dtype=float)
            vb = gb[metric_b].dropna().to_numpy(dtype=float) if gb is not None else va[:0]
            # a baseline is run once: one value on a side is taken as fixed, the other needs a spread
            if len(va) == 0 or len(vb) == 0 or len(va) + len(vb) < 3:
                continue
            if c.square:
                va, vb = va**2, vb**2
            ba, bb = _boot_means(va, rng, n_boot), _boot_means(vb, rng, n_boot)
            with np.errstate(divide="ignore", invalid="ignore"):
                boot = np.log(ba) - np.log(bb)
            logs.append(boot)
            lo, hi = np.exp(np.nanquantile(boot, [alpha, 1 - alpha]))
            ratio = va.mean() / vb.mean()
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, key if isinstance(key, tuple) else (key,)))
            slices.append((label, ratio, lo, hi, verdict(lo, hi, c.relation)))
        if not slices:
            outcomes.append(Outcome(c.claim, c.source, c.label or c.metric, np.nan, np.nan, np.nan,
                                    "inconclusive", "too few seeds in every slice (one side needs two)"))
            continue
        pooled = np.mean(np.vstack(logs), axis=0)  # log of the geometric mean over slices
        value = float(np.exp(np.mean([np.log(s[1]) for s in slices])))
        lo, hi = np.exp(np.nanquantile(pooled, [alpha, 1 - alpha]))
        counts = {v: sum(s[4] == v for s in slices) for v in VERDICTS}
        detail = f"per slice ({', '.join(keys) or 'one'}): " + ", ".join(
            f"{v} {n}" for v, n in counts.items() if n) + f" of {len(slices)}"
        outcomes.append(Outcome(c.claim, c.source, c.label or c.metric, value, float(lo), float(hi),
                                verdict(lo, hi, c.relation), detail, tuple(slices)))
    return outcomes


# ------------------------------------------------------------------------------ rendering
def _num(x: float) -> str:
    if not np.isfinite(x):
        return "n/a"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _interval(o: Outcome) -> str:
    return f"{_num(o.value)} [{_num(o.low)}, {_num(o.high)}]"


def markdown(outcomes, title: str = "Claims versus measured") -> str:
    """The claim table (and a per-slice table for each claim with slices) as markdown."""
    lines = [f"## {title}", "", "| claim | source | measured | value [95% CI] | verdict | detail |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        cells = (o.claim, o.source, o.measured, _interval(o), f"**{o.verdict}**", o.detail)
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    for o in outcomes:
        if not o.slices:
            continue
        lines += ["", f"### {o.claim} ({o.measured}), per slice", "", "| slice | value [95% CI] | verdict |",
                  "|---|---|---|"]
        lines += [f"| {s[0]} | {_num(s[1])} [{_num(s[2])}, {_num(s[3])}] | {s[4]} |" for s in o.slices]
    return "\n".join(lines) + "\n"


def html(outcomes, title: str = "Claims versus measured", notes=()) -> str:
    """The claim table as an HTML fragment (a section for report.html), per-slice tables folded."""
    e = _html.escape
    colour = {"holds": "#e6f4ea", "fails": "#fdecea", "inconclusive": "#fff8e6"}
    rows = "\n".join(
        f'<tr style="background:{colour.get(o.verdict, "#fff")}"><td class="txt">{e(o.claim)}</td>'
        f'<td class="txt">{e(o.source)}</td><td class="txt">{e(o.measured)}</td>'
        f'<td class="num">{e(_interval(o))}</td><td class="txt"><strong>{e(o.verdict)}</strong></td>'
        f'<td class="txt">{e(o.detail)}</td></tr>'
        for o in outcomes)
    parts = ['<section id="claims">', f"<h2>{e(title)}</h2>",
             "<p>Each claim as the paper makes it, what this run measured (a ratio of means unless "
             "said otherwise) with its 95% bootstrap interval, and the verdict: <em>holds</em> when the "
             "whole interval is on the claimed side of the boundary, <em>fails</em> when it is on the "
             "other side, <em>inconclusive</em> when it straddles it.</p>",
             '<div class="tablewrap"><table class="board"><thead><tr><th>claim</th><th>source</th>'
             "<th>measured</th><th>value [95% CI]</th><th>verdict</th><th>detail</th></tr></thead><tbody>",
             rows, "</tbody></table></div>"]
    for note in notes:
        parts.append(f'<p class="notes">{e(note)}</p>')
    for o in outcomes:
        if not o.slices:
            continue
        body = "".join(f'<tr><td class="txt">{e(s[0])}</td><td class="num">{e(_num(s[1]))} '
                       f'[{e(_num(s[2]))}, {e(_num(s[3]))}]</td><td class="txt">{e(s[4])}</td></tr>'
                       for s in o.slices)
        parts.append(f"<details><summary>{e(o.claim)}: per slice</summary>"
                     '<table class="board"><thead><tr><th>slice</th><th>value [95% CI]</th>'
                     f"<th>verdict</th></tr></thead><tbody>{body}</tbody></table></details>")
    parts.append("</section>")
    return "\n".join(parts)
