"""Trigonometric random features (random Fourier features for the softmax kernel)."""

from __future__ import annotations

import torch

from rfbench.features.base import FeatureMap, Params, sq_norm
from rfbench.weights.base import WeightDraw


class TrigRF(FeatureMap):
    """SM^trig: f(omega, x) = exp(|x|^2 / 2) [cos(omega . x), sin(omega . x)], omega ~ N(0, I).

    Two features per omega; f(x) . f(y) = exp((|x|^2 + |y|^2) / 2) cos(omega . (x - y)), whose
    mean is exp(x . y) (the Gaussian characteristic function), so the estimate is unbiased.
    One-sample variance (Choromanski et al., ICLR 2021, Lemma 2; docs/theory.md §1.1):
        Var1 = 1/2 exp(|x + y|^2) SM(x, y)^-2 (1 - exp(-|x - y|^2))^2
             = exp(2 x.y) (cosh(|x - y|^2) - 1),
    large where SM is small (x ~ -y), which makes attention denominators unstable.
    """

    name = "trigrf"
    per_omega = 2
    positive = False
    description = "trigonometric random features exp(|x|^2/2)[cos, sin] (random Fourier features)"
    reference = (
        "Rahimi & Recht, Random Features for Large-Scale Kernel Machines, NeurIPS 2007; "
        "Choromanski et al., Rethinking Attention with Performers, ICLR 2021, Lemma 2"
    )

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        wx = x @ draw.W.T  # [..., L, m]
        log_mag = (0.5 * sq_norm(x)).expand(*wx.shape[:-1], 2 * wx.shape[-1])
        return log_mag, torch.cat([torch.cos(wx), torch.sin(wx)], dim=-1)


# --------------------------------------------------------------------------- closed-form variance
def trigrf_variance(fm, x, y, fit) -> torch.Tensor:
    """Var1 = e^(2x.y) (cosh|x-y|^2 - 1) = 2 e^(2x.y) sinh^2(|x-y|^2 / 2), x, y ``[..., d]`` -> ``[...]``
    (Choromanski et al., ICLR 2021, Lemma 2). The protocol is rfbench.theory's."""
    z = x - y
    return 2 * torch.exp(2 * (x * y).sum(dim=-1)) * torch.sinh(0.5 * (z * z).sum(dim=-1)) ** 2


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"trigrf": trigrf_variance}
