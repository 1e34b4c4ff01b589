"""Taylor-2: the deterministic second-order feature map behind Based (a biased baseline).

Arora et al., "Simple linear attention language models balance the recall-throughput tradeoff"
(Based), ICML 2024, Sec. 3.1 (the Taylor feature map, after Keles et al. 2023 and Zhang et al.
2024): phi(x) = [1, x, vec(x x^T) / sqrt 2], so

    phi(x) . phi(y) = 1 + x.y + (x.y)^2 / 2,

the second-order Taylor polynomial of exp(x . y). We store the symmetric part once: the d
squares x_l^2 / sqrt 2 and the d(d-1)/2 cross products x_l x_k (l < k), F = 1 + d + d(d+1)/2
features with the same inner product. No randomness: the estimate is deterministic, variance 0,
and its error is exactly (``taylor2_error``)

    exp(t) - (1 + t + t^2 / 2) = sum_{n >= 3} t^n / n!,   t = x . y,

>= 0 for t >= 0 (the map underestimates), and for t < 0 it has the sign of -t^3 (overestimates).
The polynomial is >= 1/2 for every t (its minimum, at t = -1), so attention denominators stay
positive although single features are signed.

``num_features`` must be F (the map has one size); the Estimator's 1/sqrt(m) per side is put back.
"""

from __future__ import annotations

import math

import torch

from rfbench.errors import UnsupportedError
from rfbench.features.base import FeatureMap, Params
from rfbench.weights.base import WeightDraw, WeightMatrix


def taylor2_size(d: int) -> int:
    """F = 1 + d + d (d + 1) / 2, the number of Taylor-2 features in dimension d."""
    return 1 + d + d * (d + 1) // 2


class Taylor2(FeatureMap):
    """phi(x) = [1, x, x_l^2 / sqrt 2, x_l x_k (l < k)]: phi(x) . phi(y) = 1 + x.y + (x.y)^2 / 2.

    Deterministic and biased for exp(x . y), with the exact error ``taylor2_error`` (Based,
    Arora et al., ICML 2024, Sec. 3.1). ``num_features`` must be ``taylor2_size(d)``.
    """

    name = "taylor2"
    positive = False
    unbiased = False
    needs_gaussian_rows = False
    weights = ("iid",)  # nothing is drawn; "iid" is the placeholder pairing
    description = "deterministic 2nd-order Taylor map 1 + x.y + (x.y)^2/2 (Based); biased baseline"
    reference = "Arora et al., Based, ICML 2024, Sec. 3.1 (Taylor feature map)"

    @staticmethod
    def fixed_num_features(d: int) -> int:
        """The only ``num_features`` this map takes at dimension d (generic callers read this)."""
        return taylor2_size(d)

    def _weights_reason(self, weights: WeightMatrix) -> str:
        return f"taylor2 draws nothing; a weight matrix ({weights.name!r}) does not apply; use taylor2-iid"

    def draw(self, weights: WeightMatrix, m: int, d: int, *, generator, device, dtype) -> WeightDraw:
        """No random draw: W ``[F, d]`` of zeros records the size; refuses m != F."""
        F = taylor2_size(d)
        if m != F:
            raise UnsupportedError(
                [f"taylor2 has exactly 1 + d + d(d+1)/2 = {F} features at d={d}; pass num_features={F}"]
            )
        note = "deterministic map: W is zeros (nothing is drawn)"
        return WeightDraw(torch.zeros(F, d, device=device, dtype=dtype), notes=(note,))

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        """``(log|phi|, sign phi)``, ``[..., L, F]``, with +log(F)/2 undoing the Estimator's 1/sqrt(F)."""
        d = x.shape[-1]
        iu = torch.triu_indices(d, d, offset=1, device=x.device)
        ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        phi = torch.cat(
            [ones, x, x * x * (0.5**0.5), x[..., iu[0]] * x[..., iu[1]]], dim=-1
        )
        return torch.log(phi.abs()) + 0.5 * math.log(phi.shape[-1]), torch.sign(phi)


def taylor2_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 + t + t^2 / 2 for t = x . y: x, y ``[..., d]`` -> ``[...]``."""
    t = (x * y).sum(-1)
    return 1 + t + 0.5 * t * t


def taylor2_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """exp(t) - (1 + t + t^2/2), t = x . y, x, y ``[..., d]`` -> ``[...]``: the exact (signed) error.

    Written as expm1(t) - t - t^2/2 (accurate to rounding near t = 0, where it is ~ t^3 / 6)."""
    t = (x * y).sum(-1)
    small = t.abs() < 1e-2
    series = t**3 / 6 + t**4 / 24 + t**5 / 120  # next term t^6/720 < 2e-15 |t|^3 here
    return torch.where(small, series, torch.expm1(t) - t - 0.5 * t * t)
