"""The generic checks a suite reader is built from: tables, bounded numbers, strings, lists and
per-device tables, each problem recorded as "<file>: <key path>: <what>" (``spec_reader`` walks
the sections with them)."""

from __future__ import annotations

import dataclasses
import difflib
import math

from rfbench.suite.spec_types import MAX_SEED, PER_DEVICE, Bound

_MISSING = object()
INDEX_BOUND = Bound(0, 65535)  # a model's layer or head index


def _show(value) -> str:
    if isinstance(value, dict):
        return "a table"
    text = ascii(value)  # escapes newlines, ANSI escapes and any non-ASCII character
    return text if len(text) <= 80 else text[:77] + "..."


def _key(key) -> str:
    """A TOML key as it may be shown: plain keys as they are, any other quoted and escaped."""
    key = str(key)
    plain = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if plain else _show(key)


def _close(name: str, known) -> str:
    match = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


class _Checks:
    """Records every problem found (``errors``) instead of stopping at the first."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{self.source}: {path}: {message}")

    # ------------------------------------------------------------- generic checks
    def table(self, value, path: str, allowed: tuple[str, ...]) -> dict:
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a table, got {_show(value)}")
            return {}
        for key in value:
            if key not in allowed:
                self.error(
                    f"{path}.{_key(key)}" if path else _key(key),
                    f"unknown key{_close(key, allowed)}; allowed: {', '.join(allowed)}",
                )
        return value

    def integer(self, value, path: str, *, low: int = 1, default=_MISSING, bound: Bound | None = None):
        """An int in ``bound`` (default: ``low`` and up to 2**63 - 1, so no size overflows)."""
        return self.bounded(value, path, bound or Bound(low, MAX_SEED), default=default)

    def bounded(self, value, path: str, bound: Bound, *, default=_MISSING):
        """``value`` if ``bound`` holds it (an int, or a finite number: a float then); else recorded."""
        if value is _MISSING:
            return default
        if not bound.holds(value):
            self.error(path, f"expected {bound.text()}, got {_show(value)}")
            return default if default is not _MISSING else None
        return value if bound.integer else float(value)

    def _bounded_item(self, bound: Bound):
        return lambda v, q: self.bounded(v, q, bound, default=None)

    def number(self, value, path: str, *, default=_MISSING, positive: bool = True):
        return self.bounded(value, path, Bound(0.0 if positive else -math.inf, math.inf, False, positive),
                            default=default)

    def fields(self, cls, value, section: str, choices: dict[str, tuple[str, ...]] | None = None):
        """An instance of dataclass ``cls`` from table ``value``: each field read by its declared
        Bound, as a boolean, or as one of ``choices[name]``; absent keys take the defaults."""
        t = self.table(value, section, tuple(f.name for f in dataclasses.fields(cls)))
        out = {}
        for f in dataclasses.fields(cls):
            raw, path = t.get(f.name, _MISSING), f"{section}.{f.name}"
            if "bound" in f.metadata:
                out[f.name] = self.bounded(raw, path, f.metadata["bound"], default=f.default)
            elif choices and f.name in choices:
                out[f.name] = self.string(raw, path, choices=choices[f.name], default=f.default)
            else:
                out[f.name] = self.boolean(raw, path, default=f.default)
        return cls(**out)

    def boolean(self, value, path: str, *, default=_MISSING):
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {_show(value)}")
            return default
        return value

    def string(self, value, path: str, *, choices: tuple[str, ...] | None = None, default=_MISSING):
        if value is _MISSING:
            return default
        if not isinstance(value, str) or (choices is None and not value.strip()):
            self.error(
                path, f"expected a {'non-empty ' if choices is None else ''}string, got {_show(value)}"
            )
            return default
        if choices is not None and value not in choices:
            self.error(
                path, f"{value!r} is not allowed{_close(value, choices)}; allowed: {', '.join(choices)}"
            )
            return default
        return value

    def items(self, value, path: str, check, *, default=_MISSING, nonempty: bool = True) -> tuple:
        """A list (a scalar counts as a one-element list) whose items pass ``check(item, path)``."""
        if value is _MISSING:
            return default
        values = value if isinstance(value, list) else [value]
        if nonempty and not values:
            self.error(path, "expected a non-empty list")
            return default if default is not _MISSING else ()
        out = []
        for i, item in enumerate(values):
            v = check(item, f"{path}[{i}]")
            if v is not None:
                out.append(v)
        return tuple(dict.fromkeys(out))  # repeated values would repeat cells

    def per_device(self, value, path: str, check, *, default=_MISSING) -> dict[str, tuple]:
        """A list of items passing ``check``, or a table of such lists keyed by device."""
        if value is _MISSING:
            if default is _MISSING:
                self.error(
                    path, "required (a list, or a table of lists per device: { cpu = [...], cuda = [...] })"
                )
                return {"*": ()}
            return {"*": default}
        if isinstance(value, dict):
            self.table(value, path, PER_DEVICE)
            out = {dev: self.items(value[dev], f"{path}.{dev}", check) for dev in PER_DEVICE if dev in value}
            if not out:
                self.error(path, f"the per-device table is empty; give {' and/or '.join(PER_DEVICE)} lists")
            return out
        return {"*": self.items(value, path, check)}
