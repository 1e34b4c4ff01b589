"""The parameters every positive-family op takes, and how to read them off an Estimator.

All positive feature maps in rfbench have log-features affine in a projection of x:

    log phi_f(x) = (W x)_f + bias_f + coef * |P x|^2          (P = I when None)

- PosRF (Performer Lemma 1): W = omega, bias = 0, coef = -1/2.
- hyperbolic PosRF: W = [omega; -omega] (2m rows), bias = -log(2)/2.
- GERF / OPRF with real A (CRT sec. 3, ALGORITHMS.md 1.5-1.6): W = sqrt(1 - 4A) omega,
  bias_f = A |omega_f|^2 + (d/4) log(1 - 4A) (A may be one per leading index, OPRF's A*).
- DARK (PosRF on M x): W = omega M, P = M. DARKIS / darkl "is": W = omega' (the proposal's rows,
  times M when inputs are transformed), bias = the importance weight log sqrt(p_I / p_Sigma).

The Estimator's 1/m average (or its quadrature row weights) is folded into ``bias``. Attention's
input scale s (the feature map sees s * x) folds in too: W -> s W, coef -> s^2 coef.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rfbench.errors import UnsupportedError


@dataclass(frozen=True)
class PositiveFeatures:
    """log phi_f(x) = (W x)_f + bias_f + coef |P x|^2.

    W: ``[..., F, d]`` (leading dims broadcast against the data's, e.g. one per head).
    bias: ``[..., F]``.
    coef: the coefficient of the squared norm (-1/2 for every map above).
    P: ``[..., d, d]`` or None (identity): the norm is taken of P x (DARK's M x).
    """

    W: torch.Tensor
    bias: torch.Tensor
    coef: float = -0.5
    P: torch.Tensor | None = None

    @property
    def feature_dim(self) -> int:
        return self.W.shape[-2]

    @property
    def dim(self) -> int:
        return self.W.shape[-1]

    def scaled(self, s: float) -> PositiveFeatures:
        """The map of ``s * x``: W s and coef s^2 (P's norm scales with x)."""
        return PositiveFeatures(self.W * s, self.bias, self.coef * s * s, self.P)

    def to(self, device=None, dtype=None) -> PositiveFeatures:
        P = None if self.P is None else self.P.to(device=device, dtype=dtype)
        return PositiveFeatures(
            self.W.to(device=device, dtype=dtype), self.bias.to(device=device, dtype=dtype), self.coef, P
        )

    def lead_shape(self) -> torch.Size:
        """Leading (batch/head) dims the parameters carry; () when shared by all."""
        shapes = [self.W.shape[:-2], self.bias.shape[:-1]]
        if self.P is not None:
            shapes.append(self.P.shape[:-2])
        return torch.broadcast_shapes(*shapes)


# ----------------------------------------------------------------------------- adapters
# Each takes (feature_map, W [m, d] of the draw, fitted params, d) and returns (W_eff, bias, P)
# *before* the 1/m or row-weight term; one per family, as the feature modules are.


def _transform_of(fm, params, d: int, like: torch.Tensor) -> torch.Tensor | None:
    """M ``[..., d, d]`` of a map whose target_transform is x -> M x (None when it is the identity).

    Read through the public ``target_transform``: applied to the identity it returns M^T.
    """
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    Mt = fm.target_transform(eye, params, True)
    if Mt.shape == eye.shape and torch.equal(Mt, eye):
        return None
    return Mt.transpose(-1, -2)


def _posrf(fm, W, params, d):
    return W, torch.zeros(W.shape[0], dtype=W.dtype, device=W.device), None


def _hyprf(fm, W, params, d):
    bias = torch.full((2 * W.shape[0],), -0.5 * math.log(2.0), dtype=W.dtype, device=W.device)
    return torch.cat([W, -W], dim=0), bias, None  # omega-major blocks, as HypRF lays them out


def _gerf(fm, W, params, d):
    A = params["A"] if "A" in params else fm.params["A"]
    A = torch.as_tensor(A, dtype=W.dtype, device=W.device)
    A = A.reshape(*A.shape[:-2], 1) if A.ndim >= 2 else A  # OPRF's [..., 1, 1] -> [..., 1]
    W_eff = torch.sqrt(1 - 4 * A).unsqueeze(-1) * W  # [..., m, d]
    bias = A * (W * W).sum(dim=-1) + 0.25 * d * torch.log1p(-4 * A)
    return W_eff, bias, None


def _dark(fm, W, params, d):
    M = fm.transform(params).to(device=W.device, dtype=W.dtype)  # fixed or fitted: no probe, no sync
    return W @ M, torch.zeros(W.shape[0], dtype=W.dtype, device=W.device), M


def _importance(W: torch.Tensor, omega: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """log sqrt(p_I / p_Sigma)(omega) = (|w|^2 - |omega|^2 + log det Sigma) / 4, ``[..., m]``."""
    return 0.25 * ((W * W).sum(-1) - (omega * omega).sum(-1) + log_det.unsqueeze(-1))


def _darkis(fm, W, params, d):
    if "sqrt_sigma_star" not in params:
        raise UnsupportedError("darkis needs its fitted proposal: call est.fit(q, k) first")
    R = params["sqrt_sigma_star"].to(device=W.device, dtype=W.dtype)
    omega = W @ R
    bias = _importance(W, omega, params["log_det"].to(device=W.device, dtype=W.dtype))
    M = _transform_of(fm, params, d, W)
    return (omega if M is None else omega @ M), bias, M


def _darkl(fm, W, params, d):
    M = fm.transform(params).to(device=W.device, dtype=W.dtype)
    if fm.params["mode"] == "aligned":
        return W @ M, torch.zeros(W.shape[0], dtype=W.dtype, device=W.device), M
    omega = W @ M
    log_det = 2 * torch.linalg.slogdet(M).logabsdet
    return omega, _importance(W, omega, log_det), None


#: Feature-map name -> adapter. A map not listed here is served by the torch path.
ADAPTERS: dict[str, Callable] = {
    "posrf": _posrf,
    "hyprf": _hyprf,
    "gerf": _gerf,
    "oprf": _gerf,
    "dark": _dark,
    "darkis": _darkis,
    "darkl": _darkl,
}


def not_supported_reasons(est) -> list[str]:
    """Why ``est`` cannot be written as PositiveFeatures (empty when it can)."""
    reasons = []
    name = est.feature_map.name
    if name not in ADAPTERS:
        reasons.append(
            f"feature map {name!r} is not of the positive exponential family the fused kernels serve "
            f"({', '.join(ADAPTERS)})"
        )
    if est.draw_.signed:
        reasons.append(
            f"weight matrix {est.weight_matrix.name!r} drew negative quadrature weights, so the features "
            "are signed; the fused kernels serve positive features only"
        )
    return reasons


def from_estimator(est, params: dict | None = None, scale: float = 1.0) -> PositiveFeatures:
    """PositiveFeatures of ``est`` (its draw, ``params`` fitted or {}), for inputs ``scale**0.5 * x``.

    Raises UnsupportedError (with the reasons) for maps outside the positive family.
    """
    reasons = not_supported_reasons(est)
    if reasons:
        raise UnsupportedError(reasons)
    draw = est.draw_
    W = draw.W
    W_eff, bias, P = ADAPTERS[est.feature_map.name](est.feature_map, W, params or {}, est.dim)
    per = est.feature_map.per_omega
    if draw.row_weights is None:
        bias = bias - 0.5 * math.log(est.num_omega)  # 1/sqrt(m) on each side
    else:
        bias = bias + 0.5 * torch.log(draw.row_weights.abs()).repeat(per)  # sqrt(w_i) on each side
    fp = PositiveFeatures(W_eff, bias, -0.5, P)
    return fp.scaled(math.sqrt(scale)) if scale != 1.0 else fp
