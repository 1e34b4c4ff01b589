"""DARKFormer feature maps: PosRF on data-aligned inputs, and the importance-sampled PosRF.

DARKFormer (Farzam, Mobahi, Miller, Sernau, "DARKFormer: Data-Aware Random Feature Kernel for
Transformers", arXiv 2603.04127, 2026). Paper-derived, no official code: only the abstract is
public; equation and theorem numbers below are those cited by the third-party
darkformer-pytorch README, and the formulas are re-derived in docs/theory.md §3.

Both maps work on transformed inputs x' = M x with M ``[..., d, d]`` (``[d, d]`` or one per
leading index, e.g. per head). Second moments of the data are taken about the origin, the
zero-mean model q, k ~ N(0, Lambda) of section 3: the PosRF variance grows with |x'|^2, whose
average over the tokens is tr(M Lambda M^T) exactly when Lambda is the uncentred second moment
(for centred data the two agree).
"""

from __future__ import annotations

import math
import warnings

import torch

from rfbench.errors import ClippingWarning, EstimatorError
from rfbench.features.base import FeatureMap, Params, sq_norm
from rfbench.features.target import SOFTMAX, TargetKernel, transformed_softmax
from rfbench.ops.form import ExpForm
from rfbench.weights.base import WeightDraw

SIGMA_TARGET = "exp(q^T Sigma k)"


# --------------------------------------------------------------------------- validation helpers
def _as_matrix(value, name: str) -> torch.Tensor:
    """``value`` as a finite float64 CPU tensor ``[..., d, d]``; EstimatorError otherwise."""
    try:
        t = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EstimatorError(
            f"{name} must be a [d, d] matrix (tensor, array or nested list): {exc}"
        ) from None
    if t.ndim < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] == 0:
        raise EstimatorError(
            f"{name} must be a square matrix [d, d] (or [..., d, d]), got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise EstimatorError(f"{name} contains NaN/Inf values")
    return t


def _sqrt_spd(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive definite ``sigma``; EstimatorError if it is not SPD."""
    scale = float(sigma.abs().amax())
    if float((sigma - sigma.transpose(-1, -2)).abs().amax()) > 1e-6 * max(scale, 1e-300):
        raise EstimatorError(
            "sigma must be symmetric (a covariance matrix); symmetrise it with (S + S.T) / 2"
        )
    evals, U = torch.linalg.eigh(sigma)
    lo, hi = float(evals.amin()), float(evals.amax())
    if not lo > 1e-10 * max(hi, 1e-300):
        raise EstimatorError(
            f"sigma must be positive definite; its smallest eigenvalue is {lo:.3g} (largest {hi:.3g}). "
            "For a singular Sigma = M^T M pass the factor as M= instead"
        )
    return (U * evals.sqrt().unsqueeze(-2)) @ U.transpose(-1, -2)


def _fixed_transform(params: dict) -> torch.Tensor | None:
    """The fixed M given through ``sigma`` or ``M`` (float64 CPU), or None when neither is."""
    sigma, M = params.get("sigma"), params.get("M")
    if sigma is not None and M is not None:
        raise EstimatorError("give either sigma (a covariance, M = sigma^1/2) or M, not both")
    if sigma is not None:
        return _sqrt_spd(_as_matrix(sigma, "sigma"))
    if M is not None:
        return _as_matrix(M, "M")
    return None


def _apply(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x' = M x for ``x: [..., L, d]`` and ``M: [..., d, d]`` -> ``[..., L, d]``."""
    _check_dim(M, x.shape[-1])
    try:
        torch.broadcast_shapes(M.shape[:-2], x.shape[:-2])
    except RuntimeError:
        raise EstimatorError(
            f"the DARK transform's leading dims {tuple(M.shape[:-2])} do not broadcast with the inputs' "
            f"{tuple(x.shape[:-2])}"
        ) from None
    return x @ M.to(device=x.device, dtype=x.dtype).transpose(-1, -2)


def second_moment(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[..., d, d]`` float64 second moment (about 0) of the pooled tokens of q ``[..., Lq, d]`` and k."""
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    x = torch.cat([q.expand(*lead, *q.shape[-2:]), k.expand(*lead, *k.shape[-2:])], dim=-2).double()
    return x.transpose(-1, -2) @ x / x.shape[-2]


def whiten_eigs(evals: torch.Tensor, d: int, scale, eig_floor: float, who: str, stacklevel: int = 3):
    """Eigenvalues s * lambda^-1/2 of the whitening M = s Lambda^-1/2 ("Proposition C.1"; s =
    ``scale`` or d^-1/4), eigenvalues below ``eig_floor`` x the largest raised to it (with a
    warning naming ``who``)."""
    floor = eig_floor * evals.amax(dim=-1, keepdim=True).clamp(min=1e-300)
    if bool((evals < floor).any()):
        warnings.warn(
            f"{who} whitening: the queries/keys second moment is rank-deficient or ill-conditioned; "
            f"eigenvalues below {eig_floor:g} x the largest were raised to that floor",
            ClippingWarning,
            stacklevel=stacklevel,
        )
    return (scale or d**-0.25) * torch.maximum(evals, floor).rsqrt()


def _check_dim(M: torch.Tensor, d: int) -> None:
    if M.shape[-1] != d:
        raise EstimatorError(
            f"the DARK transform is {M.shape[-1]}x{M.shape[-1]} but the inputs have d={d}; "
            "give sigma/M of the inputs' dimension"
        )


def importance_bias(W: torch.Tensor, omega: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """log sqrt(p_I / p_Sigma)(omega) = (|w|^2 - |omega|^2 + log det Sigma) / 4, ``[..., m]``.

    The importance weight of PosRF features at proposal-distributed rows omega, shared by the two
    sides; W ``[m, d]`` holds the standard normal rows w that omega ``[..., m, d]`` was made from.
    """
    return 0.25 * (sq_norm(W).squeeze(-1) - sq_norm(omega).squeeze(-1) + log_det.unsqueeze(-1))


def aligned_form(W: torch.Tensor, M: torch.Tensor) -> ExpForm:
    """PosRF on M x: log f = w . Mx - |Mx|^2 / 2, so W_eff = W M ``[..., m, d]`` and P = M ``[..., d, d]``."""
    M = M.to(device=W.device, dtype=W.dtype)
    return ExpForm(W @ M, torch.zeros(W.shape[0], dtype=W.dtype, device=W.device), -0.5, M)


def proposal_eigs(evals: torch.Tensor, max_eig: float, who: str = "darkis") -> torch.Tensor:
    """Eigenvalues (1 + 2 lambda) / (1 - 2 lambda) of Sigma* ("Theorem 3.2"), lambda clipped to
    [0, ``max_eig``] (< 1/2; clipping keeps the importance-sampled estimate unbiased, but Sigma*
    then exists only for the clipped spectrum: a ClippingWarning says how much was clipped)."""
    clipped = evals > max_eig
    if bool(clipped.any()):  # one host sync per fit, not per forward
        n, total = int(clipped.sum()), clipped.numel()
        warnings.warn(
            f"{who}: {n}/{total} eigenvalues of the queries/keys second moment clipped to "
            f"max_eig={max_eig:g} (largest {float(evals.max()):.3g}); the proposal Sigma* needs every "
            "eigenvalue below 1/2, so the estimate stays unbiased but its proposal is not the optimal one",
            ClippingWarning,
            stacklevel=3,
        )
    lam = evals.clamp(min=0.0, max=max_eig)
    return (1 + 2 * lam) / (1 - 2 * lam)


def _check_fraction(params: dict, key: str, lo: float, hi: float, hint: str) -> None:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise EstimatorError(f"{key} must be a number in ({lo}, {hi}), got {value!r}; {hint}")


# --------------------------------------------------------------------------- DARK
class DARK(FeatureMap):
    """Data-aligned PosRF: f(w, x) = exp(w . Mx - |Mx|^2 / 2), w ~ N(0, I)  ("Equation (3)").

    Equivalently omega' = M^T w ~ N(0, Sigma) with Sigma = M^T M. Estimates the data-aligned
    kernel kappa_Sigma(q, k) = exp(q^T Sigma k), unbiased for it (it is PosRF on (Mq, Mk)); it
    is *not* an estimate of exp(q . k) unless Sigma = I. One-sample variance
    Var1 = exp(2 q^T Sigma k) (exp((q + k)^T Sigma (q + k)) - 1) (PosRF, Performer Lemma 2).

    Parameters (keyword):
        sigma: a symmetric positive definite ``[d, d]`` (or ``[..., d, d]``) Sigma; M = Sigma^1/2.
        M: the factor ``[d, d]`` (or ``[..., d, d]``) itself, e.g. a singular one.
        With neither, M is fitted by whitening ("Proposition C.1"): M = s Lambda^-1/2, Lambda the
        second moment of the pooled queries and keys (per leading index), so E[(Mx)(Mx)^T] = s^2 I.
        whiten_scale: s; None means d^-1/4 (temperature preserving, as darkformer-pytorch).
            Literal whitening (s = 1) gives |Mq|^2 ~ d, and the PosRF variance grows like
            exp(|Mq + Mk|^2) ~ exp(2d) (e^128 at d = 64); with s = d^-1/4, |Mq|^2 ~ sqrt(d),
            as for unit-variance inputs pre-scaled by d^-1/4 for attention.
        eig_floor: eigenvalues of Lambda below eig_floor * (largest) are raised to it, so a
            rank-deficient Lambda (fewer tokens than d, or data in a subspace) gives a finite M;
            a warning says when this happens.
    DARKFormer, Farzam et al., arXiv 2603.04127 (2026); paper-derived, no official code.
    """

    name = "dark"
    target = SIGMA_TARGET
    description = "DARKFormer data-aligned PosRF for exp(q^T Sigma k) (paper-derived, no official code)"
    reference = "Farzam et al., DARKFormer, arXiv 2603.04127 (2026), Eq. (3) per darkformer-pytorch"
    defaults = {"sigma": None, "M": None, "whiten_scale": None, "eig_floor": 1e-6}

    def _validate(self) -> None:
        self._M = _fixed_transform(self.params)  # the SPD check needs the eigendecomposition: keep its root
        # Only the whitening fit depends on the data; an instance attribute shadows the class one.
        self.data_dependent = self._M is None
        s = self.params["whiten_scale"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf):
            raise EstimatorError(f"whiten_scale must be a positive number or None (d^-1/4), got {s!r}")
        _check_fraction(self.params, "eig_floor", 0.0, 1.0, "it is relative to the largest eigenvalue")

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"M": [..., d, d]}`` whitening M = s Lambda^-1/2 (empty when sigma or M was given)."""
        if not self.data_dependent:
            return {}
        evals, U = torch.linalg.eigh(second_moment(q, k))
        p = self.params
        mu = whiten_eigs(evals, q.shape[-1], p["whiten_scale"], p["eig_floor"], "DARK")
        M = (U * mu.unsqueeze(-2)) @ U.transpose(-1, -2)
        return {"M": M.to(q.dtype)}

    def transform(self, params: Params) -> torch.Tensor:
        """The M in use: the fixed one, or the fitted ``params["M"]``."""
        if self._M is not None:
            return self._M
        if "M" not in params:
            raise EstimatorError("dark with whitening needs fitted parameters: call est.fit(q, k) first")
        return params["M"]

    def target_kernel(self, params: Params) -> TargetKernel:
        """exp((Mq) . (Mk)) = exp(q^T Sigma k) with the fixed or fitted M."""
        return transformed_softmax(self.target, self.transform(params))

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        M = self.transform(params)  # fixed or fitted: no probe, no device sync
        _check_dim(M, d)
        return aligned_form(draw.W, M)


# --------------------------------------------------------------------------- DARKIS
class DARKIS(FeatureMap):
    """Importance-sampled PosRF for exp(x' . y'), x' = M x (M = I by default: the softmax kernel).

    omega ~ N(0, Sigma*) with the variance-optimal Gaussian proposal ("Theorem 3.2")
        Sigma* = (I + 2 Lambda)(I - 2 Lambda)^-1,
    Lambda the second moment of the pooled transformed queries and keys (fitted per leading
    index), optimal when x', y' ~ N(0, Lambda) i.i.d. Each side's feature is
        f(omega, x) = sqrt(p_I(omega) / p_Sigma*(omega)) exp(omega . x' - |x'|^2 / 2),
    realised as omega = Sigma*^1/2 w with w a weight-matrix row (N(0, I) marginal), so
    log(p_I / p_Sigma*)(omega) = (|w|^2 - |omega|^2 + log det Sigma*) / 2. Unbiased for
    exp(x' . y') with any Gaussian proposal (E_{Sigma*}[(p_I / p_Sigma*) g] = E_I[g]).

    Sigma* needs every eigenvalue of Lambda below 1/2; they are clipped to ``max_eig``
    (default 0.45, so Sigma* <= 19 I): clipping keeps the estimate unbiased and only loses
    optimality. For eigenvalues >= 1/2 no Gaussian proposal has a finite averaged variance;
    shrink the inputs (e.g. M = s Lambda^-1/2, the DARK whitening) first.

    Parameters: sigma or M (the transform, as in DARK; default identity), max_eig.
    DARKFormer, Farzam et al., arXiv 2603.04127 (2026); paper-derived, no official code.
    """

    name = "darkis"
    target = "softmax"
    data_dependent = True
    description = "DARKFormer importance-sampled PosRF with proposal Sigma* (paper-derived, no official code)"
    reference = "Farzam et al., DARKFormer, arXiv 2603.04127 (2026), Theorem 3.2 per darkformer-pytorch"
    defaults = {"sigma": None, "M": None, "max_eig": 0.45}

    def _validate(self) -> None:
        self._M = _fixed_transform(self.params)
        self.target = "softmax" if self._M is None else SIGMA_TARGET
        _check_fraction(
            self.params, "max_eig", 0.0, 0.5, "Sigma* = (I + 2L)(I - 2L)^-1 needs eigenvalues < 1/2"
        )

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._M is None else _apply(self._M, x)

    def target_kernel(self, params: Params) -> TargetKernel:
        """exp(q . k), or exp((Mq) . (Mk)) with a fixed transform M."""
        return SOFTMAX if self._M is None else transformed_softmax(self.target, self._M)

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """Proposal ``sigma_star`` and its square root ``[..., d, d]``, and ``log_det`` ``[...]``."""
        evals, U = torch.linalg.eigh(second_moment(self._transform(q), self._transform(k)))
        s = proposal_eigs(evals, self.params["max_eig"])
        Ut = U.transpose(-1, -2)
        return {
            "sigma_star": ((U * s.unsqueeze(-2)) @ Ut).to(q.dtype),
            "sqrt_sigma_star": ((U * s.sqrt().unsqueeze(-2)) @ Ut).to(q.dtype),
            "log_det": s.log().sum(dim=-1).to(q.dtype),
        }

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        """omega = Sigma*^1/2 w; log f = omega . Mx - |Mx|^2 / 2 + importance weight:
        W_eff = omega M, P = M (omega and P = None without a transform)."""
        if "sqrt_sigma_star" not in params:
            raise EstimatorError("darkis needs its fitted proposal: call est.fit(q, k) first")
        W = draw.W
        R = params["sqrt_sigma_star"].to(device=W.device, dtype=W.dtype)
        omega = W @ R  # [..., m, d]; rows R w since R is symmetric
        bias = importance_bias(W, omega, params["log_det"].to(device=W.device, dtype=W.dtype))
        if self._M is None:
            return ExpForm(omega, bias)
        _check_dim(self._M, d)
        M = self._M.to(device=W.device, dtype=W.dtype)
        return ExpForm(omega @ M, bias, -0.5, M)


# --------------------------------------------------------------------------- closed-form variance
def dark_variance(fm, x, y, fit) -> torch.Tensor:
    """PosRF's variance on (Mx, My): e^(2 x^T Sigma y) expm1((x+y)^T Sigma (x+y)), Sigma = M^T M.
    Needs a fixed M (sigma= or M=); the whitening fit is a property of a data set, not of a pair."""
    from rfbench.errors import DataError
    from rfbench.features.positive import posrf_variance  # one formula: DARK is PosRF on M x

    if fm.data_dependent:
        raise EstimatorError(
            "dark's closed form needs a fixed Sigma: pass sigma= (a covariance) or M= (its factor)"
        )
    M = fm.transform({}).to(device=x.device, dtype=torch.float64)
    if M.shape[-1] != x.shape[-1]:
        raise DataError(f"dark's M is {M.shape[-1]}x{M.shape[-1]} but x and y have d={x.shape[-1]}")
    xt = (x.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)
    yt = (y.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)
    return posrf_variance(fm, xt, yt, fit)


#: Closed-form one-sample variances of this module's maps, by map name (read by rfbench.theory).
VARIANCE = {"dark": dark_variance}
