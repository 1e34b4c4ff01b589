"""DARK with a learned transform M: the DARKFormer kernel learner ("darkl").

DARKFormer (Farzam, Mobahi, Miller, Sernau, arXiv 2603.04127, 2026) learns the projection
covariance Sigma = M^T M end to end. Paper-derived, no official code (docs/theory.md §3).
The features use omega = M^T w with w a weight-matrix row (N(0, I) marginal), so omega ~ N(0, Sigma).
Two readings of the paper are offered (``mode``):

- ``"aligned"`` (default): PosRF on M x, f(w, x) = exp(w . Mx - |Mx|^2 / 2) ("Equation (3)").
  Unbiased for the data-aligned kernel exp(q^T Sigma k), *not* for exp(q . k) unless Sigma = I.
  Learning M changes the kernel: after training the target is "learned: exp(q^T Sigma k)".
- ``"is"``: importance-sampled PosRF for exp(q . k) with the proposal N(0, Sigma),
  f(w, x) = sqrt(p_I(omega) / p_Sigma(omega)) exp(omega . x - |x|^2 / 2). Unbiased for the softmax
  kernel whatever Sigma is; learning M only moves the sampling distribution, so the target stays
  fixed and the variance has a closed form (``log_second_moment``), whose minimiser over
  Gaussian proposals for x, y ~ N(0, Lambda) is Sigma* = (I + 2 Lambda)(I - 2 Lambda)^-1
  ("Theorem 3.2" per darkformer-pytorch).

Parameterisation of M (``param``), all trained through the same fitted ``params`` tensors:

- ``"full"``: ``{"M": [..., d, d]}``;
- ``"diag"``: ``{"M_diag": [..., d]}``, M = diag(a);
- ``"lowrank"``: ``{"M_diag": [..., d], "M_U": [..., d, r], "M_V": [..., d, r]}``, M = diag(a) + U V^T.

Initialisation (``init``), from the second moment Lambda (about 0) of the pooled scaled queries
and keys, one per leading index (e.g. per head):

- ``"whiten"``: M = s Lambda^-1/2 ("Proposition C.1"; s = ``whiten_scale``, default d^-1/4,
  the temperature-preserving choice of darkformer-pytorch), as ``dark``;
- ``"proposal"``: M = Sigma*^1/2, Sigma* from Lambda with eigenvalues clipped to ``max_eig``, as
  ``darkis``;
- ``"identity"``: M = I (plain PosRF).

``diag`` applies the formula to diag(Lambda) (a diagonal model of the data); ``lowrank`` keeps the
``rank`` eigen-directions of the full init M0 that deviate most from c = median eigenvalue of
M0, and c elsewhere: M = c I + U_r diag(mu_r - c) U_r^T (exact when M0 has at most ``rank``
eigenvalues other than c).

Without training, ``fit_params`` gives the initial M (so ``darkl`` fitted but not trained is
``dark`` / ``darkis`` with that init); ``rfbench.learning.fit_estimator`` trains the tensors.
"""

from __future__ import annotations

import math

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params, sq_norm
from rfbench.features.dark import (
    SIGMA_TARGET,
    aligned_form,
    importance_bias,
    proposal_eigs,
    second_moment,
    whiten_eigs,
)
from rfbench.features.target import SOFTMAX, TargetKernel, transformed_softmax
from rfbench.ops.form import ExpForm
from rfbench.weights.base import WeightDraw

LEARNED_SIGMA_TARGET = "learned: exp(q^T Sigma k), Sigma fitted"
PARAMS = ("full", "diag", "lowrank")
INITS = ("whiten", "proposal", "identity")
MODES = ("aligned", "is")


def _choice(params: dict, key: str, allowed: tuple[str, ...]) -> None:
    if params[key] not in allowed:
        shown = ", ".join(map(repr, allowed))
        raise EstimatorError(f"darkl: {key} must be one of {shown}, got {params[key]!r}")


class DARKLearned(FeatureMap):
    """DARK with a learnable M = full / diag / low-rank + diag; see the module docstring.

    Parameters (keyword): param ("full"), rank (4, for "lowrank"), init ("whiten"), mode
    ("aligned"), whiten_scale (None: d^-1/4), eig_floor (1e-6, relative floor on Lambda's
    eigenvalues for whitening), max_eig (0.45, clip of Lambda's eigenvalues for Sigma*).
    """

    name = "darkl"
    target = SIGMA_TARGET
    data_dependent = True
    #: Every tensor of ``fit_params`` is a trainable parameter (read by rfbench.learning).
    learnable = True
    description = "DARKFormer with a learned transform M (Sigma = M^T M), trained by rfbench.learning"
    reference = "Farzam et al., DARKFormer, arXiv 2603.04127 (2026); paper-derived, no official code"
    defaults = {
        "param": "full", "rank": 4, "init": "whiten", "mode": "aligned",
        "whiten_scale": None, "eig_floor": 1e-6, "max_eig": 0.45,
    }

    def _validate(self) -> None:
        p = self.params
        _choice(p, "param", PARAMS)
        _choice(p, "init", INITS)
        _choice(p, "mode", MODES)
        r = p["rank"]
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise EstimatorError(f"darkl: rank must be a positive integer (for param='lowrank'), got {r!r}")
        s = p["whiten_scale"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf):
            raise EstimatorError(f"darkl: whiten_scale must be a positive number or None (d^-1/4), got {s!r}")
        for key, hi in (("eig_floor", 1.0), ("max_eig", 0.5)):
            v = p[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < hi:
                raise EstimatorError(f"darkl: {key} must be a number in (0, {hi}), got {v!r}")
        if p["mode"] == "is" and p["init"] == "whiten":
            raise EstimatorError(
                "darkl: mode='is' learns a sampling proposal N(0, Sigma) for exp(q . k); the whitening M "
                "is a kernel transform, not a proposal (its Sigma may have eigenvalues <= 1/2, where the "
                "importance-sampling variance is infinite). Use init='proposal' or 'identity'"
            )
        # The IS estimator stays unbiased for the softmax kernel whatever Sigma is learned.
        self.target = "softmax" if p["mode"] == "is" else SIGMA_TARGET

    # ------------------------------------------------------------------ learnable protocol
    def learnable_params(self, params: Params, draw: WeightDraw | None = None) -> Params:
        """The fitted tensors ``rfbench.learning`` trains: all of them (M's factors; the draw is not one)."""
        return dict(params)

    def trained_target(self, params: Params) -> TargetKernel:
        """The TargetKernel once M is trained: the learned exp((Mq) . (Mk)) (aligned), or the
        softmax kernel (is: a learned proposal leaves the target alone)."""
        if self.params["mode"] == "is":
            return SOFTMAX
        return transformed_softmax(LEARNED_SIGMA_TARGET, self.transform(params).detach())

    # ------------------------------------------------------------------ init
    def _init_full(self, lam: torch.Tensor, d: int) -> torch.Tensor:
        """Symmetric M0 ``[..., d, d]`` (float64) from the second moment ``lam``."""
        init = self.params["init"]
        if init == "identity":
            return torch.eye(d, dtype=torch.float64).expand(lam.shape).clone()
        evals, U = torch.linalg.eigh(lam)
        mu = self._init_eigs(evals, d)
        return (U * mu.unsqueeze(-2)) @ U.transpose(-1, -2)

    def _init_eigs(self, evals: torch.Tensor, d: int) -> torch.Tensor:
        """Eigenvalues of M0 from eigenvalues (or diagonal entries) of Lambda."""
        if self.params["init"] == "identity":
            return torch.ones_like(evals)
        p = self.params
        if p["init"] == "whiten":
            return whiten_eigs(evals, d, p["whiten_scale"], p["eig_floor"], "darkl", stacklevel=4)
        return proposal_eigs(evals, p["max_eig"], "darkl (proposal init)").sqrt()  # M0 = Sigma*^1/2

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """Initial factors of M (see the module docstring), float64-computed, cast to q's dtype."""
        d = q.shape[-1]
        lam = second_moment(q, k)
        kind = self.params["param"]
        if kind == "diag":
            out = {"M_diag": self._init_eigs(torch.diagonal(lam, dim1=-2, dim2=-1), d)}
        else:
            M0 = self._init_full(lam, d)
            if kind == "full":
                out = {"M": M0}
            else:
                r = self.params["rank"]
                if r > d:
                    raise EstimatorError(f"darkl: rank={r} exceeds the dimension d={d}; choose rank <= d")
                mu, U = torch.linalg.eigh(M0)
                c = mu.median(dim=-1, keepdim=True).values
                idx = (mu - c).abs().topk(r, dim=-1).indices  # the r directions furthest from c
                U_r = torch.gather(U, -1, idx.unsqueeze(-2).expand(*U.shape[:-1], r))
                mu_r = torch.gather(mu, -1, idx)
                out = {"M_diag": c.expand(mu.shape).clone(), "M_U": U_r * (mu_r - c).unsqueeze(-2),
                       "M_V": U_r}
        return {key: t.to(q.dtype) for key, t in out.items()}

    # ------------------------------------------------------------------ the transform
    def transform(self, params: Params) -> torch.Tensor:
        """M ``[..., d, d]`` built (differentiably) from the fitted or trained factors."""
        kind = self.params["param"]
        need = {"full": ("M",), "diag": ("M_diag",), "lowrank": ("M_diag", "M_U", "M_V")}[kind]
        missing = [key for key in need if key not in params]
        if missing:
            raise EstimatorError(f"darkl needs its fitted M (missing {missing}): call est.fit(q, k) first")
        if kind == "full":
            return params["M"]
        M = torch.diag_embed(params["M_diag"])
        if kind == "lowrank":
            M = M + params["M_U"] @ params["M_V"].transpose(-1, -2)
        return M

    def sigma(self, params: Params) -> torch.Tensor:
        """Sigma = M^T M ``[..., d, d]``: the kernel's matrix (aligned) or the proposal covariance (is)."""
        M = self.transform(params)
        return M.transpose(-1, -2) @ M

    def target_kernel(self, params: Params) -> TargetKernel:
        """exp((Mq) . (Mk)) at the fitted M (mode "aligned"); exp(q . k) in mode "is"."""
        if self.params["mode"] == "is":
            return SOFTMAX
        return transformed_softmax(self.target, self.transform(params))

    def exp_form(self, draw: WeightDraw, params: Params, d: int) -> ExpForm:
        """Aligned: PosRF on M x (W_eff = W M, P = M). IS: omega = M^T w ~ N(0, Sigma), W_eff = omega,
        bias = the importance weight; omega^T Sigma^-1 omega = |w|^2 for invertible M, so the weight
        needs only log det Sigma = 2 log |det M|. Differentiable in the factors of M."""
        W = draw.W
        M = self.transform(params).to(device=W.device, dtype=W.dtype)
        if self.params["mode"] == "aligned":
            return aligned_form(W, M)
        omega = W @ M  # [..., m, d], rows M^T w
        return ExpForm(omega, importance_bias(W, omega, 2 * torch.linalg.slogdet(M).logabsdet))

    # ------------------------------------------------------------------ closed-form variance
    def log_second_moment(self, x: torch.Tensor, y: torch.Tensor, params: Params) -> torch.Tensor:
        """log E_omega[(f(omega, x) f(omega, y))^2] for all pairs, one i.i.d. sample: ``[..., Lx, Ly]``.

        Mode "is" only (the target exp(x . y) does not move with Sigma). With A = 2 I - Sigma^-1
        (derived from the Gaussian integral; needs Sigma > I/2, else the variance is infinite and
        +inf is returned) and B = A^-1 = Sigma (2 Sigma - I)^-1:
            E[Y^2] = det(Sigma) det(2 Sigma - I)^-1/2 exp(2 u^T B u - |x|^2 - |y|^2),  u = x + y.
        At Sigma = I this is exp(2 x.y + |x + y|^2) = Var1 + K^2 of PosRF (Performer Lemma 2).
        """
        if self.params["mode"] != "is":
            raise EstimatorError(
                "darkl in mode 'aligned' learns its kernel exp(q^T Sigma k): its variance about a moving "
                "target is minimised by Sigma -> 0 (a constant kernel). Use mode='is' for a variance "
                "objective, or objective 'kernel' / 'attention'"
            )
        sigma = self.sigma(params).to(device=x.device, dtype=x.dtype)
        d = sigma.shape[-1]
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        two_s = 2 * sigma - eye
        L, info = torch.linalg.cholesky_ex(two_s)
        if bool((info != 0).any()):
            lead = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2], sigma.shape[:-2])
            return torch.full((*lead, x.shape[-2], y.shape[-2]), math.inf, dtype=x.dtype, device=x.device)
        B = torch.cholesky_solve(sigma, L)  # (2 Sigma - I)^-1 Sigma = B (B is symmetric)
        B = 0.5 * (B + B.transpose(-1, -2))
        log_c = torch.linalg.slogdet(sigma).logabsdet - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        xB = x @ B
        qx = (xB * x).sum(-1, keepdim=True)  # [..., Lx, 1]
        qy = ((y @ B) * y).sum(-1).unsqueeze(-2)  # [..., 1, Ly]
        cross = xB @ y.transpose(-1, -2)
        quad = qx + qy + 2 * cross
        return log_c[..., None, None] + 2 * quad - sq_norm(x) - sq_norm(y).transpose(-1, -2)
