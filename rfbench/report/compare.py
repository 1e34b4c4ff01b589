"""``rfbench compare BASE NEW``: the regression gate between results folders.

``rfbench compare BASE NEW`` compares two folders; ``rfbench compare --base A1 A2 --new B1 B2``
compares several runs per side (their rows are pooled; the spread between the runs of one side
is then measured too). Cells are joined on their key hash (``cell``: the same cell definition
has the same hash in every run) and seeds on ``seed_index``. For each common cell and metric
(default: time, peak memory, kernel relative MSE, output error; lower is better except
throughput):

    ratio = mean_new / mean_base             (geometric mean over runs, mean over seeds that succeeded)
    noise = standard error of log(ratio)     (about the relative standard error of the change)

The noise model, in log space (the noise of times, bytes and errors is multiplicative). The
noise of a comparison is the largest of these estimates, each made from the data, and never
below a stated floor, so it is never zero and z is never infinite:

- seeds: paired (both runs succeeded on the same seed indices): the spread of the per-seed
  log-ratios (two runs of the same code draw the same random features per seed, so pairing
  cancels the Monte Carlo spread they share); unpaired: Welch's sqrt(var_b / n_b + var_n / n_n)
  of the per-seed log values. Also pooled over all cells of the metric (a few seeds give a
  noisy variance);
- repeats (times): the within-run jitter of one repeat, (p80 - p20) / 1.683 relative to the
  median (the 20-80 % range of a normal spans 1.683 sigma);
- runs: with several folders on a side, the spread of a cell's log value between them;
- cells (times and memory): the run-to-run spread seen across all common cells, 1.4826 x the
  median absolute deviation of their log-ratios about the median (robust: a regression in a
  minority of cells does not inflate it). It is what one cell's ratio scatters by when nothing
  changed, measured in this very comparison;
- jitter (times): the absolute floor (30 us) over the faster run's time, in log units: a call's
  time scatters by tens of microseconds however short the call (the interpreter, the allocator),
  so a 25 us cell needs a change of e^4 to count while a 1 ms one is unaffected;
- floor: ``REL_FLOOR`` per metric kind: time 10 % (6 % for an estimator's all-cells row), memory
  1 %, errors 1 %. Memory repeats to the
  byte on the CPU (rfbench.suite.measure's allocation tracker) and on CUDA, so only the floor
  is left there: 2x more memory is z ~ 70.

Time against the reference (rfbench.report.compare_time): each timed cell also timed a fixed
calibration kernel between its repeats, in wall and process CPU time. The time verdict is judged
on CPU time where both runs have it (waiting for a busy core does not count), else on wall time,
over the calibration kernel's time on the same clock (``vs ref``: drift of the machine's speed
cancels); a regression needs that clock's plain ratio beyond the threshold too. Each estimator
also gets an "(all cells)" time row: the mean judged log-ratio over its cells, with noise the
larger of the cross-cell and its own spread over sqrt(cells), floored (a slower forward slows
every cell of its estimator; one cell's noise can hide it). Bonferroni counts these rows. A time
comparison is **noisy** (never a REGRESSION) when either run's repeats scatter by more than
``CV_MAX`` (robust CV of the judged clock's samples; from p20/p80 for wall time), or when the
two runs' calibration medians differ by more than ``REF_AGREE``. A cell's time REGRESSION (or
improvement) also needs its estimator's all-cells row to say the same, unless the cell is beyond
``LONE_CELL_Z`` x the critical z: one cell's time has heavier tails than the normal model
(``_corroborate``).

A metric **regresses** when it is worse by more than ``--threshold`` (relative), AND
z = log(ratio) / noise exceeds the one-sided normal quantile at ``--alpha`` / N (Bonferroni
over the N comparisons: N=20 gives 3.0 noise units, N=900: 3.9), AND the change exceeds an
absolute floor (30 us for time, as xformers uses; 1 MiB for memory; 1e-6 for errors). A change
beyond the threshold but within the noise is "noisy". A cell that succeeded in BASE and fails
(oom/nonfinite/error) on some seed in NEW regresses too.

Exit status: 0 no regression, 1 regression, 2 incompatible or unreadable runs.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from rfbench.errors import DataError, SpecError
from rfbench.report import METRICS, SLICE_KEYS
from rfbench.report.compare_time import (
    CV_MAX,
    JUDGED_TIME,
    KINDS,
    P20_P80_SIGMAS,
    REF_AGREE,
    REL_FLOOR,
    cell_spread,
    estimator_groups,
    gmean,
    group_row,
    judge_clock,
    judged_log_ratio,
    metric_sign,
    robust_cv,
)
from rfbench.results import load_meta, load_results
from rfbench.results.meta import META_FILE

DEFAULT_METRICS = ("time_ms", "peak_mem_bytes", "kernel_rel_mse", "out_rel_err")
#: Least change that counts (and, for times, an absolute jitter: a call's time scatters by about this
#: much however short it is; the uniform baseline's ~25 us cells read x3.2 and x3.7 between two quiet
#: runs on the CI machine, z = 7-9 against its relative noise alone)
ABS_FLOOR = {"time_ms": 0.03, "draw_ms": 0.03, "fit_ms": 0.03, "peak_mem_bytes": float(2**20),
             "tokens_per_s": 0.0}
ERROR_FLOOR = 1e-6
LONE_CELL_Z = 2.0  # a cell's time verdict stands without its estimator's all-cells row beyond this x z_crit
FAILED = ("oom", "nonfinite", "error")
MIN_POOLED_DOF = 5  # fewer residual degrees of freedom than this: no pooled estimate
VERDICT_ORDER = {"fails now": 0, "REGRESSION": 1, "noisy": 2, "improved": 3, "fixed": 4, "same": 5}
COLUMNS = ["cell", "label", "metric", "base", "new", "ratio", "ratio_ref", "ref_ratio", "noise", "z",
           "cv", "n_base", "n_new", "paired", "verdict", "regression", "note"]


class IncompatibleRuns(DataError):
    """The two folders cannot be compared (different suites, no common cell, a missing metric)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="*", metavar="DIR",
                        help="BASE_DIR NEW_DIR: the reference run and the run under test")
    parser.add_argument("--base", nargs="+", metavar="DIR",
                        help="several reference runs (instead of BASE_DIR; with --new)")
    parser.add_argument("--new", nargs="+", metavar="DIR",
                        help="several runs under test (instead of NEW_DIR; with --base)")
    parser.add_argument("--threshold", default="10%", metavar="T",
                        help="relative change that counts, as '10%%' or '0.1' (default 10%%)")
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="metric column to compare (repeatable; default: "
                             + ", ".join(DEFAULT_METRICS) + ", those both runs have)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="family-wise false-alarm rate of the noise test (default 0.05)")
    parser.add_argument("--changes-only", action="store_true",
                        help="print only regressions, improvements and changed statuses")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def sides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The BASE and NEW folders from ``compare BASE NEW`` or ``compare --base .. --new ..``."""
    if args.base or args.new:
        if args.dirs or not (args.base and args.new):
            raise SpecError("give either BASE_DIR NEW_DIR or both --base DIR... and --new DIR..., "
                            "not a mix")
        return list(args.base), list(args.new)
    if len(args.dirs) != 2:
        raise SpecError(f"compare needs BASE_DIR NEW_DIR (got {len(args.dirs)} folder(s)); for several "
                        "runs per side write --base DIR... --new DIR...")
    return [args.dirs[0]], [args.dirs[1]]


def parse_threshold(text: str) -> float:
    """'10%' -> 0.10, '0.1' -> 0.1; SpecError on anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
    if not m:
        raise SpecError(f"--threshold must look like '10%' or '0.1', got {text!r}")
    value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not m.group(2) and value >= 1:
        raise SpecError(f"--threshold {text!r} is ambiguous: write '{text}%' for a percentage or a "
                        "fraction below 1 such as 0.1")
    if value <= 0:
        raise SpecError(f"--threshold must be positive, got {text!r}")
    return value


def main(args: argparse.Namespace) -> int:
    threshold = parse_threshold(args.threshold)
    if not 0 < args.alpha < 1:
        raise SpecError(f"--alpha must lie in (0, 1), got {args.alpha}")
    base, new = sides(args)
    table, z_crit = compare_runs(base, new, metrics=args.metric, threshold=threshold, alpha=args.alpha)
    shown = table[~table["verdict"].isin(["same", "noisy"])] if args.changes_only else table
    print(format_table(shown, markdown=args.markdown) if len(shown) else "(no change beyond the threshold)")
    bad = table[table["regression"]]
    n_cells = table.loc[~table["cell"].str.startswith("estimator:"), "cell"].nunique()  # no all-cells rows
    n_noisy = int((table["verdict"] == "noisy").sum())
    rule = f"{threshold:.0%} and {z_crit:.2g} noise units (family-wise alpha {args.alpha:g})"
    noisy = f"; {n_noisy} noisy (beyond the threshold, not beyond the noise)" if n_noisy else ""
    if len(bad):
        worst = bad.sort_values("ratio", ascending=False).iloc[0]
        what = "fails now" if worst["metric"] == "status" else f"{worst['metric']} x{worst['ratio']:.2f}"
        names = ", ".join(sorted(set(bad["label"].str.split(" ").str[0])))
        n_bad = bad.loc[~bad["cell"].str.startswith("estimator:"), "cell"].nunique()
        groups = int(bad["cell"].str.startswith("estimator:").sum())
        where = f"{n_bad} of {n_cells} common cells" + (f" and {groups} all-cells row(s)" if groups else "")
        print(f"\n{len(bad)} regression(s) beyond {rule} in {where} ({names}); "
              f"worst: {worst['label']} {what}{noisy}")
        return 1
    print(f"\nno regression beyond {rule}: {n_cells} common cells, {len(table)} comparisons{noisy}")
    return 0


# ------------------------------------------------------------------------------ comparison
def compare_runs(
    base_dirs, new_dirs, *, metrics=None, threshold: float = 0.10, alpha: float = 0.05
) -> tuple[pd.DataFrame, float]:
    """One row per (common cell, metric), worst first, and the z threshold used.

    ``base_dirs``, ``new_dirs``: a results folder or a list of them (runs of one side, pooled).
    Columns: cell, label, metric, base, new, ratio, ratio_ref (the ratio of time / calibration
    time; NaN where not timed against it), ref_ratio (calibration NEW / BASE), noise (s.e. of the
    log ratio judged), z, cv (the larger robust CV of the two runs' repeats), n_base, n_new,
    paired, verdict, regression, note. Raises IncompatibleRuns (exit 2) when the runs cannot be
    joined.
    """
    (rb, suites_b), (rn, suites_n) = _load_side(base_dirs), _load_side(new_dirs)
    if suites_b and suites_n and suites_b != suites_n:
        raise IncompatibleRuns(f"the runs come from different suites ({_few(suites_b)} vs "
                               f"{_few(suites_n)}); compare two runs of the same suite")
    common = sorted(set(rb["cell"]) & set(rn["cell"]))
    if not common:
        raise IncompatibleRuns(f"the runs share no cell ({rb['cell'].nunique()} vs "
                               f"{rn['cell'].nunique()} cells){_why_disjoint(rb, rn)}")
    metrics = _choose_metrics(rb, rn, metrics)
    cells = pd.concat([rb, rn]).drop_duplicates("cell").set_index("cell").loc[common]
    labels = _labels(cells)
    cb, cn = _Cells(rb, metrics), _Cells(rn, metrics)

    rows = [{"cell": c, "label": labels[c], **r} for c in common
            if (r := _status_row(cb.statuses(c), cn.statuses(c)))]
    measured = []
    for metric in metrics:
        pairs = {c: (cb.values(c, metric), cn.values(c, metric)) for c in common}
        pairs = {c: v for c, v in pairs.items() if len(v[0][1]) and len(v[1][1])}
        pooled = _pooled_variances((vb[:2], vn[:2]) for vb, vn in pairs.values())
        clocks = {c: judge_clock(cb.timing(c), cn.timing(c)) for c in pairs} if metric == JUDGED_TIME else {}
        spread = cell_spread(metric, pairs, clocks)
        for cell, (vb, vn) in pairs.items():
            measured.append((cell, metric, vb, vn, pooled, spread, clocks.get(cell)))
    groups = estimator_groups(cells["estimator"].astype(str), measured)
    z_crit = NormalDist().inv_cdf(1 - alpha / max(len(measured) + len(groups), 1))
    group_verdicts = {}
    for name, members in groups.items():
        rows.append(group_row(name, members, threshold, z_crit, ABS_FLOOR[JUDGED_TIME]))
        group_verdicts[name] = rows[-1]["verdict"]
    estimator = cells["estimator"].astype(str)
    for cell, metric, vb, vn, pooled, spread, clock in measured:
        rep = (cb.rep_sigma(cell, metric), cn.rep_sigma(cell, metric))
        row = _compare(vb, vn, metric, pooled, rep, threshold, z_crit, spread=spread, clock=clock)
        _corroborate(row, group_verdicts.get(estimator[cell]), z_crit)
        rows.append({"cell": cell, "label": labels[cell], **row})
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["_order"] = table["verdict"].map(VERDICT_ORDER)
    table = table.sort_values(["_order", "ratio"], ascending=[True, False])
    return table.drop(columns="_order").reset_index(drop=True), z_crit


def _load_side(folders) -> tuple[pd.DataFrame, set[str]]:
    """The rows of one side's folders, with a ``_run`` column (0, 1, ..), and their suite names."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    frames, suites = [], set()
    for i, folder in enumerate(folders):
        rows, names = _load(folder)
        frames.append(rows.assign(_run=i))
        suites |= names
    if len(suites) > 1:
        raise IncompatibleRuns(f"the runs of one side come from different suites ({_few(suites)}); "
                               "give runs of one suite per side")
    return pd.concat(frames, ignore_index=True), suites


def _load(folder) -> tuple[pd.DataFrame, set[str]]:
    """The per-seed rows of a results folder (through ``rfbench.results``: cells finished after
    results.parquet are included) and its suite name(s): the rows' ``suite`` column, else the
    name in meta.json. DataError (one line) when the folder is missing or broken."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"results folder {str(folder)!r} does not exist; give the --out folder of "
                        "`rfbench run`")
    rows = load_results(folder)
    suites = set(map(str, rows["suite"])) - {""} if "suite" in rows else set()
    if not suites and (folder / META_FILE).is_file():
        suites = {load_meta(folder).suite.name} - {""}
    return rows, suites


def _choose_metrics(rb: pd.DataFrame, rn: pd.DataFrame, asked) -> list[str]:
    def measured(frame, m):
        return m in frame and bool(np.isfinite(pd.to_numeric(frame[m], errors="coerce")).any())

    if asked:
        for m in asked:
            if m not in METRICS:
                raise SpecError(f"unknown metric {m!r}; known: {', '.join(METRICS)}")
            missing = [name for name, f in (("BASE", rb), ("NEW", rn)) if not measured(f, m)]
            if missing:
                raise IncompatibleRuns(f"metric {m!r} is not measured in {' and '.join(missing)}; "
                                       "drop that --metric or re-run with it")
        return list(dict.fromkeys(asked))
    chosen = [m for m in DEFAULT_METRICS if measured(rb, m) and measured(rn, m)]
    if not chosen:
        raise IncompatibleRuns(f"the runs share none of the metrics {', '.join(DEFAULT_METRICS)}; "
                               "name one with --metric")
    return chosen


def _why_disjoint(rb: pd.DataFrame, rn: pd.DataFrame) -> str:
    for col in ("device", "dtype", "data", "dim", "seq_len", "num_features", "estimator"):
        if col in rb and col in rn and set(rb[col]) != set(rn[col]):
            return f"; their {col} values differ ({_few(rb[col])} vs {_few(rn[col])})"
    return ""


def _few(col: pd.Series) -> str:
    vals = sorted(map(str, set(col)))
    return ", ".join(vals[:4]) + (", ..." if len(vals) > 4 else "")


def _labels(cells: pd.DataFrame) -> dict[str, str]:
    """'posrf-orf L=1024 m=64' from the key columns that vary among the compared cells."""
    short = {"seq_len": "L", "num_features": "m", "dim": "d", "batch": "B", "heads": "H"}
    varying = [c for c in SLICE_KEYS if c in cells and cells[c].nunique() > 1]
    out = {}
    for cell, r in cells.iterrows():
        bits = [str(r["estimator"])]
        for c in varying:
            if c == "num_features" and r.get("kind") == "baseline":
                continue
            bits.append(f"{short[c]}={r[c]}" if c in short else str(r[c]))
        out[cell] = " ".join(bits)
    return out


class _Cells:
    """Per-cell numpy views of one side's rows (one or more runs), built once (per-cell pandas
    indexing is slow)."""

    def __init__(self, results: pd.DataFrame, metrics: list[str]):
        self._status = results["status"].to_numpy(str)
        self._all = results.groupby("cell").indices
        ok = results[results["status"] == "ok"]
        self._ok = ok.groupby("cell").indices
        self._seed = ok["seed_index"].to_numpy() if "seed_index" in ok else np.arange(len(ok))
        wanted = [c for m in metrics for c in (m, f"{m}_p20", f"{m}_p80")]
        wanted += ["ref_ms", "cpu_ms", "ref_cpu_ms", "n_rep"]
        self._col = {c: pd.to_numeric(ok[c], errors="coerce").to_numpy(float) for c in wanted if c in ok}
        self._cpu_samples = ok["cpu_samples_ms"].to_numpy(object) if "cpu_samples_ms" in ok else None

    def statuses(self, cell: str) -> np.ndarray:
        return self._status[self._all[cell]]

    def values(self, cell: str, metric: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(seed indices, values, between-run variance) of ``metric`` on the ok seeds with a
        finite value, by seed index. A seed measured in several runs of the side gets the
        geometric mean of its values (positive ones; else the mean), and the variance of its log
        values divided by their count (averaged over such seeds; 0 with one run) comes third."""
        pos = self._ok.get(cell, np.array([], int))
        if metric not in self._col or not len(pos):
            return np.array([], int), np.array([]), 0.0
        vals, seeds = self._col[metric][pos], self._seed[pos]
        keep = np.isfinite(vals)
        vals, seeds = vals[keep], seeds[keep]
        uniq = np.unique(seeds)
        if len(uniq) == len(seeds):  # one run: nothing to pool
            order = np.argsort(seeds, kind="stable")
            return seeds[order], vals[order], 0.0
        out, between = [], []
        for s in uniq:
            v = vals[seeds == s]
            if (v > 0).all():
                lv = np.log(v)
                out.append(float(np.exp(lv.mean())))
                if len(v) > 1:
                    between.append(float(np.var(lv, ddof=1)) / len(v))
            else:
                out.append(float(v.mean()))
        return uniq, np.asarray(out), float(np.mean(between)) if between else 0.0

    def rep_sigma(self, cell: str, metric: str) -> np.ndarray:
        """Per-row relative sigma of one repeat (a robust CV), from the timing loop's p20/p80."""
        lo, hi = f"{metric}_p20", f"{metric}_p80"
        pos = self._ok.get(cell, np.array([], int))
        if lo not in self._col or hi not in self._col or not len(pos):
            return np.array([])
        rel = (self._col[hi][pos] - self._col[lo][pos]) / P20_P80_SIGMAS / self._col[metric][pos]
        return rel[np.isfinite(rel)]

    def timing(self, cell: str) -> dict:
        """The cell's timing detail over its timed rows: geometric means of the wall median
        (``wall``), its calibration (``ref``), the CPU-time median (``cpu``) and its calibration
        (``ref_cpu``), each NaN where not measured; the largest robust CV of the rows' repeats on
        each clock (``cv_wall`` from p20/p80, ``cv_cpu`` from the raw CPU samples); the repeats."""
        pos = self._ok.get(cell, np.array([], int))
        out = {k: gmean(self._col[c][pos]) if c in self._col and len(pos) else math.nan
               for k, c in (("wall", JUDGED_TIME), ("ref", "ref_ms"), ("cpu", "cpu_ms"),
                            ("ref_cpu", "ref_cpu_ms"))}
        rep = self.rep_sigma(cell, JUDGED_TIME)
        out["cv_wall"] = float(rep.max()) if len(rep) else math.nan
        cvs = [robust_cv(self._cpu_samples[i]) for i in pos] if self._cpu_samples is not None else []
        cvs = [c for c in cvs if math.isfinite(c)]
        out["cv_cpu"] = max(cvs) if cvs else math.nan
        n = self._col["n_rep"][pos] if "n_rep" in self._col and len(pos) else np.array([])
        n = n[np.isfinite(n) & (n > 0)]
        out["n_rep"] = float(n.min()) if len(n) else 1.0
        return out


def _is_paired(vb, vn) -> bool:
    """Both runs succeeded on the same seed indices (each once)."""
    ib, in_ = vb[0], vn[0]
    return len(ib) == len(in_) and len(np.unique(ib)) == len(ib) and bool((ib == in_).all())


def _pooled_variances(pairs) -> dict:
    """Pooled variance (log space) of per-seed log-ratios (paired cells) and of per-seed log
    values (unpaired cells), over every cell of one metric; None where too few dof."""
    ss = {"paired": 0.0, "unpaired": 0.0}
    dof = {"paired": 0, "unpaired": 0}
    for vb, vn in pairs:
        if (vb[1] <= 0).any() or (vn[1] <= 0).any():
            continue
        if _is_paired(vb, vn):
            r = np.log(vn[1]) - np.log(vb[1])
            ss["paired"] += float(((r - r.mean()) ** 2).sum())
            dof["paired"] += len(r) - 1
        else:
            for _, v in (vb, vn):
                lv = np.log(v)
                ss["unpaired"] += float(((lv - lv.mean()) ** 2).sum())
                dof["unpaired"] += len(lv) - 1
    return {k: (ss[k] / dof[k] if dof[k] >= MIN_POOLED_DOF else None) for k in ss}


def _status_row(sb: np.ndarray, sn: np.ndarray) -> dict | None:
    """A 'status' row when a cell starts or stops failing (oom/error on any seed)."""
    failed_b, failed_n = np.isin(sb, FAILED), np.isin(sn, FAILED)
    if failed_b.any() == failed_n.any():
        return None

    def text(statuses, failed):
        worst = next((s for s in ("error", "nonfinite", "oom") if (statuses == s).any()), "")
        return f"{worst} on {int(failed.sum())}/{len(statuses)} seeds" if failed.any() else "ok"

    verdict = "fails now" if failed_n.any() else "fixed"
    return dict(metric="status", base=math.nan, new=math.nan, ratio=math.nan, ratio_ref=math.nan,
                ref_ratio=math.nan, noise=math.nan, z=math.nan, cv=math.nan,
                n_base=int((sb == "ok").sum()), n_new=int((sn == "ok").sum()),
                paired=False, verdict=verdict, regression=verdict == "fails now",
                note=f"{text(sb, failed_b)} -> {text(sn, failed_n)}")


def _compare(vb, vn, metric: str, pooled: dict, rep, threshold: float, z_crit: float, *,
             spread: dict | None = None, clock: dict | None = None) -> dict:
    """Ratio, noise, z and verdict of one metric of one cell (see the module docstring).

    ``vb``, ``vn``: (seed indices, values, between-run variance) of BASE and NEW; ``rep``: per-row
    relative repeat sigmas; ``spread``: the cross-cell spread of ``cell_spread``; ``clock``: what
    a time verdict is judged on (``_clock``), None for other metrics.
    """
    paired = _is_paired(vb, vn)
    (_, b, between_b), (_, n, between_n) = vb, vn
    mb, mn = float(b.mean()), float(n.mean())
    kind = KINDS.get(metric, "error")
    sign = metric_sign(metric)
    floor = REL_FLOOR[kind]
    sb, sn = rep
    ratio = mn / mb if mb else (1.0 if mn == 0 else math.inf)
    ratio_ref = ref_ratio = math.nan
    cv = float(max(sb.max(initial=0.0), sn.max(initial=0.0))) if len(sb) or len(sn) else math.nan
    notes = []
    if mb > 0 and mn > 0 and (b > 0).all() and (n > 0).all():
        change = math.log(mn / mb)  # > 0: larger in NEW
        if paired:
            r = np.log(n) - np.log(b)
            own = float(np.std(r, ddof=1) / math.sqrt(len(r))) if len(r) > 1 else 0.0
            pool = math.sqrt(pooled["paired"] / len(r)) if pooled["paired"] is not None else 0.0
        else:
            lb, ln = np.log(b), np.log(n)
            own = math.sqrt(_var(lb) / len(lb) + _var(ln) / len(ln))
            pool = (math.sqrt(pooled["unpaired"] * (1 / len(lb) + 1 / len(ln)))
                    if pooled["unpaired"] is not None else 0.0)
        repeat = (math.sqrt(np.mean(sb**2) / len(sb) + np.mean(sn**2) / len(sn))
                  if len(sb) and len(sn) else 0.0)
        judged_abs = judged = change
        if clock is not None:  # time: the judged clock, against its calibration kernel
            cv = clock["cv"]
            repeat = clock["se"]
            judged_abs, with_ref = judged_log_ratio(clock)
            judged = judged_abs
            if math.isfinite(with_ref):
                ref_ratio = clock["ref_new"] / clock["ref_base"]
                judged = with_ref
                ratio_ref = math.exp(with_ref)
            if clock["clock"] == "cpu":
                notes.append(f"judged on CPU time x{math.exp(judged_abs):.2f}")
        cells = (spread or {}).get("log") or 0.0
        jitter = 0.0
        if kind == "time" and metric in ABS_FLOOR:  # an absolute jitter, relative to the faster run
            t_min = min(clock["base"], clock["new"]) if clock is not None else min(mb, mn)
            jitter = ABS_FLOOR[metric] / t_min if t_min > 0 else 0.0
        noise = max(own, pool, repeat, math.sqrt(between_b + between_n), cells, floor, jitter)
    else:  # zeros (an exact baseline's error): linear change relative to the larger value
        top = max(abs(mb), abs(mn))
        judged_abs = judged = (mn - mb) / top if top else 0.0
        noise = floor
    worse = sign * judged
    z = worse / noise
    rel = sign * math.expm1(judged) if math.isfinite(ratio) and mb > 0 and mn > 0 else math.inf
    rel_abs = sign * math.expm1(judged_abs) if math.isfinite(rel) else math.inf
    beyond_floor = abs(mn - mb) > ABS_FLOOR.get(metric, ERROR_FLOOR)
    timed = kind == "time"
    if abs(rel) <= threshold or not beyond_floor:
        verdict = "same"
    elif timed and cv > CV_MAX:
        verdict = "noisy"
        notes.append(f"repeats scatter {cv:.0%} > {CV_MAX:.0%}")
    elif timed and math.isfinite(ref_ratio) and abs(math.log(ref_ratio)) > math.log1p(REF_AGREE):
        verdict = "noisy"
        notes.append(f"calibration kernel x{ref_ratio:.2f} between the runs: machine speed changed")
    elif abs(z) <= z_crit:
        verdict = "noisy"
    elif worse > 0 and rel_abs <= threshold:
        verdict = "noisy"
        notes.append("worse against the calibration kernel only")
    else:
        verdict = "REGRESSION" if worse > 0 else "improved"
    return dict(metric=metric, base=mb, new=mn, ratio=ratio, ratio_ref=ratio_ref, ref_ratio=ref_ratio,
                noise=noise, z=z, cv=cv, n_base=len(b), n_new=len(n), paired=paired, verdict=verdict,
                regression=verdict == "REGRESSION", note="; ".join(notes))


def _corroborate(row: dict, group: str | None, z_crit: float) -> None:
    """A lone cell's time verdict needs its estimator's all-cells row to agree, unless it is beyond
    ``LONE_CELL_Z`` x z_crit noise units.

    One cell's time between two runs has heavier tails than the normal model behind z: on the
    2-core CI machine, 10 back-to-back pairs of quick runs gave 4 single-cell time "regressions"
    of identical code, none in an estimator's all-cells row. A slower forward slows every cell of
    its estimator, so the all-cells row (z over sqrt(cells)) is the verdict; a lone cell far beyond
    the noise (a cliff at one L or m) still counts on its own.
    """
    lone = row["verdict"] in ("REGRESSION", "improved")
    if KINDS.get(row["metric"]) != "time" or group is None or not lone:
        return
    if group == row["verdict"] or abs(row["z"]) > LONE_CELL_Z * z_crit:
        return
    row["note"] = "; ".join(filter(None, [row["note"], f"its estimator's all-cells time is {group}"]))
    row["verdict"], row["regression"] = "noisy", False


def _var(v: np.ndarray) -> float:
    return float(np.var(v, ddof=1)) if len(v) > 1 else 0.0


# ------------------------------------------------------------------------------ printing
def _num(x: float, metric: str) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    x = x * (METRICS[metric].scale if metric in METRICS else 1.0)
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """The comparison as aligned text (or Markdown): cell, metric, base, new, ratio, ratio against
    the calibration kernel, noise, z, seeds, verdict and a note."""
    header = ["cell", "metric", "base", "new", "ratio", "vs ref", "noise (1σ)", "z", "seeds", "verdict",
              "note"]
    lines = []
    for _, r in table.iterrows():
        seeds = f"{r['n_base']}/{r['n_new']}" + (" paired" if r["paired"] else "")
        if r["metric"] == "status":
            before, after = r["note"].split(" -> ")
            lines.append([r["label"], "status", before, after, "", "", "", "", seeds, r["verdict"], ""])
            continue
        unit = METRICS[r["metric"]].unit if r["metric"] in METRICS else ""
        lines.append([
            r["label"], r["metric"] + (f" [{unit}]" if unit else ""),
            _num(r["base"], r["metric"]), _num(r["new"], r["metric"]),
            f"{r['ratio']:.3f}" if np.isfinite(r["ratio"]) else "inf",
            f"{r['ratio_ref']:.3f}" if np.isfinite(r["ratio_ref"]) else "",
            f"±{100 * r['noise']:.1f}%" if np.isfinite(r["noise"]) else "—",
            f"{r['z']:.1f}" if np.isfinite(r["z"]) else "—",
            seeds, r["verdict"], r["note"] or "",
        ])
    right = {2, 3, 4, 5, 6, 7}
    if markdown:
        rule = "|" + "|".join("---:" if i in right else ":---" for i in range(len(header))) + "|"
        body = ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
        return "\n".join(["| " + " | ".join(header) + " |", rule, *body])
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])
