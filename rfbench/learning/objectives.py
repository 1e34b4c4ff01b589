"""Training losses of kernel learners, each on a batch of tokens used both as queries and keys.

Every objective is evaluated at the attention scale (the estimator sees x * scale**0.5):

- ``"attention"``: |out - out_exact|_F^2 / |out_exact|_F^2, out_exact the exact softmax attention
  of the batch (needs v): the squared ``out_rel_err`` of the results.
- ``"kernel"``: relative MSE of the kernel estimate against exp(q . k * scale), per leading index
  (head), sum_ij (K_hat - K)^2 / sum_ij K^2, averaged over heads: ``kernel_rel_mse``.
- ``"variance"``: the estimator's variance about a target kernel that does not move while it
  learns, in closed form (``log_second_moment`` of the feature map: i.i.d. rows, Var1 / m),
  relative as above. Only ``darkl`` with ``mode="is"`` (a learned proposal for exp(q . k)) has
  one; a map that learns its kernel would minimise it by shrinking the kernel to a constant.
- ``"crossentropy"``: the attention-weight distillation loss of Hedgehog (Zhang et al., ICLR 2024,
  arXiv 2402.04347, Sec. 4.1), -(1/Lq) sum_ij a_ij log a^_ij with a_ij = softmax_j(q_i . k_j * scale)
  and a^_ij = K^_ij / sum_j' K^_ij' the estimator's row-normalised weights (positive maps only).
  Scale-free in the estimate (per-query constants cancel), >= the mean entropy of the a_i (Gibbs),
  with equality iff a^ = a; a constant kernel scores log Lk.

The estimator is used duck-typed (``params_``, ``log_features``, ``attention``, ``feature_map``,
``num_features``): this package never imports ``rfbench.estimator``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rfbench import exact
from rfbench.ops.features.naive import stabiliser_constant

#: An ``rfbench.estimator.Estimator``, used duck-typed: this package never imports the estimator.
EstimatorLike = Any


def kernel_hat(
    est: EstimatorLike, qs: torch.Tensor, ks: torch.Tensor, params
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K_hat / e^c, c)`` for all pairs of the scaled ``qs [..., Lq, d]``, ``ks [..., Lk, d]``.

    The query constant is its row max, the key constant one max shared by all keys: exp() of
    what is left is <= 1, and c = c_q + c_k multiplies the estimate back exactly.
    """
    lq, fq = est.log_features(qs, params, True)
    lk, fk = est.log_features(ks, params, False)
    cq, ck = stabiliser_constant(lq, "row"), stabiliser_constant(lk, "shared")
    Q, K = torch.exp(lq - cq), torch.exp(lk - ck)
    if fq is not None:
        Q = Q * fq
    if fk is not None:
        K = K * fk
    return Q @ K.transpose(-1, -2), cq + ck.transpose(-1, -2)


def rel_mse(log_hat_parts: tuple[torch.Tensor, torch.Tensor], logK: torch.Tensor) -> torch.Tensor:
    """Per leading index sum (K_hat - K)^2 / sum K^2, averaged; computed relative to max K."""
    G, log_g = log_hat_parts
    c = logK.detach().amax(dim=(-2, -1), keepdim=True)  # K / e^c <= 1: no overflow; ratio unchanged
    t = torch.exp(logK - c)
    r = G * torch.exp(log_g - c)
    num = ((r - t) ** 2).sum(dim=(-2, -1))
    return (num / (t * t).sum(dim=(-2, -1))).mean()


def weight_cross_entropy(G: torch.Tensor, logK: torch.Tensor) -> torch.Tensor:
    """-(1/Lq) sum_ij a_ij log(G_ij / sum_j' G_ij'), averaged over leading indices.

    ``G [..., Lq, Lk]``: nonnegative estimates up to a per-query factor (``kernel_hat``'s first
    part: its constants cancel in the row normalisation); ``logK``: the exact logits, a = softmax.
    """
    a = torch.softmax(logK.detach(), dim=-1)
    # clamp: a product that underflowed to 0 would give log 0 = -inf (0 * -inf = NaN where a_ij = 0
    # too); tiny is far below any weight that matters, so the loss changes by nothing measurable
    G = G.clamp_min(torch.finfo(G.dtype).tiny)
    log_w = torch.log(G) - torch.log(G.sum(dim=-1, keepdim=True))
    return -(a * log_w).sum(dim=-1).mean()


class Objective:
    """Loss of the estimator's current parameters on (q, k, v) tokens, at the attention scale.

    ``Objective(est, "kernel", scale)(q, k, v)`` -> a 0-d tensor (differentiable in the
    estimator's ``params_`` and ``draw_``). ``ref``: the exact attention of (q, k, v), if known.
    """

    def __init__(self, est: EstimatorLike, objective: str, scale: float):
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
        if self.objective == "crossentropy":
            return weight_cross_entropy(kernel_hat(est, qs, ks, params)[0], logK)
        if self.objective == "kernel":
            return rel_mse(kernel_hat(est, qs, ks, params), logK)
        # variance: closed-form second moment E[Y^2] of one i.i.d. sample, Var = (E[Y^2] - K^2) / m.
        # float64 and log-sum-exp: on real queries/keys sum E[Y^2] / sum K^2 reaches e^100 and more
        # (PosRF's relative variance is e^|q+k|^2 - 1), beyond float32; the ratio itself is exact.
        p64 = {key: t.double() for key, t in params.items()}
        log_e2 = est.feature_map.log_second_moment(qs.double(), ks.double(), p64)
        log_k2 = 2 * logK.double().flatten(-2)
        log_ratio = torch.logsumexp(log_e2.flatten(-2), -1) - torch.logsumexp(log_k2, -1)
        return torch.expm1(log_ratio).mean() / est.num_features  # float64: may exceed the float32 range
