"""Dense-exponential random features (DERF) of FAVOR#: SADERF and the symmetric SDERF.

Likhosherstov, Choromanski, Dubey, Liu, Sarlos, Weller, "Dense-Exponential Random Features:
Sharp Positive Estimators of the Gaussian Kernel", NeurIPS 2023 (arXiv 2302.00787; "FAVOR#").
A general DERF is f_k(omega, x) = D exp(omega^T A omega + omega^T B_k x + x^T C_k x),
omega ~ N(0, I); it is unbiased for exp(x . y) when (docs/theory.md §1.8, derived)
    8A < I,  B_1^T (I - 4A)^-1 B_2 = I,  C_k = -1/2 B_k^T (I - 4A)^-1 B_k,  D = det(I - 4A)^(1/4).
"""

from __future__ import annotations

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params
from rfbench.features.gerf import gerf_form, mean_pair_sq_norm, oprf_a_star
from rfbench.ops.features.naive import log_features as form_log_features
from rfbench.ops.form import ExpForm
from rfbench.weights.base import WeightDraw

#: Psi^4 is clipped to [1e-12, 1e12] (Psi in [1e-3, 1e3]): a coordinate that is zero on one side
#: would send Psi to 0 or infinity. Any positive Psi keeps SADERF unbiased; the clip only costs
#: variance on such degenerate coordinates.
PSI4_RANGE = (1e-12, 1e12)


def saderf_psi(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Psi* ``[..., 1, d]`` (diagonal): Psi_l = (mean_j k_jl^2 / mean_i q_il^2)^(1/4).

    Minimises sum_ij |Psi q_i + Psi^-1 k_j|^2 (docs/theory.md §1.8). With Lq = Lk this is the paper's
    (sum_j k_jl^2 / sum_i q_il^2)^(1/4); with Lq != Lk the minimiser uses means, as here.
    Queries are multiplied by Psi and keys by Psi^-1 (google-research's exparf applies the inverse).
    """
    tiny = torch.finfo(q.dtype).tiny  # 0/0 -> 1 for a coordinate that is zero on both sides
    mq = (q * q).mean(dim=-2, keepdim=True) + tiny
    mk = (k * k).mean(dim=-2, keepdim=True) + tiny
    return (mk / mq).clamp(*PSI4_RANGE) ** 0.25


class SADERF(FeatureMap):
    """Simplified asymmetric DERF: GERF (s = +1) on (Psi q, Psi^-1 k), Psi diagonal.

    f1(omega, x) = f_GE(omega, Psi x), f2(omega, y) = f_GE(omega, Psi^-1 y); since
    (Psi x) . (Psi^-1 y) = x . y it is unbiased for exp(x . y) for any positive Psi. Psi = Psi*
    (``saderf_psi``) per leading index, then A = the OPRF A* for the mean |Psi q_i + Psi^-1 k_j|^2
    of the rescaled data. Var1 = the GERF Var1 at (Psi x, Psi^-1 y) (FAVOR#, SADERF; docs/theory.md §1.8).
    """

    name = "saderf"
    data_dependent = True
    description = "simplified asymmetric dense-exponential RF (FAVOR#): GERF on (Psi* q, Psi*^-1 k)"
    reference = (
        "Likhosherstov et al., Dense-Exponential Random Features, NeurIPS 2023 (arXiv 2302.00787), SADERF"
    )

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"psi": [..., 1, d], "A": [..., 1, 1]}``."""
        psi = saderf_psi(q, k)
        A = oprf_a_star(mean_pair_sq_norm(q * psi, k / psi) / q.shape[-1])
        return {"psi": psi, "A": A}

    # No ``exp_form``: queries see Psi x and keys Psi^-1 x, two different affine forms, and an
    # ExpForm is one form for both sides. The GERF form is applied to each side's rescaled input.
    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        if "psi" not in params or "A" not in params:
            raise EstimatorError("saderf needs its fitted Psi and A: call est.fit(q, k) first")
        xs = x * params["psi"] if is_query else x / params["psi"]
        return form_log_features(xs, gerf_form(draw.W, params["A"], x.shape[-1])), None


def sderf_fit(q: torch.Tensor, k: torch.Tensor) -> Params:
    """SDERF parameters ``{"Q": [..., d, d], "a": [..., 1, d]}`` (derived from docs/theory.md §1.8).

    P = mean_ij (q_i + k_j)(q_i + k_j)^T = M_q + M_k + mu_q mu_k^T + mu_k mu_q^T (second moments M,
    means mu), P = Q diag(sigma) Q^T, and a_l = the 1-d OPRF A* at rho = sigma_l.
    """
    mu_q, mu_k = q.mean(dim=-2, keepdim=True), k.mean(dim=-2, keepdim=True)
    cross = mu_q.transpose(-1, -2) @ mu_k
    P = q.transpose(-1, -2) @ q / q.shape[-2] + k.transpose(-1, -2) @ k / k.shape[-2] + cross
    P = P + cross.transpose(-1, -2)
    sigma, Q = torch.linalg.eigh(P)
    sigma = sigma.clamp(min=0.0)  # P is PSD; eigh may return -eps for its null directions
    return {"Q": Q, "a": oprf_a_star(sigma).unsqueeze(-2)}


class SDERF(FeatureMap):
    """Symmetric DERF: f(omega, x) = D exp(omega^T A omega + omega^T B x - |x|^2 / 2), both sides.

    Take A = diag(a) and B = diag(sqrt(1 - 4a)) Q^T with Q orthogonal. Then
    B^T (I - 4A)^-1 B = Q Q^T = I and C = -I/2, D = prod_l (1 - 4 a_l)^(1/4): the DERF validity
    conditions hold, so the estimate is unbiased for every orthogonal Q and every a_l < 1/8. It is a
    GERF with one A per coordinate of the rotated inputs Q^T x:
        log f = sum_l [a_l omega_l^2 + sqrt(1 - 4 a_l) omega_l (Q^T x)_l + (1/4) log(1 - 4 a_l)] - |x|^2/2.
    Per pair, with t = Q^T (x + y) (derived from the DERF second moment of docs/theory.md §1.8):
        Var1 = e^(2 x.y) expm1(sum_l [log(1 - 4 a_l) - 1/2 log(1 - 8 a_l) + t_l^2 / (1 - 8 a_l)]).
    Fit (``sderf_fit``): the mean of that expm1 argument over the query-key pairs is
    sum_l [log(1 - 4 a_l) - 1/2 log(1 - 8 a_l) + sigma_l / (1 - 8 a_l)], sigma = diag(Q^T P Q), whose
    minimum over a_l is the OPRF A* at rho = sigma_l; that minimum is concave in sigma_l, so over Q
    it is smallest at the eigenvectors of P (Schur-Horn). This construction (docs/theory.md §1.8) is
    in google-research's ``expsharp_softmax_kernel_transformation`` (FAVOR# SDERF), re-derived
    here, not ported. Costs one d x d eigendecomposition per leading index (O(d^3)).
    """

    name = "sderf"
    data_dependent = True
    description = "symmetric dense-exponential RF (FAVOR# SDERF): per-eigendirection GERF"
    reference = (
        "Likhosherstov et al., Dense-Exponential Random Features, NeurIPS 2023 (arXiv 2302.00787), SDERF"
    )

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"Q": [..., d, d], "a": [..., 1, d]}`` (``sderf_fit``)."""
        return sderf_fit(q, k)

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        """W_eff = omega diag(sqrt(1 - 4a)) Q^T (so W_eff x = sqrt(1 - 4a) . (omega o Q^T x)),
        bias = sum_l a_l omega_l^2 + (1/4) sum_l log(1 - 4 a_l), coef = -1/2."""
        if "Q" not in params or "a" not in params:
            raise EstimatorError("sderf needs its fitted Q and a: call est.fit(q, k) first")
        W, a = draw.W, params["a"]  # a: [..., 1, d]
        W_eff = (W * torch.sqrt(1 - 4 * a)) @ params["Q"].transpose(-1, -2)  # [..., m, d]
        bias = (a @ (W * W).T).squeeze(-2) + 0.25 * torch.log1p(-4 * a).sum(dim=-1)  # [..., m]
        return ExpForm(W_eff, bias)


# --------------------------------------------------------------------------- closed-form variance
def saderf_variance(fm, x, y, fit, *, psi=None, A=None) -> torch.Tensor:
    """The GERF variance at (Psi x, Psi^-1 y) (FAVOR#, SADERF): the given psi and A, else the pair's
    fit; a given psi without A takes the A* of the rescaled pair, as the fit would."""
    from rfbench.features.gerf import check_A_tensor, gerf_variance_at  # kept beside its use

    psi_given = psi is not None
    fitted = fit() if psi is None or A is None else {}
    psi = psi if psi_given else fitted["psi"]
    if bool((psi <= 0).any()):
        raise EstimatorError("saderf: psi must be positive")
    xs, ys = x * psi, y / psi
    if A is not None:
        A = check_A_tensor(A, "saderf")
    elif psi_given:  # A* of the rescaled pair, as the fit would give for this psi
        A = oprf_a_star(((xs + ys) * (xs + ys)).sum(dim=-1) / x.shape[-1])
    else:
        A = fitted["A"].squeeze(-1)
    return gerf_variance_at(A, xs, ys)


def sderf_variance(fm, x, y, fit, *, Q=None, a=None) -> torch.Tensor:
    """Symmetric DERF (derived, see ``SDERF``), t = Q^T (x + y):
    e^(2x.y) expm1(sum_l [log(1-4a_l) - 1/2 log(1-8a_l) + t_l^2 / (1-8a_l)])."""
    from rfbench.features.gerf import check_A_tensor  # kept beside its use

    fitted = fit() if Q is None or a is None else {}
    Q = Q if Q is not None else fitted["Q"]
    a = a if a is not None else fitted["a"]
    check_A_tensor(a, "sderf (a)")
    t2 = (((x + y).unsqueeze(-2) @ Q).squeeze(-2)) ** 2
    excess = (torch.log1p(-4 * a) - 0.5 * torch.log1p(-8 * a) + t2 / (1 - 8 * a)).sum(dim=-1)
    return torch.exp(2 * (x * y).sum(dim=-1)) * torch.expm1(excess)


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"saderf": saderf_variance, "sderf": sderf_variance}
