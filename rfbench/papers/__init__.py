"""Reproductions of published claims: one module per paper, each declaring its claims as data.

A suite named ``papers-<paper>`` (``suites/papers/<paper>.toml``) has its claims in
``rfbench.papers.<paper>``: ``CLAIMS`` (``claims.Comparison`` rows) and optionally
``evaluate(results) -> list[Outcome]`` and ``notes(results) -> list[str]``. ``rfbench report``
puts their claim-versus-measured table first (``claims_section``). The closed-form figures
(Performer Lemma 2, FAVOR++ variances) are commands of their own:
``python -m rfbench.papers.lemma2 --out DIR`` and ``python -m rfbench.papers.favorpp --out DIR``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from rfbench.papers import claims as claims

#: suite name -> module of rfbench.papers holding its claims
SUITES = {
    "papers-performer": "performer",
    "papers-performer-100": "performer",
    "papers-simrf": "simrf",
    "papers-spectraformer": "spectraformer",
    "papers-darkformer": "darkformer",
    "papers-darkformer-llm": "darkformer",
}


def module_for(suite: str):
    """The claims module of a suite name, or None for a suite that reproduces no paper."""
    name = SUITES.get(str(suite))
    return importlib.import_module(f"rfbench.papers.{name}") if name else None


def outcomes_for(suite: str, results) -> tuple[list, list[str], str] | None:
    """(outcomes, notes, title) of a suite's claims on its results frame, or None."""
    mod = module_for(suite)
    if mod is None:
        return None
    fn = getattr(mod, "evaluate", None)
    outcomes = fn(results) if fn else claims.evaluate(mod.CLAIMS, results)
    notes = list(mod.notes(results)) if hasattr(mod, "notes") else []
    return outcomes, notes, getattr(mod, "TITLE", "Claims versus measured")


def write_claims(out_dir: str | Path, outcomes, notes=(), title: str = "Claims versus measured",
                 interval: str = "log scale, delta method, Welch t") -> str:
    """Write ``tables/claims.md`` and ``tables/claims.html`` under ``out_dir``; return the HTML fragment."""
    from rfbench.results.atomic import write_text

    tables = Path(out_dir) / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    md = claims.markdown(outcomes, title)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    fragment = claims.html(outcomes, title, notes, interval)
    write_text(tables / "claims.md", md)
    write_text(tables / "claims.html", fragment + "\n")
    return fragment


def claims_section(run, out_dir: str | Path) -> str | None:
    """The HTML claim section of a loaded run (rfbench.report.Run) of a papers-* suite, or None;
    writes its tables too. Called by rfbench.report.html before the rest of the page."""
    found = outcomes_for(run.suite, run.results)
    if found is None:
        return None
    outcomes, notes, title = found
    return write_claims(out_dir, outcomes, notes, title)
