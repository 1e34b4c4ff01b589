"""Signed circulant random features (Feng, Hu, Liao, IJCAI 2015)."""

from __future__ import annotations

import torch

from rfbench.weights._blocks import rademacher, stack_blocks
from rfbench.weights.base import WeightMatrix, normal


def circulant(g: torch.Tensor) -> torch.Tensor:
    """``[d, d]`` circulant matrix, row i = g shifted right by i: C[i, j] = g[(j - i) % d]."""
    d = g.shape[-1]
    idx = (torch.arange(d).unsqueeze(0) - torch.arange(d).unsqueeze(1)) % d
    return g[idx]


class SCRF(WeightMatrix):
    """W = [D_1 circ(g_1); D_2 circ(g_2); ...][:m], ceil(m / d) independent d x d blocks.

    g_b ~ N(0, I_d) and D_b a Rademacher (+-1) diagonal (Feng, Hu, Liao, "Random Feature Mapping
    with Signed Circulant Matrix Projection", IJCAI 2015, Sec. 3). Each row is +-(a cyclic
    shift of g_b), so exactly N(0, I_d) marginally: unbiased. Rows of a block share their norm
    |g_b| and are strongly coupled. Unlike the Spectraformer code the number of blocks is
    ceil(m / d), never 0, so W is never all zeros.
    """

    name = "scrf"
    independent_rows = False
    description = "signed circulant blocks D circ(g), g ~ N(0, I); unbiased"
    reference = "Feng, Hu, Liao, Random Feature Mapping with Signed Circulant Matrix Projection, IJCAI 2015"

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        def block() -> torch.Tensor:
            g = normal((d,), generator)
            signs = rademacher(d, generator)
            return signs.unsqueeze(1) * circulant(g)

        return stack_blocks(m, block)

