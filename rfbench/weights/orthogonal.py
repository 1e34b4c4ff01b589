"""Block-orthogonal random features: ORF (chi norms, unbiased) and its fixed-norm SMREG variant.

Yu et al., "Orthogonal Random Features", NeurIPS 2016 (Sec. 3); Choromanski et al., "Rethinking
Attention with Performers", ICLR 2021 (Sec. 2.4, Thm 2: strictly smaller PosRF MSE than iid).
"""

from __future__ import annotations

import math

import torch

from rfbench.weights._blocks import stack_blocks
from rfbench.weights.base import WeightMatrix, chi_norms, normal


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, n]`` orthogonal matrix from the Haar measure on O(n) (Mezzadri 2007, Sec. 5).

    Q of the QR of a Gaussian matrix, with its columns multiplied by sign(diag R).
    """
    Q, R = torch.linalg.qr(normal((n, n), generator))
    # QR alone is not Haar: LAPACK's sign convention ties Q to R's diagonal. Moving the signs
    # of diag(R) into Q makes the factorisation unique and Q exactly Haar-distributed.
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


class ORF(WeightMatrix):
    """Block-orthogonal rows with chi_d norms: W = [diag(s_1) Q_1; diag(s_2) Q_2; ...][:m].

    ceil(m / d) independent Haar-orthogonal d x d blocks Q_b (Mezzadri's sign-corrected QR),
    the last one truncated; every row gets an independent norm s ~ chi_d (Yu et al. 2016,
    ORF with S = diag(chi_d); Performer "scaling=0"). Each row is a uniform direction times an
    independent chi_d norm, hence exactly N(0, I_d) marginally: every Gaussian feature map stays
    unbiased. Rows within a block are orthogonal (coupled), which strictly lowers the PosRF MSE
    (Performer Thm 2).
    """

    name = "orf"
    independent_rows = False
    description = "block-orthogonal (Haar) rows with chi_d norms; unbiased"
    reference = "Yu et al., Orthogonal Random Features, NeurIPS 2016; Choromanski et al., ICLR 2021, Thm 2"

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        def block() -> torch.Tensor:
            Q = haar_orthogonal(d, generator)
            return chi_norms(d, d, generator).unsqueeze(1) * Q

        return stack_blocks(m, block)


class ORFFixed(ORF):
    """Block-orthogonal rows all of norm sqrt(d) (Performer "scaling=1", the SMREG variant).

    Same blocks as ``orf`` but |omega_i| = sqrt(d) exactly, so rows are uniform on the sphere of
    radius sqrt(d), *not* N(0, I_d): biased for the softmax kernel (it estimates the regularised
    softmax SMREG of Performer Sec. 2.4). Offered as a labelled-biased baseline.
    """

    name = "orffixed"
    unbiased = False
    description = "block-orthogonal (Haar) rows of norm sqrt(d) (SMREG); biased for SM"
    reference = "Choromanski et al., Rethinking Attention with Performers, ICLR 2021, Sec. 2.4 (SMREG)"

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        return stack_blocks(m, lambda: math.sqrt(d) * haar_orthogonal(d, generator))
