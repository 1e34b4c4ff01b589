"""The out folder of a run: refuse to mix suites or overwrite results; what ``--resume`` skips.

A folder may be written by a run, resumed, and shared by shards: it holds one suite's results
(its parsed TOML is in meta.json). ``--resume`` skips cells already written with status ok,
skipped or oom, and re-runs cells that ended in ``error`` (a missing module or a bug fixed since).
"""

from __future__ import annotations

import json
from pathlib import Path

from rfbench.errors import SpecError
from rfbench.results import store
from rfbench.results.meta import META_FILE, Meta, read_meta
from rfbench.suite.plan import Cell
from rfbench.suite.spec_types import Suite

#: Statuses of a finished cell that ``--resume`` keeps (``error`` cells are run again).
KEPT_ON_RESUME = ("ok", "skipped", "oom")


def check_out(out: Path, suite: Suite, cells: list[Cell], resume: bool) -> Meta | None:
    """Refuse to overwrite results or to mix suites in ``out``; return its previous meta (or None)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise SpecError(f"--out {out} exists and is not a folder")
    # logs/: what --executor local|slurm writes before the first task records its run
    entries = [p for p in out.iterdir() if not p.name.startswith(".") and p.name != "logs"]
    if not entries:
        return None
    if not (out / META_FILE).is_file():
        raise SpecError(
            f"--out {out} is not empty and is not an rfbench results folder; choose another --out"
        )
    previous = read_meta(out)
    parsed = previous.suite.parsed
    if parsed is not None and parsed != json.loads(json.dumps(suite.raw, default=str)):
        raise SpecError(
            f"{out} holds results of a different suite definition ({previous.suite.path}); "
            "use another --out (or delete that folder)"
        )
    if not resume:
        done = store.cell_files(out)
        if any(c.cell in done for c in cells):
            raise SpecError(
                f"{out} already holds results of this suite; pass --resume to finish it, "
                "or --out to write elsewhere"
            )
    return previous


def prepare(out: Path, resume: bool) -> dict[str, str]:
    """Create ``out``, clear temporaries of killed writes; ``{cell: status}`` that resume skips."""
    out.mkdir(parents=True, exist_ok=True)
    store.remove_stale_temporaries(out)
    return store.finished_cells(out, KEPT_ON_RESUME) if resume else {}
