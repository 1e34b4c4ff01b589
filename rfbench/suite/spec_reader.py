"""Validation of a parsed suite document into ``spec_types`` objects, reporting every problem.

Each problem is recorded as "<file>: <key path>: <what>" (with a close match for a misspelt
name); ``spec.suite_from_dict`` raises one SpecError with the first few.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
from pathlib import Path

from rfbench import registry
from rfbench.errors import DataError, EstimatorError, SpecError
from rfbench.suite import baselines as B
from rfbench.suite.executor_spec import read_executor
from rfbench.suite.spec_types import (
    DEVICES,
    DTYPES,
    GPU_TIMERS,
    PER_DEVICE,
    SOURCES,
    DataSpec,
    EstimatorSpec,
    MetricSpec,
    SeedSpec,
    Suite,
    SweepSpec,
    TimingSpec,
)

BASELINES = B.names()

_MISSING = object()


def _show(value) -> str:
    return repr(value) if not isinstance(value, dict) else "a table"


def _close(name: str, known) -> str:
    match = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


class _Reader:
    """Walks the TOML document; every problem is recorded as "<file>: <key path>: <what>"."""

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
                    f"{path}.{key}" if path else key,
                    f"unknown key{_close(key, allowed)}; allowed: {', '.join(allowed)}",
                )
        return value

    def integer(self, value, path: str, *, low: int = 1, default=_MISSING):
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            self.error(path, f"expected {what}, got {_show(value)}")
            return default if default is not _MISSING else None
        return value

    def number(self, value, path: str, *, default=_MISSING, positive: bool = True):
        if value is _MISSING:
            return default
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            self.error(path, f"expected a {'positive ' if positive else ''}number, got {_show(value)}")
            return default
        return float(value)

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

    # ------------------------------------------------------------- sections
    def suite(self, raw: dict, path: Path | None) -> Suite:
        top = self.table(
            raw, "", ("suite", "estimators", "data", "sweep", "seeds", "metrics", "timing", "fit", "executor")
        )
        head = self.table(top.get("suite", _MISSING), "suite", ("name", "description"))
        default_name = path.stem if path is not None else "suite"
        name = self.string(head.get("name", _MISSING), "suite.name", default=default_name)
        if name and any(c in name for c in '/\\:*?"<>| '):
            self.error("suite.name", f"{name!r} must be usable as a folder name (no spaces, / or \\)")
        description = self.string(head.get("description", _MISSING), "suite.description", default="")
        estimators, baselines = self.estimators(top.get("estimators", _MISSING))
        data = self.data(top.get("data", _MISSING), path)
        sweep = self.sweep(top.get("sweep", _MISSING))
        seeds = self.seeds(top.get("seeds", _MISSING))
        metrics = self.metrics(top.get("metrics", _MISSING))
        timing = self.timing(top.get("timing", _MISSING))
        fit = self.fit(top.get("fit", _MISSING), [e.name for e in estimators])
        executor, problems = read_executor(top.get("executor"))
        self.errors += [f"{self.source}: {p}" for p in problems]
        if not (metrics.kernel or metrics.attention_matrix or metrics.output or timing.enabled):
            self.error("metrics", "nothing to measure: every metric and timing are switched off")
        return Suite(
            name=name or default_name,
            description=description or "",
            estimators=estimators,
            baselines=baselines,
            data=data,
            sweep=sweep,
            seeds=seeds,
            metrics=metrics,
            timing=timing,
            fit=fit,
            executor=executor,
            source=self.source,
            path=path,
        )

    def estimators(self, value) -> tuple[tuple[EstimatorSpec, ...], tuple[str, ...]]:
        allowed = ("names", "feature_maps", "weight_matrices", "exclude", "baselines", "params")
        t = self.table(value, "estimators", allowed)
        errors_before = len(self.errors)
        names: list[str] = []

        def estimator_name(item, p):
            if not isinstance(item, str):
                self.error(p, f"expected an estimator name such as 'posrf-orf', got {_show(item)}")
                return None
            try:
                fm, wm = registry.parse(item)
            except EstimatorError as exc:
                self.error(p, str(exc))
                return None
            return f"{fm}-{wm}"

        def component(known: list[str], what: str):
            def check(item, p):
                if item == "*":
                    return "*"
                if not isinstance(item, str) or item not in known:
                    self.error(
                        p, f"unknown {what} {_show(item)}{_close(item, known)}; known: {', '.join(known)}"
                    )
                    return None
                return item

            return check

        names += self.items(t.get("names", _MISSING), "estimators.names", estimator_name, default=())
        fms = self.items(
            t.get("feature_maps", _MISSING),
            "estimators.feature_maps",
            component(registry.feature_maps(), "feature map"),
            default=None,
        )
        wms = self.items(
            t.get("weight_matrices", _MISSING),
            "estimators.weight_matrices",
            component(registry.weight_matrices(), "weight matrix"),
            default=None,
        )
        if (fms is None) != (wms is None):
            missing = "weight_matrices" if wms is None else "feature_maps"
            self.error(
                f"estimators.{missing}", "required with a grid: give both feature_maps and weight_matrices"
            )
        elif fms is not None:
            fms = registry.feature_maps() if "*" in fms else fms
            wms = registry.weight_matrices() if "*" in wms else wms
            names += [f"{fm}-{wm}" for fm in fms for wm in wms]

        def pattern(item, p):
            if isinstance(item, str) and any(c in item for c in "*?["):
                return item
            return estimator_name(item, p)

        exclude = self.items(
            t.get("exclude", _MISSING), "estimators.exclude", pattern, default=(), nonempty=False
        )
        names = [n for n in dict.fromkeys(names) if not any(fnmatch.fnmatchcase(n, x) for x in exclude)]
        baselines = self.items(
            t.get("baselines", _MISSING),
            "estimators.baselines",
            lambda item, p: self.string(item, p, choices=BASELINES, default=None),
            default=("exact", "sdpa"),
            nonempty=False,
        )
        if not names and not baselines and len(self.errors) == errors_before:
            self.error("estimators", "no estimators and no baselines to run; give estimators.names or a grid")
        params = self.params(t.get("params", _MISSING), names)
        specs = []
        for n in names:
            fm, wm = n.split("-")
            specs.append(EstimatorSpec(n, fm, wm, params.get(fm, {}), params.get(wm, {}), params.get(n, {})))
        return tuple(specs), tuple(baselines)

    def params(self, value, names: list[str]) -> dict[str, dict]:
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self.error("estimators.params", f"expected a table of tables, got {_show(value)}")
            return {}
        known = [*registry.feature_maps(), *registry.weight_matrices(), *names]
        out = {}
        for key, table in value.items():
            p = f"estimators.params.{key}"
            if key not in known:
                self.error(p, f"not a feature map, weight matrix or listed estimator{_close(key, known)}")
                continue
            if not isinstance(table, dict):
                self.error(p, f"expected a table of parameters, e.g. {{ A = -0.1 }}, got {_show(table)}")
                continue
            allowed = self._component_defaults(key)
            if allowed is not None:
                for name in table:
                    if name not in allowed:
                        shown = ", ".join(sorted(allowed)) or "none"
                        self.error(
                            f"{p}.{name}", f"unknown parameter{_close(name, allowed)}; allowed: {shown}"
                        )
            out[key] = dict(table)
        return out

    @staticmethod
    def _component_defaults(key: str) -> set[str] | None:
        """Parameter names a component (or an estimator's two) accepts; None if not importable yet."""
        try:
            if key in registry.FEATURE_MAPS:
                return set(registry.feature_map_class(key).defaults)
            if key in registry.WEIGHT_MATRICES:
                return set(registry.weight_matrix_class(key).defaults)
            fm, wm = key.split("-")
            return set(registry.feature_map_class(fm).defaults) | set(
                registry.weight_matrix_class(wm).defaults
            )
        except ImportError:  # that module is not written yet: the cell will say so
            return None

    def data(self, value, path: Path | None) -> tuple[DataSpec, ...]:
        if value is _MISSING:
            self.error(
                "data",
                'required: at least one [[data]] table (e.g. source = "synthetic", kind = "isotropic")',
            )
            return ()
        tables = value if isinstance(value, list) else [value]
        if not tables:
            self.error("data", "expected at least one [[data]] table")
        out = []
        for i, t in enumerate(tables):
            p = f"data[{i}]"
            if not isinstance(t, dict):
                self.error(p, f"expected a table, got {_show(t)}")
                continue
            source = self.string(t.get("source", "synthetic"), f"{p}.source", choices=SOURCES, default=None)
            if source == "synthetic":
                spec = self.synthetic(t, p, i)
            elif source in ("bundled", "file", "capture"):
                spec = self.capture(t, p, i, source, path)
            else:
                continue
            if spec is not None:
                out.append(spec)
        labels: dict[str, int] = {}
        for spec in out:
            if spec.label is not None and spec.label in labels:
                self.error(
                    f"data[{spec.index}].label",
                    f"{spec.label!r} is already used by data[{labels[spec.label]}]; "
                    "give each source its own label",
                )
            elif spec.label is not None:
                labels[spec.label] = spec.index
        return tuple(out)

    def synthetic(self, t: dict, p: str, index: int) -> DataSpec | None:
        allowed = ("source", "kind", "params", "dim", "dim_v", "batch", "heads", "seed", "label")
        self.table(t, p, allowed)
        try:
            from rfbench.data import synthetic
        except ImportError as exc:  # rfbench.data.synthetic not installed: nothing to validate against
            self.error(p, f"synthetic data are not available ({exc})")
            return None
        kind = t.get("kind", _MISSING)
        if kind is _MISSING:
            self.error(f"{p}.kind", f"required for synthetic data; one of {', '.join(synthetic.KINDS)}")
            return None
        kind = self.string(kind, f"{p}.kind", choices=tuple(synthetic.KINDS), default=None)
        params = t.get("params", {})
        if not isinstance(params, dict):
            self.error(f"{p}.params", f"expected a table of parameters, got {_show(params)}")
            params = None
        dim = self.integer(t.get("dim", _MISSING), f"{p}.dim", default=64)
        dim_v = self.integer(t.get("dim_v", _MISSING), f"{p}.dim_v", default=None)
        batch = self.integer(t.get("batch", _MISSING), f"{p}.batch", default=1)
        heads = self.integer(t.get("heads", _MISSING), f"{p}.heads", default=1)
        seed = self.integer(t.get("seed", _MISSING), f"{p}.seed", low=0, default=0)
        label = self.string(t.get("label", _MISSING), f"{p}.label", default=None)
        if kind is None or params is None or None in (dim, batch, heads, seed):
            return None
        defaults = synthetic.parameters(kind)
        bad = [k for k in params if k not in defaults]
        for k in bad:
            self.error(
                f"{p}.params.{k}",
                f"unknown parameter of {kind!r}{_close(k, defaults)}; "
                f"allowed: {', '.join(defaults) or 'none'}",
            )
        if bad:
            return None
        try:  # the data module owns the value checks: a two-token draw runs all of them
            synthetic.make(kind, seq_len=2, dim=dim, dim_v=dim_v, seed=seed, **params)
        except DataError as exc:
            self.error(f"{p}.params" if params else p, str(exc))
            return None
        return DataSpec(
            "synthetic",
            label,
            kind=kind,
            params={**defaults, **params},
            dim=dim,
            dim_v=dim_v,
            batch=batch,
            heads=heads,
            seed=seed,
            index=index,
        )

    def capture(self, t: dict, p: str, index: int, source: str, path: Path | None) -> DataSpec | None:
        from rfbench.data import cache  # light: no model or transformers import until a capture is made

        allowed = ("source", "layers", "heads", "per_layer", "label") + (
            ("path",) if source == "file" else cache.SUITE_KEYS if source == "capture" else ()
        )
        self.table(t, p, allowed)
        file = None
        params: dict = {}
        if source == "capture":
            try:  # model and text paths are made absolute against the suite's folder
                params = cache.resolve_source(
                    {k: t[k] for k in cache.SUITE_KEYS if k in t}, None if path is None else path.parent
                )
            except DataError as exc:
                self.error(p, str(exc))
                return None
        if source == "file":
            raw = self.string(t.get("path", _MISSING), f"{p}.path", default=None)
            if raw is None:
                if "path" not in t:
                    self.error(f"{p}.path", 'required with source = "file" (.safetensors, .npz or .pt)')
                return None
            file = Path(raw).expanduser()
            if not file.is_absolute() and path is not None:
                file = path.parent / file
            if not file.is_file():
                self.error(f"{p}.path", f"no such file: {file}")
                return None

        def index_list(key):
            value = t.get(key, _MISSING)
            if value is _MISSING or value == "all":
                return None
            return self.items(value, f"{p}.{key}", lambda v, q: self.integer(v, q, low=0, default=None))

        layers, heads = index_list("layers"), index_list("heads")
        per_layer = self.boolean(t.get("per_layer", _MISSING), f"{p}.per_layer", default=False)
        label = self.string(t.get("label", _MISSING), f"{p}.label", default=None)
        return DataSpec(
            source,
            label,
            params=params,
            path=None if file is None else str(file),
            layers=layers,
            head_indices=heads,
            per_layer=bool(per_layer),
            index=index,
            dim=0,
        )

    def sweep(self, value) -> SweepSpec:
        t = self.table(value, "sweep", ("seq_len", "num_features", "causal", "dtype", "device"))
        if value is _MISSING:
            self.error("sweep", "required: give at least sweep.seq_len and sweep.num_features")
        return SweepSpec(
            seq_len=self.per_device(t.get("seq_len", _MISSING), "sweep.seq_len", self.integer),
            num_features=self.per_device(t.get("num_features", _MISSING), "sweep.num_features", self.integer),
            causal=self.per_device(
                t.get("causal", _MISSING),
                "sweep.causal",
                lambda v, q: self.boolean(v, q, default=None),
                default=(False,),
            ),
            dtype=self.per_device(
                t.get("dtype", _MISSING),
                "sweep.dtype",
                lambda v, q: self.string(v, q, choices=DTYPES, default=None),
                default=("float32",),
            ),
            device=self.items(
                t.get("device", _MISSING),
                "sweep.device",
                lambda v, q: self.string(v, q, choices=DEVICES, default=None),
                default=("auto",),
            ),
        )

    def seeds(self, value) -> SeedSpec:
        t = self.table(value, "seeds", ("count", "base"))
        return SeedSpec(
            count=self.integer(t.get("count", _MISSING), "seeds.count", default=5),
            base=self.integer(t.get("base", _MISSING), "seeds.base", low=0, default=0),
        )

    def metrics(self, value) -> MetricSpec:
        t = self.table(value, "metrics", tuple(f.name for f in dataclasses.fields(MetricSpec)))
        d = MetricSpec()
        return MetricSpec(
            kernel=self.boolean(t.get("kernel", _MISSING), "metrics.kernel", default=d.kernel),
            attention_matrix=self.boolean(
                t.get("attention_matrix", _MISSING), "metrics.attention_matrix", default=d.attention_matrix
            ),
            output=self.boolean(t.get("output", _MISSING), "metrics.output", default=d.output),
            kernel_max_tokens=self.integer(
                t.get("kernel_max_tokens", _MISSING),
                "metrics.kernel_max_tokens",
                low=0,
                default=d.kernel_max_tokens,
            ),
            tile=self.integer(t.get("tile", _MISSING), "metrics.tile", default=d.tile),
        )

    def fit(self, value, estimators: list[str]):
        """The [fit] section as a ``rfbench.learning.FitSpec`` (None without one)."""
        if value is _MISSING:
            return None
        # Only a suite with [fit] needs the learning configuration (``rfbench.learning`` loads
        # its parts lazily: this imports the config, not the trainer).
        from rfbench.learning import parse_fit_section

        try:
            return parse_fit_section(value, where="fit", estimators=estimators)
        except SpecError as exc:  # parse_fit_section names the key path itself
            self.errors.append(f"{self.source}: {exc}")
            return None

    def timing(self, value) -> TimingSpec:
        t = self.table(value, "timing", tuple(f.name for f in dataclasses.fields(TimingSpec)))
        d = TimingSpec()
        return TimingSpec(
            enabled=self.boolean(t.get("enabled", _MISSING), "timing.enabled", default=d.enabled),
            warmup=self.integer(t.get("warmup", _MISSING), "timing.warmup", low=0, default=d.warmup),
            repeats=self.integer(t.get("repeats", _MISSING), "timing.repeats", default=d.repeats),
            max_seconds=self.number(
                t.get("max_seconds", _MISSING), "timing.max_seconds", default=d.max_seconds
            ),
            memory=self.boolean(t.get("memory", _MISSING), "timing.memory", default=d.memory),
            all_seeds=self.boolean(t.get("all_seeds", _MISSING), "timing.all_seeds", default=d.all_seeds),
            gpu_timer=self.string(
                t.get("gpu_timer", _MISSING), "timing.gpu_timer", choices=GPU_TIMERS, default=d.gpu_timer
            ),
            gpu_warmup_ms=self.number(
                t.get("gpu_warmup_ms", _MISSING), "timing.gpu_warmup_ms", default=d.gpu_warmup_ms
            ),
            gpu_rep_ms=self.number(t.get("gpu_rep_ms", _MISSING), "timing.gpu_rep_ms", default=d.gpu_rep_ms),
            threads=self.integer(t.get("threads", _MISSING), "timing.threads", low=0, default=d.threads),
        )
