"""Fitting kernel learners (FastFood-L, DARK with learned M) on one part of the data.

    cfg = FitConfig(objective="attention", steps=200, lr=0.01)
    res = fit_estimator(est, q_train, k_train, v_train, cfg, scale=capture.scale)
    res.estimator.attention(q_held, k_held, v_held, scale=capture.scale)   # learned parameters
    res.curve                                                               # step, train_loss, val_loss

A kernel learner changes the kernel or its sampling distribution using data, so it must be
fitted on one part of the data and measured on another (else it measures memorisation). The
caller keeps a held-out part for measurement (``FitSpec.holdout_ranges``); ``fit_estimator``
splits what it is given once more into train / validation tokens (``split_ranges``, or the
``split`` the caller computed once), trains on the former and early-stops on the latter.

What trains is what the components declare: a feature map or weight matrix whose class sets
``learnable = True`` implements the learnable protocol (the estimator's state changes, the
components never do):

- feature map: ``learnable_params(params, draw) -> Params``, the tensors that train (their
  starting values, from the fitted ones and, for a map that ``learns_draw`` such as Hedgehog's
  layer, from the draw; the other fitted tensors stay fixed), and ``trained_target(params) ->
  TargetKernel``, the kernel the estimator approximates once they are trained;
- weight matrix: ``learnable_draw(m, d, *, generator, device, dtype) -> (tensors, build)``, the
  starting values of its trainable tensors for the draw ``sample(m, d, generator=...)`` gives,
  and ``build(tensors) -> W [m, d]`` rebuilding that draw from them (differentiably); and
  ``trained_target(params) -> TargetKernel``.

Trained values live in ``est.params_`` / ``est.draw_``; ``est.trained_`` (a
``rfbench.features.target.Trained``) records which parts were trained ("features", "weights")
and the target kernel they give.

Randomness during training (``FitConfig.redraw``). ``darkl`` learns a *distribution* (omega =
M^T w, w ~ N(0, I)): its random vectors are redrawn at every step (default), so M is trained for
any draw; training against one fixed draw lets M fit that draw's accidents (the loss falls on
that draw, not on the next) and an MC variance on one draw is not a variance. ``fastfoodl``
learns the *draw itself* (S, G, B of one FastFood matrix; Pi fixed), as in Chowdhury et al.:
there is nothing to redraw, and held-out early stopping is what guards against overfitting; so
for a feature map that ``learns_draw`` (Hedgehog: its layer starts from the draw and trains).
Validation losses use fixed draws (``val_draws`` of them, the same at every evaluation), so the
validation curve moves only with the parameters.

Estimators without learnable parts are fitted the ordinary way (``est.fit`` on all the tokens
given: DARK whitening, the DARKIS proposal, OPRF's A*), with an empty curve, so a runner can call
``fit_estimator`` for every estimator of a suite.

The estimator is used duck-typed (annotated ``EstimatorLike``): this package never imports
``rfbench.estimator``, which imports it lazily for ``Estimator.fit(train=...)``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable

import pandas as pd
import torch

from rfbench._checks import check_qkv
from rfbench.errors import DataError, EstimatorError, SpecError
from rfbench.features.target import Trained
from rfbench.learning.config import FitConfig, TokenSplit, split_ranges
from rfbench.learning.objectives import EstimatorLike, Objective

#: Seeds of the fixed validation draws start here (far from the estimator seeds of a suite).
VAL_SEED_BASE = 1_000_003


@dataclasses.dataclass
class FitResult:
    """What ``fit_estimator`` returns.

    estimator: the fitted estimator (``params_`` / ``draw_`` hold the learned values, for ``scale``).
    curve: DataFrame with one row per step: step (0 = before training), train_loss (NaN at 0),
        val_loss (NaN where not evaluated).
    fit_ms: wall-clock time of the whole fit, in milliseconds.
    best_step: the step whose parameters were kept (0: the initial ones were best or nothing trained).
    target: the kernel the fitted estimator approximates (``estimator.target``).
    trained: whether anything was trained (False for estimators without learnable parts).
    stopped: "steps" (ran them all), "patience" (early stop), "diverged" (non-finite loss), or
        "not trainable".
    objective, n_train, n_val: as used.
    seed_independent: the fitted parameters do not depend on the estimator's seed (nothing
        trained, or a learned distribution such as darkl's M trained with a fixed
        ``FitConfig.seed`` and redraws), so estimators of other seeds may share them: a copy of
        the fitted estimator, ``redraw(seed)``, is what fitting it anew would give.
    """

    estimator: EstimatorLike
    curve: pd.DataFrame
    fit_ms: float
    best_step: int
    target: str
    trained: bool
    stopped: str
    objective: str
    n_train: int
    n_val: int
    seed_independent: bool = False

    @property
    def init_val_loss(self) -> float:
        return float(self.curve["val_loss"].iloc[0]) if len(self.curve) else math.nan

    @property
    def best_val_loss(self) -> float:
        """The validation loss of the parameters kept (those of ``best_step``)."""
        if not len(self.curve):
            return math.nan
        return float(self.curve.loc[self.curve["step"] == self.best_step, "val_loss"].iloc[0])


# --------------------------------------------------------------------------- honest references
def _cast(est: EstimatorLike, x: torch.Tensor) -> torch.Tensor:
    return x.to(device=est.device, dtype=est.compute_dtype)


def target_inputs(est: EstimatorLike, q: torch.Tensor, k: torch.Tensor, *, scale: float):
    """``(q', k')`` with target kernel exp(q' . k') for the inputs at ``scale``, or None.

    ``est.target_kernel.exponential_inputs`` of q * scale**0.5 and k * scale**0.5: themselves for
    the softmax kernel, (Mq, Mk) for DARK's exp(q^T M^T M k). None when the target is not of that
    form (an arc-cosine kernel) or has no closed form (a trained FastFood-L's learned kernel).
    Data-dependent estimators must be fitted at ``scale``.
    """
    _fitted_params(est, scale, "target_inputs")
    s = math.sqrt(scale)
    return est.target_kernel.exponential_inputs(_cast(est, q) * s, _cast(est, k) * s)


def _fitted_params(est: EstimatorLike, scale: float, what: str) -> dict:
    if not est.feature_map.data_dependent:
        return {}
    if est.params_ is None or est.fit_scale_ is None or not math.isclose(est.fit_scale_, scale):
        raise EstimatorError(
            f"{what}: {est.name} has data-dependent parameters and is not fitted at scale={scale:.6g}; "
            f"call est.fit(q, k, scale={scale:.6g}) first"
        )
    return est.params_


def target_attention(
    est: EstimatorLike, q, k, v, *, scale: float, causal: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """Exact attention under the estimator's own target kernel (None: no closed form).

    softmax_j(log k(q'_i, k'_j)) v with q' = q * scale**0.5 and ``log_kernel`` of
    ``est.target_kernel``: ``exact.attention(q, k, v, causal, scale=scale)`` for a softmax-target
    estimator; softmax((Mq)(Mk)^T * scale) v for DARK / darkl (aligned), what their estimate is
    unbiased for. ``dtype``: the accumulation dtype of the reference (float64 for a metric's
    oracle). Data-dependent estimators must be fitted at ``scale``.
    """
    from rfbench import exact

    target = est.target_kernel
    if target.log_kernel is None:
        return None
    _fitted_params(est, scale, "target_attention")
    with torch.no_grad():
        s = math.sqrt(scale)
        qs, ks, vc = _cast(est, q) * s, _cast(est, k) * s, _cast(est, v)
        if target.is_softmax:
            return exact.attention(qs, ks, vc, causal, scale=1.0, dtype=dtype)
        return exact.attention(qs, ks, vc, causal, dtype=dtype, log_kernel=target.log_kernel)


# --------------------------------------------------------------------------- fitting
@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``fit_estimator`` trains: which components learn, and whether draws are redrawn."""

    features: bool
    weights: bool
    redraw: bool


def check_config(est: EstimatorLike, config: FitConfig) -> None:
    """Raise EstimatorError when ``config`` cannot fit ``est`` (e.g. a variance objective for a
    learner of its own kernel, or redraws for FastFood-L), values v being given."""
    _plan(est, config, v=True)


def _plan(est: EstimatorLike, cfg: FitConfig, v) -> _Plan:
    """The learnable parts of ``est`` (declared by its components); EstimatorError for
    impossible combinations."""
    fm_learns, wm_learns = bool(est.feature_map.learnable), bool(est.weight_matrix.learnable)
    if cfg.objective == "attention" and v is None:
        raise EstimatorError("fit objective 'attention' needs values v: pass v, or use objective 'kernel'")
    if cfg.objective == "variance" and (fm_learns or wm_learns):
        # The variance is a fixed target's only when the map learns a sampling distribution for
        # the softmax kernel and states its second moment in closed form.
        fixed = (
            fm_learns
            and not wm_learns
            and est.target == "softmax"  # the declared name: known before anything is fitted
            and callable(getattr(est.feature_map, "log_second_moment", None))
        )
        if not fixed:
            raise EstimatorError(
                f"fit objective 'variance' needs an estimator whose target kernel stays fixed while it "
                f"learns and whose variance has a closed form (darkl with mode='is'); {est.name} "
                f"learns its kernel (target {est.target!r}), which a variance objective would shrink to a "
                "constant. Use objective 'kernel' or 'attention'"
            )
    if cfg.objective == "crossentropy" and (fm_learns or wm_learns) and not est.feature_map.positive:
        raise EstimatorError(
            f"fit objective 'crossentropy' needs positive features (attention weights to take the log of); "
            f"{est.feature_map.name} has signed ones. Use objective 'attention' or 'kernel'"
        )
    learns_draw = wm_learns or (fm_learns and bool(getattr(est.feature_map, "learns_draw", False)))
    redraw = cfg.redraw
    if redraw is None:
        redraw = fm_learns and not learns_draw
    if redraw and learns_draw:
        owner = est.weight_matrix.name if wm_learns else est.feature_map.name
        raise EstimatorError(
            f"{est.name}: fit redraw=true cannot be used with {owner}, which learns its "
            "draw (redrawing would discard what it learns); use redraw=false or leave it out"
        )
    return _Plan(fm_learns, wm_learns, bool(redraw))


def _progress(progress, steps: int):
    """A callable(step, train, val) and a closer, from ``progress`` (None: a bar on a terminal only)."""
    if callable(progress):

        def call(step, tr, va):
            progress({"step": step, "train_loss": tr, "val_loss": va})

        return call, (lambda: None)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return (lambda *a: None), (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="fit", leave=False)

    def update(step, tr, va):
        bar.update(1)
        bar.set_postfix(train=f"{tr:.4g}", val=f"{va:.4g}" if va == va else "-")

    return update, bar.close


_WARM = False


def warm_up() -> None:
    """Pay torch's one-time set-up of autograd and Adam (about 1.4 s on first use on a CPU).

    Called by the runner before its first timed fit, so ``fit_ms`` times the fit alone. Cheap
    after the first call.
    """
    global _WARM
    if _WARM:
        return
    with torch.inference_mode(False), torch.enable_grad():
        w = torch.zeros(2, requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.1)
        (w * w + w).sum().backward()
        opt.step()
    _WARM = True


def fit_estimator(
    est: EstimatorLike,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    config: FitConfig | None = None,
    *,
    scale: float,
    progress: bool | Callable[[dict], None] | None = None,
    split: TokenSplit | None = None,
) -> FitResult:
    """Fit ``est`` on the tokens given (the caller keeps its held-out part apart).

    q, k ``[..., L, d]`` (the same L: one token stream), v ``[..., L, dv]`` (needed by the
    attention objective). ``scale`` is the attention's logit scale (``capture.scale``, or
    1/sqrt(d)); the learned parameters are for that scale. The parts the components declare
    learnable (``darkl``'s M, ``fastfoodl``'s S, G, B) are trained by Adam on the train split,
    with the validation split for early stopping and for choosing the step whose parameters are
    kept. ``split``: the train / validation split of these L tokens if already computed
    (``FitSpec.validation_ranges``); by default it is computed from ``config``. ``progress``:
    None (a bar when stderr is a terminal), True/False, or a callable receiving
    ``{"step", "train_loss", "val_loss"}`` each step. Modifies and returns ``est`` (in the result).
    """
    cfg = FitConfig() if config is None else config
    if not isinstance(cfg, FitConfig):
        raise SpecError(f"config must be a FitConfig, got {type(cfg).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
        raise EstimatorError(f"scale must be a positive number (the attention's logit scale), got {scale!r}")
    check_qkv(q, k, v, dim=est.dim)
    if q.shape[-2] != k.shape[-2]:
        raise DataError(
            "fit_estimator splits one token stream: q and k need the same L, got "
            f"{q.shape[-2]} and {k.shape[-2]}"
        )
    if split is not None and (not isinstance(split, TokenSplit) or split.L != q.shape[-2]):
        raise DataError(f"split must be a TokenSplit of the L={q.shape[-2]} tokens given, got {split!r}")
    plan = _plan(est, cfg, v)
    # Training needs autograd even when called under no_grad or inference_mode (as the runner's
    # measurements are); tensors made in inference mode cannot be saved for backward: copy them.
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v = (None if x is None else x.clone() if x.is_inference() else x for x in (q, k, v))
        draw = est.draw_
        if draw is not None and (
            draw.W.is_inference() or (draw.row_weights is not None and draw.row_weights.is_inference())
        ):
            rw = None if draw.row_weights is None else draw.row_weights.clone()
            est.draw_ = dataclasses.replace(draw, W=draw.W.clone(), row_weights=rw)
        return _fit(est, q, k, v, cfg, float(scale), plan, progress, split)


def _fit_plainly(est: EstimatorLike, q, k, cfg: FitConfig, scale: float, t0: float) -> FitResult:
    """Nothing learnable: the ordinary fit on all the tokens given, an empty curve."""
    if est.feature_map.data_dependent:
        est.fit(q, k, scale=scale)
    curve = pd.DataFrame(
        {
            "step": pd.Series(dtype="int64"),
            "train_loss": pd.Series(dtype="float64"),
            "val_loss": pd.Series(dtype="float64"),
        }
    )
    ms = (time.perf_counter() - t0) * 1e3
    return FitResult(
        est,
        curve,
        ms,
        0,
        est.target,
        False,
        "not trainable",
        cfg.objective,
        q.shape[-2],
        0,
        seed_independent=True,
    )


def _fit(est, q, k, v, cfg: FitConfig, scale: float, plan: _Plan, progress, split) -> FitResult:
    t0 = time.perf_counter()
    L = q.shape[-2]
    q, k = _cast(est, q), _cast(est, k)
    v = None if v is None else _cast(est, v)
    if not (plan.features or plan.weights):
        return _fit_plainly(est, q, k, cfg, scale, t0)

    if split is None:
        split = split_ranges(L, cfg.val_fraction, split=cfg.split, n_blocks=cfg.n_blocks)
    tr_idx, va_idx = split.indices()

    def take(x, idx):
        return None if x is None else x.index_select(-2, idx.to(x.device))

    q_tr, k_tr, v_tr = take(q, tr_idx), take(k, tr_idx), take(v, tr_idx)
    q_va, k_va, v_va = take(q, va_idx), take(k, va_idx), take(v, va_idx)

    # Initial (data-dependent) parameters from the training tokens only.
    if est.feature_map.data_dependent:
        est.fit(q_tr, k_tr, scale=scale)
    fixed_params = dict(est.params_ or {})
    # The components' learnable tensors (their starting values): leaves that Adam trains.
    trainable: dict[str, torch.Tensor] = {}
    if plan.features:
        start = est.feature_map.learnable_params(fixed_params, est.draw_)
        trainable = {key: t.detach().clone().requires_grad_(True) for key, t in start.items()}
    factors: dict[str, torch.Tensor] = {}
    build = None
    orig_seed, orig_draw = est.seed, est.draw_
    if plan.weights:
        start, build = est.weight_matrix.learnable_draw(
            est.num_features,
            est.dim,
            generator=torch.Generator().manual_seed(est.seed),
            device=est.device,
            dtype=est.compute_dtype,
        )
        factors = {key: t.detach().clone().requires_grad_(True) for key, t in start.items()}
        with torch.no_grad():
            if not torch.allclose(build(factors), orig_draw.W, rtol=1e-5, atol=1e-5):  # a bug, not the user's
                raise AssertionError(
                    f"{est.weight_matrix.name}: its learnable tensors do not rebuild its draw"
                )
    parameters = [*trainable.values(), *factors.values()]
    if not parameters:
        raise EstimatorError(f"{est.name}: nothing to train (no trainable parameter)")

    def install():
        """Point the estimator at the current (grad-carrying) parameters."""
        est.params_ = {**fixed_params, **trainable}
        est.fit_scale_ = float(scale)
        if build is not None:
            est.draw_ = dataclasses.replace(orig_draw, W=build(factors))

    def snapshot():
        return {key: t.detach().clone() for key, t in (*trainable.items(), *factors.items())}

    loss_fn = Objective(est, cfg.objective, float(scale))
    train_seed = est.seed if cfg.seed is None else cfg.seed
    gen = torch.Generator().manual_seed(train_seed)
    n_tr = q_tr.shape[-2]
    redraw = plan.redraw
    val_seeds = [VAL_SEED_BASE + i for i in range(cfg.val_draws if redraw else 1)]
    ref_va = None
    if cfg.objective == "attention":
        from rfbench import exact

        ref_va = exact.attention(q_va, k_va, v_va, scale=scale)

    def val_loss() -> float:
        with torch.no_grad():
            install()
            if not redraw or cfg.objective == "variance":
                return float(loss_fn(q_va, k_va, v_va, ref_va))
            losses = []
            for s in val_seeds:
                est.redraw(s)
                losses.append(float(loss_fn(q_va, k_va, v_va, ref_va)))
            return sum(losses) / len(losses)

    opt = torch.optim.Adam(parameters, lr=cfg.lr)
    rows = [(0, math.nan, val_loss())]
    best, best_step, best_state, bad, stopped = rows[0][2], 0, snapshot(), 0, "steps"
    if not math.isfinite(best):
        raise EstimatorError(
            f"{est.name}: the initial validation {cfg.objective} loss is not finite ({best}); the init does "
            "not suit this data (e.g. a proposal with an eigenvalue <= 1/2 has infinite IS variance)"
        )
    update, close = _progress(progress, cfg.steps)
    try:
        for step in range(1, cfg.steps + 1):
            if redraw:
                est.redraw(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            if n_tr > cfg.batch_tokens:
                idx = torch.randperm(n_tr, generator=gen)[: cfg.batch_tokens].sort().values
                qb, kb, vb = take(q_tr, idx), take(k_tr, idx), take(v_tr, idx)
            else:
                qb, kb, vb = q_tr, k_tr, v_tr
            install()
            loss = loss_fn(qb, kb, vb)
            train = float(loss.detach())
            if not math.isfinite(train):
                rows.append((step, train, math.nan))
                stopped = "diverged"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            va = math.nan
            if step % cfg.eval_every == 0 or step == cfg.steps:
                va = val_loss()
                if va < best * (1 - cfg.min_delta):
                    best, best_step, best_state, bad = va, step, snapshot(), 0
                else:
                    bad += 1
            rows.append((step, train, va))
            update(step, train, va)
            if cfg.patience and bad >= cfg.patience:
                stopped = "patience"
                break
    finally:
        close()

    # Keep the best parameters; put the estimator's own draw back (or the learned one).
    with torch.no_grad():
        best_params = {key: best_state[key] for key in trainable}
        est.params_ = {**fixed_params, **best_params} or None
        est.fit_scale_ = float(scale)
        est.seed = orig_seed
        est.draw_ = orig_draw
        if build is not None and best_step > 0:
            note = f"{est.weight_matrix.name}: {', '.join(factors)} trained, {cfg.objective} objective"
            W = build({key: best_state[key] for key in factors}).detach()
            est.draw_ = dataclasses.replace(orig_draw, W=W, notes=(*orig_draw.notes, note))
    if best_step > 0:
        _mark_trained(est, plan)
    curve = pd.DataFrame(rows, columns=["step", "train_loss", "val_loss"])
    return FitResult(
        est,
        curve,
        (time.perf_counter() - t0) * 1e3,
        best_step,
        est.target,
        True,
        stopped,
        cfg.objective,
        int(n_tr),
        int(q_va.shape[-2]),
        seed_independent=not plan.weights and redraw and cfg.seed is not None,
    )


def _mark_trained(est: EstimatorLike, plan: _Plan) -> None:
    """Record on the estimator what was trained and the target kernel it now approximates.

    A trained weight matrix changes the kernel of whatever map it is paired with, so its
    declared target (e.g. FastFood-L's learned spectral kernel, no closed form) wins.
    """
    params = est.params_ or {}
    parts = tuple(p for p, on in (("features", plan.features), ("weights", plan.weights)) if on)
    owner = est.weight_matrix if plan.weights else est.feature_map
    est.trained_ = Trained(parts=parts, target=owner.trained_target(params))
