"""``rfbench report RUN_DIR [--out DIR]``: figures, tables and one report.html for a results folder.

Layout of the output folder (default: the results folder itself):

    report.html            the page: run metadata, reading guide, figures, leaderboards
    figures/*.png, *.svg   one file per figure (the page links them relatively, or embeds the
                           PNGs with --embed for a single-file page)
    tables/leaderboard.{md,tex,html}, tables/cells.csv

The page has no scripts and no remote resources, so it opens offline and in any browser.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import time
from pathlib import Path

from rfbench.errors import SpecError
from rfbench.report import METRICS, Run, load_runs, parse_where, peak_memory_note, safe_dir
from rfbench.report.plots import Skip  # the module imports matplotlib only when drawing
from rfbench.results import Meta

CSS = """
:root { --fg:#1d1f23; --muted:#5b6270; --line:#d9dde3; --band:#f5f7fa; --accent:#1f77b4; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
header h1 code { font-size: 0.9em; }
header p.sub { color: var(--muted); margin: 0 0 16px; }
nav { background: var(--band); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px;
      margin-bottom: 18px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
h2 { font-size: 20px; border-bottom: 2px solid var(--line); padding-bottom: 4px; margin-top: 34px; }
table.meta { border-collapse: collapse; font-size: 13.5px; }
table.meta th { text-align: left; color: var(--muted); font-weight: 600; padding: 2px 18px 2px 0;
                vertical-align: top; white-space: nowrap; }
table.meta td { padding: 2px 0; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: 12.5px; }
pre { background: var(--band); border: 1px solid var(--line); padding: 10px; overflow-x: auto; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--accent); }
.notes { background: #fff8e6; border-left: 4px solid #e6ab02; padding: 8px 12px; }
.guide li { margin-bottom: 4px; }
figure { margin: 22px 0 30px; padding: 0; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line);
             border-radius: 4px; }
figcaption { color: #33373d; font-size: 13.5px; margin-top: 6px; max-width: 1000px; }
figcaption a { color: var(--accent); }
ul.skipped li { color: var(--muted); }
.tablewrap { overflow-x: auto; margin: 14px 0 26px; }
table.board { border-collapse: collapse; font-size: 13px; min-width: 60%; }
table.board caption { caption-side: top; text-align: left; color: #33373d; padding-bottom: 6px;
                      max-width: 1000px; }
table.board th { border-bottom: 2px solid #888; padding: 4px 10px; background: var(--band);
                 white-space: nowrap; }
table.board td { border-bottom: 1px solid var(--line); padding: 3px 10px; }
table.board .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.board .txt { text-align: left; }
tr.status-baseline td { color: var(--muted); font-style: italic; }
tr.status-oom td, tr.status-error td { background: #fdecea; }
tr.status-skipped td { background: #f3f3f3; color: var(--muted); }
footer { color: var(--muted); font-size: 12.5px; margin-top: 40px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""

GUIDE = [
    "Each <em>cell</em> is one estimator (feature map × weight matrix, e.g. <code>posrf-orf</code>) at one "
    "data source, sequence length L and number of random vectors m, run over several seeds. Points and "
    "table entries are means over the seeds that succeeded; shaded bands and ± are 95% t-intervals of "
    "that mean.",
    "<strong>Kernel relative MSE</strong> = mean over all query–key pairs of (K̂ − K)² divided by the "
    "mean of K², with K = exp(q·k) on the scaled inputs; <strong>output relative error</strong> = "
    "‖out − out<sub>exact</sub>‖<sub>F</sub> / ‖out<sub>exact</sub>‖<sub>F</sub>. Lower is better for "
    "every metric except throughput.",
    "Axes are logarithmic where the values span a decade or more. On the error-vs-m plots the i.i.d. "
    "estimator's <em>expected</em> MSE follows the Monte Carlo law Var₁/m (slope −1); a weight matrix "
    "whose expected MSE lies below it reduces variance at equal m. Where q and k have large norms the "
    "squared kernel error is heavy-tailed over seeds: its mean over a few seeds is set by rare draws, can "
    "sit far below the expectation and even rise with m. Captions name the cells where the closed form "
    "or one dominant seed shows this; compare those by output error.",
    "Time is the median forward-attention time per call; memory is the peak of one call (see the "
    "metadata for what it measures on this device). Exact attention grows as L², random features as L.",
    "When a run sweeps more axes than a figure shows, the figure picks the most complete slice and its "
    "caption says which (e.g. L=1024, m=64); a run with causal and non-causal cells gets each figure "
    "for both. Each data source has its own leaderboard, at the largest L and m it was run at. "
    "<code>rfbench report DIR --where key=value</code> keeps only the cells you name.",
    "Leaderboard ranks respect the noise: an estimator's rank is 1 + the number of estimators whose 95% "
    "interval lies wholly below its own, raised where needed to the rank of the row above so ranks never "
    "fall down the table; equal ranks are marked =. Overlapping intervals need not share a rank. The "
    "seeds column says how many seeds each mean is over. The <strong>uniform</strong> "
    "baseline gives every query the mean of the values: an estimator whose output error is above it "
    "does worse than knowing nothing of q and k, and the tables say so.",
    "Cells that ran out of memory, failed or were skipped are listed with their reason in the tables; "
    "they are never silently dropped.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="+",
                        help="results folder(s) written by `rfbench run`; several are merged into one "
                             "report (a cell held by more than one is taken from the last given)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write the report (default: RUN_DIR; required with several)")
    parser.add_argument("--where", metavar="KEY=VALUE", action="append", default=[],
                        help="keep only cells whose key column KEY equals VALUE (repeatable; a key "
                             "given twice keeps either value), e.g. --where causal=true")
    parser.add_argument("--m", type=int, metavar="M", dest="num_features",
                        help="feature count m of the fixed-m figures and tables (default: the best covered)")
    parser.add_argument("--seq-len", type=int, metavar="L",
                        help="sequence length of the fixed-L figures and tables (default: the best covered)")
    parser.add_argument("--dpi", type=int, default=150, help="PNG resolution (default 150)")
    parser.add_argument("--no-svg", action="store_true", help="write PNG figures only")
    parser.add_argument("--embed", action="store_true",
                        help="embed the PNG figures in report.html (one file to share)")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.dpi is not None and not 30 <= args.dpi <= 600:
        raise SpecError(f"--dpi must be between 30 and 600, got {args.dpi}")
    prefer = {k: v for k, v in (("num_features", args.num_features), ("seq_len", args.seq_len)) if v}
    where = parse_where(args.where)
    if len(args.run_dir) > 1 and not args.out:
        raise SpecError(f"a report of {len(args.run_dir)} merged folders needs --out DIR (by default it "
                        f"would replace {args.run_dir[0]}'s own report)")
    out = Path(args.out) if args.out else Path(args.run_dir[0])
    page, figures = render_report(args.run_dir, out, prefer=prefer, dpi=args.dpi,
                                  svg=not args.no_svg, embed=args.embed, where=where)
    skipped = [f for f in figures if isinstance(f, Skip)]
    drawn = [f for f in figures if not isinstance(f, Skip)]
    print(f"wrote {page} ({len(drawn)} figures, tables in {out / 'tables'}) "
          f"in {time.perf_counter() - start:.1f} s")
    for s in skipped:
        print(f"  skipped figure {s.name}: {s.reason}")
    return 0


def render_report(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    prefer: dict | None = None,
    dpi: int = 150,
    svg: bool = True,
    embed: bool = False,
    where: dict | None = None,
) -> tuple[Path, list]:
    """Write figures, tables and report.html for ``run_dir`` (one folder or a list, merged as
    ``load_runs`` says) under ``out_dir``, keeping the cells that match ``where``; return the page
    path and the list of Figure/Skip records."""
    from rfbench.report.plots import Options, render_figures
    from rfbench.report.tables import to_html, write_tables

    started = time.perf_counter()
    dirs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    run = load_runs(dirs, where)
    out_dir = safe_dir(out_dir)
    opts = Options(out_dir=out_dir / "figures", formats=("png", "svg") if svg else ("png",), dpi=dpi,
                   prefer=dict(prefer or {}))
    figures = render_figures(run, opts)
    tables, table_files = write_tables(run, out_dir / "tables", prefer)
    body = _page(run, out_dir, figures, [to_html(t) for t in tables], table_files, embed,
                 time.perf_counter() - started)
    page = out_dir / "report.html"
    from rfbench.results.atomic import write_text

    write_text(page, body)  # atomic: a reader never sees half a page
    return page, figures


# ------------------------------------------------------------------------------ page
def _text(value) -> str:
    """A metadata value on one line: short scalars of a dict as k=v, devices by name."""
    if isinstance(value, dict):
        if "name" in value:
            extra = value.get("device")
            return f"{value['name']} ({extra})" if extra and extra != value["name"] else str(value["name"])
        items = [(k, v) for k, v in value.items() if not isinstance(v, (dict, list)) and v is not None
                 and len(str(v)) <= 40]
        return ", ".join(f"{k}={v}" for k, v in items)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return " ".join(value)  # a command line
        return ", ".join(_text(v) for v in value)
    return str(value)


def _duration(start, end) -> str:
    try:
        a, b = dt.datetime.fromisoformat(str(start)), dt.datetime.fromisoformat(str(end))
    except ValueError:
        return ""
    seconds = (b - a).total_seconds()
    return f" ({seconds:.0f} s)" if seconds < 120 else f" ({seconds / 60:.1f} min)"


def _meta_rows(run: Run) -> list[tuple[str, str]]:
    m = run.meta
    rows = [("suite", run.suite), ("results", str(run.path))]
    git = m.git.describe()
    label = " · ".join(x for x in (m.rfbench_version, f"git {git}" if git else "") if x)
    rows.append(("rfbench", label or "unknown"))
    versions = [f"{name} {v}" for name, v in m.versions.items()
                if v is not None and not isinstance(v, (dict, list))]
    if versions:
        rows.append(("versions", ", ".join(versions)))
    cpu = m.machine.cpu
    if cpu and m.machine.cpu_count:
        threads = m.machine.torch_threads
        cpu = f"{cpu} ({m.machine.cpu_count} cores" + (f", {threads} torch threads)" if threads else ")")
    for label, value in (("device", _devices(m)), ("CPU", cpu), ("host", m.machine.host)):
        if value:
            rows.append((label, value))
    start, end = m.start_time, m.end_time
    if start or end:
        rows.append(("time", f"{start or '?'} → {end or 'unfinished'}{_duration(start, end) if end else ''}"))
    for label, value in (("command", m.command), ("timing", m.timing), ("seeds", m.seeds)):
        if _text(value):
            rows.append((label, _text(value)))
    note = peak_memory_note(run)
    if note:
        rows.append(("peak memory", note))
    s = run.summary
    n_cells, n_ok = len(s), int((s["status"] == "ok").sum())
    rows.append(("cells", f"{n_cells} ({n_ok} ok, {n_cells - n_ok} failed or skipped), "
                          f"{len(run.results)} cell × seed rows"))
    return rows


def _devices(meta: Meta) -> str:
    """'NVIDIA H100 80GB HBM3 (cuda)': the run's devices by name, with their kind where it differs."""
    return ", ".join(_text(d) for d in meta.machine.devices)


def _figure_html(fig, out_dir: Path, embed: bool) -> str:
    e = html.escape
    png = fig.files[0]
    if embed:
        data = base64.b64encode((out_dir / png).read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    else:
        src = e(png)
    links = " · ".join(f'<a href="{e(f)}">{e(Path(f).suffix[1:].upper())}</a>' for f in fig.files)
    return (f'<figure id="{e(fig.name)}">\n<img src="{src}" alt="{e(fig.title)}">\n'
            f"<figcaption><strong>{e(fig.title)}.</strong> {e(fig.caption)} <span>[{links}]</span>"
            "</figcaption>\n</figure>")


def _page(run: Run, out_dir: Path, figures, table_html: list[str], table_files, embed: bool,
          elapsed: float) -> str:
    e = html.escape
    skipped = [f for f in figures if isinstance(f, Skip)]
    drawn = [f for f in figures if not isinstance(f, Skip)]
    meta_rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _meta_rows(run))
    toml = run.meta.suite.toml
    # meta.json as written (the typed Meta keeps the document it was read from)
    document = run.meta.document if run.meta.document is not None else run.meta.to_dict()
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>rfbench report: {e(run.suite)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        "<main>", "<header>", f"<h1>rfbench report: suite <code>{e(run.suite)}</code></h1>",
        f'<p class="sub">{e(_subtitle(run))}</p>', "</header>",
        '<nav><a href="#run">Run</a><a href="#guide">Reading guide</a><a href="#figures">Figures</a>'
        '<a href="#tables">Tables</a></nav>',
    ]
    from rfbench.papers import claims_section  # a papers-* suite's claim table leads the page

    claims = claims_section(run, out_dir)
    parts += [claims] if claims else []
    parts += ['<section id="run">', "<h2>Run</h2>", f'<table class="meta">\n{meta_rows}\n</table>']
    if run.notes:
        parts.append('<div class="notes">' + "<br>".join(e(n) for n in run.notes) + "</div>")
    if isinstance(toml, str) and toml.strip():
        parts.append(f"<details><summary>Suite file</summary><pre>{e(toml)}</pre></details>")
    if document:
        meta_json = json.dumps(document, indent=2, default=str, ensure_ascii=False)
        parts.append("<details><summary>All metadata (meta.json)</summary>"
                     f"<pre>{e(meta_json)}</pre></details>")
    parts += ["</section>", '<section id="guide" class="guide">', "<h2>How to read this report</h2>", "<ul>"]
    parts += [f"<li>{item}</li>" for item in GUIDE]
    parts += ["</ul>", "</section>", '<section id="figures">', "<h2>Figures</h2>"]
    parts += [_figure_html(f, out_dir, embed) for f in drawn]
    if skipped:
        parts.append("<p>Not drawn, because the run lacks their data:</p>")
        parts.append('<ul class="skipped">' + "".join(
            f"<li><strong>{e(s.title)}</strong>: {e(s.reason)}.</li>" for s in skipped) + "</ul>")
    links = " · ".join(f'<a href="{e(str(p.relative_to(out_dir)))}">{e(p.name)}</a>' for p in table_files)
    parts += ["</section>", '<section id="tables">', "<h2>Tables</h2>",
              f"<p>Also as files: {links}. Metric columns: "
              + ", ".join(e(METRICS[m].header()) for m in ("kernel_rel_mse", "out_rel_err", "time_ms",
                                                           "peak_mem_bytes"))
              + " (↓ lower is better).</p>"]
    parts += [f'<div class="tablewrap">{t}</div>' for t in table_html]
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts += ["</section>",
              f"<footer>Generated by <code>rfbench report</code> on {e(now)} in {elapsed:.1f} s from "
              f"<code>{e(str(run.path))}</code>.</footer>", "</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _subtitle(run: Run) -> str:
    device = _devices(run.meta)
    start = run.meta.start_time
    bits = []
    if device:
        bits.append(f"on {device}")
    if start:
        bits.append(f"started {start}")
    s = run.summary
    est = s[s["kind"] == "estimator"]["estimator"].nunique()
    bits.append(f"{est} estimators, {len(s)} cells")
    return " · ".join(bits)
