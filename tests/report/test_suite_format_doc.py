"""docs/suite-format.md is generated from the suite reader's declared keys and cannot drift."""

from __future__ import annotations

from pathlib import Path

from rfbench.suite import format_doc
from rfbench.suite.spec import parse_suite
from rfbench.suite.spec_reader import _Reader

DOC = Path(__file__).resolve().parents[2] / "docs" / "suite-format.md"


def test_committed_page_equals_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == format_doc.generate(), (
        "docs/suite-format.md is stale: python -m rfbench.suite.format_doc > docs/suite-format.md")


def test_every_declared_key_is_on_the_page():
    page = format_doc.generate()
    keys = format_doc.declared_keys()
    for section in keys[""]:
        assert f"`[{section}]`" in page or f"`[[{section}]]`" in page
    for path, names in keys.items():
        for name in names if path else ():
            assert f"| `{name}` |" in page, (path, name)
    assert "not described yet" not in page  # every key has its meaning written
    for section in keys[""]:  # no section is shown as an empty table (the [executor] table was)
        assert keys.get(section) or section in ("data",), f"[{section}] declares no keys"


def test_a_key_added_to_the_reader_appears_without_editing_the_generator(monkeypatch):
    original = _Reader.seeds

    def seeds(self, value):  # as if the reader's [seeds] had gained a key
        self.table(value, "seeds", ("count", "base", "shiny_new_key"))
        return original(self, value)

    monkeypatch.setattr(_Reader, "seeds", seeds)
    page = format_doc.generate()
    assert "| `shiny_new_key` |" in page and "not described yet" in page


def test_the_worked_example_is_a_valid_suite_and_the_alias_is_named():
    suite = parse_suite(format_doc.SCALING_EXAMPLE)
    assert "uniform" in suite.baselines and suite.seeds.count == 10
    assert "all-minilm-l6-v2" in format_doc.generate()
