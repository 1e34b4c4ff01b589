"""Small helpers shared by the structured weight matrices (blocks, random signs)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def stack_blocks(m: int, block: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Stack independent blocks ``block() -> [b, d]`` until there are m rows; keep the first m."""
    rows, n = [], 0
    while n < m:
        b = block()
        rows.append(b)
        n += b.shape[0]
    return torch.cat(rows, dim=0)[:m]


def rademacher(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` independent +-1 signs (float64) drawn from ``generator``."""
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
