"""Antithetic Gaussian rows: m/2 i.i.d. N(0, I) rows followed by their negatives.

Antithetic variates (Hammersley & Morton, "A new Monte Carlo technique: antithetic variates",
Proc. Cambridge Philos. Soc. 52, 1956) pair every draw omega with -omega, which has the same law.
For PosRF the pair average is exactly the hyperbolic estimator SM^hyp+ of Choromanski et al.,
"Rethinking Attention with Performers", ICLR 2021, Lemma 1 (f = exp(-|x|^2/2) [e^(w.x), e^(-w.x)]
/ sqrt 2): posrf-antithetic with m rows gives the same estimate as hyprf-iid with m/2 omegas.
Here the coupling lives in the weight matrix, so every Gaussian feature map can use it.
"""

from __future__ import annotations

import torch

from rfbench.weights.base import WeightMatrix, normal


class Antithetic(WeightMatrix):
    """W = [Z; -Z], Z ``[m/2, d]`` i.i.d. N(0, I): row i + m/2 is minus row i (m even).

    Each row is exactly N(0, I_d) marginally (-omega ~ omega), so every Gaussian feature map
    stays unbiased; the two halves are perfectly (negatively) coupled, so rows are not
    independent and the MSE is not Var1 / m. Z is drawn with the same call as ``iid``'s
    ``[m/2, d]`` draw.
    """

    name = "antithetic"
    gaussian_marginal = True
    unbiased = True
    independent_rows = False
    description = "m/2 i.i.d. N(0, I) rows and their negatives (antithetic pairs); unbiased"
    reference = (
        "Hammersley & Morton, Antithetic variates, Proc. Cambridge Philos. Soc. 1956; "
        "Choromanski et al., Rethinking Attention with Performers, ICLR 2021, Lemma 1 (SM^hyp+)"
    )

    def supports(self, m: int, d: int) -> list[str]:
        if m % 2:
            fix = f"{m + 1} or {m - 1}" if m > 1 else "2"
            return [f"antithetic pairs need an even m (got m={m}); use num_features={fix}"]
        return []

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        Z = normal((m // 2, d), generator)
        return torch.cat([Z, -Z], dim=0)
