"""Random Maclaurin features for the dot-product kernel exp(x . y) (Kar & Karnick, AISTATS 2012).

Kar & Karnick, "Random Feature Maps for Dot Product Kernels", AISTATS 2012, Algorithm 1 and
Lemma 7: for K(x, y) = f(x . y) = sum_n a_n (x . y)^n with a_n >= 0 (here a_n = 1/n!), draw a
degree N with P(N = n) = p^-(n+1) and N independent Rademacher vectors w_1..w_N in {-1, 1}^d:

    Z(x) = sqrt(a_N / P(N)) prod_{j <= N} (w_j . x),     E[Z(x) Z(y)] = sum_n a_n (x . y)^n,

since E[(w . x)(w . y)] = x . y for Rademacher w. We use p = 2 (the paper's choice) and truncate
the degree at ``max_degree`` with the law renormalised (P(N = n) = 2^-(n+1) / Z_cap, Z_cap = 1 -
2^-(cap+1)), so the estimate is exactly unbiased for the degree-<= cap Maclaurin series, which
differs from exp(x . y) by less than |x.y|^(cap+1) / (cap+1)! e^|x.y| (1e-21 relative at |x.y| =
5, cap = 40): negligible wherever exp(x . y) itself is representable at attention scale.

One-sample variance (derived from Algorithm 1; docs/theory.md, Random Maclaurin):
    Var1 = Z_cap sum_{n <= cap} a_n^2 p^(n+1) mu4^n - K_cap^2,
    mu4 = E_w[(w.x)^2 (w.y)^2] = |x|^2 |y|^2 + 2 (x.y)^2 - 2 sum_l x_l^2 y_l^2   (Rademacher w).

The draw: W ``[D, m, d]`` holds the Rademacher vectors of layer j for every feature, with rows of
zeros beyond each feature's degree (D = the largest degree drawn); the degree of feature i is the
count of its non-zero rows. The map draws its own randomness (Gaussian weight matrices do not
apply), so it pairs with ``iid`` only. Features are signed (not positive).
"""

from __future__ import annotations

import math

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params
from rfbench.weights.base import WeightDraw, WeightMatrix

_LOG_P = math.log(2.0)  # p = 2, Kar & Karnick's choice


def _log_norm_const(cap: int) -> float:
    """log Z_cap, Z_cap = sum_{n <= cap} 2^-(n+1) = 1 - 2^-(cap+1)."""
    return math.log1p(-(2.0 ** -(cap + 1)))


def draw_degrees(m: int, cap: int, generator: torch.Generator) -> torch.Tensor:
    """``[m]`` int64 degrees with P(N = n) = 2^-(n+1) / Z_cap on {0..cap} (inverse CDF of one uniform)."""
    u = torch.rand(m, generator=generator, dtype=torch.float64) * -math.expm1(-(cap + 1) * _LOG_P)
    # F(n) = 1 - 2^-(n+1): the least n with F(n) >= u is ceil(-log2(1 - u)) - 1
    n = torch.ceil(-torch.log2(1 - u)) - 1
    return n.clamp(0, cap).to(torch.int64)


class RandomMaclaurin(FeatureMap):
    """Z(x) = sqrt(2^(N+1) Z_cap / N!) prod_{j <= N} (w_j . x), N ~ Geom(1/2) on {0..cap}, w_j Rademacher.

    Estimates exp(x . y) through its Maclaurin series (Kar & Karnick, AISTATS 2012, Algorithm 1),
    unbiased up to the truncation at ``max_degree`` (module docstring). One feature per draw.
    """

    name = "maclaurin"
    positive = False
    needs_gaussian_rows = False
    weights = ("iid",)  # the map draws its own degrees and Rademacher vectors
    description = "random Maclaurin features: random degree, product of Rademacher projections"
    reference = "Kar & Karnick, Random Feature Maps for Dot Product Kernels, AISTATS 2012, Algorithm 1"
    defaults = {"max_degree": 40}

    def _validate(self) -> None:
        cap = self.params["max_degree"]
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 200:
            raise EstimatorError(f"maclaurin: max_degree must be an integer in [1, 200], got {cap!r}")

    def _weights_reason(self, weights: WeightMatrix) -> str:
        return (
            f"random Maclaurin features draw their own degrees and Rademacher vectors; a Gaussian "
            f"weight matrix ({weights.name!r}) does not apply; use maclaurin-iid"
        )

    def draw(self, weights: WeightMatrix, m: int, d: int, *, generator, device, dtype) -> WeightDraw:
        """W ``[D, m, d]``: Rademacher rows, zero beyond each feature's degree (module docstring)."""
        cap = self.params["max_degree"]
        deg = draw_degrees(m, cap, generator)
        D = int(deg.max()) if m else 0
        signs = torch.randint(0, 2, (D, m, d), generator=generator, dtype=torch.float64) * 2 - 1
        live = torch.arange(D).unsqueeze(1) < deg.unsqueeze(0)  # [D, m]
        W = signs * live.unsqueeze(-1)
        note = f"W holds Rademacher rows per degree layer [D={D}, m, d]; degrees 0..{cap}, p = 2"
        return WeightDraw(W.to(device=device, dtype=dtype), notes=(note,))

    def degrees(self, draw: WeightDraw) -> torch.Tensor:
        """``[m]`` degrees of the draw's features (non-zero layers)."""
        return (draw.W.abs().sum(-1) > 0).sum(0)

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        """``(log|Z|, sign Z)``, each ``[..., L, m]``; log|Z| = -inf where some w_j . x = 0."""
        cap = self.params["max_degree"]
        W = draw.W.to(device=x.device, dtype=x.dtype)
        live = W.abs().sum(-1) > 0  # [D, m]
        n = live.sum(0).to(x.dtype)  # [m]
        proj = torch.einsum("...ld,jmd->...ljm", x, W)  # [..., L, D, m]
        # dead layers contribute the factor 1 (log 0, sign +1)
        log_abs = torch.where(live, torch.log(proj.abs()), 0.0).sum(-2)
        negative = torch.where(live, (proj < 0).to(x.dtype), 0.0).sum(-2)
        sign = 1 - 2 * torch.remainder(negative, 2)
        log_coef = 0.5 * ((n + 1) * _LOG_P + _log_norm_const(cap) - torch.lgamma(n + 1))
        return log_abs + log_coef, sign


# --------------------------------------------------------------------------- closed-form variance
def maclaurin_variance(fm, x, y, fit) -> torch.Tensor:
    """Var1 = Z_cap sum_{n <= cap} p^(n+1) mu4^n / (n!)^2 - K_cap^2 (module docstring), ``[...]``.

    Summed in log space (mu4^n / n!^2 overflows at large norms long before its sum matters)."""
    cap = fm.params["max_degree"]
    t = (x * y).sum(-1)
    mu4 = (x * x).sum(-1) * (y * y).sum(-1) + 2 * t * t - 2 * (x * x * y * y).sum(-1)
    n = torch.arange(cap + 1, dtype=x.dtype, device=x.device)
    lg = torch.lgamma(n + 1)
    log_terms = (n + 1) * _LOG_P + n * torch.log(mu4.clamp(min=1e-300)).unsqueeze(-1) - 2 * lg
    log_terms = torch.where((mu4.unsqueeze(-1) > 0) | (n == 0), log_terms, -math.inf)
    m2 = torch.exp(torch.logsumexp(log_terms, dim=-1) + _log_norm_const(cap))
    k_cap = (t.unsqueeze(-1) ** n / torch.exp(lg)).sum(-1)
    return m2 - k_cap * k_cap


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"maclaurin": maclaurin_variance}
