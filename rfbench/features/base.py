"""The feature-map interface (the Spectraformer "component function").

A feature map turns inputs ``x: [..., L, d]`` and a weight draw (``W: [m, d]``) into one-sample
features f(omega_i, x), returned in log-magnitude form so that stabilisers can be exact:

    features = factor * exp(log_mag)        (factor None means 1)

with both of shape ``[..., L, m * per_omega]``, laid out omega-major blocks: first the m
features of kind 0 (e.g. cos, or exp(+w x)), then the m of kind 1 (sin, exp(-w x)).

Contract: for one omega, sum over its ``per_omega`` features of f1(x) * f2(y) is an unbiased
one-sample estimate of the target kernel (the map includes its own 1/2 for antithetic pairs).
The 1/m average (or the quadrature row weights) is applied by the Estimator, not here.

Exponential maps state their math once, as ``exp_form(draw, params, d) -> ExpForm`` (log-features
affine in a projection of x plus a norm term, ``rfbench/ops/form.py``); ``log_features`` is then
derived from it here, and the fused kernels and metrics consume the same form. Other maps
(trigonometric, discrete) return None and implement ``log_features`` themselves.

Data-dependent parameters (OPRF's A*, SADERF's Psi*, DARK's Sigma) are computed by
``fit_params(q, k)`` as a dict of tensors whose leading dims match the data's ``[...]`` (with
the L and d axes reduced), and passed back into ``log_features``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from rfbench.errors import EstimatorError
from rfbench.features.target import SOFTMAX, TargetKernel
from rfbench.ops.features.naive import log_features as form_log_features
from rfbench.ops.form import ExpForm
from rfbench.weights.base import WeightDraw, WeightMatrix

Params = dict[str, torch.Tensor]


class FeatureMap:
    """Base class of feature maps. Constructors only store (validated) keyword parameters; an
    instance never changes after construction (fitted and trained state lives on the Estimator).

    Capabilities are the class attributes below (a subclass may settle one in ``_validate`` from
    its parameters, e.g. DARK is data-dependent only without a fixed M).
    """

    name: ClassVar[str] = ""
    #: Output features per random vector (2 for TrigRF and hyperbolic maps).
    per_omega: ClassVar[int] = 1
    #: True when every feature is >= 0 (so attention denominators are positive).
    positive: ClassVar[bool] = True
    #: True when phi(x) . phi(y) is an unbiased estimate of the target kernel (given Gaussian rows).
    unbiased: ClassVar[bool] = True
    #: True when ``fit_params`` depends on the data.
    data_dependent: ClassVar[bool] = False
    #: True when every tensor of ``fit_params`` is a trainable parameter (rfbench.learning trains them).
    learnable: ClassVar[bool] = False
    #: True when the trained tensors start from the draw itself (Hedgehog's layer): never redrawn in training.
    learns_draw: ClassVar[bool] = False
    #: True when the map only works with weight samplers whose rows are N(0, I) marginally.
    needs_gaussian_rows: ClassVar[bool] = True
    #: Names of the only weight matrices this map accepts (None: any that meets the row requirement).
    weights: ClassVar[tuple[str, ...] | None] = None
    #: Name of the kernel this map estimates (``target_kernel`` gives the kernel itself).
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
        if self.weights is not None and weights.name not in self.weights:
            return [self._weights_reason(weights)]
        if self.needs_gaussian_rows and not weights.gaussian_marginal:
            return [f"{self.name} needs rows with N(0, I) marginals, which {weights.name} does not give"]
        return []

    def _weights_reason(self, weights: WeightMatrix) -> str:
        return f"{self.name} pairs only with {', '.join(self.weights)}, not {weights.name}"

    def draw(self, weights: WeightMatrix, m: int, d: int, *, generator, device, dtype) -> WeightDraw:
        """Draw the random vectors this map uses. Maps with their own distribution override."""
        return weights.sample(m, d, generator=generator, device=device, dtype=dtype)

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """Data-dependent parameters from queries ``[..., Lq, d]`` and keys ``[..., Lk, d]``."""
        return {}

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm | None:
        """The affine log-feature form of an exponential map, before the 1/m average and row weights
        (the Estimator folds those in, once); None for maps that are not exponential."""
        return None

    def log_features(
        self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(log_mag, factor)``, each ``[..., L, m * per_omega]`` (factor may be None).

        Derived from ``exp_form`` for exponential maps; other maps override it.
        """
        form = self.exp_form(draw, params, x.shape[-1])
        if form is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither exp_form nor log_features")
        return form_log_features(x, form), None

    def target_kernel(self, params: Params) -> TargetKernel:
        """The kernel phi(q) . phi(k) estimates, at fitted ``params``; SOFTMAX unless a map says otherwise."""
        return SOFTMAX

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``[..., L, 1]`` squared norms of ``x: [..., L, d]``."""
    return (x * x).sum(dim=-1, keepdim=True)
