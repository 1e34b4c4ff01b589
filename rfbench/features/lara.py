"""Multiple-importance-sampling positive features in the spirit of LARA (Zheng et al., ICML 2022).

Zheng, Wang, Kong, "Linear Complexity Randomized Self-attention Mechanism" (LARA), ICML 2022
(arXiv 2204.04667), Sec. 3-4: random-feature attention is self-normalised importance sampling
(SNIS) of softmax attention, and LARA improves it with several proposals q_c(omega) = N(mu_c, I)
centred on the data, combined by multiple importance sampling (MIS). We implement the part that
fits rfbench's estimator contract (one feature map whose phi(q) . phi(k) estimates exp(q . k)):

    omega_i = mu_{c(i)} + g_i,   g_i a row of any Gaussian weight matrix,  c(i) = i mod C,
    f(omega, x) = exp(omega . x - |x|^2 / 2) sqrt(N(omega) / qbar(omega)),
    qbar = sum_c (n_c / m) q_c      (the balance heuristic, Veach & Guibas 1995, with n_c draws of q_c),

so (1/m) sum_i f(omega_i, x) f(omega_i, y) is unbiased for exp(x . y) for any means mu_c (each
omega_i has marginal q_{c(i)}; orthogonal couplings of the g_i keep that). It is an exponential
map: log f = omega . x - |x|^2/2 + log w(omega) / 2, an ExpForm with a data-dependent W, so the
fused kernels and metrics take it as they take PosRF. Attention normalises by the same estimate:
that is LARA's SNIS. With C = 1 and mu = 0 it is PosRF exactly.

Proposal means (``fit_params``): for a single pair the zero-variance proposal of PosRF is
N(x + y, I), so mu_c = (mean of the queries in the c-th of C contiguous segments) + (mean key),
per leading index; LARA's segment-mean proposals, made additive in the key mean (derived here).

What does not fit, and why:
- LARA's query-specific combination weights alpha_n(omega) and its per-query proposal in the
  final estimator make the query-side factor depend on the query's own proposal. That is still
  one factorised query feature, but the paper's normalisation, which is per query over proposals,
  is not an inner product of one query feature with one key feature, so we use the query-agnostic
  balance heuristic.
- The proposals are fitted on the sequence. In causal mode that would let future tokens move
  past outputs, so the Estimator refuses causal attention until ``est.fit`` is called on held-out
  (or, knowingly, the same) tokens.
- LARA's learned (trained) proposal parameters are left out. No closed-form variance is stated.
"""

from __future__ import annotations

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params
from rfbench.ops.form import ExpForm
from rfbench.weights.base import WeightDraw


def proposal_means(q: torch.Tensor, k: torch.Tensor, C: int) -> torch.Tensor:
    """``[..., C, d]``: mean of the c-th of C contiguous query segments plus the mean key."""
    L = q.shape[-2]
    if L < C:
        raise EstimatorError(f"lara: {C} proposals need at least {C} queries to fit, got {L}")
    bounds = [round(c * L / C) for c in range(C + 1)]
    seg = torch.stack([q[..., a:b, :].mean(-2) for a, b in zip(bounds[:-1], bounds[1:])], dim=-2)
    return seg + k.mean(-2, keepdim=True)


def mis_log_weights(omega: torch.Tensor, mu: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """log N(omega) - log qbar(omega), ``[..., m]``, qbar = sum_c (n_c / m) N(mu_c, I); omega
    ``[..., m, d]``, mu ``[..., C, d]``, counts ``[C]`` (the shared (2 pi)^-d/2 cancels)."""
    log_frac = torch.log(counts / counts.sum()).to(omega.dtype)  # [C]
    diff = omega.unsqueeze(-2) - mu.unsqueeze(-3)  # [..., m, C, d]
    log_q = log_frac - 0.5 * (diff * diff).sum(-1)
    return -0.5 * (omega * omega).sum(-1) - torch.logsumexp(log_q, dim=-1)


class LARA(FeatureMap):
    """PosRF with omegas from C data-centred proposals and balance-heuristic MIS weights (LARA-style).

    Unbiased for exp(x . y) for any fitted means (module docstring; Zheng et al., ICML 2022, Sec. 4;
    MIS: Veach & Guibas, SIGGRAPH 1995). ``proposals`` = C (default 4).
    """

    name = "lara"
    data_dependent = True
    description = "multiple-importance-sampling positive features, C data-centred proposals (LARA-style)"
    reference = "Zheng et al., Linear Complexity Randomized Self-attention Mechanism (LARA), ICML 2022"
    defaults = {"proposals": 4}

    def _validate(self) -> None:
        C = self.params["proposals"]
        if isinstance(C, bool) or not isinstance(C, int) or not 1 <= C <= 256:
            raise EstimatorError(f"lara: proposals must be an integer in [1, 256], got {C!r}")

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"mu": [..., C, d]}`` (``proposal_means``)."""
        return {"mu": proposal_means(q, k, self.params["proposals"])}

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        """W = omega_i = mu_{i mod C} + g_i ``[..., m, d]``, bias = log w(omega_i) / 2 ``[..., m]``."""
        if "mu" not in params:
            raise EstimatorError("lara needs its fitted proposal means: call est.fit(q, k) first")
        g = draw.W
        mu = params["mu"].to(device=g.device, dtype=g.dtype)
        C, m = mu.shape[-2], g.shape[0]
        which = torch.arange(m, device=g.device) % C
        counts = torch.bincount(which, minlength=C).to(torch.float64).clamp(min=1e-300)
        omega = g + mu[..., which, :]
        return ExpForm(omega, 0.5 * mis_log_weights(omega, mu, counts.to(g.device)))

