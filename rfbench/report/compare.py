"""``rfbench compare BASE_DIR NEW_DIR``: the regression gate between two results folders.

Cells are joined on their key hash (``cell``: the same cell definition has the same hash in
every run) and seeds on ``seed_index``. For each common cell and metric (default: time, peak
memory, kernel relative MSE, output error; lower is better except throughput):

    ratio = mean_new / mean_base             (means over the seeds that succeeded)
    noise = standard error of log(ratio)     (about the relative standard error of the change)

How the noise is estimated, in log space (the noise of times and errors is multiplicative):

- paired seeds (both runs succeeded on the same seed indices): from the per-seed log-ratios
  log(new_i / base_i). Two runs of the same code draw the same random features per seed, so
  pairing cancels the Monte Carlo spread the runs share: an error change shows even when it is
  small next to the spread over seeds;
- unpaired: Welch's sqrt(var_base / n_base + var_new / n_new) of the per-seed log values;
- a cell has only a few seeds, so its own variance estimate is itself noisy. The variance is
  also pooled over all cells of the metric, and the larger of the cell's and the pooled
  standard error is used (relative noise is similar across cells; the max keeps a noisier cell
  from being flagged on the pooled value);
- times: at least the within-run jitter of the repeats, sigma_rep = (p80 - p20) / 1.683 (the
  20-80 % range of a normal spans 1.683 sigma), per seed, so one seed still carries its jitter.

A metric **regresses** when it is worse by more than ``--threshold`` (relative), AND
z = log(ratio) / noise exceeds the one-sided normal quantile at ``--alpha`` / N (Bonferroni
over the N comparisons, so pure noise across hundreds of cells still passes with probability
1 - alpha; N=20: 3.0 noise units, N=900: 3.9), AND the change exceeds an absolute floor (30 us
for time, as xformers uses; 1 MiB for memory; 1e-6 for errors). A cell that succeeded in BASE
and fails (oom/error) on some seed in NEW regresses too.

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
from rfbench.results import load_meta, load_results
from rfbench.results.meta import META_FILE

DEFAULT_METRICS = ("time_ms", "peak_mem_bytes", "kernel_rel_mse", "out_rel_err")
ABS_FLOOR = {"time_ms": 0.03, "draw_ms": 0.03, "fit_ms": 0.03, "peak_mem_bytes": float(2**20),
             "tokens_per_s": 0.0}
ERROR_FLOOR = 1e-6
P20_P80_SIGMAS = 1.683  # z(0.8) - z(0.2) of a normal distribution
FAILED = ("oom", "error")
MIN_POOLED_DOF = 5  # fewer residual degrees of freedom than this: no pooled estimate
VERDICT_ORDER = {"fails now": 0, "REGRESSION": 1, "noisy": 2, "improved": 3, "fixed": 4, "same": 5}


class IncompatibleRuns(DataError):
    """The two folders cannot be compared (different suites, no common cell, a missing metric)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base_dir", metavar="BASE_DIR", help="results folder of the reference run")
    parser.add_argument("new_dir", metavar="NEW_DIR", help="results folder of the run under test")
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
    table, z_crit = compare_runs(args.base_dir, args.new_dir, metrics=args.metric, threshold=threshold,
                                 alpha=args.alpha)
    shown = table[~table["verdict"].isin(["same", "noisy"])] if args.changes_only else table
    print(format_table(shown, markdown=args.markdown) if len(shown) else "(no change beyond the threshold)")
    bad = table[table["regression"]]
    n_cells = table["cell"].nunique()
    rule = f"{threshold:.0%} and {z_crit:.2g} noise units (family-wise alpha {args.alpha:g})"
    if len(bad):
        worst = bad.sort_values("ratio", ascending=False).iloc[0]
        what = "fails now" if worst["metric"] == "status" else f"{worst['metric']} x{worst['ratio']:.2f}"
        print(f"\n{len(bad)} regression(s) beyond {rule} in {bad['cell'].nunique()} of {n_cells} "
              f"common cells; worst: {worst['label']} {what}")
        return 1
    print(f"\nno regression beyond {rule}: {n_cells} common cells, {len(table)} comparisons")
    return 0


# ------------------------------------------------------------------------------ comparison
def compare_runs(
    base_dir, new_dir, *, metrics=None, threshold: float = 0.10, alpha: float = 0.05
) -> tuple[pd.DataFrame, float]:
    """One row per (common cell, metric), worst first, and the z threshold used.

    Columns: cell, label, metric, base, new, ratio, noise (s.e. of log ratio), z, n_base, n_new,
    paired, verdict, regression, note. Raises IncompatibleRuns (exit 2) when the runs cannot be
    joined.
    """
    (rb, suites_b), (rn, suites_n) = _load(base_dir), _load(new_dir)
    if suites_b and suites_n and suites_b != suites_n:
        raise IncompatibleRuns(f"the runs come from different suites ({_few(suites_b)} vs "
                               f"{_few(suites_n)}); compare two runs of the same suite")
    common = sorted(set(rb["cell"]) & set(rn["cell"]))
    if not common:
        raise IncompatibleRuns(f"the runs share no cell ({rb['cell'].nunique()} vs "
                               f"{rn['cell'].nunique()} cells){_why_disjoint(rb, rn)}")
    metrics = _choose_metrics(rb, rn, metrics)
    labels = _labels(pd.concat([rb, rn]).drop_duplicates("cell").set_index("cell").loc[common])
    cb, cn = _Cells(rb, metrics), _Cells(rn, metrics)

    rows = [{"cell": c, "label": labels[c], **r} for c in common
            if (r := _status_row(cb.statuses(c), cn.statuses(c)))]
    measured = []
    for metric in metrics:
        pairs = {c: (cb.values(c, metric), cn.values(c, metric)) for c in common}
        pairs = {c: v for c, v in pairs.items() if len(v[0][1]) and len(v[1][1])}
        pooled = _pooled_variances(pairs.values())
        for cell, (vb, vn) in pairs.items():
            measured.append((cell, metric, vb, vn, pooled))
    z_crit = NormalDist().inv_cdf(1 - alpha / max(len(measured), 1))
    for cell, metric, vb, vn, pooled in measured:
        rep = (cb.rep_sigma(cell, metric), cn.rep_sigma(cell, metric))
        rows.append({"cell": cell, "label": labels[cell],
                     **_compare(vb, vn, metric, pooled, rep, threshold, z_crit)})
    table = pd.DataFrame(rows, columns=["cell", "label", "metric", "base", "new", "ratio", "noise", "z",
                                        "n_base", "n_new", "paired", "verdict", "regression", "note"])
    table["_order"] = table["verdict"].map(VERDICT_ORDER)
    table = table.sort_values(["_order", "ratio"], ascending=[True, False])
    return table.drop(columns="_order").reset_index(drop=True), z_crit


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
    """Per-cell numpy views of one run's rows, built once (per-cell pandas indexing is slow)."""

    def __init__(self, results: pd.DataFrame, metrics: list[str]):
        self._status = results["status"].to_numpy(str)
        self._all = results.groupby("cell").indices
        ok = results[results["status"] == "ok"]
        self._ok = ok.groupby("cell").indices
        self._seed = ok["seed_index"].to_numpy() if "seed_index" in ok else np.arange(len(ok))
        wanted = [c for m in metrics for c in (m, f"{m}_p20", f"{m}_p80")]
        self._col = {c: pd.to_numeric(ok[c], errors="coerce").to_numpy(float) for c in wanted if c in ok}

    def statuses(self, cell: str) -> np.ndarray:
        return self._status[self._all[cell]]

    def values(self, cell: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(seed indices, values) of ``metric`` on the ok seeds with a finite value, by seed index."""
        pos = self._ok.get(cell, np.array([], int))
        if metric not in self._col or not len(pos):
            return np.array([], int), np.array([])
        vals, seeds = self._col[metric][pos], self._seed[pos]
        keep = np.isfinite(vals)
        order = np.argsort(seeds[keep], kind="stable")
        return seeds[keep][order], vals[keep][order]

    def rep_sigma(self, cell: str, metric: str) -> np.ndarray:
        """Per-seed relative sigma of one repeat, from the timing loop's p20/p80 (times only)."""
        lo, hi = f"{metric}_p20", f"{metric}_p80"
        pos = self._ok.get(cell, np.array([], int))
        if lo not in self._col or hi not in self._col or not len(pos):
            return np.array([])
        rel = (self._col[hi][pos] - self._col[lo][pos]) / P20_P80_SIGMAS / self._col[metric][pos]
        return rel[np.isfinite(rel)]


def _is_paired(vb, vn) -> bool:
    """Both runs succeeded on the same seed indices (each once)."""
    (ib, _), (in_, _) = vb, vn
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
        worst = "error" if (statuses == "error").any() else "oom"
        return f"{worst} on {int(failed.sum())}/{len(statuses)} seeds" if failed.any() else "ok"

    verdict = "fails now" if failed_n.any() else "fixed"
    return dict(metric="status", base=math.nan, new=math.nan, ratio=math.nan, noise=math.nan, z=math.nan,
                n_base=int((sb == "ok").sum()), n_new=int((sn == "ok").sum()),
                paired=False, verdict=verdict, regression=verdict == "fails now",
                note=f"{text(sb, failed_b)} -> {text(sn, failed_n)}")


def _compare(vb, vn, metric: str, pooled: dict, rep, threshold: float, z_crit: float) -> dict:
    """Ratio, noise, z and verdict of one metric of one cell (see the module docstring).

    ``vb``, ``vn``: (seed indices, values) of BASE and NEW; ``rep``: per-seed relative repeat sigmas.
    """
    paired = _is_paired(vb, vn)
    vb, vn = vb[1], vn[1]
    mb, mn = float(vb.mean()), float(vn.mean())
    sign = -1.0 if metric in METRICS and not METRICS[metric].lower_is_better else 1.0
    if mb > 0 and mn > 0 and (vb > 0).all() and (vn > 0).all():
        change = math.log(mn / mb)  # > 0: larger in NEW
        if paired:
            r = np.log(vn) - np.log(vb)
            own = float(np.std(r, ddof=1) / math.sqrt(len(r))) if len(r) > 1 else 0.0
            pool = math.sqrt(pooled["paired"] / len(r)) if pooled["paired"] is not None else 0.0
        else:
            lb, ln = np.log(vb), np.log(vn)
            own = math.sqrt(_var(lb) / len(lb) + _var(ln) / len(ln))
            pool = (math.sqrt(pooled["unpaired"] * (1 / len(lb) + 1 / len(ln)))
                    if pooled["unpaired"] is not None else 0.0)
        noise = max(own, pool)
        if noise < 1e-12:  # identical per-seed ratios differ only by rounding: no noise
            noise = 0.0
        sb, sn = rep
        if len(sb) and len(sn):
            noise = max(noise, math.sqrt(np.mean(sb**2) / len(sb) + np.mean(sn**2) / len(sn)))
    else:  # zeros (an exact baseline's error): linear change, no noise model
        change = (mn - mb) / abs(mb) if mb else (0.0 if mn == mb else math.copysign(math.inf, mn - mb))
        noise = 0.0
    worse = sign * change
    z = worse / noise if noise > 0 else (0.0 if worse == 0 else math.copysign(math.inf, worse))
    ratio = mn / mb if mb else (1.0 if mn == 0 else math.inf)
    rel_worse = sign * (ratio - 1.0) if math.isfinite(ratio) else math.inf
    beyond_floor = abs(mn - mb) > ABS_FLOOR.get(metric, ERROR_FLOOR)
    if abs(rel_worse) <= threshold or not beyond_floor:
        verdict = "same"
    elif abs(z) <= z_crit:
        verdict = "noisy"
    else:
        verdict = "REGRESSION" if worse > 0 else "improved"
    return dict(metric=metric, base=mb, new=mn, ratio=ratio, noise=noise, z=z, n_base=len(vb), n_new=len(vn),
                paired=paired, verdict=verdict, regression=verdict == "REGRESSION", note="")


def _var(v: np.ndarray) -> float:
    return float(np.var(v, ddof=1)) if len(v) > 1 else 0.0


# ------------------------------------------------------------------------------ printing
def _num(x: float, metric: str) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    x = x * (METRICS[metric].scale if metric in METRICS else 1.0)
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """The comparison as aligned text (or Markdown): cell, metric, base, new, ratio, noise, z, verdict."""
    header = ["cell", "metric", "base", "new", "ratio", "noise (1σ)", "z", "seeds", "verdict"]
    lines = []
    for _, r in table.iterrows():
        seeds = f"{r['n_base']}/{r['n_new']}" + (" paired" if r["paired"] else "")
        if r["metric"] == "status":
            before, after = r["note"].split(" -> ")
            lines.append([r["label"], "status", before, after, "", "", "", seeds, r["verdict"]])
            continue
        unit = METRICS[r["metric"]].unit if r["metric"] in METRICS else ""
        lines.append([
            r["label"], r["metric"] + (f" [{unit}]" if unit else ""),
            _num(r["base"], r["metric"]), _num(r["new"], r["metric"]),
            f"{r['ratio']:.3f}" if np.isfinite(r["ratio"]) else "inf",
            f"±{100 * r['noise']:.1f}%" if np.isfinite(r["noise"]) else "—",
            f"{r['z']:.1f}" if np.isfinite(r["z"]) else ("inf" if r["z"] > 0 else "-inf"),
            seeds, r["verdict"],
        ])
    right = {2, 3, 4, 5, 6}
    if markdown:
        rule = "|" + "|".join("---:" if i in right else ":---" for i in range(len(header))) + "|"
        body = ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
        return "\n".join(["| " + " | ".join(header) + " |", rule, *body])
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])
