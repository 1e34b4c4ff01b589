"""Positive random features: PosRF (FAVOR+) and its antithetic hyperbolic variant."""

from __future__ import annotations

import math

import torch

from rfbench.features.base import FeatureMap, Params
from rfbench.ops.form import ExpForm
from rfbench.weights.base import WeightDraw


class PosRF(FeatureMap):
    """SM^+: f(omega, x) = exp(omega . x - |x|^2 / 2), omega ~ N(0, I).

    Estimates the softmax kernel exp(x . y), unbiased. One-sample variance
    Var1 = exp(2 x.y) (exp(|x + y|^2) - 1) (Choromanski et al., ICLR 2021, Lemma 1 and 2).
    """

    name = "posrf"
    description = "positive random features (FAVOR+)"
    reference = "Choromanski et al., Rethinking Attention with Performers, ICLR 2021, Lemma 1"

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        """log f = omega . x - |x|^2 / 2: W = omega, bias = 0."""
        W = draw.W
        return ExpForm(W, torch.zeros(W.shape[0], dtype=W.dtype, device=W.device))


class HypRF(FeatureMap):
    """SM^hyp+: f = 2^-1/2 exp(-|x|^2 / 2) [exp(omega . x), exp(-omega . x)], 2 features per omega.

    Estimates exp(x . y), unbiased; the antithetic pair (omega, -omega) of PosRF.
    Var1 = 1/2 exp(-|x|^2 - |y|^2) (exp(|x + y|^2) - 1)^2 (Choromanski et al., ICLR 2021, Lemma 1/2).
    """

    name = "hyprf"
    per_omega = 2
    description = "hyperbolic positive random features (antithetic PosRF)"
    reference = "Choromanski et al., Rethinking Attention with Performers, ICLR 2021, Lemma 1"

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        """W = [omega; -omega] (omega-major blocks), bias = log(2^-1/2): the 1/2 averages the pair."""
        W = draw.W
        bias = torch.full((2 * W.shape[0],), -0.5 * math.log(2.0), dtype=W.dtype, device=W.device)
        return ExpForm(torch.cat([W, -W], dim=0), bias)


# --------------------------------------------------------------------------- closed-form variance
def posrf_variance(fm, x, y, fit) -> torch.Tensor:
    """Var1 = e^(2x.y) (e^|x+y|^2 - 1), x, y ``[..., d]`` -> ``[...]`` (Choromanski et al., ICLR 2021,
    Lemma 2). The protocol is rfbench.theory's."""
    s = x + y
    return torch.exp(2 * (x * y).sum(dim=-1)) * torch.expm1((s * s).sum(dim=-1))


def hyprf_variance(fm, x, y, fit) -> torch.Tensor:
    """Var1 = 1/2 e^(-|x|^2-|y|^2) (e^|x+y|^2 - 1)^2 = 2 e^(2x.y) sinh^2(|x+y|^2 / 2): PosRF's second
    moment averaged over the pair (omega, -omega), whose cross term is e^(-|x|^2-|y|^2) (SM^hyp+ of
    Choromanski et al., ICLR 2021, Lemma 1)."""
    s = x + y
    return 2 * torch.exp(2 * (x * y).sum(dim=-1)) * torch.sinh(0.5 * (s * s).sum(dim=-1)) ** 2


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"posrf": posrf_variance, "hyprf": hyprf_variance}
