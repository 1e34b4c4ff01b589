"""Tables of a results folder: ranked leaderboards and the failures list, as Markdown, LaTeX, HTML.

A leaderboard ranks the estimators of one data source at its largest (L, m) by their mean error
(output error, else kernel relative MSE, else time), with ranks that count the 95% intervals
lying wholly below (``noise_ranks``), shows mean ± 95% CI half-width over seeds for every metric and the
seed count, marks estimators whose output error exceeds the uniform baseline's, and keeps cells
that failed or were skipped, with their reason, below the ranked ones. The baselines of the
same slice follow as references.

A run of a suite with a ``[fit]`` section also gets its held-out tables first: the attention-output
error on the held-out tokens (against softmax attention, and against each learned estimator's own
kernel) for every estimator and m, averaged over the data sources seed by seed.

    tables = build_tables(run)
    to_markdown(tables[0]); to_latex(tables[0]); to_html(tables[0])
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rfbench.report import METRICS, Run, safe_dir
from rfbench.report.analysis import (
    baseline_level,
    baselines_for,
    board_slices,
    describe_slice,
    has_metric,
    heavy_tail_note,
    noise_ranks,
    seed_means_over_data,
    uniform_floor,
    value_columns,
)
from rfbench.results import STATUSES, mean_ci
from rfbench.results.atomic import atomic_write, write_text
from rfbench.results.schema import RANK_ORDER

#: Metrics a leaderboard shows, in order, when the run has them.
BOARD_METRICS = ("kernel_rel_mse", "out_rel_err", "time_ms", "peak_mem_bytes")
# Output error first (rfbench.results.schema.RANK_ORDER, which the table `rfbench run` prints also
# follows): the kernel relative MSE is heavy-tailed over seeds, so its t-intervals seldom separate.
RANK_BY = RANK_ORDER
#: The leaderboard's rank rule in words (``noise_ranks``), for its caption.
RANK_RULE = ("Rank = 1 + the number of estimators whose 95% interval lies wholly below this one's, "
             "raised where needed to the rank of the row above, so ranks never fall down the table; "
             "equal ranks are marked =. Overlapping intervals need not share a rank: an interval that "
             "overlaps a better one's but lies wholly above a third's ranks lower.")


@dataclass
class Table:
    title: str
    caption: str
    columns: list[str]
    rows: list[list[str]]
    row_status: list[str] = field(default_factory=list)  # "ok", "baseline", or a failure status
    align: str = ""  # one letter per column: l or r


# ------------------------------------------------------------------------------ formatting
def fmt(x: float) -> str:
    """Three significant figures; scientific notation outside [1e-3, 1e5)."""
    if x is None or not np.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.3g}"
    return f"{x:.2e}"


def fmt_ci(mean: float, lo: float | None, hi: float | None) -> str:
    """'mean ± half-width' of a (symmetric, t-based) 95% interval; the mean alone without one."""
    if mean is None or not np.isfinite(mean):
        return "—"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt((hi - lo) / 2)}"


def _status_text(row: pd.Series) -> str:
    status = str(row["status"])
    if status == "ok":
        return "ok"
    n_ok, n = row.get("n_ok"), row.get("n_seeds")
    part = ""
    if n_ok is not None and n is not None and pd.notna(n_ok) and pd.notna(n) and 0 < int(n_ok) < int(n):
        part = f" in {int(n) - int(n_ok)} of {int(n)} seeds"
    msg = str(row.get("message", "") or "").strip().replace("\n", " ")
    if len(msg) > 90:
        msg = msg[:87] + "..."
    return f"{status}{part}: {msg}" if msg else f"{status}{part}"


# ------------------------------------------------------------------------------ building
def build_tables(run: Run, prefer: dict | None = None) -> list[Table]:
    """One leaderboard per data source (and causal value), then the failures table (if any)."""
    s = run.summary
    est = s[s["kind"] == "estimator"]
    tables = [t for m in HELD_OUT_METRICS for t in held_out_tables(run, m)]
    several_causal = "causal" in est and est["causal"].nunique() > 1
    for rows, fixed in (board_slices(est, prefer) if len(est) else []):
        board = leaderboard(run, rows, fixed, several_causal)
        if board is not None:
            tables.append(board)
    fails = failures(run)
    if fails is not None:
        tables.append(fails)
    return tables


def leaderboard(run: Run, rows: pd.DataFrame, fixed: dict, several_causal: bool = False) -> Table | None:
    """Rank the estimators of one slice (all statuses kept) with the slice's baselines after them.

    Ranks respect the noise: an estimator's rank is 1 + the number of estimators whose 95%
    interval lies wholly below its own, raised to the rank above it where that is higher
    (``noise_ranks``); equal ranks are marked '='. An estimator whose mean output error exceeds
    the uniform baseline's is marked, and the caption names the cells whose kernel MSE the seeds
    cannot estimate (``heavy_tail_note``).
    """
    if rows.empty:
        return None
    base = baselines_for(run.summary, fixed)
    frame = pd.concat([rows, base])
    metrics = [m for m in BOARD_METRICS if has_metric(frame, m)]
    rank_by = next((m for m in RANK_BY if m in metrics), None)
    key, lo, hi = value_columns(rows, rank_by) if rank_by else (None, None, None)
    ok = rows["status"] == "ok"
    if key:
        ok &= np.isfinite(pd.to_numeric(rows[key], errors="coerce"))
    ranked = rows[ok].sort_values(key) if key else rows[ok].sort_values("estimator")
    others = rows[~ok].sort_values("estimator")
    ranks = (noise_ranks(ranked[key], ranked[lo] if lo else np.nan, ranked[hi] if hi else np.nan)
             if key else np.arange(1, len(ranked) + 1))
    floor = uniform_floor(run.summary, "out_rel_err", fixed)
    taylor = baseline_level(run.summary, "out_rel_err", fixed, "taylor2")
    columns = ["rank", "estimator", "m"] + [METRICS[m].header() for m in metrics] + ["seeds", "status"]
    out, status = [], []
    shared = {r for r in ranks if list(ranks).count(r) > 1}
    n_worse = 0
    for rank, (_, r) in zip(ranks, ranked.iterrows()):
        note = "ok"
        if floor is not None and _mean(r, "out_rel_err") > floor:
            note, n_worse = f"ok; output error above uniform's {fmt(floor)}", n_worse + 1
        out.append([f"{rank}=" if rank in shared else str(rank), r["estimator"], _int(r.get("num_features"))]
                   + _cells(r, metrics) + [_seeds(r), note])
        status.append("ok")
    for _, r in others.iterrows():
        out.append(["–", r["estimator"], _int(r.get("num_features"))] + _cells(r, metrics)
                   + [_seeds(r), _status_text(r)])
        status.append(str(r["status"]))
    for _, r in base.sort_values("estimator").iterrows():
        out.append(["ref", f"{r['estimator']} (baseline)", "–"] + _cells(r, metrics)
                   + [_seeds(r), _status_text(r)])
        status.append("baseline" if r["status"] == "ok" else str(r["status"]))
    n = ranked["n_ok"] if "n_ok" in ranked and len(ranked) else None
    seeds = "?" if n is None else f"{int(n.min())}" + (f"–{int(n.max())}" if n.max() > n.min() else "")
    where = describe_slice(fixed)
    label = METRICS[rank_by].label if rank_by else "name"
    caption = (f"Estimators ranked by mean {label} (lower is better)"
               + (f" at {where}" if where else "") + f"; mean ± 95% CI half-width over {seeds} seeds "
               "(t-interval; a lone mean where only one seed succeeded). " + RANK_RULE)
    if floor is not None:
        caption += (f" {n_worse} of {len(ranked)} ranked estimators have a mean output error above the "
                    f"uniform baseline's ({fmt(floor)}: every query gets the mean of the values), "
                    "i.e. worse than knowing nothing of q and k.")
    if taylor is not None:
        n_above = sum(_mean(r, "out_rel_err") > taylor for _, r in ranked.iterrows())
        caption += (f" {n_above} of {len(ranked)} have a mean output error above the taylor2 baseline's "
                    f"({fmt(taylor)}: Based's deterministic Taylor-2 map, biased).")
    if "kernel_rel_mse" in metrics:
        caption += heavy_tail_note(ranked, run.results, "kernel_rel_mse", by_data=False)
    caption += " Failed or skipped cells follow unranked with their reason; baselines come last."
    title = "Leaderboard: " + str(fixed.get("data", "all data"))
    if several_causal and "causal" in fixed:
        title += " (causal)" if bool(fixed["causal"]) else " (non-causal)"
    return Table(title, caption, columns, out, status, "rlr" + "r" * len(metrics) + "rl")


def _mean(r: pd.Series, metric: str) -> float:
    col = value_columns(r.to_frame().T, metric)[0]
    v = pd.to_numeric(pd.Series([r.get(col)]), errors="coerce").iloc[0]
    return float(v) if pd.notna(v) else float("nan")


def _seeds(r: pd.Series) -> str:
    n_ok, n = r.get("n_ok"), r.get("n_seeds")
    if n_ok is None or pd.isna(n_ok):
        return "?"
    return f"{int(n_ok)}" if n is None or pd.isna(n) or int(n) == int(n_ok) else f"{int(n_ok)}/{int(n)}"


HELD_OUT_METRICS = ("out_rel_err", "target_out_rel_err")
#: The kernel column of the approximate baselines (the others are exact softmax attention).
BASELINE_KERNELS = {"uniform": "constant", "taylor2": "1 + t + t^2/2 (Taylor-2)"}


def is_held_out(run: Run) -> bool:
    """Whether the run fitted on part of each cell's tokens and measured on the rest ([fit])."""
    r = run.results
    return "fit_len" in r and bool((pd.to_numeric(r["fit_len"], errors="coerce") > 0).any())


HELD_OUT_SLICE = ("seq_len", "causal", "dtype", "device", "dim")


def held_out_tables(run: Run, metric: str = "out_rel_err") -> list[Table]:
    """``held_out_table`` for each (L, causal, dtype, device, d) the run covers (usually one)."""
    if not is_held_out(run) or metric not in run.results:
        return []
    r = run.results
    keys = [k for k in HELD_OUT_SLICE if k in r]
    groups = list(r.groupby(keys, sort=True)) if keys else [((), r)]
    tables = []
    for values, frame in groups:
        values = values if isinstance(values, tuple) else (values,)
        fixed = {k: v for k, v in zip(keys, values) if r[k].nunique() > 1}  # what tells tables apart
        table = held_out_table(frame, metric, describe_slice(fixed))
        if table is not None:
            tables.append(table)
    return tables


def held_out_table(r: pd.DataFrame, metric: str = "out_rel_err", where: str = "") -> Table | None:
    """Estimators x m of a [fit] run's rows: ``metric`` on the held-out tokens, mean ± 95% CI.

    Per seed index, the metric is averaged over the run's data sources (e.g. the layers of a
    capture), then the mean and t-interval are taken over the seed indices: the spread is that
    of the random features (and of anything fitted per seed), the data being fixed. A cell needs
    every data source ok for that seed; otherwise it shows what failed. Baselines (one run each,
    no m) show the same mean in every column.
    """
    r = r.assign(_v=pd.to_numeric(r[metric], errors="coerce") * METRICS[metric].scale)
    est = r[r["kind"] == "estimator"]
    if metric != "out_rel_err":  # the own-kernel metric: estimators that have one
        has = est.groupby("estimator")["_v"].transform(lambda x: x.notna().any())
        est = est[has]
    if est.empty:
        return None
    n_data = r["data"].nunique()
    ms = sorted(int(m) for m in est["num_features"].unique())
    rows, status = [], []
    for name, g in est.groupby("estimator", sort=False):
        cells = []
        for m in ms:
            gm = g[g["num_features"] == m]
            per_seed = seed_means_over_data(gm, "_v")
            if gm.empty:
                cells.append("–")
            elif per_seed.size == 0:
                bad = gm[gm["status"] != "ok"]
                cells.append(str(bad["status"].iloc[0]) if len(bad) else "—")
            else:
                mean, _, lo, hi = mean_ci(per_seed)
                text = fmt_ci(mean, lo, hi)
                n_all = gm["seed_index"].nunique()
                if per_seed.size < n_all:  # seeds that failed on some data source are left out
                    text += f" ({per_seed.size} of {n_all} seeds)"
                cells.append(text)
        fit = pd.to_numeric(g["fit_ms"], errors="coerce").dropna() if "fit_ms" in g else pd.Series()
        target = next((t for t in g.get("target", pd.Series(dtype=str)) if t), "")
        rows.append([str(name), _short_target(target), *cells, fmt(float(fit.median())) if len(fit) else "–"])
        status.append("ok")
    if metric == "out_rel_err":
        base = r[(r["kind"] == "baseline") & (r["status"] == "ok") & r["_v"].notna()]
        for name, g in base.groupby("estimator", sort=True):
            value = fmt(float(g["_v"].mean())) if g["data"].nunique() == n_data else "—"
            kernel = BASELINE_KERNELS.get(name, "softmax")
            rows.append([f"{name} (baseline)", kernel, *[value] * len(ms), "–"])
            status.append("baseline")
    fit_len = _int_values(est, "fit_len")
    eval_len = _int_values(est, "eval_len")
    n_seeds = est["seed_index"].nunique()
    against = ("exact softmax attention" if metric == "out_rel_err"
               else "exact attention under the estimator's own kernel (learned or data-aware; "
                    "'—' where it has no closed form)")
    caption = (f"{METRICS[metric].label.capitalize()} on the held-out tokens ({eval_len} per cell, after "
               f"fitting on the other {fit_len}), against {against}. Per seed the mean over the "
               f"{n_data} data source(s), then mean ± 95% CI half-width over {n_seeds} seeds "
               "(t-interval). fit: median fit time per estimator. Baselines: one run each.")
    title = "Held-out " + ("attention-output error" if metric == "out_rel_err" else "own-kernel output error")
    title += f" ({where})" if where else ""
    columns = ["estimator", "kernel", *[f"m={m}" for m in ms], "fit (ms)"]
    return Table(title, caption, columns, rows, status, "ll" + "r" * (len(ms) + 1))


def _short_target(target: str) -> str:
    """The kernel column: 'softmax', or the first words of a learned/data-aware kernel's label."""
    target = str(target or "")
    return target if len(target) <= 40 else target[:37] + "..."


def _int_values(frame: pd.DataFrame, col: str) -> str:
    column = pd.to_numeric(frame.get(col, pd.Series(dtype=float)), errors="coerce").dropna()
    vals = sorted({int(v) for v in column})
    return "/".join(map(str, vals)) if vals else "?"


def _int(v) -> str:
    return str(int(v)) if v is not None and pd.notna(v) and float(v) > 0 else "–"


def _cells(r: pd.Series, metrics: list[str]) -> list[str]:
    out = []
    for m in metrics:
        cols = value_columns(r.to_frame().T, m)
        nums = [float(r[c]) * METRICS[m].scale if c and pd.notna(r.get(c)) else None for c in cols]
        out.append(fmt_ci(*nums))
    return out


def failures(run: Run) -> Table | None:
    """Cells with status oom/error/skipped, one row per distinct (status, reason) with the number
    of cells that share it and the estimators, data sources, L and m they cover."""
    s = run.summary
    bad = s[s["status"] != "ok"].copy()
    if bad.empty:
        return None
    bad["message"] = bad.get("message", pd.Series("", index=bad.index)).fillna("").astype(str)
    bad["message"] = bad["message"].str.strip().str.replace("\n", " ", regex=False)
    rows, status = [], []
    for (stat, msg), grp in bad.groupby(["status", "message"], sort=True, dropna=False):
        n_ok = int(grp["n_ok"].sum()) if "n_ok" in grp else None
        n = int(grp["n_seeds"].sum()) if "n_seeds" in grp else None
        rows.append([str(stat), str(len(grp)), _names(grp, "estimator"), _names(grp, "data"),
                     _values(grp, "seq_len"), _values(grp, "num_features"),
                     f"{n_ok}/{n}" if n is not None and n_ok is not None else "?",
                     msg[:200] + ("..." if len(msg) > 200 else "")])
        status.append(str(stat))
    order = sorted(range(len(rows)), key=lambda i: (-_severity(rows[i][0]), -int(rows[i][1]), rows[i][7]))
    caption = (f"{len(bad)} cell(s) did not complete on every seed; they are left out of the figures. "
               "Cells that failed for the same reason share a row ('cells' counts them); 'ok seeds' "
               "counts the seeds that did complete, over all the row's cells.")
    return Table("Failed and skipped cells", caption,
                 ["status", "cells", "estimators", "data", "L", "m", "ok seeds", "reason"],
                 [rows[i] for i in order], [status[i] for i in order], "lrllllrl")


def _names(grp: pd.DataFrame, col: str, limit: int = 6) -> str:
    """'posrf-iid, posrf-orf' (or the first few and '+ N more') of a column's distinct values."""
    if col not in grp:
        return "–"
    vals = sorted({str(v) for v in grp[col].dropna()})
    more = f" + {len(vals) - limit} more" if len(vals) > limit else ""
    return ", ".join(vals[:limit]) + more if vals else "–"


def _severity(status: str) -> int:
    return STATUSES.index(status) if status in STATUSES else len(STATUSES)


def _values(grp: pd.DataFrame, col: str) -> str:
    """'128/256/512' (or '16–1024' when long) of the distinct positive values of a column."""
    if col not in grp:
        return "–"
    vals = sorted({int(v) for v in grp[col] if pd.notna(v) and v > 0})
    if not vals:
        return "–"
    return "/".join(map(str, vals)) if len(vals) <= 4 else f"{vals[0]}–{vals[-1]} ({len(vals)} values)"


# ------------------------------------------------------------------------------ rendering
def to_markdown(table: Table) -> str:
    def esc(text: str) -> str:
        # Labels come from suite files: HTML in them must show as text, not render (or run).
        text = html.escape(" ".join(str(text).split()), quote=False)
        return text.replace("|", "\\|").replace("`", "\\`").replace("*", "\\*").replace("_", "\\_")

    align = table.align or "l" * len(table.columns)
    lines = [f"### {esc(table.title)}", "", esc(table.caption), "",
             "| " + " | ".join(esc(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {"±": r"$\pm$", "—": "---", "–": "--", "↓": r"$\downarrow$", "↑": r"$\uparrow$",
                  "²": r"\textsuperscript{2}", "×": r"$\times$", "…": r"\dots{}"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))
    for sym, rep in _LATEX_SYMBOLS.items():
        out = out.replace(sym, rep)
    return out


def to_latex(table: Table, label: str | None = None) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    align = table.align or "l" * len(table.columns)
    label = label or "tab:" + "".join(ch if ch.isalnum() else "-" for ch in table.title.lower()).strip("-")
    lines = [r"\begin{table}[ht]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(table.title)}. {latex_escape(table.caption)}}}",
             rf"\label{{{label}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    previous = None
    for row, status in zip(table.rows, table.row_status or ["ok"] * len(table.rows)):
        group = "ok" if status == "ok" else ("ref" if status == "baseline" or row[0] == "ref" else "failed")
        if previous is not None and group != previous:
            lines.append(r"\midrule")
        previous = group
        lines.append(" & ".join(latex_escape(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """A <table> fragment; rows carry class="status-<status>" for styling."""
    align = table.align or "l" * len(table.columns)
    e = html.escape
    head = "".join(f'<th class="{"num" if a == "r" else "txt"}">{e(c)}</th>'
                   for c, a in zip(table.columns, align))
    body = []
    for row, status in zip(table.rows, table.row_status or ["ok"] * len(table.rows)):
        cells = "".join(f'<td class="{"num" if a == "r" else "txt"}">{e(c)}</td>' for c, a in zip(row, align))
        body.append(f'<tr class="status-{e(status)}">{cells}</tr>')
    caption = f"<caption><strong>{e(table.title)}.</strong> {e(table.caption)}</caption>"
    return (f'<table class="board">\n{caption}\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody>\n</table>\n")


def write_tables(run: Run, out_dir: Path, prefer: dict | None = None) -> tuple[list[Table], list[Path]]:
    """Write leaderboard.{md,tex,html} and cells.csv (every cell of the summary) under ``out_dir``."""
    safe_dir(out_dir)
    tables = build_tables(run, prefer)
    header = f"# {run.suite}: leaderboards\n\n"
    files = {
        "leaderboard.md": header + "\n".join(to_markdown(t) for t in tables),
        "leaderboard.tex": "% needs \\usepackage{booktabs}\n" + "\n".join(to_latex(t) for t in tables),
        "leaderboard.html": "\n".join(to_html(t) for t in tables),
    }
    paths = []
    for name, text in files.items():
        paths.append(write_text(out_dir / name, text))  # atomic; never through a planted link
    cells = out_dir / "cells.csv"
    atomic_write(cells, lambda tmp: run.summary.to_csv(tmp, index=False, float_format="%.6g"))
    paths.append(cells)
    return tables, paths
