"""Closed-form one-sample variance and MSE of the estimators that have one, dispatched to the families.

For a feature map with per-omega one-sample estimate P(omega) = sum of f1(omega, x) f2(omega, y)
over its ``per_omega`` features, ``variance`` is Var1 = Var_omega[P] for each pair (x, y), and
``mse`` is Var1 / m, the MSE of the unbiased average over m independent omegas (rows of a weight
matrix with ``independent_rows``; coupled weight matrices have no such closed form here).

    theory.variance("posrf", x, y)                    x [..., d], y [..., d] -> [...]
    theory.mse("gerf", x, y, num_features=64, A=-0.1)
    theory.mse(est.feature_map, x, y, 64)             instance: its own parameters

Each formula is stated once, in its map's family module, which lists it in a module-level
``VARIANCE = {map name: function}`` (so a new map with a closed form is still one file and one
registry line). The protocol: ``function(fm, x, y, fit, **overrides) -> [...]`` float64, with
``fm`` the FeatureMap instance, x and y float64 ``[..., d]`` already broadcast, ``fit()`` the map's
fitted parameters for each pair alone (``fit_params`` at L = 1, the L axis dropped; computed only
when called), and ``overrides`` the function's keyword-only parameters, given here as float64
tensors on x's device (None: not given). Formulas are written as e^(2 x.y) * expm1(...) or sums
of such terms, which keeps small variances accurate.

Data-dependent maps (oprf, saderf, sderf, poisrf/geomrf without a fixed parameter) are fitted to
each pair on its own, exactly as ``est.fit`` fits a single query-key pair (L = 1); pass the
fitted parameters to override: oprf ``A`` ([...]), saderf ``psi`` ([..., d]) and ``A`` ([...]),
sderf ``Q`` ([..., d, d]) and ``a`` ([..., d]), poisrf ``lam`` and geomrf ``p`` (numbers or
[..., d]). ``dark`` needs a fixed Sigma: ``sigma`` or ``M`` (``[d, d]`` or ``[..., d, d]``).
Results are float64.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
from collections.abc import Callable

import torch

from rfbench.errors import DataError, EstimatorError
from rfbench.features.base import FeatureMap
from rfbench.features.gerf import oprf_a_star


def formula(cls: type) -> Callable | None:
    """The closed-form variance a feature-map class's family module states for it, or None."""
    table = getattr(importlib.import_module(cls.__module__), "VARIANCE", {})
    return table.get(cls.name)


def override_names(fn: Callable) -> tuple[str, ...]:
    """The fitted parameters a formula lets the caller give: its keyword-only parameters."""
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def closed_forms() -> list[str]:
    """Names of the registered feature maps ``variance`` and ``mse`` know."""
    from rfbench import registry

    return [name for name in registry.feature_maps() if formula(registry.feature_map_class(name))]


def oprf_A_star(phi, d: int):
    """OPRF's variance-minimising A for |x + y|^2 = phi in dimension d (float in, float out).

    A* = (1/16)(1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)), rho = phi / d (Likhosherstov et al.,
    Chefs' Random Tables, NeurIPS 2022, OPRF; ``rfbench.features.gerf.oprf_a_star``).
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
    fm, fn, names = _resolve(feature_map, params)
    # None means "fit it" (as poisrf's lam=None), the same as not passing it
    given = {k: v for k, v in params.items() if k in names and v is not None}
    x = _as_float64(x, "x")
    y = _as_float64(y, "y")
    if x.shape[-1] != y.shape[-1]:
        raise DataError(f"x and y must share d, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    try:
        x, y = torch.broadcast_tensors(x, y)
    except RuntimeError:
        raise DataError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not broadcast") from None
    overrides = {k: _as_float64(v, k, min_ndim=0).to(x.device) for k, v in given.items()}
    return fn(fm, x, y, lambda: _fit_pair(fm, x, y), **overrides)


# --------------------------------------------------------------------------- resolution and checks
def _resolve(feature_map, params: dict) -> tuple[FeatureMap, Callable, tuple[str, ...]]:
    from rfbench import registry

    if isinstance(feature_map, FeatureMap):
        cls, name = type(feature_map), feature_map.name
    elif isinstance(feature_map, str):
        name = feature_map.lower()
        cls = registry.feature_map_class(name) if name in registry.FEATURE_MAPS else None
    else:
        raise EstimatorError(
            f"feature_map must be a name or a FeatureMap, got {type(feature_map).__name__}"
        )
    fn = formula(cls) if cls is not None else None
    if fn is None:
        known = ", ".join(closed_forms())
        what = "has no closed-form variance here" if cls is not None else "is not a feature map"
        raise EstimatorError(f"{name!r} {what}; closed forms exist for: {known}")
    names = override_names(fn)
    ctor = {k: v for k, v in params.items() if k not in names}
    unknown = sorted(set(ctor) - set(cls.defaults))
    if unknown:
        allowed = sorted(set(cls.defaults) | set(names)) or ["none"]
        raise EstimatorError(
            f"theory for {name!r} got unknown parameter(s) {unknown}; allowed: {', '.join(allowed)}"
        )
    if not isinstance(feature_map, FeatureMap):
        return cls(**ctor), fn, names
    return (cls(**{**feature_map.params, **ctor}) if ctor else feature_map), fn, names


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


def _fit_pair(fm: FeatureMap, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Fitted parameters of ``fm`` for each pair alone (L = 1), with the L axis dropped."""
    fitted = fm.fit_params(x.unsqueeze(-2), y.unsqueeze(-2))
    return {k: (v if k == "Q" else v.squeeze(-2)) for k, v in fitted.items()}
