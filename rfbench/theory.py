"""Closed-form one-sample variance and MSE of the estimators that have one.

For a feature map with per-omega one-sample estimate P(omega) = sum of f1(omega, x) f2(omega, y)
over its ``per_omega`` features, ``variance`` is Var1 = Var_omega[P] for each pair (x, y), and
``mse`` is Var1 / m, the MSE of the unbiased average over m i.i.d. omegas (rows of ``iid``; coupled
weight matrices have no such closed form here). Every formula is written as
e^(2 x.y) * expm1(...) or a sum of such terms, which keeps small variances accurate.

    theory.variance("posrf", x, y)                    x [..., d], y [..., d] -> [...]
    theory.mse("gerf", x, y, num_features=64, A=-0.1)
    theory.mse(est.feature_map, x, y, 64)             instance: its own parameters

Data-dependent maps (oprf, saderf, sderf, poisrf/geomrf without a fixed parameter) are fitted to
each pair on its own, exactly as ``est.fit`` fits a single query-key pair (L = 1); pass the
fitted parameters to override: oprf ``A`` ([...]), saderf ``psi`` ([..., d]) and ``A`` ([...]),
sderf ``Q`` ([..., d, d]) and ``a`` ([..., d]), poisrf ``lam`` and geomrf ``p`` (numbers or
[..., d]). ``dark`` needs a fixed Sigma: ``sigma`` or ``M`` (``[d, d]`` or ``[..., d, d]``).
Results are float64.
"""

from __future__ import annotations

import math
import numbers

import torch

from rfbench.errors import DataError, EstimatorError
from rfbench.features.base import FeatureMap
from rfbench.features.discrete import LAM_MIN, P_MAX, P_MIN
from rfbench.features.gerf import oprf_a_star

#: Names with a closed form, and the parameters that override a fitted value.
_OVERRIDES: dict[str, tuple[str, ...]] = {
    "trigrf": (),
    "posrf": (),
    "hyprf": (),
    "gerf": (),
    "gerftrig": (),
    "oprf": ("A",),
    "saderf": ("psi", "A"),
    "sderf": ("Q", "a"),
    "poisrf": ("lam",),
    "geomrf": ("p",),
    "dark": (),
}


def closed_forms() -> list[str]:
    """Names of the feature maps ``variance`` and ``mse`` know."""
    return list(_OVERRIDES)


def oprf_A_star(phi, d: int):
    """OPRF's variance-minimising A for |x + y|^2 = phi in dimension d (float in, float out).

    A* = (1/16)(1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)), rho = phi / d (CRT, OPRF; ALGORITHMS.md 1.6).
    """
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise EstimatorError(f"d must be a positive integer, got {d!r}")
    if isinstance(phi, numbers.Real) and not isinstance(phi, bool):
        if not phi >= 0:
            raise DataError(f"phi = |x + y|^2 must be >= 0, got {phi!r}")
        return float(oprf_a_star(torch.tensor(float(phi), dtype=torch.float64) / d))
    phi = _as_float64(phi, "phi", min_ndim=0)
    if bool((phi < 0).any()):
        raise DataError("phi = |x + y|^2 must be >= 0")
    return oprf_a_star(phi / d)


def mse(feature_map, x, y, num_features: int, **params) -> torch.Tensor:
    """MSE of the estimate from ``num_features`` i.i.d. omegas: Var1 / m, ``[...]`` float64."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise EstimatorError(f"num_features must be a positive integer, got {num_features!r}")
    return variance(feature_map, x, y, **params) / num_features


def variance(feature_map, x, y, **params) -> torch.Tensor:
    """One-sample variance Var1 for each pair: x ``[..., d]``, y ``[..., d]`` (broadcast) -> ``[...]``.

    ``feature_map`` is a name from ``closed_forms()`` or a FeatureMap instance; ``params`` are
    constructor parameters (e.g. ``A`` for gerf) or overrides of fitted ones (module docstring).
    """
    fm = _resolve(feature_map, params)
    # None means "fit it" (as poisrf's lam=None), the same as not passing it
    overrides = {k: v for k, v in params.items() if k in _OVERRIDES[fm.name] and v is not None}
    x = _as_float64(x, "x")
    y = _as_float64(y, "y")
    if x.shape[-1] != y.shape[-1]:
        raise DataError(f"x and y must share d, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    try:
        x, y = torch.broadcast_tensors(x, y)
    except RuntimeError:
        raise DataError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not broadcast") from None
    return _FORMULAS[fm.name](fm, x, y, overrides)


# --------------------------------------------------------------------------- resolution and checks
def _resolve(feature_map, params: dict) -> FeatureMap:
    from rfbench import registry

    if isinstance(feature_map, FeatureMap):
        fm, name = feature_map, feature_map.name
    elif isinstance(feature_map, str):
        fm, name = None, feature_map.lower()
    else:
        raise EstimatorError(
            f"feature_map must be a name or a FeatureMap, got {type(feature_map).__name__}"
        )
    if name not in _OVERRIDES:
        known = ", ".join(closed_forms())
        what = "has no closed-form variance here" if name in registry.FEATURE_MAPS else "is not a feature map"
        raise EstimatorError(f"{name!r} {what}; closed forms exist for: {known}")
    cls = type(fm) if fm is not None else registry.feature_map_class(name)
    ctor = {k: v for k, v in params.items() if k not in _OVERRIDES[name]}
    unknown = sorted(set(ctor) - set(cls.defaults))
    if unknown:
        allowed = sorted(set(cls.defaults) | set(_OVERRIDES[name])) or ["none"]
        raise EstimatorError(
            f"theory for {name!r} got unknown parameter(s) {unknown}; allowed: {', '.join(allowed)}"
        )
    if fm is None:
        return cls(**ctor)
    return cls(**{**fm.params, **ctor}) if ctor else fm


def _as_float64(value, name: str, min_ndim: int = 1) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name} must be a tensor or array of numbers: {exc}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.ndim < min_ndim:
        raise DataError(f"{name} must have shape [..., d], got a scalar")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{name} contains {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
    return t


def _override(value, name: str, like: torch.Tensor) -> torch.Tensor:
    """A user-given parameter as float64 on ``like``'s device, checked finite."""
    return _as_float64(value, name, min_ndim=0).to(like.device)


def _fit_pair(fm: FeatureMap, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Fitted parameters of ``fm`` for each pair alone (L = 1), with the L axis dropped."""
    fitted = fm.fit_params(x.unsqueeze(-2), y.unsqueeze(-2))
    return {k: (v if k == "Q" else v.squeeze(-2)) for k, v in fitted.items()}


# --------------------------------------------------------------------------- formulas
def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1)


def _gerf_excess(A: torch.Tensor, d: int, s2: torch.Tensor) -> torch.Tensor:
    """log(E[P^2] / e^(2 x.y)) of the s = +1 GERF: d log(1-4A) - (d/2) log(1-8A) + |x+y|^2 / (1-8A)."""
    return d * (torch.log1p(-4 * A) - 0.5 * torch.log1p(-8 * A)) + s2 / (1 - 8 * A)


def _check_A_tensor(A: torch.Tensor, name: str) -> torch.Tensor:
    if bool((A >= 0.125).any()):
        raise EstimatorError(
            f"{name}: A >= 1/8 gives an infinite-variance estimator (E exp(4A|omega|^2) diverges); "
            "use A < 1/8"
        )
    return A


def _var_trigrf(fm, x, y, o):
    """Choromanski et al., ICLR 2021, Lemma 2: e^(2x.y) (cosh|x-y|^2 - 1) = 2 e^(2x.y) sinh^2(|x-y|^2/2)."""
    return 2 * torch.exp(2 * _dot(x, y)) * torch.sinh(0.5 * _dot(x - y, x - y)) ** 2


def _var_posrf(fm, x, y, o):
    """Choromanski et al., ICLR 2021, Lemma 2: e^(2x.y) (e^|x+y|^2 - 1)."""
    return torch.exp(2 * _dot(x, y)) * torch.expm1(_dot(x + y, x + y))


def _var_hyprf(fm, x, y, o):
    """Performer (ALGORITHMS.md 1.3): 1/2 e^(-|x|^2-|y|^2) (e^|x+y|^2 - 1)^2
    = 2 e^(2x.y) sinh^2(|x+y|^2/2)."""
    return 2 * torch.exp(2 * _dot(x, y)) * torch.sinh(0.5 * _dot(x + y, x + y)) ** 2


def _var_gerf_A(A, x, y):
    s2 = _dot(x + y, x + y)
    return torch.exp(2 * _dot(x, y)) * torch.expm1(_gerf_excess(A, x.shape[-1], s2))


def _var_gerf(fm, x, y, o):
    """CRT GERF, s = +1 (ALGORITHMS.md 1.5): e^(2x.y) expm1(d log(1-4A) - d/2 log(1-8A) + |x+y|^2/(1-8A))."""
    return _var_gerf_A(torch.tensor(fm.params["A"], dtype=torch.float64, device=x.device), x, y)


def _var_gerftrig(fm, x, y, o):
    """GERF s = -1, real A (derived; rfbench.features.gerf.GERFTrig):
    e^(2x.y)/2 (expm1(log c + |x-y|^2) + expm1(log c - |x-y|^2/(1-8A))),
    log c = d log(1-4A) - d/2 log(1-8A)."""
    A = torch.tensor(fm.params["A"], dtype=torch.float64, device=x.device)
    log_c = x.shape[-1] * (torch.log1p(-4 * A) - 0.5 * torch.log1p(-8 * A))
    z2 = _dot(x - y, x - y)
    return 0.5 * torch.exp(2 * _dot(x, y)) * (torch.expm1(log_c + z2) + torch.expm1(log_c - z2 / (1 - 8 * A)))


def _var_oprf(fm, x, y, o):
    """GERF variance at A = the given A, or A*(|x + y|^2 / d) (CRT OPRF; ALGORITHMS.md 1.6)."""
    if "A" in o:
        A = _check_A_tensor(_override(o["A"], "A", x), "oprf")
    else:
        A = _fit_pair(fm, x, y)["A"].squeeze(-1)
    return _var_gerf_A(A, x, y)


def _var_saderf(fm, x, y, o):
    """GERF variance at (Psi x, Psi^-1 y) (FAVOR# SADERF; ALGORITHMS.md 1.8)."""
    fitted = _fit_pair(fm, x, y) if not {"psi", "A"} <= set(o) else {}
    psi = _override(o["psi"], "psi", x) if "psi" in o else fitted["psi"]
    if bool((psi <= 0).any()):
        raise EstimatorError("saderf: psi must be positive")
    xs, ys = x * psi, y / psi
    if "A" in o:
        A = _check_A_tensor(_override(o["A"], "A", x), "saderf")
    elif "psi" in o:  # A* of the rescaled pair, as the fit would give for this psi
        A = oprf_a_star(_dot(xs + ys, xs + ys) / x.shape[-1])
    else:
        A = fitted["A"].squeeze(-1)
    return _var_gerf_A(A, xs, ys)


def _var_sderf(fm, x, y, o):
    """Symmetric DERF (FAVOR#; derived, rfbench.features.derf.SDERF), t = Q^T (x + y):
    e^(2x.y) expm1(sum_l [log(1-4a_l) - 1/2 log(1-8a_l) + t_l^2/(1-8a_l)])."""
    fitted = _fit_pair(fm, x, y) if not {"Q", "a"} <= set(o) else {}
    Q = _override(o["Q"], "Q", x) if "Q" in o else fitted["Q"]
    a = _override(o["a"], "a", x) if "a" in o else fitted["a"]
    _check_A_tensor(a, "sderf (a)")
    t2 = (((x + y).unsqueeze(-2) @ Q).squeeze(-2)) ** 2
    excess = (torch.log1p(-4 * a) - 0.5 * torch.log1p(-8 * a) + t2 / (1 - 8 * a)).sum(dim=-1)
    return torch.exp(2 * _dot(x, y)) * torch.expm1(excess)


def _dirf_param(fm, x, y, o, key, hi):
    """lam or p: the override (checked in (0, hi)), the fixed value, or the pair fit."""
    if key in o:
        value = _override(o[key], key, x)
        if bool(((value <= 0) | (value >= hi)).any()):
            raise EstimatorError(f"{fm.name}: {key} must be in (0, {hi})")
    elif fm.params[key] is not None:
        value = torch.tensor(fm.params[key], dtype=torch.float64, device=x.device)
    else:
        value = _fit_pair(fm, x, y)[key]
    return value.expand(x.shape)


def _var_poisrf(fm, x, y, o):
    """CRT PoisRF (ALGORITHMS.md 1.7): prod_l exp(lam_l + x_l^2 y_l^2 / lam_l) - e^(2x.y)."""
    lam = _dirf_param(fm, x, y, o, "lam", math.inf)
    lam = lam.clamp(min=LAM_MIN)  # as the feature map does
    excess = (lam + (x * y) ** 2 / lam).sum(dim=-1) - 2 * _dot(x, y)
    return torch.exp(2 * _dot(x, y)) * torch.expm1(excess)


def _var_geomrf(fm, x, y, o):
    """CRT GeomRF (ALGORITHMS.md 1.7): prod_l I0(2|x_l y_l| / sqrt(1 - p_l)) / p_l - e^(2x.y)."""
    p = _dirf_param(fm, x, y, o, "p", 1.0)
    p = p.clamp(P_MIN, P_MAX)  # as the feature map does
    t = 2 * (x * y).abs() / torch.sqrt(1 - p)
    log_m2 = (torch.log(torch.special.i0e(t)) + t - torch.log(p)).sum(dim=-1)  # log I0 = log i0e + t
    return torch.exp(2 * _dot(x, y)) * torch.expm1(log_m2 - 2 * _dot(x, y))


def _var_dark(fm, x, y, o):
    """DARK (ALGORITHMS.md 3): PosRF on (Mx, My):
    e^(2 x^T Sigma y) expm1((x+y)^T Sigma (x+y)), Sigma = M^T M."""
    if fm.data_dependent:
        raise EstimatorError(
            "dark's closed form needs a fixed Sigma: pass sigma= (a covariance) or M= (its factor)"
        )
    M = fm.transform({}).to(device=x.device, dtype=torch.float64)
    if M.shape[-1] != x.shape[-1]:
        raise DataError(f"dark's M is {M.shape[-1]}x{M.shape[-1]} but x and y have d={x.shape[-1]}")
    xt = (x.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)
    yt = (y.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)
    return _var_posrf(fm, xt, yt, o)


_FORMULAS = {
    "trigrf": _var_trigrf,
    "posrf": _var_posrf,
    "hyprf": _var_hyprf,
    "gerf": _var_gerf,
    "gerftrig": _var_gerftrig,
    "oprf": _var_oprf,
    "saderf": _var_saderf,
    "sderf": _var_sderf,
    "poisrf": _var_poisrf,
    "geomrf": _var_geomrf,
    "dark": _var_dark,
}
