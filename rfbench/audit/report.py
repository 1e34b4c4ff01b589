"""``rfbench audit TARGET``: run the checks on each adapter and print one table per implementation.

Terminal table always; ``--markdown FILE`` and ``--html FILE`` write the same tables. Exit status 1
when any check fails, 0 otherwise (a skipped implementation is not a failure: it lists the install
command). Errors in the arguments exit 2 (the CLI's RFBenchError handling).
"""

from __future__ import annotations

import argparse
import html
import pathlib
from dataclasses import dataclass, field

from rfbench.audit.adapters import Adapter, adapters_for, label
from rfbench.audit.checks import Check, Settings, run_checks


@dataclass
class Audit:
    """One implementation's result: its checks, or the reasons it was skipped."""

    target: str
    describes: str
    version: str = ""
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(c.verdict == "fail" for c in self.checks)


def audit(adapter: Adapter, settings: Settings | None = None) -> Audit:
    missing = adapter.missing()
    if missing:
        return Audit(label(adapter), adapter.describes, skipped=missing)
    return Audit(label(adapter), adapter.describes, adapter.version(), run_checks(adapter, settings))


def _title(a: Audit) -> str:
    version = f" {a.version}" if a.version else ""
    return f"{a.target}{version}: {a.describes}"


def terminal(a: Audit) -> str:
    lines = [_title(a)]
    if a.skipped:
        return "\n".join([*lines, *(f"  skipped: {r}" for r in a.skipped)])
    width = max(len(c.check) for c in a.checks)
    for c in a.checks:
        lines.append(f"  {c.check:<{width}}  {c.verdict.upper():<4}  {c.figure}")
    lines.append(f"  => {'FAIL' if a.failed else 'pass'}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal | inside a markdown table cell


def markdown(audits: list[Audit]) -> str:
    out = ["# rfbench audit", ""]
    for a in audits:
        out += [f"## {_title(a)}", ""]
        if a.skipped:
            out += [f"Skipped: {r}" for r in a.skipped] + [""]
            continue
        out += ["| check | figure | verdict |", "|---|---|---|"]
        out += [f"| {c.check} | {_cell(c.figure)} | {c.verdict} |" for c in a.checks]
        out.append("")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#176b2c}.fail{color:#b00020;font-weight:bold}.na{color:#777}"""


def to_html(audits: list[Audit]) -> str:
    body = ["<h1>rfbench audit</h1>"]
    for a in audits:
        body.append(f"<h2>{html.escape(_title(a))}</h2>")
        if a.skipped:
            body += [f"<p class='na'>Skipped: {html.escape(r)}</p>" for r in a.skipped]
            continue
        rows = "".join(
            f"<tr><td>{html.escape(c.check)}</td><td>{html.escape(c.figure)}</td>"
            f"<td class='{'na' if c.verdict == 'n/a' else c.verdict}'>{c.verdict}</td></tr>"
            for c in a.checks
        )
        body.append(f"<table><tr><th>check</th><th>figure</th><th>verdict</th></tr>{rows}</table>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>rfbench audit</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="performer, darkformer, fla, rfbench, rfbench:<estimator> or all")
    parser.add_argument("--seeds", type=int, default=Settings.seeds, help="seeds of the kernel tests")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--num-features", type=int, default=128)
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the tables as markdown here")
    parser.add_argument("--html", type=pathlib.Path, help="also write the tables as an HTML page here")


def main(args: argparse.Namespace) -> int:
    from rfbench._checks import check_positive_int

    check_positive_int(args.seeds, "--seeds")
    check_positive_int(args.dim, "--dim")
    check_positive_int(args.num_features, "--num-features")
    settings = Settings(seeds=args.seeds)
    audits = []
    for adapter in adapters_for(args.target, dim=args.dim, num_features=args.num_features):
        audits.append(audit(adapter, settings))
        print(terminal(audits[-1]), flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(audits))
    if args.html:
        args.html.write_text(to_html(audits))
    return 1 if any(a.failed for a in audits) else 0
