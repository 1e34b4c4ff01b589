"""I.i.d. Gaussian weight matrix (Rahimi & Recht 2007; Performer "IID")."""

from __future__ import annotations

import torch

from rfbench.weights.base import WeightMatrix, normal


class IID(WeightMatrix):
    """Rows omega_i ~ N(0, I_d), independent. Unbiased; MSE = Var1 / m."""

    name = "iid"
    description = "independent N(0, I) rows"
    reference = "Rahimi & Recht, NeurIPS 2007"

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        return normal((m, d), generator)
