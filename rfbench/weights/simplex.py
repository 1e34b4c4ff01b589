"""Simplex random features: SimRF and the norm-coupled SimRF+.

Reid, Choromanski, Likhosherstov, Weller, "Simplex Random Features", ICML 2023, arXiv 2301.13856.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rfbench.errors import EstimatorError
from rfbench.weights._blocks import stack_blocks
from rfbench.weights.base import WeightMatrix, chi_norms
from rfbench.weights.orthogonal import haar_orthogonal


def simplex(d: int) -> torch.Tensor:
    """``[d, d]`` rows: d unit vectors of a regular simplex, pairwise inner product -1/(d-1).

    s_i = sqrt(d / (d-1)) (e_i - 1/d): they lie in the hyperplane sum x = 0 and sum to 0.
    For d = 1 the single vector [1].
    """
    if d == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    return math.sqrt(d / (d - 1)) * (torch.eye(d, dtype=torch.float64) - 1.0 / d)


def simplex_plus_directions(norms: torch.Tensor, iters: int) -> torch.Tensor:
    """SimRF+ directions ``[d, d]`` for block norms ``[d]``, in the simplex's own frame.

    Starting from ``simplex(d)``, each sweep sets, in turn, direction i to minus the
    normalised weighted sum of the others, -r_i / |r_i| with r_i = sum_{j != i} w_j s_j
    (Reid et al. 2023, Eq. 17; Gauss-Seidel order as in the authors' code). Each step exactly
    minimises |sum_j w_j s_j|^2 over s_i, so that objective never increases.
    """
    d = norms.shape[0]
    dirs = simplex(d).numpy().copy()  # numpy: this sequential loop is dominated by per-op overhead
    if d == 1:
        return torch.from_numpy(dirs)
    w = norms.numpy()
    total = w @ dirs  # running sum_j w_j s_j
    for _ in range(iters):
        for i in range(d):
            r = total - w[i] * dirs[i]
            length = float(np.sqrt(r @ r))
            if length == 0.0:  # the others cancel exactly: every direction is optimal, keep s_i
                continue
            dirs[i] = -r / length
            total = r + w[i] * dirs[i]
    return torch.from_numpy(dirs)


class SimRF(WeightMatrix):
    """W = [diag(w_b) S R_b]_b[:m]: regular-simplex directions, Haar rotation, chi_d norms.

    Per d-block: S = ``simplex(d)`` (d unit vectors, pairwise inner product -1/(d-1)), R_b
    Haar on O(d), w_b ~ chi_d i.i.d. (Reid et al. 2023). Each row is a uniform direction times
    an independent chi_d norm: exactly N(0, I_d) marginally, unbiased.
    The most negative pairwise coupling possible; lower PosRF MSE than ORF. Cost as ORF.
    """

    name = "simrf"
    independent_rows = False
    description = "regular-simplex directions, Haar rotation, chi_d norms per d-block; unbiased"
    reference = "Reid, Choromanski, Likhosherstov, Weller, Simplex Random Features, ICML 2023"

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        return stack_blocks(m, lambda: self._block(d, generator))

    def _directions(self, norms: torch.Tensor) -> torch.Tensor:
        return simplex(norms.shape[0])

    def _block(self, d: int, generator: torch.Generator) -> torch.Tensor:
        norms = chi_norms(d, d, generator)
        R = haar_orthogonal(d, generator)
        return norms.unsqueeze(1) * (self._directions(norms) @ R)


class SimRFPlus(SimRF):
    """SimRF+: simplex directions adjusted to the sampled norms, then a Haar rotation.

    As ``simrf``, but the block's directions are ``simplex_plus_directions(w_b, iters)``
    (Reid et al. 2023, Eq. 17), which pushes |sum_i omega_i| towards 0 given the
    norms. The rotation R_b is applied after and is independent of the norms, so each row is
    still a uniform direction independent of its own norm: exactly N(0, I_d) marginally, and
    the PosRF estimate stays unbiased (the rows' joint law depends on the norms; the marginals
    do not). ``iters=0`` gives exactly ``simrf``'s draw for the same seed.
    """

    name = "simrfplus"
    defaults = {"iters": 5}
    description = "SimRF+ (directions coupled to the sampled norms, Eq. 17 sweeps); unbiased"
    reference = "Reid, Choromanski, Likhosherstov, Weller, Simplex Random Features, ICML 2023, Eq. 17"

    def _validate(self) -> None:
        it = self.params["iters"]
        if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it <= 1000:
            raise EstimatorError(f"simrfplus: iters must be an integer in [0, 1000], got {it!r}")

    def _directions(self, norms: torch.Tensor) -> torch.Tensor:
        return simplex_plus_directions(norms, self.params["iters"])
