"""The time and memory side of ``rfbench compare``'s noise model (see rfbench.report.compare).

What a time verdict is judged on (``clock``: process CPU time where both runs measured it, else
wall time, each against the calibration kernel timed beside it), the robust cross-cell spread of
a metric's log-ratios, and the all-cells time row of each estimator.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from rfbench.report import METRICS

#: metric -> kind; every other metric is an "error"
KINDS = {"time_ms": "time", "tokens_per_s": "time", "draw_ms": "time", "fit_ms": "time",
         "peak_mem_bytes": "memory"}
#: the least noise (s.e. of the log-ratio) a comparison of each kind is given
#: (time 10 %: one cell's CPU time has heavy tails between runs, a quiet machine gave x1.39)
REL_FLOOR = {"time": 0.10, "memory": 0.01, "error": 0.01}
#: the least noise of an estimator's all-cells time row (a mean over its cells): under load from
#: other jobs a whole run's estimators drifted together by up to x1.10 against the calibration
#: kernel on the 2-core CI machine; 6 % keeps such a drift below z_crit (~3.6 for the quick suite)
#: up to x1.24, while a 1.3x slower forward is z = 4.4 and a 1.5x one z = 6.8
GROUP_FLOOR = 0.06
#: the time metric judged on the timing loop's own clocks against the calibration kernel
JUDGED_TIME = "time_ms"
MEDIAN_SE = 1.2533  # s.e. of a normal sample's median, in sigma / sqrt(n)
CV_MAX = 0.25  # a run whose repeats scatter more than this (robust CV): its time is "noisy"
REF_AGREE = 0.25  # calibration medians of the two runs differ by more: their times are "noisy"
MAD_SIGMA = 1.4826  # sigma of a normal / its median absolute deviation
MIN_SPREAD_CELLS = 8  # fewer common cells: no cross-cell spread estimate
MIN_GROUP = 3  # an estimator timed in fewer common cells gets no all-cells time row
P20_P80_SIGMAS = 1.683  # z(0.8) - z(0.2) of a normal distribution


def metric_sign(metric: str) -> float:
    """+1 where lower is better, -1 where higher is (throughput)."""
    return -1.0 if metric in METRICS and not METRICS[metric].lower_is_better else 1.0


def gmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.exp(np.log(x).mean())) if len(x) else math.nan


def robust_cv(samples) -> float:
    """1.4826 x MAD / median of a JSON list of samples (NaN: none)."""
    try:
        x = np.asarray(json.loads(samples), dtype=float) if isinstance(samples, str) and samples else None
    except (ValueError, TypeError):
        return math.nan
    if x is None or len(x) < 2 or not np.isfinite(x).all() or np.median(x) <= 0:
        return math.nan
    med = np.median(x)
    return float(MAD_SIGMA * np.median(np.abs(x - med)) / med)


def judge_clock(tb: dict, tn: dict) -> dict | None:
    """What a time verdict is judged on: process CPU time where both runs measured it (immune to
    waiting for a busy core), else wall time; each against its calibration kernel where both
    runs have one. None where neither run timed the cell."""
    clock = "cpu" if math.isfinite(tb["cpu"]) and math.isfinite(tn["cpu"]) else "wall"
    ref = "ref_cpu" if clock == "cpu" else "ref"
    if not (tb[clock] > 0 and tn[clock] > 0):
        return None
    return dict(clock=clock, base=tb[clock], new=tn[clock], ref_base=tb[ref], ref_new=tn[ref],
                cv=max(_nan0(tb[f"cv_{clock}"]), _nan0(tn[f"cv_{clock}"])),
                se=MEDIAN_SE * math.sqrt(_nan0(tb[f"cv_{clock}"]) ** 2 / tb["n_rep"]
                                         + _nan0(tn[f"cv_{clock}"]) ** 2 / tn["n_rep"]))


def _nan0(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def judged_log_ratio(clock: dict) -> tuple[float, float]:
    """(log ratio of the judged clock, the same against the calibration kernel: NaN without one)."""
    change = math.log(clock["new"] / clock["base"])
    if clock["ref_base"] > 0 and clock["ref_new"] > 0:
        return change, change - math.log(clock["ref_new"] / clock["ref_base"])
    return change, math.nan


def cell_spread(metric: str, pairs: dict, clocks: dict) -> dict:
    """Robust run-to-run spread of one metric's log-ratios across the common cells: 1.4826 x
    their median absolute deviation about the median. For the judged time, of the judged clock's
    ratios against the calibration kernel where every cell has it, else of the plain ones. None
    where fewer than MIN_SPREAD_CELLS cells, or for an error metric (their per-seed spread is
    measured directly)."""
    if KINDS.get(metric, "error") == "error":
        return {"log": None}
    logs = []
    if clocks:
        judged = [judged_log_ratio(c) for c in clocks.values() if c is not None]
        with_ref = [r for _, r in judged if math.isfinite(r)]
        logs = with_ref if len(with_ref) == len(judged) else [a for a, _ in judged]
    else:
        for vb, vn in pairs.values():
            b, n = vb[1], vn[1]
            if (b > 0).all() and (n > 0).all():
                logs.append(math.log(n.mean() / b.mean()))
    if len(logs) < MIN_SPREAD_CELLS:
        return {"log": None}
    x = np.asarray(logs)
    return {"log": float(MAD_SIGMA * np.median(np.abs(x - np.median(x))))}


def estimator_groups(estimator: pd.Series, measured: list) -> dict[str, list[tuple[dict, dict]]]:
    """The judged time of each estimator's cells, ``{name: [(clock, spread), ...]}``, for those
    with at least MIN_GROUP cells timed in both runs."""
    out: dict[str, list] = {}
    for cell, metric, _, _, _, spread, clock in measured:
        if metric == JUDGED_TIME and clock is not None:
            out.setdefault(estimator[cell], []).append((clock, spread))
    return {k: v for k, v in out.items() if len(v) >= MIN_GROUP}


def group_row(name: str, members: list, threshold: float, z_crit: float, abs_floor: float = 0.0) -> dict:
    """One estimator's time over all its cells: the mean judged log-ratio, whose noise is the
    larger of the cross-cell spread and the group's own spread, over sqrt(cells), floored. A
    slower forward slows every cell of its estimator, so this sees a change that each cell's
    own noise hides; it is noisy when most of its cells' repeats scatter beyond CV_MAX or the
    calibration kernel moved by more than REF_AGREE. Like a cell's, it is "same" when its
    geometric-mean time moved by no more than ``abs_floor`` (ms): a baseline timed at tens of
    microseconds (``uniform``) moves by x0.66-x1.22 between quiet runs, all of it timer and
    call overhead."""
    judged = [judged_log_ratio(c) for c, _ in members]
    use_ref = all(math.isfinite(r) for _, r in judged)
    logs = np.array([r if use_ref else a for a, r in judged])
    k = len(logs)
    spread = max(((sp or {}).get("log") or 0.0) for _, sp in members)
    own = float(np.std(logs, ddof=1)) if k > 1 else 0.0
    base = float(np.exp(np.mean([math.log(c["base"]) for c, _ in members])))
    new = float(np.exp(np.mean([math.log(c["new"]) for c, _ in members])))
    jitter = abs_floor / min(base, new) if min(base, new) > 0 else 0.0  # absolute jitter (compare.py)
    noise = max(max(spread, own, jitter) / math.sqrt(k), GROUP_FLOOR)
    mean = float(logs.mean())
    z = mean / noise
    n_scatter = sum(c["cv"] > CV_MAX for c, _ in members)
    refs = [c["ref_new"] / c["ref_base"] for c, _ in members if c["ref_base"] > 0 and c["ref_new"] > 0]
    ref_ratio = float(np.exp(np.mean(np.log(refs)))) if refs else math.nan
    clock = members[0][0]["clock"]
    notes = [f"{k} cells, {'CPU' if clock == 'cpu' else 'wall'} time" + (" vs ref" if use_ref else "")]
    if abs(math.expm1(mean)) <= threshold or abs(new - base) <= abs_floor:
        verdict = "same"
    elif n_scatter > k / 2:
        verdict = "noisy"
        notes.append(f"{n_scatter} of {k} cells' repeats scatter > {CV_MAX:.0%}")
    elif math.isfinite(ref_ratio) and abs(math.log(ref_ratio)) > math.log1p(REF_AGREE):
        verdict = "noisy"
        notes.append(f"calibration kernel x{ref_ratio:.2f} between the runs")
    elif abs(z) <= z_crit:
        verdict = "noisy"
    else:
        verdict = "REGRESSION" if mean > 0 else "improved"
    return dict(cell=f"estimator:{name}", label=f"{name} (all cells)", metric=JUDGED_TIME, base=base, new=new,
                ratio=new / base, ratio_ref=math.exp(mean) if use_ref else math.nan, ref_ratio=ref_ratio,
                noise=noise, z=z, cv=float(np.median([c["cv"] for c, _ in members])), n_base=k, n_new=k,
                paired=False, verdict=verdict, regression=verdict == "REGRESSION", note="; ".join(notes))
