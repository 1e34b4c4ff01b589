"""Discretely-induced random features (DIRF): PoisRF and GeomRF (Chefs' Random Tables).

CRT (Likhosherstov et al., NeurIPS 2022, arXiv 2205.15317), DIRF; docs/theory.md §1.7. Expand
exp(x . y) = prod_l sum_k (x_l y_l)^k / k! and draw omega in Z_{>=0}^d from a product law p:
    f(omega, x) = prod_l x_l^omega_l / sqrt(omega_l! p_l(omega_l)),   the same map on both sides,
so E[f(omega, x) f(omega, y)] = prod_l sum_k (x_l y_l)^k / k! = exp(x . y) for any p with full
support. Features carry the sign prod_l sign(x_l)^omega_l, so they are not positive.

The omegas are not Gaussian rows: these maps draw their own. The law depends on a parameter
(lambda, p) that is fitted to the data by default, after the draw, so ``draw()`` stores U(0, 1)
variates ``W: [m, d]`` (float64, for tail resolution) and the omegas are their inverse-CDF images
at the parameter in use: omega = F^-1(U). Each U maps to an omega of the right law, and queries and
keys use the same omegas, so the estimate is unbiased for every (fitted or fixed) parameter.
"""

from __future__ import annotations

import math
import numbers

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params
from rfbench.weights.base import WeightDraw, WeightMatrix

#: log|0| stand-in: 0 * LOG_ZERO = 0 gives 0^0 = 1 without NaN, and any omega_l > 0 sends the
#: feature to exp(-1e20) = 0 exactly; finite, so per-row maxima stay finite (no inf - inf).
LOG_ZERO = -1e20
#: Poisson rates are clamped to >= LAM_MIN: lambda = 0 (a coordinate that is zero on one side)
#: would give 0 * log(0); any lambda > 0 keeps the estimate unbiased.
LAM_MIN = 1e-30
#: Geometric success probabilities are kept in [P_MIN, P_MAX]: p -> 1 (optimal on a zero
#: coordinate) would give log(1 - p) = -inf, and the range keeps 1 - p representable in float32.
P_MIN, P_MAX = 1e-12, 1.0 - 1e-6


def _draw_uniforms(m: int, d: int, generator: torch.Generator, device) -> WeightDraw:
    u = torch.rand((m, d), generator=generator, dtype=torch.float64)
    note = "W holds U(0,1) variates; the integer omegas are their inverse-CDF images at the fitted law"
    return WeightDraw(u.to(device=device), notes=(note,))


def _log_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.full_like(x, LOG_ZERO), x.abs().log())


def _sign_factor(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """prod_l sign(x_l)^omega_l as +-1: ``[..., L, m]`` from x ``[..., L, d]``, omega ``[..., m, d]``."""
    negatives = (x < 0).to(x.dtype) @ omega.transpose(-1, -2)  # exact small integers
    return 1 - 2 * torch.remainder(negatives, 2)


def _check_positive(value, key: str, owner: str, hi: float = math.inf) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < hi:
        where = f"(0, {hi})" if hi < math.inf else "> 0"
        raise EstimatorError(
            f"{owner}: {key} must be None (fit it to the data) or a number {where}, got {value!r}"
        )
    return float(value)


def _pair_scale(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_i q_il^2 * mean_j k_jl^2): ``[..., 1, d]``, the typical |q_l k_l| of a pair."""
    return torch.sqrt((q * q).mean(dim=-2, keepdim=True) * (k * k).mean(dim=-2, keepdim=True))


class _DIRF(FeatureMap):
    """Shared DIRF plumbing: own omega law, pairs only with i.i.d. draws."""

    positive = False
    needs_gaussian_rows = False
    weights = ("iid",)  # the omegas are this map's own draw: no coupling of Gaussian rows applies
    _law = ""
    _param = ""

    def _validate(self) -> None:
        self.params[self._param] = self._check(self.params[self._param])
        # Only a fitted parameter depends on the data; an instance attribute shadows the class one.
        self.data_dependent = self.params[self._param] is None

    def _weights_reason(self, weights: WeightMatrix) -> str:
        return (
            f"{type(self).__name__} draws discrete omegas from {self._law}; a Gaussian weight matrix "
            f"({weights.name!r}) does not apply; use {self.name}-iid"
        )

    def draw(self, weights: WeightMatrix, m: int, d: int, *, generator, device, dtype) -> WeightDraw:
        """i.i.d. U(0, 1) ``[m, d]`` (float64); omegas are made from them in ``log_features``."""
        return _draw_uniforms(m, d, generator, device)

    def _value(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The law's parameter: fitted ``[..., 1, d]`` or the fixed number, as a tensor."""
        fixed = self.params[self._param]
        if fixed is not None:
            return torch.tensor(fixed, dtype=torch.float64, device=x.device)
        if self._param not in params:
            raise EstimatorError(f"{self.name} needs its fitted {self._param}: call est.fit(q, k) first")
        return params[self._param].to(torch.float64)


class PoisRF(_DIRF):
    """Poisson DIRF: omega_l ~ Poisson(lambda_l), f = prod_l e^(lambda_l / 2) (x_l / sqrt(lambda_l))^omega_l.

    One-sample variance (docs/theory.md §1.7, derived):
        Var1 = prod_l exp(lambda_l + x_l^2 y_l^2 / lambda_l) - e^(2 x.y).
    lambda (param ``lam``): None (default) fits lambda_l = sqrt(mean_i q_il^2 * mean_j k_jl^2) per
    leading index, the minimiser of the pair-averaged log second moment
    sum_l (lambda_l + mean(q_l^2) mean(k_l^2) / lambda_l) (exact for a single pair: |x_l y_l|);
    a number fixes lambda_l for every coordinate.
    """

    name = "poisrf"
    description = "Poisson discretely-induced random features (CRT DIRF)"
    reference = "Likhosherstov et al., Chefs' Random Tables, NeurIPS 2022 (arXiv 2205.15317), DIRF (PoisRF)"
    defaults = {"lam": None}
    _law = "Poisson(lambda)"
    _param = "lam"

    def _check(self, value):
        return _check_positive(value, "lam", self.name)

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"lam": [..., 1, d]}`` (empty for a fixed ``lam``)."""
        if not self.data_dependent:
            return {}
        return {"lam": _pair_scale(q, k)}

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        # Rounded to x's dtype first, so the law and the weights use the very same lambda.
        lam = self._value(params, x).clamp(min=LAM_MIN).to(x.dtype)
        omega = poisson_icdf(draw.W, lam).to(x.dtype)  # [..., m, d]
        if lam.ndim == 0:
            lam = lam.expand(x.shape[-1])
        log_mag = (_log_abs(x) - 0.5 * lam.log()) @ omega.transpose(-1, -2) + 0.5 * lam.sum(-1, keepdim=True)
        return log_mag, _sign_factor(x, omega)


def poisson_icdf(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Poisson(lam) quantiles of u: the least k with F(k) >= u, as float64 ``[..., m, d]``.

    u ``[m, d]`` in [0, 1), lam > 0 broadcastable to ``[..., 1, d]``. The pmf is stepped in log
    space (no underflow of e^-lam at large lam) up to k_max = lam + 12 sqrt(lam) + 30, beyond which
    the tail mass is below 1e-30; the result is capped there.
    """
    u = u.to(torch.float64)
    lam = lam.to(device=u.device, dtype=torch.float64)
    top = float(lam.max())
    k_max = int(math.ceil(top + 12 * math.sqrt(top) + 30))
    log_lam = lam.log()
    log_p = -lam  # log P(omega = 0)
    cdf = torch.exp(log_p)
    omega = torch.zeros(torch.broadcast_shapes(u.shape, lam.shape), dtype=torch.float64, device=u.device)
    for k in range(1, k_max + 1):
        above = u > cdf  # F(k - 1) < u, so omega >= k
        if not bool(above.any()):
            break
        omega += above
        log_p = log_p + log_lam - math.log(k)
        cdf = cdf + torch.exp(log_p)
    return omega


def geometric_icdf(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Geometric(p) quantiles on {0, 1, ...} (P(k) = p (1 - p)^k): floor(log(1 - u) / log(1 - p)).

    u ``[m, d]`` in [0, 1), p in (0, 1) broadcastable to ``[..., 1, d]``; float64 ``[..., m, d]``.
    """
    u = u.to(torch.float64)
    p = p.to(device=u.device, dtype=torch.float64)
    return torch.floor(torch.log1p(-u) / torch.log1p(-p))


def geom_p_star(s: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """p minimising log E[(f1 f2)^2] = log I0(2 s / sqrt(1 - p)) - log p for |x_l y_l| = s.

    Bisection on p J'(p) = p s (1 - p)^(-3/2) I1(t)/I0(t) - 1, t = 2 s / sqrt(1 - p), which rises
    from -1 (p -> 0) to +inf (p -> 1) for s > 0: the unique stationary point is the minimum. No
    closed form exists (CRT). I1/I0 from the exponentially scaled i1e/i0e (no overflow at large t).
    s = 0 gives P_MAX. Float64, same shape as s.
    """
    s = s.to(torch.float64)
    lo = torch.full_like(s, P_MIN)
    hi = torch.full_like(s, P_MAX)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        t = 2 * s / torch.sqrt(1 - mid)
        g = mid * s * (1 - mid) ** -1.5 * torch.special.i1e(t) / torch.special.i0e(t) - 1
        rising = g >= 0
        hi = torch.where(rising, mid, hi)
        lo = torch.where(rising, lo, mid)
    return 0.5 * (lo + hi)


class GeomRF(_DIRF):
    """Geometric DIRF: omega_l ~ Geom(p_l) on {0, 1, ...}, f = prod_l x_l^w_l / sqrt(w_l! p_l (1 - p_l)^w_l).

    Second moment (docs/theory.md §1.7, derived; I0 is the *modified* Bessel function):
        E[(f1 f2)^2] = prod_l I0(2 |x_l y_l| / sqrt(1 - p_l)) / p_l,   Var1 = that - e^(2 x.y).
    p (param ``p``): None (default) fits p_l = ``geom_p_star``(sqrt(mean_i q_il^2 * mean_j k_jl^2))
    per leading index, the exact optimum for a single pair and a plug-in for many (log I0 is not
    linear in (x_l y_l)^2, so the pair average has no cheap form); a number in (0, 1) fixes p_l.
    Fitted values are kept in [1e-12, 1 - 1e-6].
    """

    name = "geomrf"
    description = "geometric discretely-induced random features (CRT DIRF)"
    reference = "Likhosherstov et al., Chefs' Random Tables, NeurIPS 2022 (arXiv 2205.15317), DIRF (GeomRF)"
    defaults = {"p": None}
    _law = "Geometric(p)"
    _param = "p"

    def _check(self, value):
        return _check_positive(value, "p", self.name, hi=1.0)

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"p": [..., 1, d]}`` (empty for a fixed ``p``)."""
        if not self.data_dependent:
            return {}
        return {"p": geom_p_star(_pair_scale(q, k)).to(q.dtype)}

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        # Rounded to x's dtype first, so the law and the weights use the very same p.
        p = self._value(params, x).clamp(P_MIN, P_MAX).to(x.dtype)
        omega64 = geometric_icdf(draw.W, p)  # [..., m, d]
        # sum_l log(omega_l!) / 2 per omega, shared by both sides: [..., 1, m]
        log_fact = 0.5 * torch.lgamma(omega64 + 1).sum(dim=-1).unsqueeze(-2).to(x.dtype)
        omega = omega64.to(x.dtype)
        if p.ndim == 0:
            p = p.expand(x.shape[-1])
        log_mag = (
            (_log_abs(x) - 0.5 * torch.log1p(-p)) @ omega.transpose(-1, -2)
            - log_fact
            - 0.5 * torch.log(p).sum(dim=-1, keepdim=True)
        )
        return log_mag, _sign_factor(x, omega)


# --------------------------------------------------------------------------- closed-form variance
def _law_param(fm, x, fit, given, key: str, hi: float) -> torch.Tensor:
    """lam or p for the variance: ``given`` (checked in (0, hi)), the map's fixed value, or the pair fit."""
    if given is not None:
        if bool(((given <= 0) | (given >= hi)).any()):
            raise EstimatorError(f"{fm.name}: {key} must be in (0, {hi})")
        value = given
    elif fm.params[key] is not None:
        value = torch.tensor(fm.params[key], dtype=torch.float64, device=x.device)
    else:
        value = fit()[key]
    return value.expand(x.shape)


def poisrf_variance(fm, x, y, fit, *, lam=None) -> torch.Tensor:
    """CRT PoisRF (derived, see ``PoisRF``): prod_l exp(lam_l + x_l^2 y_l^2 / lam_l) - e^(2x.y)."""
    lam = _law_param(fm, x, fit, lam, "lam", math.inf).clamp(min=LAM_MIN)  # as the feature map does
    xy = (x * y).sum(dim=-1)
    excess = (lam + (x * y) ** 2 / lam).sum(dim=-1) - 2 * xy
    return torch.exp(2 * xy) * torch.expm1(excess)


def geomrf_variance(fm, x, y, fit, *, p=None) -> torch.Tensor:
    """CRT GeomRF (derived, see ``GeomRF``): prod_l I0(2|x_l y_l| / sqrt(1 - p_l)) / p_l - e^(2x.y)."""
    p = _law_param(fm, x, fit, p, "p", 1.0).clamp(P_MIN, P_MAX)  # as the feature map does
    t = 2 * (x * y).abs() / torch.sqrt(1 - p)
    log_m2 = (torch.log(torch.special.i0e(t)) + t - torch.log(p)).sum(dim=-1)  # log I0 = log i0e + t
    xy = (x * y).sum(dim=-1)
    return torch.exp(2 * xy) * torch.expm1(log_m2 - 2 * xy)


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"poisrf": poisrf_variance, "geomrf": geomrf_variance}
