"""Suite files (TOML) validated into typed objects.

A suite names estimators, data sources and sweep axes; every combination of them is a *cell*,
run for ``seeds.count`` seeds. Every table and key is optional unless marked *required*; an
unknown key, a wrong type or an impossible value is a SpecError naming the file, the key path
and what is allowed (``rfbench run`` prints it on one line and exits 2).

    [suite]
    name = "quick"                  # default: the file's stem; names the results folder
    description = "..."

    [estimators]
    names = ["posrf-iid", "hyprf-orf"]     # "<feature>-<weights>" names (rfbench list estimators)
    feature_maps = ["posrf", "oprf"]       # and/or a grid: every feature map x every weight
    weight_matrices = ["iid", "orf"]       #   matrix ("*" for all registered ones)
    exclude = ["oprf-iid", "trigrf-*"]     # names or fnmatch patterns removed from the list
    baselines = ["exact", "sdpa"]          # rows of their own: exact | sdpa | flash (CUDA, half
                                           #   precision) | uniform (every query gets the mean of
                                           #   the values it sees: the error of knowing nothing) |
                                           #   taylor2 (Based's deterministic Taylor-2 map, at its
                                           #   one size); default ["exact", "sdpa"]
    [estimators.params]                    # constructor parameters keyed by a feature map,
    gerf = { A = -0.1 }                    #   weight-matrix or estimator name

    [[data]]                               # one table per data source; at least one (*required*)
    source = "synthetic"                   # synthetic (default) | bundled | file
    kind = "anisotropic"                   # synthetic, *required*: rfbench.data.synthetic.KINDS
    params = { cond = 100.0 }              # synthetic: the kind's parameters
    dim = 64                               # synthetic: head dim d (default 64); also dim_v,
    batch = 1                              #   batch, heads (default 1) and seed (default 0;
    heads = 1                              #   the data stay fixed across the estimator seeds)
    label = "aniso"                        # the `data` column; default built from the kind/params

    [[data]]
    source = "bundled"                     # the bundled MiniLM capture; or source = "file" and
    path = "captures/x.safetensors"        #   path (relative to the suite file)
    layers = [0, 5]                        # model layer indices (default: all)
    heads = [0, 1, 2]                      # model head indices (default: all)
    per_layer = false                      # true: one data source (and cells) per layer

    [sweep]                                # cells are the product of these axes
    seq_len = [256, 1024]                  # *required*; or per device: { cpu = [..], cuda = [..] }
    num_features = [32, 128]               # *required*: m, the number of random vectors
    causal = [false]                       # (these three may also be given per device)
    dtype = ["float32"]                    # float32 | float64 | float16 | bfloat16
    device = ["auto"]                      # cpu | cuda | auto (`rfbench run --device` overrides)

    [seeds]
    count = 5                              # seeds per estimator cell (baselines: one run)
    base = 0                               # mixed into every derived seed

    [metrics]
    kernel = true                          # kernel_mse, kernel_rel_mse, bias2, mc_variance
    attention_matrix = true                # attn_mse
    output = true                          # out_rel_err (all tokens)
    kernel_max_tokens = 1024               # rows sampled for the pairwise metrics (0: all)
    tile = 256                             # pair-block size of the streamed metrics

    [timing]
    enabled = true
    warmup = 2                             # untimed calls first (CPU and CUDA events)
    repeats = 10                           # timed calls, at most ...
    max_seconds = 2.0                      # ... stopping once this is spent (but >= 3 calls)
    memory = true                          # peak memory of one forward, in a run of its own
    all_seeds = false                      # time every seed, or only the first
    gpu_timer = "do_bench"                 # do_bench (triton) | cuda_events
    gpu_warmup_ms = 25.0                   # do_bench's warmup and rep (ms)
    gpu_rep_ms = 100.0
    threads = 0                            # torch CPU threads for the run (0: torch's default)

    [fit]                                  # optional: fit on part of each cell's tokens and
    holdout = 0.25                         #   measure on the rest (rfbench.learning.FitSpec):
    holdout_split = "tail"                 #   share held out for measurement; "tail" | "blocks"
    objective = "attention"                # and any FitConfig key (steps, lr, batch_tokens, ...)
    [fit.estimators."darkl-iid"]           # per-estimator overrides of FitConfig keys
    objective = "variance"

    [executor]                             # where the cells run: inline | local | slurm, and
    name = "slurm"                         #   the array tasks' settings (executor_spec.py)

Every number has a declared range, checked before anything is allocated: a ``Bound`` on each
field of ``spec_types`` (``bound_of(DataSpec, "dim")``), ``SYNTHETIC_BOUNDS`` for the synthetic
kinds' parameters and ``FIT_BOUNDS`` for ``[fit]``; products of sizes are bounded too
(``MAX_ELEMENTS`` per tensor, ``MAX_DRAW`` per estimator draw, ``MAX_SEED_RUNS`` per suite).

Scalars are accepted where a list is expected (``causal = true``). Cell keys and seeds are
derived in plan.py from these objects, never from the order of the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from rfbench.errors import SpecError
from rfbench.suite.spec_reader import _Reader
from rfbench.suite.spec_types import (  # noqa: F401  (re-exported: the suite's typed objects)
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


# --------------------------------------------------------------------------- loading
def load_suite(path_or_name) -> Suite:
    """Read and validate a suite file (a path, or the name of a ready suite such as "quick")."""
    from rfbench.suite_paths import resolve_suite

    path = resolve_suite(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the suite file ({exc})") from None
    return parse_suite(text, source=str(path), path=path)


def parse_suite(text: str, *, source: str = "<suite>", path: Path | None = None) -> Suite:
    """Validate TOML ``text``; ``source`` names it in messages, ``path`` anchors relative paths."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise SpecError(
            f"{source}: not valid TOML for a suite: arrays or tables nested too deeply; a suite "
            "needs at most a few levels"
        ) from None
    return suite_from_dict(raw, source=source, path=path, text=text)


def suite_from_dict(raw: dict, *, source: str = "<suite>", path: Path | None = None, text: str = "") -> Suite:
    """Validate an already-parsed suite document (what tomllib returns)."""
    r = _Reader(source)
    suite = r.suite(raw, path)
    if r.errors:
        shown = r.errors[:6]
        more = f" (and {len(r.errors) - len(shown)} more)" if len(r.errors) > len(shown) else ""
        raise SpecError("; ".join(shown) + more)
    return dataclasses.replace(suite, text=text, raw=raw)
