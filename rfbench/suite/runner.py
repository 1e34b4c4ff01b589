"""``rfbench run``: run a suite's cells and write its results folder.

A *cell* is one point of the product of a suite's axes: (estimator or baseline, data source,
seq_len, num_features, causal, dtype, device). Its id (the ``cell`` column) is a short sha256 of
its canonical key, and the seed of its seed index i is derived from the same key:

    seed_i = int(sha256(f"{canonical key}|{seeds.base}|{i}")[:8 bytes]) mod 2**63

so a cell's numbers do not depend on which other cells run, in which order, in which shard, or
whether the run was resumed. Data stay fixed across a cell's seeds (the spread over seeds is
the spread over random features alone).

For each estimator cell and seed: draw (``make_estimator``, ``draw_ms``), fit on the cell's
whole q and k at the attention scale (``fit_ms``; data-dependent maps only, also for causal
cells, knowingly), the attention output against float64 exact attention (``out_rel_err``), the
forward time and peak memory (seed 0 only unless ``timing.all_seeds``), and the streamed kernel
metrics of rfbench.metrics over all seeds together (bias2 and mc_variance need them all).
Estimators whose kernel is not the softmax (DARK, learned ones) are also scored against their
own kernel (``target_*``; NaN where it has no closed form). Baselines (exact, sdpa, flash,
uniform) are cells of their own with one run each.

With a ``[fit]`` section the cell's L tokens are split (``FitSpec.split``: by default the last
25% are held out). Every estimator is fitted with ``learning.fit_estimator`` on the first part
only (trained where it has learnable parts, with its validation split inside that part; fitted
the ordinary way otherwise), and everything, baselines included, is measured on the held-out
part only (``eval_len`` tokens; ``fit_len`` were fitted on). ``fit_ms`` excludes torch's one-time
optimiser set-up. A learned distribution that does not depend on the estimator's seed (darkl's
M, trained with a fixed ``FitConfig.seed``) is fitted once per cell and copied to the other seeds
with their own draw, which is exactly what fitting each anew gives; their ``fit_ms`` is that one
fit's. Training curves are written to ``fits/<cell>.parquet`` before the cell's own file.

Failures: an unsupported estimator/size pair is ``skipped`` with its reasons; running out of
memory is ``oom``; anything else is ``error`` with the exception's message. Each is recorded and
the sweep goes on. Every finished cell is written at once, atomically (store.py); ``--resume``
skips cells already written with status ok, skipped or oom, and re-runs cells that ended in
``error`` (a missing module or a bug fixed since). ``--shard I/N`` runs cells I, I+N, I+2N, ...
(1-based) of the suite's canonical order; shards may share one results folder.

Exit status of ``rfbench run``: 0 when every cell is ok, skipped or oom; 1 when a cell ended in
``error``; 2 for a bad suite or option (one line on stderr).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from rfbench import metrics as M
from rfbench.errors import DataError, EstimatorError, SpecError, UnsupportedError
from rfbench.learning import FitSpec
from rfbench.suite import executors as X
from rfbench.suite import store
from rfbench.suite.spec import DataSpec, EstimatorSpec, Suite, load_suite, suite_from_dict

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SEED_BYTES = 8


# --------------------------------------------------------------------------- keys and seeds
def canonical(obj) -> str:
    """Canonical JSON of a cell key: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_id(key: dict) -> str:
    return hashlib.sha256(canonical(key).encode()).hexdigest()[:16]


def derive_seed(key: dict, base: int, index: int) -> int:
    """The seed of seed index ``index`` of the cell with ``key`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{canonical(key)}|{base}|{index}".encode()).digest()
    return int.from_bytes(digest[:_SEED_BYTES], "big") % (2**63)


# --------------------------------------------------------------------------- data sources
@dataclass
class Source:
    """A data source ready to serve ``(q, k, v, scale)`` for any seq_len it can serve."""

    spec: DataSpec
    label: str
    key: dict
    dim: int
    batch: int
    heads: int
    max_tokens: int | None = None  # captures: tokens available
    capture: object = None

    def load(self, seq_len: int, dtype: torch.dtype, device: torch.device):
        if self.capture is None:
            from rfbench.data import synthetic

            s = self.spec
            q, k, v = synthetic.make(
                s.kind,
                batch=s.batch,
                heads=s.heads,
                seq_len=seq_len,
                dim=s.dim,
                dim_v=s.dim_v,
                seed=s.seed,
                dtype=dtype,
                **s.params,
            )
            scale = 1.0 / math.sqrt(s.dim)
        else:
            c = self.capture
            q, k, v = (x[..., :seq_len, :].to(dtype) for x in (c.q, c.k, c.v))
            scale = float(c.scale)
        return q.to(device), k.to(device), v.to(device), scale


def _synthetic_label(spec: DataSpec) -> str:
    from rfbench.data import synthetic

    defaults = synthetic.parameters(spec.kind)
    changed = {k: v for k, v in spec.params.items() if defaults.get(k) != v}
    if not changed:
        return spec.kind
    inner = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
    return f"{spec.kind}({inner})"


def _format_ranges(values) -> str:
    from rfbench.data.io import format_ranges

    return format_ranges(values, sep=",")


def prepare_sources(suite: Suite) -> list[Source]:
    """Resolve the suite's data sources (loading captures once); per_layer ones expand per layer."""
    out: list[Source] = []
    for spec in suite.data:
        where = f"{suite.source}: data[{spec.index}]"
        if spec.source == "synthetic":
            key = {
                "source": "synthetic",
                "kind": spec.kind,
                "params": spec.params,
                "dim": spec.dim,
                "dim_v": spec.dim_v,
                "batch": spec.batch,
                "heads": spec.heads,
                "seed": spec.seed,
            }
            out.append(
                Source(spec, spec.label or _synthetic_label(spec), key, spec.dim, spec.batch, spec.heads)
            )
            continue
        from rfbench.data import io

        try:
            cap = io.load_bundled() if spec.source == "bundled" else io.load_capture(spec.path)
            cap = cap.select(layers=spec.layers, heads=spec.head_indices)
        except DataError as exc:
            raise SpecError(f"{where}: {exc}") from None
        name = "bundled" if spec.source == "bundled" else f"file:{Path(spec.path).stem}"
        groups = [[layer] for layer in cap.layers] if spec.per_layer else [list(cap.layers)]
        for layers in groups:
            sub = cap.select(layers=layers) if spec.per_layer else cap
            if spec.label is None:
                label = f"{name}:L{_format_ranges(layers)}"
                if spec.head_indices is not None:
                    label += f":H{_format_ranges(sub.heads)}"
            else:
                label = f"{spec.label}:L{_format_ranges(layers)}" if spec.per_layer else spec.label
            key = {
                "source": spec.source,
                "path": spec.path if spec.source == "file" else "bundled",
                "layers": list(sub.layers),
                "heads": list(sub.heads),
                "model": cap.meta.get("model", ""),
            }
            out.append(
                Source(
                    spec,
                    label,
                    key,
                    sub.dim,
                    len(sub.layers),
                    len(sub.heads),
                    max_tokens=sub.num_tokens,
                    capture=sub,
                )
            )
    labels = [s.label for s in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SpecError(f"{suite.source}: data: two sources share the label {dup[0]!r}; give them labels")
    return out


# --------------------------------------------------------------------------- the plan
@dataclass
class Cell:
    cell: str
    key: dict
    kind: str  # "estimator" or "baseline"
    name: str
    source: Source
    seq_len: int
    num_features: int
    causal: bool
    dtype: str
    device: str
    estimator: EstimatorSpec | None = None
    skip: str = ""  # reason this cell cannot run here (known before running it)

    @property
    def context_key(self) -> tuple:
        return (self.source.label, self.seq_len, self.causal, self.dtype, self.device)

    def label(self) -> str:
        m = f" m={self.num_features}" if self.kind == "estimator" else ""
        c = " causal" if self.causal else ""
        return f"{self.name}{m} {self.source.label} L={self.seq_len}{c} {self.dtype} {self.device}"


def resolve_devices(suite: Suite, device: str | None) -> list[str]:
    """The devices the sweep runs on: ``device`` (the CLI's) overrides the suite's axis."""
    if device is not None:
        if device not in ("cpu", "cuda", "auto"):
            raise SpecError(f"--device must be cpu, cuda or auto, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise SpecError(
                "--device cuda was given but CUDA is not available here; use --device cpu or auto"
            )
        wanted = [device]
    else:
        wanted = list(suite.sweep.device)
    out = []
    for d in wanted:
        d = ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d
        if d not in out:
            out.append(d)
    return out


def plan(suite: Suite, sources: list[Source], devices: list[str]) -> list[Cell]:
    """Every cell of the suite, in canonical order (data and reference reuse stay local)."""
    cells: list[Cell] = []
    sweep = suite.sweep
    for device in devices:
        for dtype in sweep.values("dtype", device):
            for src in sources:
                for L in sweep.values("seq_len", device):
                    for causal in sweep.values("causal", device):
                        skip = ""
                        if device == "cuda" and not torch.cuda.is_available():
                            skip = "CUDA is not available on this machine"
                        elif src.max_tokens is not None and L > src.max_tokens:
                            skip = f"seq_len {L} exceeds the {src.max_tokens} tokens of {src.label}"
                        elif suite.fit is not None:
                            skip = _holdout_skip(suite.fit, L)
                        base = {
                            "data": src.key,
                            "seq_len": L,
                            "causal": causal,
                            "dtype": dtype,
                            "device": device,
                        }
                        if suite.fit is not None:  # a held-out measurement is another cell
                            base["holdout"] = _holdout_key(suite.fit)
                        for b in suite.baselines:
                            key = {"kind": "baseline", "estimator": b, "num_features": 0, **base}
                            cells.append(
                                Cell(
                                    cell_id(key),
                                    key,
                                    "baseline",
                                    b,
                                    src,
                                    L,
                                    0,
                                    causal,
                                    dtype,
                                    device,
                                    skip=skip or _baseline_skip(b, dtype, device),
                                )
                            )
                        for m in sweep.values("num_features", device):
                            for est in suite.estimators:
                                key = {"kind": "estimator", "estimator": est.key(), "num_features": m, **base}
                                est_skip = skip
                                if suite.fit is not None and _learnable(est):
                                    # training settings are part of what a learner's cell measures;
                                    # the others are fitted the plain way, whatever they say
                                    config = suite.fit.config_for(est.name)
                                    key["fit"] = dataclasses.asdict(config)
                                    est_skip = skip or _validation_skip(suite.fit, config, L)
                                cells.append(
                                    Cell(
                                        cell_id(key),
                                        key,
                                        "estimator",
                                        est.name,
                                        src,
                                        L,
                                        m,
                                        causal,
                                        dtype,
                                        device,
                                        estimator=est,
                                        skip=est_skip,
                                    )
                                )
    return cells


def _holdout_key(fit: FitSpec) -> dict:
    key = {"share": fit.holdout, "split": fit.holdout_split}
    if fit.holdout_split == "blocks":
        key["n_blocks"] = fit.config.n_blocks
    return key


def _learnable(spec: EstimatorSpec) -> bool:
    """Whether the estimator has parts that [fit] trains (darkl, fastfoodl)."""
    from rfbench import registry

    return bool(
        getattr(registry.feature_map_class(spec.feature_map), "learnable", False)
        or getattr(registry.weight_matrix_class(spec.weight_matrix), "learnable", False)
    )


def _validation_skip(fit: FitSpec, config, L: int) -> str:
    """Why a learner cannot split its fit part into training and validation tokens ("" if it can)."""
    from rfbench.learning import split_tokens

    try:
        n_fit = fit.split(L)[0].numel()
        split_tokens(n_fit, config.val_fraction, split=config.split, n_blocks=config.n_blocks)
    except SpecError as exc:
        return f"[fit] the fit part of L={L} cannot be split for validation: {exc}"
    return ""


def _check_fit(suite: Suite, sources: list[Source]) -> None:
    """Refuse, before any cell runs, a [fit] config that cannot train one of the suite's learners."""
    from rfbench.learning import check_config
    from rfbench.registry import make_estimator

    if suite.fit is None or not sources:
        return
    overridden = dict(suite.fit.overrides)
    m = next(iter(suite.sweep.num_features.values()))[0]
    for spec in suite.estimators:
        if not _learnable(spec):
            continue
        try:
            est = make_estimator(
                spec.name,
                sources[0].dim,
                m,
                0,
                feature_params=spec.feature_params,
                weight_params=spec.weight_params,
                **spec.params,
            )
        except UnsupportedError:
            continue  # its cells are skipped with the reason
        try:
            check_config(est, suite.fit.config_for(spec.name))
        except EstimatorError as exc:
            where = f'fit.estimators."{spec.name}"' if spec.name in overridden else "fit"
            raise SpecError(f"{suite.source}: {where}: {exc}") from None


def _holdout_skip(fit: FitSpec, L: int) -> str:
    try:
        fit.split(L)
    except SpecError as exc:
        return f"[fit] holdout = {fit.holdout}: {exc}"
    return ""


def _baseline_skip(name: str, dtype: str, device: str) -> str:
    if name == "flash":
        if device != "cuda":
            return "FlashAttention runs on CUDA only"
        if dtype not in ("float16", "bfloat16"):
            return f"FlashAttention needs float16 or bfloat16, not {dtype}"
    return ""


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise SpecError(f"--shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise SpecError(f"--shard I/N needs 1 <= I <= N, got {text!r}")
    return i, n


# --------------------------------------------------------------------------- per-cell context
@dataclass
class Context:
    """Data and exact references shared by the cells of one (data, seq_len, causal, dtype, device).

    ``q, k, v`` are the tokens measured: all of the cell's, or with a ``[fit]`` section its
    held-out part only, the part fitted on being ``fit_q, fit_k, fit_v`` (None without one).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    rows_seed: int
    suite: Suite
    causal: bool
    fit_q: torch.Tensor | None = None
    fit_k: torch.Tensor | None = None
    fit_v: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def rows(self):
        if "rows" not in self._cache:
            cap = self.suite.metrics.kernel_max_tokens or None
            self._cache["rows"] = M.sample_rows(self.q.shape[-2], cap, seed=self.rows_seed)
        return self._cache["rows"]

    @property
    def out_ref(self) -> torch.Tensor:
        if "out" not in self._cache:
            from rfbench import exact

            self._cache["out"] = exact.attention(
                self.q, self.k, self.v, self.causal, scale=self.scale, dtype=torch.float64
            )
        return self._cache["out"]

    @property
    def row_lse(self) -> torch.Tensor:
        if "lse" not in self._cache:
            rows = None if self.rows is None else self.rows.to(self.q.device)
            self._cache["lse"] = M.exact_row_lse(
                self.q, self.k, scale=self.scale, rows=rows, causal=self.causal, tile=self.suite.metrics.tile
            )
        return self._cache["lse"]


def make_context(cell: Cell, suite: Suite) -> Context:
    device = torch.device(cell.device)
    q, k, v, scale = cell.source.load(cell.seq_len, TORCH_DTYPES[cell.dtype], device)
    rows_seed = derive_seed({"data": cell.source.key, "seq_len": cell.seq_len}, 0, 0)
    if suite.fit is None:
        return Context(q, k, v, scale, rows_seed, suite, cell.causal)
    fit_idx, held_idx = (i.to(device) for i in suite.fit.split(cell.seq_len))
    fit_q, fit_k, fit_v = (x.index_select(-2, fit_idx) for x in (q, k, v))
    q, k, v = (x.index_select(-2, held_idx) for x in (q, k, v))
    return Context(q, k, v, scale, rows_seed, suite, cell.causal, fit_q, fit_k, fit_v)


# --------------------------------------------------------------------------- running cells
def _base_row(suite: Suite, cell: Cell) -> dict:
    src = cell.source
    return {
        "suite": suite.name,
        "cell": cell.cell,
        "kind": cell.kind,
        "estimator": cell.name,
        "feature_map": cell.estimator.feature_map if cell.estimator else "",
        "weight_matrix": cell.estimator.weight_matrix if cell.estimator else "",
        "data": src.label,
        "seq_len": cell.seq_len,
        "num_features": cell.num_features,
        "feature_dim": 0,
        "dim": src.dim,
        "batch": src.batch,
        "heads": src.heads,
        "causal": cell.causal,
        "dtype": cell.dtype,
        "device": cell.device,
        **_split_sizes(suite, cell.seq_len),
        "status": "ok",
        "message": "",
    }


def _split_sizes(suite: Suite, L: int) -> dict:
    """``fit_len`` (tokens fitted on) and ``eval_len`` (tokens measured) of a cell of L tokens."""
    if suite.fit is None:
        return {"fit_len": 0, "eval_len": L}
    try:
        fit_idx, held_idx = suite.fit.split(L)
    except SpecError:  # the cell is skipped, saying why
        return {"fit_len": 0, "eval_len": 0}
    return {"fit_len": fit_idx.numel(), "eval_len": held_idx.numel()}


def _seed_rows(suite: Suite, cell: Cell) -> list[dict]:
    base = _base_row(suite, cell)
    if cell.kind == "baseline":
        return [{**base, "seed": 0, "seed_index": 0}]
    return [
        {**base, "seed": derive_seed(cell.key, suite.seeds.base, i), "seed_index": i}
        for i in range(suite.seeds.count)
    ]


def _measure(fn, suite: Suite, device: torch.device, tokens: int) -> dict:
    t = suite.timing
    out: dict = {}
    if not t.enabled:
        return out
    timing = X.time_forward(
        fn,
        device,
        warmup=t.warmup,
        repeats=t.repeats,
        max_seconds=t.max_seconds,
        gpu_timer=t.gpu_timer,
        gpu_warmup_ms=t.gpu_warmup_ms,
        gpu_rep_ms=t.gpu_rep_ms,
    )
    out.update(
        time_ms=timing.median_ms,
        time_ms_p20=timing.p20_ms,
        time_ms_p80=timing.p80_ms,
        n_rep=timing.n_rep,
        tokens_per_s=tokens / (timing.median_ms / 1e3) if timing.median_ms > 0 else math.nan,
    )
    if t.memory:
        out["peak_mem_bytes"] = float(X.peak_memory(fn, device))
    return out


def run_baseline_cell(cell: Cell, ctx: Context, suite: Suite) -> tuple[list[dict], dict]:
    import torch.nn.functional as F

    from rfbench import exact

    q, k, v, scale, causal = ctx.q, ctx.k, ctx.v, ctx.scale, cell.causal
    if cell.name == "exact":

        def fn():
            return exact.attention(q, k, v, causal, scale=scale)
    elif cell.name == "sdpa":

        def fn():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    elif cell.name == "uniform":  # a constant kernel: the floor any estimator should beat

        def fn():
            return uniform_attention(v, causal)
    elif cell.name == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:  # the spec only lets known names through
        raise UnsupportedError(f"unknown baseline {cell.name!r}")
    row = _seed_rows(suite, cell)[0]
    row["target"] = "softmax"
    if suite.metrics.output:
        row["out_rel_err"] = M.relative_error(fn(), ctx.out_ref)
    row.update(_measure(fn, suite, q.device, cell.source.batch * cell.source.heads * q.shape[-2]))
    return [row], {}


def uniform_attention(v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention with a constant kernel: each query gets the mean of the values it sees."""
    x = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v  # counts past 256 in bf16
    if not causal:
        out = x.mean(dim=-2, keepdim=True).expand_as(x)
    else:
        count = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=x.dtype).unsqueeze(-1)
        out = x.cumsum(dim=-2) / count
    return out.to(v.dtype)


def run_estimator_cell(cell: Cell, ctx: Context, suite: Suite) -> tuple[list[dict], dict]:
    from rfbench import registry
    from rfbench.registry import make_estimator

    spec = cell.estimator
    # Import the components' modules first, so that the first seed's draw_ms is not an import time.
    registry.feature_map_class(spec.feature_map)
    registry.weight_matrix_class(spec.weight_matrix)
    rows = _seed_rows(suite, cell)
    device = torch.device(cell.device)
    q, k, v, scale, causal = ctx.q, ctx.k, ctx.v, ctx.scale, cell.causal
    tokens = cell.source.batch * cell.source.heads * q.shape[-2]
    ests = []
    curves = []
    shared = None  # (fitted estimator, its row) when the fit does not depend on the seed
    # (estimator, its own-kernel output): shared by the cells of this context, since the own kernel
    # depends on the data and the fitted parameters only (DARK's whitening is the same for any m)
    target_refs = ctx._cache.setdefault("target_refs", [])
    for i, row in enumerate(rows):
        est, row["draw_ms"] = X.timed_call(
            lambda row=row: make_estimator(
                spec.name,
                cell.source.dim,
                cell.num_features,
                row["seed"],
                device,
                TORCH_DTYPES[cell.dtype],
                feature_params=spec.feature_params,
                weight_params=spec.weight_params,
                **spec.params,
            ),
            device,
        )
        row["feature_dim"] = est.feature_dim
        if shared is not None:  # what fitting anew would give: the same parameters, this draw
            est = copy.deepcopy(shared[0]).redraw(row["seed"])
            for col in ("fit_ms", "fit_best_step", "fit_stopped"):
                row[col] = shared[1][col]
        elif suite.fit is not None:
            res = _fit(est, row, ctx, suite, device)
            if len(res.curve):
                curves.append(res.curve.assign(seed_index=i, seed=row["seed"]))
            if res.trained and res.seed_independent:
                shared = (est, row)
        elif est.feature_map.data_dependent:
            _, row["fit_ms"] = X.timed_call(lambda est=est: est.fit(q, k, scale=scale), device)
        row["target"] = est.target
        ests.append(est)

        def forward(est=est):
            return est.attention(q, k, v, causal, scale=scale)

        if suite.metrics.output:
            out = forward()
            row["out_rel_err"] = M.relative_error(out, ctx.out_ref)
            if est.target != "softmax":
                ref = _target_output(est, ctx, causal, target_refs)
                row["target_out_rel_err"] = math.nan if ref is None else M.relative_error(out, ref)
            del out
        if i == 0 or suite.timing.all_seeds:
            row.update(_measure(forward, suite, device, tokens))
    stats: dict = {}
    if curves:
        stats["fit_curves"] = curves
    if suite.metrics.kernel or suite.metrics.attention_matrix:
        rows_idx = None if ctx.rows is None else ctx.rows.to(q.device)
        ke = M.kernel_errors(
            ests,
            q,
            k,
            scale=scale,
            rows=rows_idx,
            causal=causal,
            attention_matrix=suite.metrics.attention_matrix,
            row_lse=ctx.row_lse if suite.metrics.attention_matrix else None,
            tile=suite.metrics.tile,
        )
        for i, row in enumerate(rows):
            if suite.metrics.kernel:
                row["kernel_mse"], row["kernel_rel_mse"] = ke.kernel_mse[i], ke.kernel_rel_mse[i]
                if ke.target_kernel_rel_mse is not None:
                    row["target_kernel_rel_mse"] = ke.target_kernel_rel_mse[i]
            if ke.attn_mse is not None:
                row["attn_mse"] = ke.attn_mse[i]
        if suite.metrics.kernel:
            stats.update(
                bias2=ke.bias2,
                mc_variance=ke.mc_variance,
                bias2_rel=ke.bias2_rel,
                mc_variance_rel=ke.mc_variance_rel,
                n_pairs=ke.n_pairs,
            )
    return rows, stats


def _fit(est, row: dict, ctx: Context, suite: Suite, device: torch.device):
    """Fit ``est`` on the cell's fit part (``[fit]``); fill the row's fit columns; return the FitResult."""
    from rfbench.learning import fit_estimator, warm_up

    config = suite.fit.config_for(est.name)
    warm_up()  # torch's one-time optimiser set-up is not the estimator's fit time
    res, row["fit_ms"] = X.timed_call(
        lambda: fit_estimator(est, ctx.fit_q, ctx.fit_k, ctx.fit_v, config, scale=ctx.scale, progress=False),
        device,
    )
    row.update(fit_best_step=res.best_step, fit_stopped=res.stopped)
    if not (res.trained or est.feature_map.data_dependent):
        row["fit_ms"] = math.nan  # nothing to fit: no fit time, as without [fit]
    return res


def _target_output(est, ctx: Context, causal: bool, cache: list) -> torch.Tensor | None:
    """Exact attention under ``est``'s own kernel (None: it has no closed form), float64.

    The own kernel depends on the data and the fitted parameters only, so seeds that share their
    parameters share one reference (kept in ``cache``).
    """
    from rfbench.learning import target_attention
    from rfbench.metrics import _same_params

    for other, ref in cache:
        if (
            type(other.feature_map) is type(est.feature_map)
            and other.target == est.target
            and getattr(other.weight_matrix, "fitted_", False) == getattr(est.weight_matrix, "fitted_", False)
            and _same_params(other.params_, est.params_)
        ):
            return ref
    ref = target_attention(est, ctx.q, ctx.k, ctx.v, scale=ctx.scale, causal=causal, dtype=torch.float64)
    cache.append((est, ref))
    return ref


def run_cell(cell: Cell, ctx_holder: dict, suite: Suite) -> tuple[list[dict], dict]:
    """Run one cell, turning every failure into rows with a status; never raises (but Ctrl-C)."""
    if cell.skip:
        rows = _seed_rows(suite, cell)
        for row in rows:
            row.update(status="skipped", message=cell.skip)
        return rows, {}
    failure = None
    # No autograd bookkeeping: nothing measured is differentiated. A [fit] section trains
    # estimators (learning.fit_estimator turns autograd back on), and inference-mode tensors
    # could not take part in that, so such suites run under no_grad instead.
    mode = torch.inference_mode if suite.fit is None else torch.no_grad
    try:
        ctx = ctx_holder.get(cell.context_key)
        if ctx is None:
            ctx_holder.clear()  # one context at a time: cells sharing one are adjacent in the plan
            with mode():
                ctx = ctx_holder[cell.context_key] = make_context(cell, suite)
        runner = run_baseline_cell if cell.kind == "baseline" else run_estimator_cell
        with mode():
            return runner(cell, ctx, suite)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded per cell (status and message), the sweep goes on
        failure = (X.classify_failure(exc), X.failure_message(exc))
    # Recover outside the except block: its traceback would keep the cell's tensors alive.
    if failure[0] == "oom":
        ctx_holder.clear()
    X.free_memory(torch.device(cell.device))
    rows = _seed_rows(suite, cell)
    for row in rows:
        row.update(status=failure[0], message=failure[1])
    return rows, {}


# --------------------------------------------------------------------------- metadata
def _git_info() -> dict:
    root = Path(__file__).resolve().parent.parent.parent

    def git(*args):
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    if rev is None:
        return {"revision": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": rev, "dirty": bool(status), "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    import numpy
    import pandas
    import pyarrow

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _machine(devices: list[str]) -> dict:
    out = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "devices": [],
    }
    for d in devices:
        if d == "cuda":
            props = torch.cuda.get_device_properties(0)
            out["devices"].append(
                {
                    "device": "cuda",
                    "name": props.name,
                    "count": torch.cuda.device_count(),
                    "memory_bytes": props.total_memory,
                    "capability": f"{props.major}.{props.minor}",
                    "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                }
            )
        else:
            out["devices"].append({"device": "cpu", "name": out["cpu"]})
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def _meta(suite: Suite, devices: list[str], previous: dict | None) -> dict:
    from rfbench import __version__

    meta = dict(previous or {})
    meta.update(
        {
            "rfbench_version": __version__,
            "suite": {
                "name": suite.name,
                "path": None if suite.path is None else str(suite.path),
                "toml": suite.text,
                "parsed": suite.raw,
                "validated": suite.to_dict(),
            },
            "git": _git_info(),
            "versions": _versions(),
            "machine": _machine(devices),
            "timing": {
                **suite.to_dict()["timing"],
                "cpu_timer": "time.perf_counter per call after warmup; median, p20, p80",
                "gpu": "triton.testing.do_bench(return_mode='all', L2 flushed) or CUDA events; "
                "median, p20, p80",
                "forward": "Estimator.attention(q, k, v, causal, scale) with a drawn and fitted estimator; "
                "draw_ms and fit_ms are measured apart",
                "timed_seeds": "all" if suite.timing.all_seeds else "seed_index 0 only",
            },
            "peak_memory": {"cpu": X.CPU_MEMORY_NOTE, "cuda": X.CUDA_MEMORY_NOTE},
            "metrics": {
                **suite.to_dict()["metrics"],
                "definitions": M.__doc__.split("Per entry")[0].strip(),
                "kernel_pairs": "rows sampled once per (data, seq_len), independent of seeds; "
                "attention-matrix row sums over all keys",
                "fit": "data-dependent estimators are fitted on the cell's whole q, k at the attention scale",
            },
            "seeds": {
                "count": suite.seeds.count,
                "base": suite.seeds.base,
                "rule": "seed_i = int.from_bytes(sha256(canonical_key + '|' + base + '|' + i)[:8]) mod 2**63",
            },
        }
    )
    meta.setdefault("start_time", _now())
    meta.setdefault("runs", [])
    return meta


# --------------------------------------------------------------------------- run_suite
def _as_suite(spec_or_path) -> Suite:
    if isinstance(spec_or_path, Suite):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        return suite_from_dict(spec_or_path)
    return load_suite(spec_or_path)


def _check_out(out: Path, suite: Suite, cells: list[Cell], resume: bool) -> dict | None:
    """Refuse to overwrite results; return the previous meta.json (or None)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise SpecError(f"--out {out} exists and is not a folder")
    meta_file = out / "meta.json"
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return None
    if not meta_file.is_file():
        raise SpecError(
            f"--out {out} is not empty and is not an rfbench results folder; choose another --out"
        )
    previous = store.load_meta(out)
    parsed = previous.get("suite", {}).get("parsed")
    if parsed is not None and parsed != json.loads(json.dumps(suite.raw, default=str)):
        raise SpecError(
            f"{out} holds results of a different suite definition ({previous['suite'].get('path')}); "
            "use another --out (or delete that folder)"
        )
    if not resume:
        done = store.cell_files(out)
        if any(c.cell in done for c in cells):
            raise SpecError(
                f"{out} already holds results of this suite; pass --resume to finish it, "
                "or --out to write elsewhere"
            )
    return previous


def run_suite(spec_or_path, out=None, *, device=None, resume=False, shard=None, progress=None) -> Path:
    """Run a suite (a Suite, a parsed dict, a TOML path or a ready suite's name); return the results folder.

    out: the folder (default ``reports/<suite name>`` under the current directory).
    device: "cpu", "cuda" or "auto" to override the suite's device axis.
    resume: skip cells already finished in ``out`` (status ok, skipped or oom); re-run the others.
    shard: ``(i, n)`` or "i/n": run only cells i, i+n, ... (1-based) of the canonical order.
    progress: show a progress bar (default: when stderr is a terminal).
    """
    suite = _as_suite(spec_or_path)
    out = Path(out) if out is not None else Path("reports") / suite.name
    shard = parse_shard(shard) if isinstance(shard, str) or shard is None else tuple(shard)
    if shard is not None and not (1 <= shard[0] <= shard[1]):
        raise SpecError(f"shard must be (i, n) with 1 <= i <= n, got {shard}")
    devices = resolve_devices(suite, device)
    sources = prepare_sources(suite)
    _check_fit(suite, sources)
    cells = plan(suite, sources, devices)
    order = [c.cell for c in cells]
    mine = cells if shard is None else [c for i, c in enumerate(cells) if i % shard[1] == shard[0] - 1]
    previous = _check_out(out, suite, mine, resume)
    out.mkdir(parents=True, exist_ok=True)
    store.remove_stale_temporaries(out)
    done = {}
    if resume:
        for cell, path in store.cell_files(out).items():
            try:
                meta = store.read_cell_meta(path)
            except DataError:
                continue  # unreadable: run it again
            if meta.get("status") in ("ok", "skipped", "oom"):
                done[cell] = meta["status"]
        store.consolidate(out, order)
    todo = [c for c in mine if c.cell not in done]
    threads_before = torch.get_num_threads()
    if suite.timing.threads:
        torch.set_num_threads(suite.timing.threads)
    try:
        run = {
            "start_time": _now(),
            "end_time": None,
            "command": sys.argv,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "resume": bool(resume),
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
            "devices": devices,
            "cells_total": len(cells),
            "cells_this_run": len(todo),
            "cells_already_done": len(mine) - len(todo),
            "status": "running",
        }
        meta = _meta(suite, devices, previous)
        meta["runs"] = [*meta.get("runs", []), run]
        meta["command"] = sys.argv
        store.write_json(out / "meta.json", meta)
        _sweep(
            suite, out, todo, order, meta, run, sys.stderr.isatty() if progress is None else bool(progress)
        )
    finally:
        torch.set_num_threads(threads_before)
    return out


def _sweep(
    suite: Suite, out: Path, todo: list[Cell], order: list[str], meta: dict, run: dict, show: bool
) -> None:
    """Run ``todo``, writing each cell as it finishes; consolidate and close meta.json whatever happens."""
    counts: dict[str, int] = {}
    ctx_holder: dict = {}
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="cell", file=sys.stderr, dynamic_ncols=True, desc=suite.name)
    status = "interrupted"
    try:
        for cell in todo:
            if bar is not None:
                bar.set_postfix_str(cell.label()[:60], refresh=False)
            t0 = time.perf_counter()
            rows, stats = run_cell(cell, ctx_holder, suite)
            curves = stats.pop("fit_curves", None)
            if curves:  # before the cell file: a cell written is a cell complete
                store.write_fit_curves(out, cell.cell, _curve_frame(cell, curves))
            worst = store.worst_status(r["status"] for r in rows)
            stats = {**stats, "status": worst, "key": cell.key, "wall_s": time.perf_counter() - t0}
            store.write_cell(out, cell.cell, rows, stats)
            counts[worst] = counts.get(worst, 0) + 1
            if bar is not None:
                bar.update(1)
        status = "finished"
    finally:
        if bar is not None:
            bar.close()
        ctx_holder.clear()
        store.consolidate(out, order)
        run.update(end_time=_now(), status=status, status_counts=counts)
        meta["end_time"] = run["end_time"]
        store.write_json(out / "meta.json", meta)


def _curve_frame(cell: Cell, curves: list) -> pd.DataFrame:
    df = pd.concat(curves, ignore_index=True)
    first = {
        "cell": cell.cell,
        "estimator": cell.name,
        "data": cell.source.label,
        "num_features": cell.num_features,
    }
    for i, (col, value) in enumerate(first.items()):
        df.insert(i, col, value)
    order = [*first, "seed", "seed_index", "step", "train_loss", "val_loss"]
    return df[order]


# --------------------------------------------------------------------------- terminal summary
def format_summary(summary, *, top: int = 5, max_groups: int = 8) -> str:
    """A short ranked table: per (data, seq_len), the best estimator cells by kernel_rel_mse
    (by out_rel_err where the kernel was not measured, or where a [fit] section held tokens out:
    the held-out output error is then the headline), with their time and the baselines' times."""
    lines = []
    counts = summary["status"].value_counts().to_dict()
    lines.append("cells: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in store.STATUSES if counts.get(s)))
    est = summary[(summary["kind"] == "estimator") & (summary["n_ok"] > 0)]
    base = summary[(summary["kind"] == "baseline") & (summary["n_ok"] > 0)]
    groups = list(est.groupby(["data", "seq_len", "causal", "device"], sort=False))
    for (data, L, causal, device), g in groups[:max_groups]:
        held_out = "fit_len" in g and bool((g["fit_len"] > 0).any())
        by_kernel = g["kernel_rel_mse_mean"].notna().any() and not held_out
        metric = "kernel_rel_mse_mean" if by_kernel else "out_rel_err_mean"
        g = g.sort_values(metric, na_position="last").head(top)
        title = f"{data}  L={L}{' causal' if causal else ''}  {device}  (ranked by {metric[:-5]})"
        lines.append("")
        lines.append(title)
        lines.append(f"  {'estimator':<18}{'m':>6}{'kernel_rel_mse':>16}{'out_rel_err':>13}{'time_ms':>10}")
        for _, r in g.iterrows():
            lines.append(
                f"  {r['estimator']:<18}{r['num_features']:>6}{_fmt(r['kernel_rel_mse_mean']):>16}"
                f"{_fmt(r['out_rel_err_mean']):>13}{_fmt(r['time_ms_mean'], '.3g'):>10}"
            )
        b = base[
            (base["data"] == data)
            & (base["seq_len"] == L)
            & (base["causal"] == causal)
            & (base["device"] == device)
        ]
        if len(b):
            lines.append(
                "  baselines: "
                + ", ".join(
                    f"{r['estimator']} {_fmt(r['time_ms_mean'], '.3g')} ms"
                    + (
                        f" (out_rel_err {_fmt(r['out_rel_err_mean'], '.3g')})"
                        if r["estimator"] == "uniform"
                        else ""
                    )
                    for _, r in b.iterrows()
                )
            )
    if len(groups) > max_groups:
        lines.append(f"\n... {len(groups) - max_groups} more groups in summary.parquet")
    failed = summary[summary["status"].isin(["error", "oom"])]
    for _, r in failed.head(3).iterrows():
        lines.append(
            f"{r['status']}: {r['estimator']} m={r['num_features']} {r['data']} L={r['seq_len']}: "
            f"{r['message'][:120]}"
        )
    if len(failed) > 3:
        lines.append(f"... and {len(failed) - 3} more failed cells (see the message column)")
    return "\n".join(lines)


def _fmt(x, spec: str = ".3e") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="a suite TOML file, or the name of a ready suite (e.g. quick)")
    parser.add_argument("--out", help="results folder (default: reports/<suite name>)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the suite's device axis")
    parser.add_argument("--resume", action="store_true", help="skip cells already finished in --out")
    parser.add_argument("--shard", metavar="I/N", help="run only shard I of N (1-based)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the suite and list its cells; run nothing"
    )


def main(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    if args.dry_run:
        devices = resolve_devices(suite, args.device)
        cells = plan(suite, prepare_sources(suite), devices)
        shard = parse_shard(args.shard)
        for i, c in enumerate(cells):
            if shard is None or i % shard[1] == shard[0] - 1:
                print(f"{c.cell}  {c.label()}" + (f"  [skip: {c.skip}]" if c.skip else ""))
        print(f"{len(cells)} cells", file=sys.stderr)
        return 0
    out = run_suite(
        suite,
        args.out,
        device=args.device,
        resume=args.resume,
        shard=args.shard,
        progress=False if args.quiet else None,
    )
    summary = store.load_summary(out)
    if not args.quiet:
        print(format_summary(summary))
        print(f"\nresults: {out}")
    n_error = int((summary["status"] == "error").sum())
    if n_error:
        print(
            f"rfbench run: {n_error} cell(s) ended in error; see the message column of {out}/results.parquet",
            file=sys.stderr,
        )
        return 1
    return 0
