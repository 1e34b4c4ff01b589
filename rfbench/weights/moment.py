"""Moment matching: Gaussian rows whitened so the draw's first two moments are exactly those of N(0, I)."""

from __future__ import annotations

import torch

from rfbench.weights.base import WeightMatrix, normal


def _whiten(Z: torch.Tensor) -> torch.Tensor:
    """Z ``[m, d]`` (centred) times S^-1/2, S = Z^T Z / m: symmetric whitening (rotation-equivariant)."""
    S = Z.T @ Z / Z.shape[0]
    evals, evecs = torch.linalg.eigh(S)
    return Z @ (evecs * evals.rsqrt().unsqueeze(0)) @ evecs.T


class MomentMatching(WeightMatrix):
    """W = (Z - mean(Z)) S^-1/2 with Z ``[m, d]`` i.i.d. N(0, 1), S the centred second moment.

    Afterwards (1/m) sum_i omega_i = 0 and (1/m) sum_i omega_i omega_i^T = I_d exactly (to
    rounding; the 1/m convention is the one the Monte Carlo average uses). Symmetric whitening
    S^-1/2 (not Cholesky) keeps the law of W rotation-invariant, so each row's direction is
    uniform, but its norm is no longer chi_d: rows are not N(0, I) and the estimate is only
    nearly unbiased (bias O(1/m)). Needs m > d: m <= d centred rows span at most m - 1
    dimensions, so S is singular. (Shen et al., "Random Features for Shift-Invariant Kernels
    with Moment Matching", AAAI 2017; Spectraformer "mm".)
    """

    name = "mm"
    unbiased = False
    independent_rows = False
    description = "Gaussian rows whitened to mean 0, covariance I exactly; needs m > d; nearly unbiased"
    reference = "Shen et al., Random Features for Shift-Invariant Kernels with Moment Matching, AAAI 2017"

    def supports(self, m: int, d: int) -> list[str]:
        if m <= d:
            return [
                f"moment matching needs m > d (m={m}, d={d}): the centred sample covariance of m <= d "
                f"rows is singular; use num_features >= {d + 1} or another weight matrix"
            ]
        return []

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        Z = normal((m, d), generator)
        Z = Z - Z.mean(dim=0, keepdim=True)
        # A second pass removes the rounding error the first leaves when S is ill-conditioned
        # (m close to d); it is a near-identity map otherwise.
        return _whiten(_whiten(Z))
