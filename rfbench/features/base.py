"""The feature-map interface (the Spectraformer "component function").

A feature map turns inputs ``x: [..., L, d]`` and a weight draw (``W: [m, d]``) into one-sample
features f(omega_i, x), returned in log-magnitude form so that stabilisers can be exact:

    features = factor * exp(log_mag)        (factor None means 1)

with both of shape ``[..., L, m * per_omega]``, laid out omega-major blocks: first the m
features of kind 0 (e.g. cos, or exp(+w x)), then the m of kind 1 (sin, exp(-w x)).

Contract: for one omega, sum over its ``per_omega`` features of f1(x) * f2(y) is an unbiased
one-sample estimate of the target kernel (the map includes its own 1/2 for antithetic pairs).
The 1/m average (or the quadrature row weights) is applied by the Estimator, not here.

Data-dependent parameters (OPRF's A*, SADERF's Psi*, DARK's Sigma) are computed by
``fit_params(q, k)`` as a dict of tensors whose leading dims match the data's ``[...]`` (with
the L and d axes reduced), and passed back into ``log_features``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from rfbench.errors import EstimatorError
from rfbench.weights.base import WeightDraw, WeightMatrix

Params = dict[str, torch.Tensor]


class FeatureMap:
    """Base class of feature maps. Constructors only store (validated) keyword parameters."""

    name: ClassVar[str] = ""
    #: Output features per random vector (2 for TrigRF and hyperbolic maps).
    per_omega: ClassVar[int] = 1
    #: True when every feature is >= 0 (so attention denominators are positive).
    positive: ClassVar[bool] = True
    #: True when phi(x) . phi(y) is an unbiased estimate of the target kernel (given Gaussian rows).
    unbiased: ClassVar[bool] = True
    #: True when ``fit_params`` depends on the data.
    data_dependent: ClassVar[bool] = False
    #: True when the map only works with weight samplers whose rows are N(0, I) marginally.
    needs_gaussian_rows: ClassVar[bool] = True
    #: The kernel this map estimates: "softmax" (exp(x . y)) or a description of another one.
    target: ClassVar[str] = "softmax"
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise EstimatorError(
                f"feature map {self.name!r} got unknown parameter(s) {unknown}; allowed: {allowed}"
            )
        self.params = {**self.defaults, **params}
        self._validate()

    def _validate(self) -> None:
        """Check ``self.params``; raise EstimatorError naming the parameter and the fix."""

    def supports(self, weights: WeightMatrix) -> list[str]:
        """Reasons this map cannot be paired with ``weights``; empty when it can."""
        if self.needs_gaussian_rows and not weights.gaussian_marginal:
            return [f"{self.name} needs rows with N(0, I) marginals, which {weights.name} does not give"]
        return []

    def draw(self, weights: WeightMatrix, m: int, d: int, *, generator, device, dtype) -> WeightDraw:
        """Draw the random vectors this map uses. Maps with their own distribution override."""
        return weights.sample(m, d, generator=generator, device=device, dtype=dtype)

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """Data-dependent parameters from queries ``[..., Lq, d]`` and keys ``[..., Lk, d]``."""
        return {}

    def log_features(
        self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(log_mag, factor)``, each ``[..., L, m * per_omega]`` (factor may be None)."""
        raise NotImplementedError

    def target_transform(self, x: torch.Tensor, params: Params, is_query: bool) -> torch.Tensor:
        """Map x so that the target kernel is exp(T(q) . T(k)); identity for the softmax kernel."""
        return x

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``[..., L, 1]`` squared norms of ``x: [..., L, d]``."""
    return (x * x).sum(dim=-1, keepdim=True)
