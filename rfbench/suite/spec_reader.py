"""Validation of a parsed suite document into ``spec_types`` objects, reporting every problem.

Each problem is recorded as "<file>: <key path>: <what>" (with a close match for a misspelt
name); ``spec.suite_from_dict`` raises one SpecError with the first few.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from rfbench import registry
from rfbench.errors import DataError, EstimatorError, SpecError
from rfbench.suite import baselines as B
from rfbench.suite.executor_spec import read_executor
from rfbench.suite.spec_checks import _MISSING, INDEX_BOUND, _Checks, _close, _key, _show
from rfbench.suite.spec_types import (
    DEVICES,
    DTYPES,
    FIT_BOUNDS,
    GPU_TIMERS,
    MAX_DRAW,
    MAX_ELEMENTS,
    MAX_SEED_RUNS,
    SOURCES,
    SYNTHETIC_BOUNDS,
    DataSpec,
    EstimatorSpec,
    MetricSpec,
    SeedSpec,
    Suite,
    SweepSpec,
    TimingSpec,
    bound_of,
)

BASELINES = B.names()


def _probe(kind: str, dim: int, dim_v: int | None, params: dict, defaults: dict) -> dict:
    """Arguments of the validating draw: small (nothing of the suite's size is built), yet such
    that every check depending on d runs as it would at full size: ``cond`` needs d >= 2,
    ``rank`` <= d (a rank above d fails its check before anything is drawn), and ``matched``
    compares d with its capture's (whose size bounds the draw)."""
    if kind == "matched":
        return {"dim": dim, "dim_v": dim_v, **params}
    out = {"dim": min(dim, 2), "dim_v": None if dim_v is None else min(dim_v, 2), **params}
    rank = {**defaults, **params}.get("rank")
    if kind == "lowrank" and isinstance(rank, int) and not isinstance(rank, bool) and rank <= dim:
        out["rank"] = min(rank, out["dim"])
    elif kind == "lowrank" and isinstance(rank, int) and not isinstance(rank, bool):
        out["dim"] = dim
    return out


class _Reader(_Checks):
    """Walks the TOML document; every problem is recorded as "<file>: <key path>: <what>"."""

    # ------------------------------------------------------------- sections
    def suite(self, raw: dict, path: Path | None) -> Suite:
        top = self.table(
            raw, "", ("suite", "estimators", "data", "sweep", "seeds", "metrics", "timing", "fit", "executor")
        )
        head = self.table(top.get("suite", _MISSING), "suite", ("name", "description"))
        default_name = path.stem if path is not None else "suite"
        name = self.string(head.get("name", _MISSING), "suite.name", default=default_name)
        if name and (name.strip(".") == "" or not all(c.isprintable() for c in name)
                     or any(c in name for c in '/\\:*?"<>| ')):
            self.error(
                "suite.name",
                f"{_show(name)} must be usable as a folder name (not . or .., no spaces, / or \\); "
                "name it like 'my-suite'",
            )
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
        self.sizes(estimators, data, sweep, seeds)
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
            p = f"estimators.params.{_key(key)}"
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
                            f"{p}.{_key(name)}", f"unknown parameter{_close(name, allowed)}; allowed: {shown}"
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
        dim, dim_v, batch, heads, seed = (
            self.bounded(t.get(name, _MISSING), f"{p}.{name}", bound_of(DataSpec, name),
                         default=next(f.default for f in dataclasses.fields(DataSpec) if f.name == name))
            for name in ("dim", "dim_v", "batch", "heads", "seed")
        )
        label = self.string(t.get("label", _MISSING), f"{p}.label", default=None)
        if kind is None or params is None or None in (dim, batch, heads, seed):
            return None
        defaults = synthetic.parameters(kind)
        bad = [k for k in params if k not in defaults]
        for k in bad:
            self.error(
                f"{p}.params.{_key(k)}",
                f"unknown parameter of {kind!r}{_close(k, defaults)}; "
                f"allowed: {', '.join(defaults) or 'none'}",
            )
        for k, value in params.items():
            if k in SYNTHETIC_BOUNDS and value is not None and not SYNTHETIC_BOUNDS[k].holds(value):
                bad.append(k)
                self.error(f"{p}.params.{k}", f"expected {SYNTHETIC_BOUNDS[k].text()}, got {_show(value)}")
        if bad:
            return None
        try:  # the data module owns the value checks: a two-token draw runs all of them
            synthetic.make(kind, seq_len=2, seed=seed, **_probe(kind, dim, dim_v, params, defaults))
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
            return self.items(value, f"{p}.{key}", lambda v, q: self.bounded(v, q, INDEX_BOUND, default=None))

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
            **{
                axis: self.per_device(
                    t.get(axis, _MISSING),
                    f"sweep.{axis}",
                    self._bounded_item(bound_of(SweepSpec, axis)),
                )
                for axis in ("seq_len", "num_features")
            },
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
        return self.fields(SeedSpec, value, "seeds")

    def metrics(self, value) -> MetricSpec:
        return self.fields(MetricSpec, value, "metrics")

    def sizes(self, estimators, data, sweep: SweepSpec, seeds: SeedSpec) -> None:
        """Refuse sizes whose product no cell could hold (each number is in its own bounds)."""
        lengths = [L for values in sweep.seq_len.values() for L in values]
        ms = [m for values in sweep.num_features.values() for m in values]
        if not lengths or not ms:
            return
        L, m = max(lengths), max(ms)
        for spec in data:
            if spec.source != "synthetic":
                continue  # a capture's size is its file's
            width = max(spec.dim, spec.dim_v or 0, 2 * m if estimators else 0)
            elements = spec.batch * spec.heads * L * width
            if elements > MAX_ELEMENTS:
                self.error(
                    f"data[{spec.index}]",
                    f"batch x heads x seq_len x max(dim, dim_v, 2 m) = {elements:.3g} elements (with "
                    f"seq_len {L}, num_features {m}) exceeds {MAX_ELEMENTS:.3g}; lower one of them",
                )
            elif estimators and m * spec.dim > MAX_DRAW:
                self.error(
                    f"data[{spec.index}].dim",
                    f"num_features x dim = {m} x {spec.dim} exceeds {MAX_DRAW:.3g} elements per "
                    "estimator draw; lower sweep.num_features or dim",
                )
        axes = 1
        for axis in ("dtype", "causal", "seq_len", "num_features"):  # an upper bound over devices
            axes *= max(1, sum(len(values) for values in getattr(sweep, axis).values()))
        runs = len(estimators) * max(len(data), 1) * len(sweep.device) * axes * seeds.count
        if runs > MAX_SEED_RUNS:
            self.error(
                "seeds.count",
                f"{len(estimators)} estimators x the sweep x {seeds.count} seeds = {runs:.3g} estimator "
                f"runs exceeds {MAX_SEED_RUNS:.3g}; lower seeds.count or the sweep",
            )

    def fit(self, value, estimators: list[str]):
        """The [fit] section as a ``rfbench.learning.FitSpec`` (None without one)."""
        if value is _MISSING:
            return None
        tables = [("fit", value)] if isinstance(value, dict) else []
        per = value.get("estimators") if isinstance(value, dict) else None
        if isinstance(per, dict):
            tables += [(f"fit.estimators.{_key(k)}", t) for k, t in per.items() if isinstance(t, dict)]
        errors_before = len(self.errors)
        for where, table in tables:
            for key, bound in FIT_BOUNDS.items():
                v = table.get(key)
                # above the bound (or beyond an int64): FitConfig words the lower bounds itself
                too_big = isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v <= bound.high
                if too_big:
                    self.error(f"{where}.{key}", f"expected {bound.text()}, got {v!r}")
        if len(self.errors) > errors_before:
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
        return self.fields(TimingSpec, value, "timing", {"gpu_timer": GPU_TIMERS})
