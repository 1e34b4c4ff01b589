"""The columns of a results folder, declared once: name, dtype, role, unit, direction, labels.

``results.parquet`` (and every cell file) has exactly the columns of ``COLUMNS``, in order.
``summary.parquet`` has the ``SUMMARY_KEYS``, the cell columns of ``SUMMARY_OTHER``, then for
each metric M: ``M_mean, M_std, M_ci_low, M_ci_high``, then the cross-seed ``CELL_STATS``.

Roles: ``key`` (what identifies a cell and a seed), ``metric`` (a float measured per seed, NaN
when not measured; summarised over seeds), ``stat`` (a cross-seed statistic of a cell, summary
only), ``other`` (counts, labels, status). Direction: "lower" or "higher" is better, None where
neither is (a count, a label). Units are those of the stored value; ``display_unit`` and
``display_scale`` say how a reader shows it (bytes shown in MiB).

This module imports nothing heavy: the suite parser, the runner and the report all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("object", "int64", "float64", "bool")
ROLES = ("key", "metric", "stat", "other")


@dataclass(frozen=True)
class Column:
    """One column of the results contract."""

    name: str
    dtype: str  # pandas dtype: object | int64 | float64 | bool
    role: str  # key | metric | stat | other
    unit: str = ""  # unit of the stored value ("" for a ratio or a label)
    direction: str | None = None  # "lower" | "higher" is better; None: neither
    label: str = ""  # long label (axis labels, captions)
    short: str = ""  # short label (table headers); default: the long one
    display_unit: str | None = None  # unit a reader shows (default: ``unit``)
    display_scale: float = 1.0  # shown value = stored value * display_scale
    later: bool = False  # added after cell files were first written: an old file lacks it

    def __post_init__(self):
        if (
            self.dtype not in DTYPES
            or self.role not in ROLES
            or self.direction not in ("lower", "higher", None)
        ):
            raise ValueError(f"bad column declaration {self!r}")


def _key(name: str, dtype: str = "object", label: str = "") -> Column:
    return Column(name, dtype, "key", label=label or name)


def _metric(name: str, label: str, unit: str = "", direction: str = "lower", short: str = "", **kw) -> Column:
    return Column(name, "float64", "metric", unit, direction, label, short, **kw)


_DECLARED: tuple[Column, ...] = (
    _key("suite"),
    _key("cell"),
    _key("kind"),  # "estimator" or "baseline"
    _key("estimator"),
    _key("feature_map"),
    _key("weight_matrix"),
    _key("data"),
    _key("seq_len", "int64", "L"),
    _key("num_features", "int64", "m"),  # m, the number of random vectors
    _key("feature_dim", "int64", "F"),  # F, the features emitted (2m for trig/hyperbolic maps)
    _key("dim", "int64", "d"),
    _key("batch", "int64", "B"),
    _key("heads", "int64", "H"),
    _key("causal", "bool"),
    _key("dtype"),
    _key("device"),
    _key("seed", "int64"),
    _key("seed_index", "int64"),
    _metric("kernel_mse", "kernel MSE"),
    _metric("kernel_rel_mse", "kernel relative MSE", short="kernel rel. MSE"),
    # E[kernel_rel_mse] over seeds in closed form (rfbench.metrics.expected): the same in every
    # seed row of a cell; NaN without a closed form (coupled rows, fitted maps), inf where infinite
    _metric("kernel_rel_mse_theory", "kernel relative MSE, closed-form expectation",
            short="kernel rel. MSE (closed form)", later=True),
    _metric("attn_mse", "attention-matrix MSE", short="attn. MSE"),
    _metric("out_rel_err", "attention-output relative error", short="output rel. error"),
    _metric("target_kernel_rel_mse", "own-kernel relative MSE"),
    _metric("target_out_rel_err", "own-kernel output relative error"),
    # The wall-clock measurements close the metrics (TIMED_COLUMNS relies on it).
    _metric("time_ms", "forward time", "ms", short="time"),
    _metric("time_ms_p20", "forward time, 20th percentile", "ms"),
    _metric("time_ms_p80", "forward time, 80th percentile", "ms"),
    _metric("tokens_per_s", "throughput", "tokens/s", "higher"),
    _metric(
        "peak_mem_bytes",
        "peak memory",
        "bytes",
        short="peak mem.",
        display_unit="MiB",
        display_scale=1 / 2**20,
    ),
    _metric("draw_ms", "weight draw time", "ms"),
    _metric("fit_ms", "fit time", "ms"),
    Column("n_rep", "int64", "other", label="timed repeats"),
    # Timing detail (rfbench.suite.measure): every raw forward time as a JSON list of ms, their
    # coefficient of variation (std / mean), and the calibration kernel timed between the repeats
    # (its median and its raw samples): rfbench compare judges time_ms / ref_ms as well as time_ms.
    Column("time_samples_ms", "object", "other", "ms", label="forward time samples (JSON)", later=True),
    Column("time_cv", "float64", "other", label="forward time coefficient of variation", later=True),
    Column("ref_ms", "float64", "other", "ms", label="calibration kernel time", later=True),
    Column("ref_samples_ms", "object", "other", "ms", label="calibration kernel samples (JSON)", later=True),
    # the same in process CPU time (CPU device; NaN on CUDA): immune to waiting for a busy core
    Column("cpu_ms", "float64", "other", "ms", label="forward CPU time", later=True),
    Column("cpu_cv", "float64", "other", label="forward CPU time coefficient of variation", later=True),
    Column("cpu_samples_ms", "object", "other", "ms", label="forward CPU time samples (JSON)", later=True),
    Column("ref_cpu_ms", "float64", "other", "ms", label="calibration kernel CPU time", later=True),
    Column("ref_cpu_samples_ms", "object", "other", "ms", label="calibration kernel CPU time samples (JSON)",
           later=True),
    # the kernel the estimator approximates ("softmax", or e.g. a learned one)
    Column("target", "object", "other", label="target kernel", later=True),
    Column("fit_len", "int64", "other", "tokens", label="tokens fitted on", later=True),  # 0 without [fit]
    Column("eval_len", "int64", "other", "tokens", label="tokens measured", later=True),
    # training step whose parameters were kept (0: the initial ones)
    Column("fit_best_step", "int64", "other", label="best training step", later=True),
    # steps | patience | diverged | not trainable ("" without [fit])
    Column("fit_stopped", "object", "other", label="why training stopped", later=True),
    Column("status", "object", "other", label="status"),
    Column("message", "object", "other", label="message"),
)

#: Every column of results.parquet, in order, by name.
COLUMNS: dict[str, Column] = {c.name: c for c in _DECLARED}
#: Key columns of results.parquet, in order.
KEY_COLUMNS: tuple[str, ...] = tuple(n for n, c in COLUMNS.items() if c.role == "key")
#: Metric columns (float, NaN when not measured), in order.
METRICS: tuple[str, ...] = tuple(n for n, c in COLUMNS.items() if c.role == "metric")
#: What estimators are ranked by, first measured first: the report's leaderboards and the table
#: ``rfbench run`` prints. Output error leads: it is what attention sees and its spread over seeds
#: is small, while the kernel relative MSE can be heavy-tailed over seeds.
RANK_ORDER: tuple[str, ...] = ("out_rel_err", "kernel_rel_mse", "time_ms")
#: Columns that change from run to run of the same cells: the wall-clock measurements, which
#: close METRICS (from time_ms on), the repeat count they chose and their timing detail.
TIMED_COLUMNS: tuple[str, ...] = (
    *METRICS[METRICS.index("time_ms") :], "n_rep", "time_samples_ms", "time_cv", "ref_ms", "ref_samples_ms",
    "cpu_ms", "cpu_cv", "cpu_samples_ms", "ref_cpu_ms", "ref_cpu_samples_ms",
)
#: Columns a cell file may lack (written before they existed): filled when it is read.
LATER_COLUMNS: tuple[str, ...] = tuple(n for n, c in COLUMNS.items() if c.later)
#: Best to worst. "nonfinite": the cell ran but its attention output holds NaN or Inf.
STATUSES: tuple[str, ...] = ("ok", "skipped", "oom", "nonfinite", "error")
#: Key columns of summary.parquet (one row per cell: no seed).
SUMMARY_KEYS: tuple[str, ...] = tuple(c for c in KEY_COLUMNS if c not in ("seed", "seed_index"))
#: Per-cell columns of summary.parquet between the keys and the metric statistics.
SUMMARY_OTHER: dict[str, str] = {
    "target": "object",
    "fit_len": "int64",
    "eval_len": "int64",
    "n_seeds": "int64",
    "n_ok": "int64",
    "status": "object",
    "message": "object",
}
#: Per-metric statistics of summary.parquet: ``f"{metric}_{stat}"``.
METRIC_STATS: tuple[str, ...] = ("mean", "std", "ci_low", "ci_high")
#: Cross-seed statistics of a cell (summary.parquet only), computed over all seeds together.
STAT_COLUMNS: dict[str, Column] = {
    c.name: c
    for c in (
        Column("bias2", "float64", "stat", direction="lower", label="bias²"),
        Column("mc_variance", "float64", "stat", direction="lower", label="MC variance"),
        Column("bias2_rel", "float64", "stat", direction="lower", label="relative bias²"),
        Column("mc_variance_rel", "float64", "stat", direction="lower", label="relative MC variance"),
    )
}
CELL_STATS: tuple[str, ...] = tuple(STAT_COLUMNS)


def column(name: str) -> Column:
    """The declaration of a results or summary column (KeyError naming the known ones)."""
    found = COLUMNS.get(name) or STAT_COLUMNS.get(name)
    if found is None:
        raise KeyError(f"{name!r} is not a results column; known: {', '.join([*COLUMNS, *STAT_COLUMNS])}")
    return found


def summary_columns() -> list[str]:
    """The columns of summary.parquet, in order."""
    return [
        *SUMMARY_KEYS,
        *SUMMARY_OTHER,
        *(f"{m}_{s}" for m in METRICS for s in METRIC_STATS),
        *CELL_STATS,
    ]
