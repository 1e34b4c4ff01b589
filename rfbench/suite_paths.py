"""Where the ready-made suites live, and resolving a suite name to a file."""

from __future__ import annotations

from pathlib import Path

from rfbench.errors import SpecError

#: The repository's suites/ folder (the package is installed from the repository).
SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


def list_suites() -> list[Path]:
    """The ready suites: ./suites/*.toml if present, else the repository's suites/."""
    for folder in (Path.cwd() / "suites", SUITES_DIR):
        if folder.is_dir():
            return sorted(folder.glob("*.toml"))
    return []


def resolve_suite(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a ready suite ('quick' -> suites/quick.toml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in list_suites():
        if candidate.stem == str(name_or_path) or candidate.name == str(name_or_path):
            return candidate
    known = ", ".join(p.stem for p in list_suites()) or "none found"
    raise SpecError(f"suite {str(name_or_path)!r} not found: give a TOML path or a ready suite ({known})")
