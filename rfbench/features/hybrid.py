"""Hybrid random features: the angular hybrid of PosRF and TrigRF (Choromanski et al., ICLR 2022).

Choromanski, Chen, Lin, Ma, Sehanobish, Jain, Ryoo, Varley, Zeng, Likhosherstov, Kalashnikov,
Sindhwani, Weller, "Hybrid Random Features", ICLR 2022 (arXiv 2110.04367), Sec. 3 (HRF
estimators) and Sec. 3.2 (angular hybrids): an estimate of exp(x . y) is a mixture

    K_hyb(x, y) = lambda(x, y) K_pos(x, y) + (1 - lambda(x, y)) K_trig(x, y),

with lambda itself estimated by random features independent of the base estimators, so that
the product of two estimates is one inner product of Kronecker features and stays unbiased.
The angular hybrid takes lambda = theta / pi (theta the angle between x and y), which puts the
positive estimator where it is accurate (x ~ -y, small kernel values) and the trigonometric one
where it is (x ~ y). theta / pi has the unbiased estimate from n sign features (Goemans &
Williamson; E[sgn(u . x) sgn(u . y)] = 1 - 2 theta / pi for u ~ N(0, I)):

    theta/pi     ~ 1/2 - (1/2n) sum_j sgn(u_j . x) sgn(u_j . y) = a(x) . b(y),
    1 - theta/pi ~ 1/2 + (1/2n) sum_j sgn(u_j . x) sgn(u_j . y) = a(x) . a(y),
    a(x) = [2^-1/2, sgn(U x) (2n)^-1/2],   b(y) = [2^-1/2, -sgn(U y) (2n)^-1/2]   (keys only).

Features per omega (omega-major blocks): a(x) (x) PosRF_i(x) (n + 1 of them), a(x) (x) cos, a(x) (x)
sin (2 (n + 1)); keys use b for the PosRF block. per_omega = 3 (n + 1).

Implemented: the angular hybrid with n = ``angular`` i.i.d. sign features, base omegas from any
Gaussian weight matrix (orthogonal ones included). Left out: the Gaussian-mixture lambdas and the
trained (clustered) lambda of Sec. 3.3-3.4, the bipolar estimators and the Gaussian-kernel
variants; no closed-form variance is stated here (the test checks unbiasedness only).
The draw: W ``[m + n, d]``, the m base omegas then the n angular directions u_j.
"""

from __future__ import annotations

import math

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params, sq_norm
from rfbench.weights.base import WeightDraw, WeightMatrix, normal


class AngularHybrid(FeatureMap):
    """lambda-angular HRF: theta/pi * PosRF + (1 - theta/pi) * TrigRF, lambda from sign features.

    Unbiased for exp(x . y) (HRF, Choromanski et al., ICLR 2022, Sec. 3.2). Signed features;
    query and key features differ (the key side negates the sign block of the PosRF part).
    """

    name = "hybrid"
    positive = False
    description = "angular hybrid random features (theta/pi PosRF + (1 - theta/pi) TrigRF)"
    reference = "Choromanski et al., Hybrid Random Features, ICLR 2022 (arXiv 2110.04367), Sec. 3.2"
    defaults = {"angular": 4}

    def _validate(self) -> None:
        n = self.params["angular"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
            raise EstimatorError(
                f"hybrid: angular (sign features for lambda) must be an integer in [1, 1024], got {n!r}"
            )
        self.per_omega = 3 * (n + 1)  # instance attribute: the size depends on the parameter

    def draw(self, weights: WeightMatrix, m: int, d: int, *, generator, device, dtype) -> WeightDraw:
        base = weights.sample(m, d, generator=generator, device=device, dtype=dtype)
        U = normal((self.params["angular"], d), generator).to(device=device, dtype=dtype)
        notes = (*base.notes, f"W rows m..m+{U.shape[0]} are the angular directions u_j (i.i.d. N(0, I))")
        return WeightDraw(torch.cat([base.W, U], dim=0), base.row_weights, notes)

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        """``(log|f|, sign f)``, ``[..., L, 3 m (n + 1)]``: a (x) pos, a (x) cos, a (x) sin (see module)."""
        n = self.params["angular"]
        W, U = draw.W[:-n], draw.W[-n:]
        wx = x @ W.T  # [..., L, m]
        half_sq = 0.5 * sq_norm(x)
        s = torch.sign(x @ U.T)  # [..., L, n]; sgn 0 has probability 0 for u ~ N(0, I)
        lead = x.shape[:-1]
        log_a = torch.cat(
            [torch.full((*lead, 1), -0.5 * math.log(2.0), dtype=x.dtype, device=x.device),
             torch.full((*lead, n), -0.5 * math.log(2.0 * n), dtype=x.dtype, device=x.device)], dim=-1
        )  # [..., L, n + 1]
        sa = torch.cat([torch.ones(*lead, 1, dtype=x.dtype, device=x.device), s], dim=-1)
        sb = sa if is_query else torch.cat([sa[..., :1], -s], dim=-1)

        def kron(log_u, sign_u, log_v, sign_v):  # [..., L, m] x [..., L, n+1] -> [..., L, (n+1) m]
            # omega-major: index j m + i, so row weights tiled per_omega times line up with omega i
            lg = (log_v.unsqueeze(-1) + log_u.unsqueeze(-2)).flatten(-2)
            sg = (sign_v.unsqueeze(-1) * sign_u.unsqueeze(-2)).flatten(-2)
            return lg, sg

        one = torch.ones_like(wx)
        lp, sp = kron(wx - half_sq, one, log_a, sb)  # PosRF (x) (b on keys)
        # TrigRF: exp(|x|^2/2) [cos, sin]; magnitudes |cos| and |sin| go into the sign factor
        lc, sc = kron(half_sq.expand_as(wx), torch.cos(wx), log_a, sa)
        ls, ss = kron(half_sq.expand_as(wx), torch.sin(wx), log_a, sa)
        return torch.cat([lp, lc, ls], dim=-1), torch.cat([sp, sc, ss], dim=-1)
