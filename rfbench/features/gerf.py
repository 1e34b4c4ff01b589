"""Generalised exponential random features (GERF) and the optimal positive RF (OPRF, FAVOR++).

Chefs' Random Tables (CRT; Likhosherstov, Choromanski, Dubey, Liu, Sarlos, Weller, NeurIPS 2022,
arXiv 2205.15317), section 3. With omega ~ N(0, I_d), s in {-1, +1} and a real A:

    f1(omega, x) = D exp(A |omega|^2 + B omega . x + C |x|^2)
    f2(omega, y) = D exp(A |omega|^2 + s B omega . y + C |y|^2)

For the softmax kernel exp(x . y) (docs/theory.md §1.5, derived): B = sqrt(s (1 - 4A)),
C = -s/2 and D = (1 - 4A)^(d/4). C = -(s + 1)/2 is the *Gaussian*-kernel constant; using it
for softmax multiplies every key by exp(-|k|^2/2) (the Spectraformer defect of section 0a).

E[(f1 f2)^2] involves E exp(4A |omega|^2) = (1 - 8A)^(-d/2), finite only for A < 1/8: for
1/8 <= A < 1/4 the estimate is unbiased but its variance is infinite, so A >= 1/8 is refused.
"""

from __future__ import annotations

import math
import numbers

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params, sq_norm
from rfbench.ops.form import ExpForm
from rfbench.weights.base import WeightDraw

#: Default A of ``gerf``: the OPRF optimum A*(rho) at rho = mean |x + y|^2 / d = 3/20 (solve
#: 16A^2 - (2 - 4 rho) A - rho = 0 at A = -1/16). Negative, so features are bounded in omega (the
#: point of GERF over PosRF, A = 0), and far from the 1/8 pole. Fit A to the data with ``oprf``.
GERF_DEFAULT_A = -0.0625


def check_A(value, owner: str) -> float:
    """``value`` as a float A < 1/8; EstimatorError (saying why) otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise EstimatorError(f"{owner}: A must be a finite real number below 1/8, got {value!r}")
    if value >= 0.125:
        raise EstimatorError(
            f"{owner}: A={value!r} >= 1/8 gives an infinite-variance estimator "
            "(E[(f1 f2)^2] contains E exp(4A|omega|^2) = (1 - 8A)^(-d/2), finite only for A < 1/8); "
            "choose A < 1/8 (A <= 0 keeps the features bounded), or use 'oprf' to fit A"
        )
    return float(value)


def oprf_a_star(rho: torch.Tensor) -> torch.Tensor:
    """Variance-minimising GERF A for rho = |x + y|^2 / d (CRT, OPRF; docs/theory.md §1.6).

    A* = (1/16)(1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)), the negative root of
    16 A^2 - (2 - 4 rho) A - rho = 0 (the stationarity condition of the GERF variance). Evaluated
    as -rho / (1 - 2 rho + sqrt(...)): the same number without the cancellation of 1 - sqrt(...)
    at small rho (the denominator is > 0 for every rho >= 0). A* <= 0, A*(0) = 0.
    """
    return -rho / (1 - 2 * rho + torch.sqrt((2 * rho + 1) ** 2 + 8 * rho))


def mean_pair_sq_norm(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean over all Lq x Lk pairs of |q_i + k_j|^2, in O(L d): ``[..., 1, 1]``.

    mean |q_i + k_j|^2 = mean |q_i|^2 + mean |k_j|^2 + 2 (mean q) . (mean k) (CRT homogeneity
    heuristic, docs/theory.md §1.6), per leading index (batch element, head).
    """
    cross = (q.mean(dim=-2, keepdim=True) * k.mean(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True)
    phi = sq_norm(q).mean(dim=-2, keepdim=True) + sq_norm(k).mean(dim=-2, keepdim=True) + 2 * cross
    return phi.clamp(min=0.0)  # a mean of squares; the expansion can round below 0 when q ~ -k


def gerf_form(W: torch.Tensor, A, d: int) -> ExpForm:
    """ExpForm of the s = +1 softmax GERF: ``[..., m]`` features from W ``[m, d]``.

    log f = A |omega|^2 + sqrt(1 - 4A) omega . x - |x|^2 / 2 + (d/4) log(1 - 4A), so
    W_eff = sqrt(1 - 4A) omega and bias = A |omega|^2 + (d/4) log(1 - 4A). A is a float or
    ``[..., 1, 1]`` (one per leading index: OPRF's A*), giving W_eff ``[..., m, d]``, bias ``[..., m]``.
    """
    A = torch.as_tensor(A, dtype=W.dtype, device=W.device)
    A = A.reshape(*A.shape[:-2], 1) if A.ndim >= 2 else A  # OPRF's [..., 1, 1] -> [..., 1]
    W_eff = torch.sqrt(1 - 4 * A).unsqueeze(-1) * W
    bias = A * (W * W).sum(dim=-1) + 0.25 * d * torch.log1p(-4 * A)
    return ExpForm(W_eff, bias.expand(*bias.shape[:-1], W.shape[0]))


class GERF(FeatureMap):
    """GERF with s = +1 and a fixed real A < 1/8 (positive features; A = 0 is PosRF).

    f(omega, x) = (1 - 4A)^(d/4) exp(A |omega|^2 + sqrt(1 - 4A) omega . x - |x|^2 / 2), the same
    map on both sides. Unbiased for exp(x . y) for every A < 1/4. One-sample variance
    (docs/theory.md §1.5, derived and checked by Monte Carlo in tests/test_theory.py):
        Var1 = (1 - 4A)^d (1 - 8A)^(-d/2) exp(2 (1 - 4A) |x + y|^2 / (1 - 8A) - |x|^2 - |y|^2) - e^(2 x.y)
             = e^(2 x.y) expm1(d log(1 - 4A) - (d/2) log(1 - 8A) + |x + y|^2 / (1 - 8A)).

    Parameters: A (default -1/16, the OPRF optimum at rho = 3/20; see ``GERF_DEFAULT_A``).
    """

    name = "gerf"
    description = "generalised exponential random features, s=+1, fixed A (CRT)"
    reference = "Likhosherstov et al., Chefs' Random Tables, NeurIPS 2022 (arXiv 2205.15317), Sec. 3 (GERF)"
    defaults = {"A": GERF_DEFAULT_A}

    def _validate(self) -> None:
        self.params["A"] = check_A(self.params["A"], self.name)

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        return gerf_form(draw.W, self.params["A"], d)


class GERFTrig(FeatureMap):
    """GERF with s = -1 and a real A < 1/8, in real cos/sin form (A = 0 is TrigRF).

    With s = -1: B = i sqrt(1 - 4A) =: i b, C = +1/2, D = (1 - 4A)^(d/4), and the complex pair
    f1 f2 = D^2 exp(2A |omega|^2 + i b omega . (x - y) + (|x|^2 + |y|^2) / 2) has mean exp(x . y).
    Its real part is an unbiased real estimate, and it factorises over two real features:
        g(omega, x) = D exp(A |omega|^2 + |x|^2 / 2) [cos(b omega . x), sin(b omega . x)],
        g(x) . g(y) = D^2 exp(2A |omega|^2 + (|x|^2 + |y|^2) / 2) cos(b omega . (x - y)).
    One-sample variance (derived here; Monte-Carlo check in tests/test_theory.py), z = x - y,
    c = (1 - 4A)^d (1 - 8A)^(-d/2):
        E[P^2] = c/2 e^(|x|^2 + |y|^2) (1 + exp(-2 (1 - 4A) |z|^2 / (1 - 8A)))
        Var1 = e^(2 x.y) / 2 (expm1(log c + |z|^2) + expm1(log c - |z|^2 / (1 - 8A))).
    At A = 0 this is TrigRF's Var1. The variance-optimal A depends on the pair, is positive and
    O(1/d): about |z|^2 e^(-2|z|^2) / (2d (1 + e^(-2|z|^2))) <= 0.07/d (second-order expansion,
    checked against a grid), so no fixed A helps every pair and the default is A = 0.

    Parameters: A (default 0.0).
    """

    name = "gerftrig"
    per_omega = 2
    positive = False
    description = "generalised exponential random features, s=-1 (trigonometric branch), real A (CRT)"
    reference = (
        "Likhosherstov et al., Chefs' Random Tables, NeurIPS 2022 (arXiv 2205.15317), Sec. 3 (GERF, s=-1)"
    )
    defaults = {"A": 0.0}

    def _validate(self) -> None:
        self.params["A"] = check_A(self.params["A"], self.name)

    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        A = self.params["A"]
        W = draw.W
        d = x.shape[-1]
        wx = math.sqrt(1 - 4 * A) * (x @ W.T)  # [..., L, m]
        base = A * (W * W).sum(dim=-1) + 0.5 * sq_norm(x) + 0.25 * d * math.log1p(-4 * A)
        return torch.cat([base, base], dim=-1), torch.cat([torch.cos(wx), torch.sin(wx)], dim=-1)


class OPRF(FeatureMap):
    """Optimal positive random features (FAVOR++): GERF s = +1 with A = A*(rho) fitted to the data.

    rho = phi / d, phi = the mean of |q_i + k_j|^2 over all Lq x Lk query-key pairs, computed in
    O(L d) per leading index (CRT homogeneity heuristic; docs/theory.md §1.6), and
    A* = (1/16)(1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) <= 0 (``oprf_a_star``), the exact
    minimiser of the GERF Var1 for a pair with |x + y|^2 = phi. Positive and bounded features;
    unbiased given A (A depends on the data, not on omega).
    """

    name = "oprf"
    data_dependent = True
    description = "optimal positive random features (FAVOR++): GERF with data-fitted A*"
    reference = "Likhosherstov et al., Chefs' Random Tables, NeurIPS 2022 (arXiv 2205.15317), OPRF"

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"A": [..., 1, 1]}``, A* for the pair-averaged |q_i + k_j|^2."""
        return {"A": oprf_a_star(mean_pair_sq_norm(q, k) / q.shape[-1])}

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        if "A" not in params:
            raise EstimatorError("oprf needs its fitted A: call est.fit(q, k) first")
        return gerf_form(draw.W, params["A"], d)


# --------------------------------------------------------------------------- closed-form variance
def check_A_tensor(A: torch.Tensor, owner: str) -> torch.Tensor:
    """``A`` unchanged when every entry is below 1/8; EstimatorError naming ``owner`` otherwise."""
    if bool((A >= 0.125).any()):
        raise EstimatorError(
            f"{owner}: A >= 1/8 gives an infinite-variance estimator (E exp(4A|omega|^2) diverges); "
            "use A < 1/8"
        )
    return A


def gerf_log_excess(A: torch.Tensor, d: int, s2: torch.Tensor) -> torch.Tensor:
    """log(E[P^2] / e^(2 x.y)) of the s = +1 GERF: d log(1-4A) - (d/2) log(1-8A) + |x+y|^2 / (1-8A)."""
    return d * (torch.log1p(-4 * A) - 0.5 * torch.log1p(-8 * A)) + s2 / (1 - 8 * A)


def gerf_variance_at(A: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Var1 of the s = +1 GERF at A (broadcast with ``[...]``) for x, y ``[..., d]``:
    e^(2x.y) expm1(``gerf_log_excess``) (CRT, Sec. 3; derived, Monte-Carlo checked in
    tests/test_theory.py)."""
    s = x + y
    excess = gerf_log_excess(A, x.shape[-1], (s * s).sum(dim=-1))
    return torch.exp(2 * (x * y).sum(dim=-1)) * torch.expm1(excess)


def gerf_variance(fm, x, y, fit) -> torch.Tensor:
    """GERF at its fixed A (the protocol is rfbench.theory's)."""
    return gerf_variance_at(torch.tensor(fm.params["A"], dtype=torch.float64, device=x.device), x, y)


def gerftrig_variance(fm, x, y, fit) -> torch.Tensor:
    """GERF s = -1, real A (derived, see ``GERFTrig``), z = x - y, log c = d log(1-4A) - d/2 log(1-8A):
    e^(2x.y) / 2 (expm1(log c + |z|^2) + expm1(log c - |z|^2 / (1-8A)))."""
    A = torch.tensor(fm.params["A"], dtype=torch.float64, device=x.device)
    log_c = x.shape[-1] * (torch.log1p(-4 * A) - 0.5 * torch.log1p(-8 * A))
    z = x - y
    z2 = (z * z).sum(dim=-1)
    both = torch.expm1(log_c + z2) + torch.expm1(log_c - z2 / (1 - 8 * A))
    return 0.5 * torch.exp(2 * (x * y).sum(dim=-1)) * both


def oprf_variance(fm, x, y, fit, *, A=None) -> torch.Tensor:
    """The GERF variance at the given A, or at the pair's own A*(|x + y|^2 / d) (CRT, OPRF)."""
    A = check_A_tensor(A, "oprf") if A is not None else fit()["A"].squeeze(-1)
    return gerf_variance_at(A, x, y)


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"gerf": gerf_variance, "gerftrig": gerftrig_variance, "oprf": oprf_variance}
