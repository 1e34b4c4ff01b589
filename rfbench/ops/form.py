"""ExpForm: the affine log-feature form every exponential random-feature map reduces to.

    log phi_f(x) = (x W^T)_f + bias_f + coef * |x P^T|^2          (P = I when None)
    phi_f(x)     = sign_f * exp(log phi_f(x))                      (query side; keys: sign 1)

Each exponential feature map writes its own form once (``FeatureMap.exp_form`` in its family file,
``rfbench/features/``); the Estimator folds in the 1/m average (or the quadrature row weights and
their signs) and the input scale. The torch references and the fused kernels in ``rfbench.ops``
consume the form and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpForm:
    """log phi_f(x) = (x W^T)_f + bias_f + coef |x P^T|^2, features sign_f exp(log phi_f).

    W: ``[..., F, d]`` (leading dims broadcast against the data's, e.g. one per head).
    bias: ``[..., F]``.
    coef: the coefficient of the squared norm (-1/2 for every map in rfbench).
    P: ``[..., d, d]`` or None (identity): the norm is taken of P x (DARK's M x).
    sign: ``[F]`` or None (all +1): the query-side sign of signed quadrature row weights
        (sparse grids); keys are always unsigned, so sum_f phi_f(q) phi_f(k) carries each sign once.
    """

    W: torch.Tensor
    bias: torch.Tensor
    coef: float = -0.5
    P: torch.Tensor | None = None
    sign: torch.Tensor | None = None

    @property
    def feature_dim(self) -> int:
        return self.W.shape[-2]

    @property
    def dim(self) -> int:
        return self.W.shape[-1]

    @property
    def signed(self) -> bool:
        """True when some query-side feature is negated (the fused kernels serve unsigned forms)."""
        return self.sign is not None

    def scaled(self, s: float) -> ExpForm:
        """The form of ``s * x``: W s and coef s^2 (P's norm scales with x)."""
        return ExpForm(self.W * s, self.bias, self.coef * s * s, self.P, self.sign)

    def to(self, device=None, dtype=None) -> ExpForm:
        P = None if self.P is None else self.P.to(device=device, dtype=dtype)
        sign = None if self.sign is None else self.sign.to(device=device, dtype=dtype)
        W, bias = self.W.to(device=device, dtype=dtype), self.bias.to(device=device, dtype=dtype)
        return ExpForm(W, bias, self.coef, P, sign)

    def lead_shape(self) -> torch.Size:
        """Leading (batch/head) dims the parameters carry; () when shared by all."""
        shapes = [self.W.shape[:-2], self.bias.shape[:-1]]
        if self.P is not None:
            shapes.append(self.P.shape[:-2])
        return torch.broadcast_shapes(*shapes)
