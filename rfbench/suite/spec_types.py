"""The typed objects a suite file is validated into (``spec.py`` reads them; the runner uses them)."""

from __future__ import annotations

import dataclasses
import math
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


# --------------------------------------------------------------------------- bounds
@dataclass(frozen=True)
class Bound:
    """The closed range ``[low, high]`` a suite number must lie in (``integer``: an int, not a float).

    Declared with each field (``field(metadata={"bound": ...})``) so that the reader checks every
    number before anything is allocated and the suite-format page can show the ranges. The upper
    bounds are far above any real benchmark yet small enough that no size overflows an int64 or
    asks for more memory than a machine has before a cell even starts.
    """

    low: float
    high: float
    integer: bool = True
    open_low: bool = False  # (low, high]: low itself is not allowed

    def text(self) -> str:
        def show(x):
            if self.integer and x >= 2**20 and (x & (x - 1)) == 0:
                return f"2**{int(x).bit_length() - 1}"
            if self.integer and x >= 2**20 and ((x + 1) & x) == 0:
                return f"2**{int(x).bit_length()} - 1"
            return f"{x:g}" if not self.integer else str(int(x))

        kind = "an integer" if self.integer else "a number"
        return f"{kind} in {'(' if self.open_low else '['}{show(self.low)}, {show(self.high)}]"

    def holds(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high


MAX_DIM = 8192  # head dim d (and dv): a d x d float64 rotation is 512 MiB
MAX_SEQ_LEN = 2**22  # tokens per cell
MAX_FEATURES = 2**20  # m, random vectors per estimator
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; derived seeds are < 2**63
MAX_SEEDS = 10_000  # seeds.count
MAX_ELEMENTS = 2**34  # elements of one [B, H, L, d|dv] tensor, or of an m x d draw
MAX_SEED_RUNS = 10_000_000  # estimator cells x seeds.count (the plan holds one seed per run)
MAX_DRAW = 2**28  # elements of an estimator's m x d draw (1 GiB in float32)


def bounded(default, low, high, *, integer: bool = True, open_low: bool = False, **kw):
    """A dataclass field whose values must lie in ``Bound(low, high, integer)``."""
    metadata = {"bound": Bound(low, high, integer, open_low)}
    if callable(default) and not isinstance(default, (int, float)):
        return field(default_factory=default, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def bound_of(cls, name: str) -> Bound:
    """The declared Bound of field ``name`` of dataclass ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["bound"]


#: Bounds of the numeric parameters of synthetic kinds (``rfbench.data.synthetic`` checks the
#: lower bounds and the rest; these keep a structure such as ``clusters`` x d centres allocatable).
SYNTHETIC_BOUNDS: dict[str, Bound] = {
    "clusters": Bound(1, 65536),
    "rank": Bound(1, MAX_DIM),
    "cond": Bound(1.0, 1e15, integer=False),
    "q_norm": Bound(0.0, 1e6, integer=False, open_low=True),
    "k_norm": Bound(0.0, 1e6, integer=False, open_low=True),
    "df": Bound(2.0, 1e9, integer=False, open_low=True),
}

#: Bounds of the integer keys of ``[fit]``: the reader checks the upper ones,
#: ``rfbench.learning.FitConfig`` the lower ones, the types and the rest.
FIT_BOUNDS: dict[str, Bound] = {
    "steps": Bound(1, 10_000_000),
    "batch_tokens": Bound(2, MAX_SEQ_LEN),
    "n_blocks": Bound(2, 65536),
    "eval_every": Bound(1, 10_000_000),
    "patience": Bound(0, 1_000_000),
    "val_draws": Bound(1, 10_000),
    "seed": Bound(-(2**63), MAX_SEED),
}


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
    dim: int = bounded(64, 1, MAX_DIM)
    dim_v: int | None = bounded(None, 1, MAX_DIM)
    batch: int = bounded(1, 1, 65536)
    heads: int = bounded(1, 1, 65536)
    seed: int = bounded(0, 0, MAX_SEED)
    path: str | None = None  # file: resolved path; bundled: None
    layers: tuple[int, ...] | None = None
    head_indices: tuple[int, ...] | None = None
    per_layer: bool = False
    index: int = 0  # position in the file, for messages ("data[2]")


@dataclass(frozen=True)
class SweepSpec:
    """Sweep axes. Each axis but ``device`` maps a device ("*": any device) to its values."""

    seq_len: dict[str, tuple[int, ...]] = field(metadata={"bound": Bound(1, MAX_SEQ_LEN)})
    num_features: dict[str, tuple[int, ...]] = field(metadata={"bound": Bound(1, MAX_FEATURES)})
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
    count: int = bounded(5, 1, MAX_SEEDS)
    base: int = bounded(0, 0, MAX_SEED)


@dataclass(frozen=True)
class MetricSpec:
    kernel: bool = True
    attention_matrix: bool = True
    output: bool = True
    kernel_max_tokens: int = bounded(1024, 0, MAX_SEQ_LEN)  # 0: all tokens
    tile: int = bounded(256, 1, 65536)


@dataclass(frozen=True)
class TimingSpec:
    enabled: bool = True
    warmup: int = bounded(2, 0, 10_000)
    repeats: int = bounded(10, 1, 1_000_000)
    max_seconds: float = bounded(2.0, 0.0, 86400.0, integer=False, open_low=True)
    memory: bool = True
    all_seeds: bool = False
    gpu_timer: str = "do_bench"
    gpu_warmup_ms: float = bounded(25.0, 0.0, 600_000.0, integer=False, open_low=True)
    gpu_rep_ms: float = bounded(100.0, 0.0, 600_000.0, integer=False, open_low=True)
    threads: int = bounded(0, 0, 1024)  # libgomp aborts far above the machine's cores


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
