"""ReLU random features for the arc-cosine kernel of order 1 (Cho & Saul, NeurIPS 2009).

Cho & Saul, "Kernel Methods for Deep Learning", NeurIPS 2009, Eq. (1)-(6): for w ~ N(0, I_d),

    k_n(x, y) = 2 E_w[relu(w . x)^n relu(w . y)^n] = (1/pi) |x|^n |y|^n J_n(t),
    J_1(t) = sin t + (pi - t) cos t,   J_2(t) = 3 sin t cos t + (pi - t)(1 + 2 cos^2 t),

t the angle between x and y. So f(w, x) = sqrt(2) relu(w . x) gives f(w, x) f(w, y) with mean
k_1(x, y): an unbiased one-sample estimate of k_1, with second moment 4 E[relu(w.x)^2 relu(w.y)^2]
= 2 k_2(x, y), hence Var1 = 2 k_2 - k_1^2 (``relu_variance``). The target is not exp(q . k): the
map is the worked example of a declared non-exponential target (``target_kernel``).
"""

from __future__ import annotations

import math

import torch

from rfbench.features.base import FeatureMap, Params
from rfbench.features.target import TargetKernel
from rfbench.weights.base import WeightDraw

TARGET = "arccos1: arc-cosine kernel of order 1, (1/pi) |q| |k| (sin t + (pi - t) cos t)"
_LOG_SQRT2 = 0.5 * math.log(2.0)


def _norms_and_cos(x: torch.Tensor, y: torch.Tensor, pairs: bool):
    """|x|, |y| and cos t: for all pairs (``pairs``: x ``[..., Lx, d]``, y ``[..., Ly, d]`` ->
    ``[..., Lx, Ly]``) or elementwise (x, y ``[..., d]`` -> ``[...]``). cos t is 0 where a norm is 0
    (the kernel is 0 there)."""
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    if pairs:
        nx, ny = nx.unsqueeze(-1), ny.unsqueeze(-2)
        dot = x @ y.transpose(-1, -2)
    else:
        dot = (x * y).sum(dim=-1)
    den = nx * ny
    cos = torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0).clamp(-1.0, 1.0)
    return nx, ny, cos


def arccos_j1(cos: torch.Tensor) -> torch.Tensor:
    """J_1(t) = sin t + (pi - t) cos t from cos t (Cho & Saul 2009, Eq. 6). In [0, pi], 0 at t = pi."""
    t = torch.arccos(cos)
    j1 = torch.sqrt((1 - cos * cos).clamp(min=0.0)) + (math.pi - t) * cos
    return j1.clamp(min=0.0)  # the two terms cancel near t = pi; rounding must not go below 0


def arccos_j2(cos: torch.Tensor) -> torch.Tensor:
    """J_2(t) = 3 sin t cos t + (pi - t)(1 + 2 cos^2 t) from cos t (Cho & Saul 2009, Eq. 6)."""
    t = torch.arccos(cos)
    j2 = 3 * torch.sqrt((1 - cos * cos).clamp(min=0.0)) * cos + (math.pi - t) * (1 + 2 * cos * cos)
    return j2.clamp(min=0.0)  # as J_1: cancellation near t = pi


def arccos1_log_kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log k_1(q, k) for pair tiles: q ``[..., tq, d]``, k ``[..., tk, d]`` -> ``[..., tq, tk]``.

    log |q| + log |k| - log pi + log J_1(t); -inf where q or k is 0 or t = pi (k_1 = 0 there).
    """
    nq, nk, cos = _norms_and_cos(q, k, pairs=True)
    return torch.log(nq) + torch.log(nk) - math.log(math.pi) + torch.log(arccos_j1(cos))


class ReLU(FeatureMap):
    """f(omega, x) = sqrt(2) max(0, omega . x), omega ~ N(0, I): one feature per omega.

    Estimates the arc-cosine kernel k_1(x, y) = (1/pi) |x| |y| (sin t + (pi - t) cos t) (Cho &
    Saul, NeurIPS 2009, Eq. 6 with J_1), unbiased with Gaussian rows; not an exponential map
    (no ``exp_form``). The Estimator applies 1/sqrt(m) per side. Features are >= 0 but may all
    be 0 for a token (each is 0 with probability 1/2 under i.i.d. rows): such a row's
    log-features are all -inf, and attention normalises by phi(q) . sum_j phi(k_j), the
    estimate of sum_j k_1(q, k_j).
    """

    name = "relu"
    positive = True
    unbiased = True
    needs_gaussian_rows = True
    target = TARGET
    description = "ReLU random features sqrt(2) max(0, w.x) for the arc-cosine kernel of order 1"
    reference = "Cho & Saul, Kernel Methods for Deep Learning, NeurIPS 2009, Eq. 6 (n = 1)"

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        """``(log(max(0, x W^T)) + log sqrt 2, None)``, ``[..., L, m]``; -inf where w . x <= 0."""
        return torch.log(torch.relu(x @ draw.W.T)) + _LOG_SQRT2, None

    def target_kernel(self, params: Params) -> TargetKernel:
        return TargetKernel(TARGET, arccos1_log_kernel)


# --------------------------------------------------------------------------- closed-form variance
def relu_variance(fm, x, y, fit) -> torch.Tensor:
    """Var1 = 2 k_2(x, y) - k_1(x, y)^2 for x, y ``[..., d]`` -> ``[...]``: the one-sample second moment
    is 4 E[relu(w.x)^2 relu(w.y)^2] = 2 k_2 (Cho & Saul 2009, Eq. 1 and 6 with n = 2). Monte-Carlo
    checked in tests/features/test_relu.py. The protocol is rfbench.theory's."""
    nx, ny, cos = _norms_and_cos(x, y, pairs=False)
    k1 = nx * ny * arccos_j1(cos) / math.pi
    k2 = (nx * ny) ** 2 * arccos_j2(cos) / math.pi
    return 2 * k2 - k1 * k1


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"relu": relu_variance}
