"""Acceptance of the regression gate on real runs (issue 12, point 3): slow, minutes.

- ``RFBENCH_ACCEPT_PAIRS`` (default 10) back-to-back pairs of ``suites/quick.toml`` runs of this
  commit: ``rfbench compare A B`` must find no regression in any pair;
- a 1.5x slowdown injected into posrf-iid's forward (``RFBENCH_TEST_INJECT``, the documented
  test hook of rfbench.suite.measure) must make ``compare`` exit 1 naming posrf-iid;
- 2x peak memory injected the same way must make it exit 1 too.

The figures (regressions per pair, the verdict counts, the detections) are printed and, with
``RFBENCH_ACCEPT_OUT=FILE``, written there as JSON. Run:

    RFBENCH_ACCEPT_PAIRS=10 python -m pytest -m slow -s tests/bench/test_compare_acceptance.py
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from rfbench.cli import main_entry
from rfbench.report.compare import compare_runs
from rfbench.suite.measure import INJECT_ENV
from rfbench.suite.runner import run_suite

pytestmark = pytest.mark.slow
QUICK = Path(__file__).resolve().parents[2] / "suites" / "quick.toml"
PAIRS = int(os.environ.get("RFBENCH_ACCEPT_PAIRS", "10"))
FIGURES: dict = {"pairs": []}


def _run(out: Path) -> Path:
    return run_suite(str(QUICK), out=out, progress=False)


def _compare(capsys, base, new) -> tuple[int, str]:
    capsys.readouterr()
    code = main_entry(["compare", str(base), str(new)])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("accept") / "base")


def _record(key, value):
    FIGURES[key] = value
    target = os.environ.get("RFBENCH_ACCEPT_OUT")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=2))
    print(f"\n[acceptance] {key}: {value}")


def test_back_to_back_runs_of_one_commit_give_no_regression(tmp_path, capsys):
    per_pair = []
    for i in range(PAIRS):
        a, b = _run(tmp_path / f"a{i}"), _run(tmp_path / f"b{i}")
        code, out = _compare(capsys, a, b)
        table, _ = compare_runs(a, b)
        verdicts = table.groupby("metric")["verdict"].value_counts().to_dict()
        bad = table[table["regression"]]
        entry = {"pair": i, "exit": code, "regressions": int(table["regression"].sum()),
                 "verdicts": {f"{m}:{v}": int(n) for (m, v), n in verdicts.items()},
                 "flagged": [f"{r.label} {r.metric} x{r.ratio:.3f} z={r.z:.1f}" for r in bad.itertuples()]}
        FIGURES["pairs"].append(entry)
        _record("pairs", FIGURES["pairs"])
        per_pair.append(entry["regressions"])
        for d in (a, b):  # keep the disk small: a pair is judged, its folders are not needed
            _rmtree(d)
    assert per_pair == [0] * PAIRS, f"false regressions per pair: {per_pair}"


def test_an_injected_slowdown_is_named(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "posrf-iid:slow=1.5")
    slow = _run(tmp_path / "slow")
    code, out = _compare(capsys, base, slow)
    summary = out.strip().splitlines()[-1]
    table, _ = compare_runs(base, slow)
    bad = table[table["regression"]]
    _record("slow=1.5", {"exit": code, "summary": summary,
                         "regressions": bad["label"].tolist(), "ratios": bad["ratio_ref"].round(3).tolist()})
    assert code == 1 and _names(summary, "posrf-iid"), summary


def test_injected_memory_is_named(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "posrf-iid:mem=2")
    heavy = _run(tmp_path / "mem")
    code, out = _compare(capsys, base, heavy)
    summary = out.strip().splitlines()[-1]
    table, _ = compare_runs(base, heavy)
    bad = table[table["regression"]]
    _record("mem=2", {"exit": code, "summary": summary, "n_regressions": len(bad),
                      "metrics": sorted(set(bad["metric"]))})
    assert code == 1 and _names(summary, "posrf-iid") and "peak_mem_bytes" in set(bad["metric"]), summary


def _names(summary: str, name: str) -> bool:
    """The summary line's list of regressed estimators, '(a, b)', holds ``name``."""
    m = re.search(r"\(([^()]*)\); worst:", summary)
    return bool(m) and name in m.group(1).split(", ")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
