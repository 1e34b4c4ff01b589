"""Streaming accumulators of the kernel and attention-matrix errors (float64 sums over tiles).

Each tile of pairs adds its sums; nothing is kept per pair. Per entry,
(1/S) sum_s (K^s - K)^2 = (Kbar - K)^2 + ((S-1)/S) var_s(K^s), so the cross-seed sums give
exactly ``mean_s kernel_mse_s = bias2 + (S-1)/S * mc_variance``.
"""

from __future__ import annotations

import torch


class KernelSums:
    """Sums for S seeds: squared errors against the softmax kernel and against each seed's
    declared target (``slots[i]`` indexes the distinct target kernels, None: not measured),
    sum K^2 of each kernel, and the cross-seed squared bias and variance sums."""

    def __init__(self, slots: list[int | None], n_targets: int):
        S = len(slots)
        self.slots = slots
        self.sse = torch.zeros(S, dtype=torch.float64)
        self.tsse = torch.zeros(S, dtype=torch.float64)
        self.tk2 = torch.zeros(n_targets, dtype=torch.float64)
        self.sk2 = self.bias_sum = self.var_sum = 0.0

    def add_exact(self, K: torch.Tensor, targets: list[torch.Tensor]) -> None:
        """The exact kernel tile ``K`` and the tiles of the distinct target kernels."""
        self.sk2 += float((K * K).sum())
        for j, Kt in enumerate(targets):
            self.tk2[j] += float((Kt * Kt).sum())

    def add_seed(self, i: int, Kh: torch.Tensor, K: torch.Tensor, targets: list[torch.Tensor]) -> None:
        """Seed ``i``'s estimate ``Kh`` of the tile."""
        self.sse[i] += float(((Kh - K) ** 2).sum())
        j = self.slots[i]
        if j is not None:
            self.tsse[i] += float(((Kh - targets[j]) ** 2).sum())

    def add_seeds(self, stack: torch.Tensor, K: torch.Tensor) -> None:
        """All seeds' estimates ``stack [S, ...]`` of the tile: squared bias of their mean, variance."""
        S = stack.shape[0]
        Kbar = stack.mean(dim=0)
        self.bias_sum += float(((Kbar - K) ** 2).sum())
        if S > 1:
            self.var_sum += float(((stack - Kbar) ** 2).sum()) / (S - 1)


class AttentionSums:
    """Squared errors of the attention matrix per seed over the visible pairs, and their count."""

    def __init__(self, S: int):
        self.asse = torch.zeros(S, dtype=torch.float64)
        self.n_visible = 0

    def add_visible(self, n: int) -> None:
        self.n_visible += n

    def add_seed(self, i: int, Ah: torch.Tensor, A: torch.Tensor) -> None:
        self.asse[i] += float(((Ah - A) ** 2).sum())

    def mse(self) -> list[float]:
        return (self.asse / max(self.n_visible, 1)).tolist()
