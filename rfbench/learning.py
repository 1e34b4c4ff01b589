"""Fitting kernel learners (FastFood-L, DARK with learned M) on one part of the data.

    cfg = FitConfig(objective="attention", steps=200, lr=0.01)
    res = fit_estimator(est, q_train, k_train, v_train, cfg, scale=capture.scale)
    res.estimator.attention(q_held, k_held, v_held, scale=capture.scale)   # learned parameters
    res.curve                                                               # step, train_loss, val_loss

A kernel learner changes the kernel or its sampling distribution using data, so it must be
fitted on one part of the data and measured on another (else it measures memorisation). The
caller keeps a held-out part for measurement (``split_tokens`` with ``split="tail"``);
``fit_estimator`` splits what it is given once more into train / validation tokens, trains on
the former and early-stops on the latter.

Splits are contiguous blocks of tokens, never random single tokens: neighbouring tokens of a
text are strongly correlated (shared context, near-identical keys), so a random token split
would put near-copies of validation tokens in the training set. ``"blocks"`` cuts the sequence
into ``n_blocks`` equal contiguous blocks and validates on evenly spaced ones (positions spread
over the sequence); ``"tail"`` validates on the last block (one boundary, contiguous, causal-safe).

Objectives (``FitConfig.objective``), each a loss on a batch of training tokens used both as
queries and keys, at the attention scale (the estimator sees x * scale**0.5):

- ``"attention"``: |out - out_exact|_F^2 / |out_exact|_F^2, out_exact the exact softmax attention
  of the batch (needs v): the squared ``out_rel_err`` of the results.
- ``"kernel"``: relative MSE of the kernel estimate against exp(q . k * scale), per leading index
  (head), sum_ij (K_hat - K)^2 / sum_ij K^2, averaged over heads: ``kernel_rel_mse``.
- ``"variance"``: the estimator's variance about a target kernel that does not move while it
  learns, in closed form (``log_second_moment`` of the feature map: i.i.d. rows, Var1 / m),
  relative as above. Only ``darkl`` with ``mode="is"`` (a learned proposal for exp(q . k)) has
  one; a map that learns its kernel would minimise it by shrinking the kernel to a constant.

Randomness during training (``FitConfig.redraw``). ``darkl`` learns a *distribution* (omega =
M^T w, w ~ N(0, I)): its random vectors are redrawn at every step (default), so M is trained for
any draw; training against one fixed draw lets M fit that draw's accidents (the loss falls on
that draw, not on the next) and an MC variance on one draw is not a variance. ``fastfoodl``
learns the *draw itself* (S, G, B of one FastFood matrix; Pi fixed), as in Chowdhury et al.:
there is nothing to redraw, and held-out early stopping is what guards against overfitting.
Validation losses use fixed draws (``val_draws`` of them, the same at every evaluation), so the
validation curve moves only with the parameters.

Estimators without learnable parts are fitted the ordinary way (``est.fit`` on all the tokens
given: DARK whitening, the DARKIS proposal, OPRF's A*), with an empty curve, so a runner can call
``fit_estimator`` for every estimator of a suite.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from rfbench import exact
from rfbench._checks import check_qkv
from rfbench.errors import DataError, EstimatorError, SpecError
from rfbench.estimator import Estimator
from rfbench.weights.base import WeightDraw

OBJECTIVES = ("attention", "kernel", "variance")
SPLITS = ("blocks", "tail")
#: Seeds of the fixed validation draws start here (far from the estimator seeds of a suite).
VAL_SEED_BASE = 1_000_003


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How to fit a kernel learner. Validated on construction (SpecError naming the field).

    objective: "attention" | "kernel" | "variance" (see the module docstring).
    steps: optimiser steps (Adam), > 0.
    lr: Adam learning rate, > 0.
    batch_tokens: training tokens per step (queries and keys); all of them when fewer.
    val_fraction: share of the tokens given that validates, in (0, 1).
    split: "blocks" (evenly spaced contiguous blocks) or "tail" (the last block).
    n_blocks: number of contiguous blocks for split="blocks" (>= 2).
    eval_every: steps between validation evaluations (>= 1).
    patience: evaluations without improvement before stopping; 0 never stops early.
    min_delta: relative improvement of the validation loss that counts (>= 0).
    val_draws: fixed draws averaged for each validation loss (>= 1; used when redrawing).
    redraw: redraw the random vectors every step; None picks per estimator (True for a learned
        distribution such as darkl, False for fastfoodl, which learns its draw).
    seed: seed of the training randomness (batch order, redraws). Fixed (0) by default, so a
        learned distribution (darkl's M) is the same for every estimator seed of a cell: the seeds
        then measure the spread over random features alone, as for every other estimator, and
        share one target kernel. None uses the estimator's seed (fastfoodl's initial draw always
        comes from the estimator's seed).
    """

    objective: str = "attention"
    steps: int = 200
    lr: float = 0.01
    batch_tokens: int = 256
    val_fraction: float = 0.2
    split: str = "blocks"
    n_blocks: int = 8
    eval_every: int = 10
    patience: int = 5
    min_delta: float = 0.0
    val_draws: int = 4
    redraw: bool | None = None
    seed: int | None = 0

    def __post_init__(self):
        def bad(key: str, message: str):
            err = SpecError(f"fit {key} {message}")
            err.key, err.detail = key, message  # from_dict names the key path with them
            raise err

        if self.objective not in OBJECTIVES:
            bad("objective", f"must be one of {', '.join(map(repr, OBJECTIVES))}, got {self.objective!r}")
        if self.split not in SPLITS:
            bad("split", f"must be one of {', '.join(map(repr, SPLITS))}, got {self.split!r}")
        for name, low in (
            ("steps", 1),
            ("batch_tokens", 2),
            ("n_blocks", 2),
            ("eval_every", 1),
            ("patience", 0),
            ("val_draws", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                bad(name, f"must be an integer >= {low}, got {value!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
                bad(name, f"must be a number in ({lo}, {hi}), got {value!r}")
        if (
            isinstance(self.min_delta, bool)
            or not isinstance(self.min_delta, (int, float))
            or not (0 <= self.min_delta < 1)
        ):
            bad("min_delta", f"must be a number in [0, 1), got {self.min_delta!r}")
        if self.redraw is not None and not isinstance(self.redraw, bool):
            bad("redraw", f"must be true, false or absent (per estimator), got {self.redraw!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"must be an integer or absent (the estimator's), got {self.seed!r}")
        if self.split == "blocks" and max(1, round(self.n_blocks * self.val_fraction)) >= self.n_blocks:
            bad(
                "val_fraction",
                f"= {self.val_fraction} leaves no training block of n_blocks = {self.n_blocks}; "
                "lower it or raise n_blocks",
            )
        # One spelling of each number: `lr = 1` and `lr = 1.0` are the same config (and cell key).
        for name in ("lr", "val_fraction", "min_delta"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_dict(cls, table: dict[str, Any], where: str = "fit") -> FitConfig:
        """Build from a suite's ``[fit]`` table; unknown keys raise SpecError listing the known ones."""
        if not isinstance(table, dict):
            raise SpecError(f"{where} must be a table, got {type(table).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; known: {', '.join(known)}")
        try:
            return cls(**table)
        except SpecError as exc:
            if hasattr(exc, "key"):
                raise SpecError(f"{where}.{exc.key}: {exc.detail}") from None
            raise SpecError(f"{where}: {exc}") from None


def check_config(est: Estimator, config: FitConfig) -> None:
    """Raise EstimatorError when ``config`` cannot fit ``est`` (e.g. a variance objective for a
    learner of its own kernel, or redraws for FastFood-L), values v being given."""
    _check_learnable(est, config, v=True)


HOLDOUT_KEYS = ("holdout", "holdout_split")


@dataclasses.dataclass(frozen=True)
class FitSpec:
    """A suite's ``[fit]`` section: which tokens are held out for measurement, and how to fit.

        [fit]
        holdout = 0.25            # share of each cell's tokens kept for measurement, in (0, 1)
        holdout_split = "tail"    # "tail" (the last tokens: contiguous, causal-safe) | "blocks"
        objective = "attention"   # and any other FitConfig key (steps, lr, batch_tokens, ...)
        [fit.estimators."darkl-iid"]   # per-estimator overrides of FitConfig keys
        objective = "variance"

    The runner fits every estimator of a cell (``fit_estimator``) on the first part and measures
    everything (the estimators and the baselines) on the held-out part only. A "blocks" holdout
    cuts the tokens into the section's ``n_blocks`` blocks (the same key as the validation split
    inside the fit part); its held-out blocks are measured together as one sequence.
    """

    holdout: float = 0.25
    holdout_split: str = "tail"
    config: FitConfig = FitConfig()
    overrides: tuple[tuple[str, FitConfig], ...] = ()

    def config_for(self, estimator: str) -> FitConfig:
        """The FitConfig of ``estimator`` (its override, else the section's)."""
        return dict(self.overrides).get(estimator, self.config)

    def split(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fit_idx, held_idx)`` token indices of a cell of ``L`` tokens."""
        return split_tokens(L, self.holdout, split=self.holdout_split, n_blocks=self.config.n_blocks)


def parse_fit_section(table, *, where: str = "fit", estimators=None) -> FitSpec:
    """Validate a suite's ``[fit]`` table into a FitSpec; SpecError naming ``where.key`` otherwise.

    ``estimators``: the suite's estimator names, to check the names of per-estimator overrides.
    """
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table, got {type(table).__name__}")
    fields = [f.name for f in dataclasses.fields(FitConfig)]
    allowed = [*HOLDOUT_KEYS, *fields, "estimators"]
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    holdout = table.get("holdout", 0.25)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise SpecError(
            f"{where}.holdout: expected a number in (0, 1) (share of tokens held out), got {holdout!r}"
        )
    split = table.get("holdout_split", "tail")
    if split not in SPLITS:
        raise SpecError(f"{where}.holdout_split: expected one of {', '.join(SPLITS)}, got {split!r}")
    base_keys = {key: value for key, value in table.items() if key in fields}
    base = FitConfig.from_dict(base_keys, where)
    per = table.get("estimators", {})
    if not isinstance(per, dict):
        raise SpecError(f"{where}.estimators: expected a table of tables keyed by estimator name")
    overrides = []
    for name, sub in per.items():
        p = f"{where}.estimators.{name}"
        if estimators is not None and name not in estimators:
            raise SpecError(f"{p}: not an estimator of this suite; its estimators: {', '.join(estimators)}")
        if not isinstance(sub, dict):
            raise SpecError(f"{p}: expected a table of FitConfig keys, got {sub!r}")
        FitConfig.from_dict(sub, p)  # unknown keys named with their own path
        overrides.append((name, FitConfig(**{**base_keys, **sub})))
    return FitSpec(float(holdout), split, base, tuple(overrides))


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

    estimator: Estimator
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


# --------------------------------------------------------------------------- splits
def split_tokens(
    L: int, val_fraction: float, *, split: str = "blocks", n_blocks: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx)``: sorted token indices of a contiguous-block split of ``L`` tokens.

    "tail": the last round(L * val_fraction) tokens. "blocks": ``n_blocks`` contiguous blocks of
    (nearly) equal size, of which round(n_blocks * val_fraction) (at least 1), evenly spaced,
    validate. Raises SpecError when either part would be empty.
    """
    if split not in SPLITS:
        raise SpecError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    if not 0 < val_fraction < 1:
        raise SpecError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if split == "tail":
        n_val = round(L * val_fraction)
        is_val = torch.arange(L) >= L - n_val
    else:
        if L < n_blocks:
            raise SpecError(
                f"cannot cut {L} tokens into n_blocks={n_blocks} contiguous blocks; give more tokens "
                "or fewer blocks"
            )
        n_vb = max(1, round(n_blocks * val_fraction))
        if n_vb >= n_blocks:
            raise SpecError(f"val_fraction={val_fraction} leaves no training block of {n_blocks}")
        # evenly spaced validation blocks, centred: e.g. 8 blocks, 2 val -> blocks 2 and 6
        val_blocks = {int((i + 0.5) * n_blocks / n_vb) for i in range(n_vb)}
        block_of = torch.arange(L) * n_blocks // L
        is_val = torch.tensor([int(b) in val_blocks for b in block_of], dtype=torch.bool)
    n_val = int(is_val.sum())
    if n_val == 0 or n_val == L:
        raise SpecError(
            f"the {split!r} split of {L} tokens with val_fraction={val_fraction} leaves "
            f"{'no validation' if n_val == 0 else 'no training'} tokens; give more tokens or change "
            "val_fraction"
        )
    idx = torch.arange(L)
    return idx[~is_val], idx[is_val]


# --------------------------------------------------------------------------- honest references
def target_inputs(est: Estimator, q: torch.Tensor, k: torch.Tensor, *, scale: float):
    """``(q', k')`` with target kernel exp(q' . k') for the inputs at ``scale``, or None.

    q' = T(q * scale**0.5) with T the feature map's ``target_transform`` (identity for the softmax
    kernel, M x for DARK). None when the estimator's kernel has no closed form (a trained
    FastFood-L: a learned spectral kernel).
    """
    if getattr(est.weight_matrix, "fitted_", False):
        return None
    s = math.sqrt(scale)
    qs, ks = est._cast(q) * s, est._cast(k) * s
    params = est._params(qs, ks, scale)
    fm = est.feature_map
    return fm.target_transform(qs, params, True), fm.target_transform(ks, params, False)


def target_attention(
    est: Estimator, q, k, v, *, scale: float, causal: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """Exact attention under the estimator's own target kernel (None: no closed form).

    For a softmax-target estimator this is ``exact.attention(q, k, v, causal, scale=scale)``; for
    DARK / darkl (aligned) it is softmax((Mq)(Mk)^T * scale) v, what their estimate is unbiased
    for. ``dtype``: the accumulation dtype of the reference (float64 for a metric's oracle).
    """
    with torch.no_grad():
        t = target_inputs(est, q, k, scale=scale)
        if t is None:
            return None
        return exact.attention(t[0], t[1], est._cast(v), causal, scale=1.0, dtype=dtype)


# --------------------------------------------------------------------------- losses
def _kernel_hat(est: Estimator, qs, ks, params):
    """``(K_hat / e^c, c)``: the kernel estimate for all pairs, scaled by e^c per leading index."""
    Q, mq, K, mk = est._stable_features(qs, ks, params)
    return Q @ K.transpose(-1, -2), mq + mk.transpose(-1, -2)


def _rel_mse(log_hat_parts, logK: torch.Tensor) -> torch.Tensor:
    """Per leading index sum (K_hat - K)^2 / sum K^2, averaged; computed relative to max K."""
    G, log_g = log_hat_parts
    c = logK.detach().amax(dim=(-2, -1), keepdim=True)  # K / e^c <= 1: no overflow; ratio unchanged
    t = torch.exp(logK - c)
    r = G * torch.exp(log_g - c)
    num = ((r - t) ** 2).sum(dim=(-2, -1))
    return (num / (t * t).sum(dim=(-2, -1))).mean()


class _Objective:
    """Loss of the estimator's current parameters on (q, k, v) tokens, at the attention scale."""

    def __init__(self, est: Estimator, objective: str, scale: float):
        self.est, self.objective, self.scale = est, objective, scale
        self.s = math.sqrt(scale)

    def __call__(self, q, k, v, ref=None) -> torch.Tensor:
        est = self.est
        params = est.params_ or {}
        if self.objective == "attention":
            out = est.attention(q, k, v, scale=self.scale)
            if ref is None:
                with torch.no_grad():
                    ref = exact.attention(q, k, v, scale=self.scale)
            return ((out - ref) ** 2).sum() / (ref * ref).sum()
        qs, ks = q * self.s, k * self.s
        logK = qs @ ks.transpose(-1, -2)
        if self.objective == "kernel":
            return _rel_mse(_kernel_hat(est, qs, ks, params), logK)
        # variance: closed-form second moment E[Y^2] of one i.i.d. sample, Var = (E[Y^2] - K^2) / m.
        # float64 and log-sum-exp: on real queries/keys sum E[Y^2] / sum K^2 reaches e^100 and more
        # (PosRF's relative variance is e^|q+k|^2 - 1), beyond float32; the ratio itself is exact.
        p64 = {key: t.double() for key, t in params.items()}
        log_e2 = est.feature_map.log_second_moment(qs.double(), ks.double(), p64)
        log_k2 = 2 * logK.double().flatten(-2)
        log_ratio = torch.logsumexp(log_e2.flatten(-2), -1) - torch.logsumexp(log_k2, -1)
        return torch.expm1(log_ratio).mean() / est.num_omega  # float64: may exceed the float32 range


# --------------------------------------------------------------------------- fitting
def _check_learnable(est: Estimator, cfg: FitConfig, v) -> tuple[bool, bool, bool]:
    """``(fm_learns, wm_learns, redraw)``; EstimatorError for impossible combinations."""
    fm_learns = bool(getattr(est.feature_map, "learnable", False))
    wm_learns = bool(getattr(est.weight_matrix, "learnable", False))
    if cfg.objective == "attention" and v is None:
        raise EstimatorError("fit objective 'attention' needs values v: pass v, or use objective 'kernel'")
    if cfg.objective == "variance" and (fm_learns or wm_learns):
        fixed = (
            fm_learns
            and not wm_learns
            and est.feature_map.target == "softmax"
            and callable(getattr(est.feature_map, "log_second_moment", None))
        )
        if not fixed:
            raise EstimatorError(
                f"fit objective 'variance' needs an estimator whose target kernel stays fixed while it "
                f"learns and whose variance has a closed form (darkl with mode='is'); {est.name} "
                f"learns its kernel (target {est.target!r}), which a variance objective would shrink to a "
                "constant. Use objective 'kernel' or 'attention'"
            )
    redraw = cfg.redraw
    if redraw is None:
        redraw = fm_learns and not wm_learns
    if redraw and wm_learns:
        raise EstimatorError(
            f"{est.name}: fit redraw=true cannot be used with {est.weight_matrix.name}, which learns its "
            "draw (S, G, B of one FastFood matrix); use redraw=false or leave it out"
        )
    return fm_learns, wm_learns, redraw


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
    est: Estimator,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    config: FitConfig | None = None,
    *,
    scale: float,
    progress: bool | Callable[[dict], None] | None = None,
) -> FitResult:
    """Fit ``est`` on the tokens given (the caller keeps its held-out part apart).

    q, k ``[..., L, d]`` (the same L: one token stream), v ``[..., L, dv]`` (needed by the
    attention objective). ``scale`` is the attention's logit scale (``capture.scale``, or
    1/sqrt(d)); the learned parameters are for that scale. Learnable parts (``darkl``'s M,
    ``fastfoodl``'s S, G, B) are trained by Adam on the train split, with the validation split
    for early stopping and for choosing the step whose parameters are kept. ``progress``: None
    (a bar when stderr is a terminal), True/False, or a callable receiving
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
    fm_learns, wm_learns, redraw = _check_learnable(est, cfg, v)
    # Training needs autograd even when called under no_grad or inference_mode (as the runner's
    # measurements are); tensors made in inference mode cannot be saved for backward: copy them.
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v = (None if x is None else x.clone() if x.is_inference() else x for x in (q, k, v))
        draw = est.draw_
        if draw is not None and (
            draw.W.is_inference() or (draw.row_weights is not None and draw.row_weights.is_inference())
        ):
            rw = None if draw.row_weights is None else draw.row_weights.clone()
            est.draw_ = WeightDraw(draw.W.clone(), rw, draw.notes)
        return _fit(est, q, k, v, cfg, float(scale), fm_learns, wm_learns, redraw, progress)


def _fit(est, q, k, v, cfg: FitConfig, scale: float, fm_learns, wm_learns, redraw, progress) -> FitResult:
    t0 = time.perf_counter()
    L = q.shape[-2]
    q, k = est._cast(q), est._cast(k)
    v = None if v is None else est._cast(v)

    if not (fm_learns or wm_learns):
        if est.feature_map.data_dependent:
            est.fit(q, k, scale=scale)
        curve = pd.DataFrame(
            {
                "step": pd.Series(dtype="int64"),
                "train_loss": pd.Series(dtype="float64"),
                "val_loss": pd.Series(dtype="float64"),
            }
        )
        return FitResult(
            est,
            curve,
            (time.perf_counter() - t0) * 1e3,
            0,
            est.target,
            False,
            "not trainable",
            cfg.objective,
            L,
            0,
            seed_independent=True,
        )

    tr_idx, va_idx = split_tokens(L, cfg.val_fraction, split=cfg.split, n_blocks=cfg.n_blocks)

    def take(x, idx):
        return None if x is None else x.index_select(-2, idx.to(x.device))

    q_tr, k_tr, v_tr = take(q, tr_idx), take(k, tr_idx), take(v, tr_idx)
    q_va, k_va, v_va = take(q, va_idx), take(k, va_idx), take(v, va_idx)

    # Initial (data-dependent) parameters from the training tokens only.
    if est.feature_map.data_dependent:
        est.fit(q_tr, k_tr, scale=scale)
    fixed_params = dict(est.params_ or {})
    trainable: dict[str, torch.Tensor] = {}
    if fm_learns:
        trainable = {key: t.detach().clone().requires_grad_(True) for key, t in fixed_params.items()}
    module = None
    orig_seed, orig_draw = est.seed, est.draw_
    if wm_learns:
        module = est.weight_matrix.module(
            est.num_omega,
            est.dim,
            generator=torch.Generator().manual_seed(est.seed),
            device=est.device,
            dtype=est.compute_dtype,
        )
        with torch.no_grad():
            if not torch.allclose(module(), orig_draw.W, rtol=1e-5, atol=1e-5):  # a bug, not the user's
                raise AssertionError(f"{est.weight_matrix.name}: its factors do not rebuild its draw")
    parameters = list(trainable.values())
    if module is not None:
        parameters += [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise EstimatorError(f"{est.name}: nothing to train (no trainable parameter)")

    def install():
        """Point the estimator at the current (grad-carrying) parameters."""
        est.params_ = {**fixed_params, **trainable}
        est.fit_scale_ = float(scale)
        if module is not None:
            est.draw_ = WeightDraw(module(), orig_draw.row_weights, orig_draw.notes)

    def snapshot():
        return (
            {key: t.detach().clone() for key, t in trainable.items()},
            None if module is None else {n: p.detach().clone() for n, p in module.named_parameters()},
        )

    loss_fn = _Objective(est, cfg.objective, float(scale))
    train_seed = est.seed if cfg.seed is None else cfg.seed
    gen = torch.Generator().manual_seed(train_seed)
    n_tr = q_tr.shape[-2]
    val_seeds = [VAL_SEED_BASE + i for i in range(cfg.val_draws if redraw else 1)]
    ref_va = None
    if cfg.objective == "attention":
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
        for key, t in best_state[0].items():
            trainable[key].copy_(t)
        if module is not None:
            for n, p in module.named_parameters():
                p.copy_(best_state[1][n])
        est.params_ = {**fixed_params, **{key: t.detach() for key, t in trainable.items()}} or None
        est.fit_scale_ = float(scale)
        est.seed = orig_seed
        est.draw_ = orig_draw
        if module is not None and best_step > 0:
            note = f"FastFood-L: {est.weight_matrix.params['learn']} trained, {cfg.objective} objective"
            est.draw_ = WeightDraw(module().detach(), orig_draw.row_weights, (*orig_draw.notes, note))
    if best_step > 0:
        _label_trained(est, module is not None)
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
        seed_independent=module is None and redraw and cfg.seed is not None,
    )


def _label_trained(est: Estimator, weights_trained: bool) -> None:
    """Make ``est.target`` / ``est.info()`` name the learned kernel.

    ``Estimator.target`` reads its feature map's ``target``; each estimator owns its feature-map
    instance, so an instance attribute relabels this estimator only. A trained FastFood-L changes
    the kernel of whatever map it is paired with, hence the label goes on that map's instance too,
    and ``fitted_`` on the weight matrix tells ``target_inputs`` there is no closed-form kernel.
    """
    if weights_trained:
        from rfbench.weights.learned import LEARNED_TARGET

        est.feature_map.target = LEARNED_TARGET
        est.weight_matrix.fitted_ = True
    elif getattr(est.feature_map, "learnable", False):
        est.feature_map.target = est.feature_map.learned_target
