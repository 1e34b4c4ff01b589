"""Published claims as data, their evaluation on a results frame, and the claim-versus-measured table.

A ``Comparison`` says: on the rows ``a`` selects, the mean of ``metric`` (squared when
``square``) is below (``relation = "<"``) or above (``">"``) its mean on the rows ``b`` selects,
slice by slice (``by``: the columns a slice shares, such as ``num_features``). What is measured
is the ratio of means A / B per slice and, pooled over the slices, their geometric mean; each
has a 95% interval on the log scale: the delta method (se of log mean = s / (sqrt(n) mean) per
side) with Welch-Satterthwaite degrees of freedom and Student's t. A percentile bootstrap was
tried first and dropped: with 5 seeds of heavy-tailed errors (PosRF at |x|^2 ~ 6) it gave
intervals far too narrow, so one outlying seed turned noise into a "fails". A baseline run once
(a single value) is taken as fixed. A slice where one seed carries more than half of a side's
sum (``carried_by_one``) has no usable mean at that seed count: it is inconclusive whatever its
interval says, and it is left out of the pooled value. The verdict is read off the interval
against the boundary 1:

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
from scipy import stats

from rfbench.errors import SpecError

VERDICTS = ("holds", "fails", "inconclusive")
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
    b_by: tuple[str, ...] | None = None  # B's slice columns when fewer (a baseline run once per data)

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


def _log_mean_se(values: np.ndarray) -> tuple[float, float, float]:
    """log of the mean, its delta-method standard error and degrees of freedom (0 se for one value)."""
    n, mean = len(values), float(values.mean())
    if n < 2:
        return float(np.log(mean)), 0.0, np.inf
    return float(np.log(mean)), float(values.std(ddof=1) / (np.sqrt(n) * mean)), float(n - 1)


def carried_by_one(values: np.ndarray) -> bool:
    """True when one seed's value is more than half of the sum of a side's (n >= 2) values."""
    return len(values) >= 2 and float(values.max()) > 0.5 * float(values.sum())


def _welch(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """Combined (se, df) of a sum of independent terms (se_i, df_i), Welch-Satterthwaite."""
    var = sum(se**2 for se, _ in parts)
    denom = sum(se**4 / df for se, df in parts if np.isfinite(df) and df > 0 and se > 0)
    return float(np.sqrt(var)), (var**2 / denom if denom > 0 else np.inf)


def _interval(log_value: float, se: float, df: float) -> tuple[float, float]:
    t = stats.t.ppf(0.5 + LEVEL / 2, df) if np.isfinite(df) else stats.norm.ppf(0.5 + LEVEL / 2)
    return float(np.exp(log_value - t * se)), float(np.exp(log_value + t * se))


def evaluate(claims, results: pd.DataFrame) -> list[Outcome]:
    """Each Comparison of ``claims`` on ``results`` (rows with status ok), as an Outcome."""
    ok = results[results["status"] == "ok"] if "status" in results else results
    outcomes = []
    for c in claims:
        frame = _select(ok, c.where)
        side_a, side_b = _select(frame, c.a), _select(frame, c.b)
        metric_b = c.metric_b or c.metric
        if c.metric not in frame or metric_b not in frame or side_a.empty or side_b.empty:
            outcomes.append(Outcome(c.claim, c.source, c.label or c.metric, np.nan, np.nan, np.nan,
                                    "inconclusive", "no rows to compare: the run lacks them"))
            continue
        keys = list(c.by)
        keys_b = list(c.by if c.b_by is None else c.b_by)
        groups_b = dict(iter(side_b.groupby(keys_b, sort=True))) if keys_b else {(): side_b}
        groups_a = side_a.groupby(keys, sort=True) if keys else [((), side_a)]
        slices, terms, heavy = [], [], 0
        for key, ga in groups_a:
            key = key if isinstance(key, tuple) else (key,)
            kb = tuple(key[keys.index(k)] for k in keys_b)
            gb = groups_b.get(kb if len(kb) != 1 else kb[0], groups_b.get(kb))
            va = ga[c.metric].dropna().to_numpy(dtype=float)
            vb = gb[metric_b].dropna().to_numpy(dtype=float) if gb is not None else va[:0]
            # a baseline is run once: one value on a side is taken as fixed, the other needs a spread
            if len(va) == 0 or len(vb) == 0 or len(va) + len(vb) < 3:
                continue
            if c.square:
                va, vb = va**2, vb**2
            if va.mean() <= 0 or vb.mean() <= 0:
                continue
            (la, sa, da), (lb, sb, db) = _log_mean_se(va), _log_mean_se(vb)
            se, df = _welch([(sa, da), (sb, db)])
            lo, hi = _interval(la - lb, se, df)
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, key))
            if carried_by_one(va) or carried_by_one(vb):
                heavy += 1
                slices.append((label + " (one seed carries the mean)", float(np.exp(la - lb)), lo, hi,
                               "inconclusive"))
                continue
            terms.append((la - lb, se, df))
            slices.append((label, float(np.exp(la - lb)), lo, hi, verdict(lo, hi, c.relation)))
        if not terms:
            why = ("one seed carries the mean in every slice" if slices
                   else "too few seeds in every slice (one side needs two)")
            outcomes.append(Outcome(c.claim, c.source, c.label or c.metric, np.nan, np.nan, np.nan,
                                    "inconclusive", why, tuple(slices)))
            continue
        k = len(terms)
        log_value = sum(t[0] for t in terms) / k  # log of the geometric mean over slices
        se, df = _welch([(t[1] / k, t[2]) for t in terms])
        lo, hi = _interval(log_value, se, df)
        counts = {v: sum(s[4] == v for s in slices) for v in VERDICTS}
        detail = f"per slice ({', '.join(keys) or 'one'}): " + ", ".join(
            f"{v} {n}" for v, n in counts.items() if n) + f" of {len(slices)}"
        if heavy:
            detail += f" ({heavy} inconclusive as one seed carries the mean; left out of the pooled value)"
        outcomes.append(Outcome(c.claim, c.source, c.label or c.metric, float(np.exp(log_value)), lo, hi,
                                verdict(lo, hi, c.relation), detail, tuple(slices)))
    return outcomes


# ------------------------------------------------------------------------------ rendering
def _num(x: float) -> str:
    if not np.isfinite(x):
        return "n/a"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _shown(o: Outcome) -> str:
    return f"{_num(o.value)} [{_num(o.low)}, {_num(o.high)}]"


def markdown(outcomes, title: str = "Claims versus measured") -> str:
    """The claim table (and a per-slice table for each claim with slices) as markdown."""
    lines = [f"## {title}", "", "| claim | source | measured | value [95% CI] | verdict | detail |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        cells = (o.claim, o.source, o.measured, _shown(o), f"**{o.verdict}**", o.detail)
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    for o in outcomes:
        if not o.slices:
            continue
        lines += ["", f"### {o.claim} ({o.measured}), per slice", "", "| slice | value [95% CI] | verdict |",
                  "|---|---|---|"]
        lines += [f"| {s[0]} | {_num(s[1])} [{_num(s[2])}, {_num(s[3])}] | {s[4]} |" for s in o.slices]
    return "\n".join(lines) + "\n"


def html(outcomes, title: str = "Claims versus measured", notes=(),
         interval: str = "log scale, delta method, Welch t") -> str:
    """The claim table as an HTML fragment (a section for report.html), per-slice tables folded."""
    e = _html.escape
    colour = {"holds": "#e6f4ea", "fails": "#fdecea", "inconclusive": "#fff8e6"}
    rows = "\n".join(
        f'<tr style="background:{colour.get(o.verdict, "#fff")}"><td class="txt">{e(o.claim)}</td>'
        f'<td class="txt">{e(o.source)}</td><td class="txt">{e(o.measured)}</td>'
        f'<td class="num">{e(_shown(o))}</td><td class="txt"><strong>{e(o.verdict)}</strong></td>'
        f'<td class="txt">{e(o.detail)}</td></tr>'
        for o in outcomes)
    parts = ['<section id="claims">', f"<h2>{e(title)}</h2>",
             "<p>Each claim as the paper makes it, what this run measured (a ratio of means unless "
             f"said otherwise) with its 95% interval ({e(interval)}), and the verdict: "
             "<em>holds</em> when the "
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
