"""The typed objects a suite file is validated into (``spec.py`` reads them; the runner uses them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rfbench.errors import SpecError
from rfbench.suite.executor_spec import ExecutorSpec

DTYPES = ("float32", "float64", "float16", "bfloat16")
DEVICES = ("cpu", "cuda", "auto")
SOURCES = ("synthetic", "bundled", "file", "capture")
GPU_TIMERS = ("do_bench", "cuda_events")
PER_DEVICE = ("cpu", "cuda")


# --------------------------------------------------------------------------- typed objects
@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator and the constructor parameters the suite gives it."""

    name: str
    feature_map: str
    weight_matrix: str
    feature_params: dict = field(default_factory=dict)
    weight_params: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # keyed by the estimator name: routed by make_estimator

    def key(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        for what in ("feature_params", "weight_params", "params"):
            if getattr(self, what):
                out[what] = getattr(self, what)
        return out


@dataclass(frozen=True)
class DataSpec:
    """One data source as written (a per_layer capture is expanded by the runner)."""

    source: str
    label: str | None
    kind: str | None = None
    params: dict = field(default_factory=dict)
    dim: int = 64
    dim_v: int | None = None
    batch: int = 1
    heads: int = 1
    seed: int = 0
    path: str | None = None  # file: resolved path; bundled: None
    layers: tuple[int, ...] | None = None
    head_indices: tuple[int, ...] | None = None
    per_layer: bool = False
    index: int = 0  # position in the file, for messages ("data[2]")


@dataclass(frozen=True)
class SweepSpec:
    """Sweep axes. Each axis but ``device`` maps a device ("*": any device) to its values."""

    seq_len: dict[str, tuple[int, ...]]
    num_features: dict[str, tuple[int, ...]]
    causal: dict[str, tuple[bool, ...]] = field(default_factory=lambda: {"*": (False,)})
    dtype: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"*": ("float32",)})
    device: tuple[str, ...] = ("auto",)

    def values(self, axis: str, device: str) -> tuple[int, ...]:
        table = getattr(self, axis)
        if "*" in table:
            return table["*"]
        if device not in table:
            raise SpecError(
                f"sweep.{axis} gives values for {', '.join(sorted(table))} but not for device {device!r}; "
                f"add {device} = [...] to it"
            )
        return table[device]


@dataclass(frozen=True)
class SeedSpec:
    count: int = 5
    base: int = 0


@dataclass(frozen=True)
class MetricSpec:
    kernel: bool = True
    attention_matrix: bool = True
    output: bool = True
    kernel_max_tokens: int = 1024  # 0: all tokens
    tile: int = 256


@dataclass(frozen=True)
class TimingSpec:
    enabled: bool = True
    warmup: int = 2
    repeats: int = 10
    max_seconds: float = 2.0
    memory: bool = True
    all_seeds: bool = False
    gpu_timer: str = "do_bench"
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0
    threads: int = 0


@dataclass(frozen=True)
class Suite:
    """A validated suite. ``text`` is the TOML as given; ``raw`` the parsed TOML document."""

    name: str
    description: str
    estimators: tuple[EstimatorSpec, ...]
    baselines: tuple[str, ...]
    data: tuple[DataSpec, ...]
    sweep: SweepSpec
    seeds: SeedSpec
    metrics: MetricSpec
    timing: TimingSpec
    # the [fit] section (rfbench.learning.FitSpec, not imported here: it would load the learning
    # package for every suite): None measures on every token, fitting nothing
    fit: FitSpec | None = None  # noqa: F821
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)  # where the cells run (executor_spec.py)
    source: str = "<suite>"
    path: Path | None = None
    text: str = ""
    raw: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The validated suite as plain JSON-able data (for meta.json)."""
        d = dataclasses.asdict(self)
        d["path"] = None if self.path is None else str(self.path)
        d.pop("text")
        d.pop("raw")
        return _plain(d)


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
