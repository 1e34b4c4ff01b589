"""Running one cell: its rows (one per seed) and its cross-seed statistics.

For each estimator cell and seed: draw (``make_estimator``, ``draw_ms``), fit on the cell's
whole q and k at the attention scale (``fit_ms``; data-dependent maps only, also for causal
cells, knowingly), the attention output against float64 exact attention (``out_rel_err``), the
forward time and peak memory (seed 0 only unless ``timing.all_seeds``), and the streamed kernel
metrics of rfbench.metrics over all seeds together (bias2 and mc_variance need them all), with
the closed-form expectation of kernel_rel_mse where one exists (``kernel_rel_mse_theory``, once
per cell; rfbench.metrics.expected).
Estimators whose kernel is not the softmax (DARK, learned ones) are also scored against their
own kernel (``target_*``; NaN where it has no closed form). Baselines (``baselines.py``) are
cells of their own with one run each.

With a ``[fit]`` section every estimator is fitted with ``learning.fit_estimator`` on the fit
part of the cell's tokens only (trained where it has learnable parts, with its validation split
inside that part; fitted the ordinary way otherwise), and everything, baselines included, is
measured on the held-out part (``eval_len`` tokens; ``fit_len`` were fitted on). ``fit_ms``
excludes torch's one-time optimiser set-up. A learned distribution that does not depend on the
estimator's seed (darkl's M, trained with a fixed ``FitConfig.seed``) is fitted once per cell
and copied to the other seeds with their own draw, which is exactly what fitting each anew
gives; their ``fit_ms`` is that one fit's.

Failures: an unsupported estimator/size pair is ``skipped`` with its reasons; running out of
memory is ``oom``; an attention output holding NaN or Inf is ``nonfinite`` (the seed's row keeps
its numbers, with a message counting the bad values); anything else is ``error`` with the
exception's message (``run_cell`` never raises but for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from dataclasses import dataclass, field

import torch

from rfbench import metrics as M
from rfbench.errors import ClippingWarning
from rfbench.suite import baselines
from rfbench.suite import measure as X
from rfbench.suite.plan import Cell, derive_seed
from rfbench.suite.spec_types import Suite

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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
    fit_idx, held_idx = cell.split.fit_idx.to(device), cell.split.held_idx.to(device)
    fit_q, fit_k, fit_v = (x.index_select(-2, fit_idx) for x in (q, k, v))
    q, k, v = (x.index_select(-2, held_idx) for x in (q, k, v))
    return Context(q, k, v, scale, rows_seed, suite, cell.causal, fit_q, fit_k, fit_v)


# --------------------------------------------------------------------------- rows
def seed_rows(suite: Suite, cell: Cell) -> list[dict]:
    """The cell's results rows before measurement: keys filled, status ok."""
    src = cell.source
    base = {
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
        **cell.split.sizes(cell.seq_len, suite.fit is not None),
        "status": "ok",
        "message": "",
    }
    return [{**base, "seed": seed, "seed_index": i} for i, seed in enumerate(cell.seeds)]


def _measure(fn, suite: Suite, device: torch.device, tokens: int, name: str) -> dict:
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
        name=name,
    )
    out.update(
        time_ms=timing.median_ms,
        time_ms_p20=timing.p20_ms,
        time_ms_p80=timing.p80_ms,
        n_rep=timing.n_rep,
        tokens_per_s=tokens / (timing.median_ms / 1e3) if timing.median_ms > 0 else math.nan,
        time_samples_ms=_json_ms(timing.samples_ms),
        time_cv=timing.cv,
        ref_ms=timing.ref_ms,
        ref_samples_ms=_json_ms(timing.ref_samples_ms),
        cpu_ms=timing.cpu_ms,
        cpu_cv=timing.cpu_cv,
        cpu_samples_ms=_json_ms(timing.cpu_samples_ms),
        ref_cpu_ms=timing.ref_cpu_ms,
        ref_cpu_samples_ms=_json_ms(timing.ref_cpu_samples_ms),
    )
    if t.memory:
        out["peak_mem_bytes"] = float(X.peak_memory(fn, device, name=name))
    return out


def _json_ms(samples) -> str:
    """Raw samples as a JSON list of milliseconds, to the nanosecond (the timer's resolution)."""
    return json.dumps([round(float(x), 6) for x in samples])


def _note_nonfinite(row: dict, out: torch.Tensor) -> None:
    """Status "nonfinite" and a message when the attention output holds NaN or Inf (issue 15)."""
    msg = X.nonfinite_message(out)
    if msg:
        row["status"] = "nonfinite"
        row["message"] = "; ".join(filter(None, [row.get("message", ""), msg]))


# --------------------------------------------------------------------------- baselines
def run_baseline_cell(cell: Cell, ctx: Context, suite: Suite) -> tuple[list[dict], dict]:
    q = ctx.q
    fn = baselines.get(cell.name).make(q, ctx.k, ctx.v, ctx.scale, cell.causal)
    row = seed_rows(suite, cell)[0]
    row["target"] = "softmax"
    out = fn()
    _note_nonfinite(row, out)
    if suite.metrics.output:
        row["out_rel_err"] = M.relative_error(out, ctx.out_ref)
    del out
    row.update(_measure(fn, suite, q.device, cell.source.batch * cell.source.heads * q.shape[-2], cell.name))
    return [row], {}


# --------------------------------------------------------------------------- estimators
def run_estimator_cell(cell: Cell, ctx: Context, suite: Suite) -> tuple[list[dict], dict]:
    from rfbench import registry
    from rfbench.registry import make_estimator

    spec = cell.estimator
    # Import the components' modules first, so that the first seed's draw_ms is not an import time.
    registry.feature_map_class(spec.feature_map)
    registry.weight_matrix_class(spec.weight_matrix)
    rows = seed_rows(suite, cell)
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
            for col in ("fit_ms", "fit_best_step", "fit_stopped", "message"):
                row[col] = shared[1][col]
        elif suite.fit is not None:
            with _clipping_noted(row):
                res = _fit(est, row, ctx, suite, device)
            if len(res.curve):
                curves.append(res.curve.assign(seed_index=i, seed=row["seed"]))
            if res.trained and res.seed_independent:
                shared = (est, row)
        elif est.feature_map.data_dependent:
            with _clipping_noted(row):
                _, row["fit_ms"] = X.timed_call(lambda est=est: est.fit(q, k, scale=scale), device)
        row["target"] = est.target
        ests.append(est)

        def forward(est=est):  # inputs validated once below: the timed loop skips the NaN/Inf scan
            return est.attention(q, k, v, causal, scale=scale, check=False)

        out = est.attention(q, k, v, causal, scale=scale)  # checked: validates q, k, v once
        _note_nonfinite(row, out)
        if suite.metrics.output:
            row["out_rel_err"] = M.relative_error(out, ctx.out_ref)
            if est.target != "softmax":
                ref = _target_output(est, ctx, causal, target_refs)
                row["target_out_rel_err"] = math.nan if ref is None else M.relative_error(out, ref)
        del out
        if i == 0 or suite.timing.all_seeds:
            row.update(_measure(forward, suite, device, tokens, cell.name))
    stats: dict = {}
    if curves:
        stats["fit_curves"] = curves
    if suite.metrics.kernel or suite.metrics.attention_matrix:
        stats.update(_kernel_metrics(ests, rows, ctx, suite, causal))
    return rows, stats


def _kernel_metrics(ests: list, rows: list[dict], ctx: Context, suite: Suite, causal: bool) -> dict:
    """Fill the rows' streamed kernel metrics; return the cell's cross-seed statistics."""
    rows_idx = None if ctx.rows is None else ctx.rows.to(ctx.q.device)
    if suite.metrics.kernel:  # the same for every seed: once per cell (NaN without a closed form)
        theory = M.expected_kernel_rel_mse(ests[0], ctx.q, ctx.k, scale=ctx.scale, rows=rows_idx)
    ke = M.kernel_errors(
        ests,
        ctx.q,
        ctx.k,
        scale=ctx.scale,
        rows=rows_idx,
        causal=causal,
        attention_matrix=suite.metrics.attention_matrix,
        row_lse=ctx.row_lse if suite.metrics.attention_matrix else None,
        tile=suite.metrics.tile,
    )
    for i, row in enumerate(rows):
        if suite.metrics.kernel:
            row["kernel_mse"], row["kernel_rel_mse"] = ke.kernel_mse[i], ke.kernel_rel_mse[i]
            row["kernel_rel_mse_theory"] = theory
            if ke.target_kernel_rel_mse is not None:
                row["target_kernel_rel_mse"] = ke.target_kernel_rel_mse[i]
        if ke.attn_mse is not None:
            row["attn_mse"] = ke.attn_mse[i]
    if not suite.metrics.kernel:
        return {}
    return dict(
        bias2=ke.bias2,
        mc_variance=ke.mc_variance,
        bias2_rel=ke.bias2_rel,
        mc_variance_rel=ke.mc_variance_rel,
        n_pairs=ke.n_pairs,
    )


@contextlib.contextmanager
def _clipping_noted(row: dict):
    """Write the ClippingWarnings of a fit (DARK's clipped proposal or floored whitening) into the
    row's message, each once; the status stays ok. Other warnings pass on unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClippingWarning)
        yield
    notes = []
    for w in caught:
        if issubclass(w.category, ClippingWarning):
            if str(w.message) not in notes:
                notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if notes:
        row["message"] = "; ".join(filter(None, [row.get("message", ""), *notes]))


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
    from rfbench.metrics import same_target

    for other, ref in cache:
        if same_target(other, est):
            return ref
    ref = target_attention(est, ctx.q, ctx.k, ctx.v, scale=ctx.scale, causal=causal, dtype=torch.float64)
    cache.append((est, ref))
    return ref


# --------------------------------------------------------------------------- one cell
def run_cell(cell: Cell, ctx_holder: dict, suite: Suite) -> tuple[list[dict], dict]:
    """Run one cell, turning every failure into rows with a status; never raises (but Ctrl-C)."""
    if cell.skip:
        rows = seed_rows(suite, cell)
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
    rows = seed_rows(suite, cell)
    for row in rows:
        row.update(status=failure[0], message=failure[1])
    return rows, {}
