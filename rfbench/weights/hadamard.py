"""Walsh-Hadamard-based weight matrices: SORF, ROM (S-Rademacher, S-Hybrid) and FastFood.

All use the *normalised* Walsh-Hadamard matrix H (entries +-1/sqrt(n), H H = I), n a power of
two. Where d is not a power of two (and ``pad=True``, the default) the input is zero-padded to
n = next_pow2(d): W keeps the first d columns of each n-column block, and the draw's ``notes``
say so. With ``pad=False`` such a d is refused.

``fwht`` is the O(n log n) transform; ``hadamard`` the dense matrix it is tested against.
"""

from __future__ import annotations

import math

import torch

from rfbench.errors import EstimatorError
from rfbench.weights._blocks import rademacher, stack_blocks
from rfbench.weights.base import WeightDraw, WeightMatrix, chi_norms, next_pow2, normal


def _check_pow2(n: int) -> None:
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Walsh-Hadamard size must be a power of two, got {n}")


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[n, n]`` normalised Sylvester Walsh-Hadamard matrix: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    _check_pow2(n)
    H = torch.ones(1, 1, dtype=dtype)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], dim=1), torch.cat([H, -H], dim=1)], dim=0)
    return H / math.sqrt(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh-Hadamard transform over the last dim: ``x @ hadamard(n)``, O(n log n).

    x: ``[..., n]`` with n a power of two; returns the same shape (H is symmetric, so this is
    also H applied to each vector).
    """
    n = x.shape[-1]
    _check_pow2(n)
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(-1, n) / math.sqrt(n)).reshape(*lead, n)


def hd_product(signs: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` product H diag(signs[0]) H diag(signs[1]) ... H diag(signs[k-1]) for signs ``[k, n]``.

    Built column by column with ``fwht`` (O(k n^2 log n)): the columns M e_j are computed as the
    rows of M^T, applying the rightmost factor first.
    """
    Mt = torch.diag(signs[-1])
    for i in range(signs.shape[0] - 1, -1, -1):
        Mt = fwht(Mt)
        if i > 0:
            Mt = Mt * signs[i - 1].unsqueeze(0)
    return Mt.T


class _PaddedHadamard(WeightMatrix):
    """Shared logic: blocks of n = next_pow2(d) columns, zero-padding d when allowed."""

    independent_rows = False
    defaults = {"pad": True}

    def _validate(self) -> None:
        if not isinstance(self.params["pad"], bool):
            raise EstimatorError(f"{self.name}: pad must be True or False, got {self.params['pad']!r}")
        k = self.params.get("k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise EstimatorError(f"{self.name}: k (number of H D factors) must be an integer >= 1, got {k!r}")

    def supports(self, m: int, d: int) -> list[str]:
        if not self.params["pad"] and d != next_pow2(d):
            n = next_pow2(d)
            return [
                f"d={d} is not a power of two and pad=False; pass pad=True (zero-pads to {n}) "
                f"or use d in {{{n // 2}, {n}}}"
            ]
        return []

    def _block(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """One block ``[rows, n]`` whose full rows have E|w|^2 = n."""
        raise NotImplementedError

    def _pad_note(self, d: int, n: int, rows: int) -> str:
        return (
            f"d={d} zero-padded to n={n} (power of two): W keeps the first {d} of {n} columns of "
            f"each block, so rows are not exactly orthogonal and their norms vary; each {rows}-row "
            f"block is still a tight frame (W_b^T W_b = {rows} I)"
        )

    def _sample(self, m: int, d: int, generator: torch.Generator) -> WeightDraw:
        n = next_pow2(d)
        W = stack_blocks(m, lambda: self._block(n, generator))[:, :d].contiguous()
        notes = () if n == d else (self._pad_note(d, n, self._rows_per_block(n)),)
        return WeightDraw(W, notes=notes)

    def _rows_per_block(self, n: int) -> int:
        return n


class ROM(_PaddedHadamard):
    """S-Rademacher random ortho-matrix: sqrt(n) * prod_{i=1..k} H D_i per n x n block.

    Choromanski, Rowland, Weller, "The Unreasonable Effectiveness of Structured Random Orthogonal
    Embeddings", NeurIPS 2017 (Sec. 2, S-Rademacher M^(k) = prod S D_i^(R), scaled by sqrt(n)).
    D_i Rademacher diagonals, H normalised; ceil(m / n) independent blocks. For d a power of
    two, rows within a block are exactly orthogonal with norm exactly sqrt(d): the rows are not
    N(0, I) (fixed norm, non-uniform directions), so the estimate is biased for SM (like
    ``orffixed``), nearly unbiased for large d. k=3 is ``sorf``.
    """

    name = "rom"
    unbiased = False
    defaults = {"k": 3, "pad": True}
    description = "S-Rademacher ROM: sqrt(d) (H D)^k blocks, orthogonal rows of norm sqrt(d); biased for SM"
    reference = "Choromanski, Rowland, Weller, Structured Random Orthogonal Embeddings, NeurIPS 2017"

    def _num_factors(self) -> int:
        """k, the number of H D factors per block."""
        return self.params["k"]

    def _block(self, n: int, generator: torch.Generator) -> torch.Tensor:
        signs = torch.stack([rademacher(n, generator) for _ in range(self._num_factors())])
        return math.sqrt(n) * hd_product(signs)


class SORF(ROM):
    """Structured orthogonal random features: W = sqrt(n) H D_1 H D_2 H D_3 per n x n block.

    Yu et al., "Orthogonal Random Features", NeurIPS 2016 (Sec. 4, W_SORF = sqrt(d)/sigma
    H D1 H D2 H D3), with the *normalised* H so rows have norm sqrt(d) (the Spectraformer code
    uses the unnormalised transform and gets norms ~ n^2). For d a power of two rows are exactly
    orthogonal with norm sqrt(d): not N(0, I), biased for SM (nearly unbiased for large d).
    The same distribution as ``rom`` with k=3.
    """

    name = "sorf"
    defaults = {"pad": True}
    description = "structured orthogonal RF sqrt(d) H D1 H D2 H D3, rows of norm sqrt(d); biased for SM"
    reference = "Yu et al., Orthogonal Random Features, NeurIPS 2016, Sec. 4"

    def _num_factors(self) -> int:
        return 3  # SORF is ROM's block with k = 3 (no k parameter of its own)


class ROMHybrid(_PaddedHadamard):
    """S-Hybrid random ortho-matrix, realified: 2n real rows per n x n complex block.

    U = H D^(U) H D_2 ... H D_k with D^(U) = diag(e^{i theta}), theta ~ U[0, 2 pi), the other
    D_i Rademacher (Choromanski, Rowland, Weller, NeurIPS 2017, Sec. 2, S-Hybrid). U is
    unitary, so with U = A + iB: A^T A + B^T B = I. The block is sqrt(2n) [A; B] (the real and
    imaginary parts of each complex row as two real rows): a tight frame, W_b^T W_b = 2n I, so
    the block's second moment is exactly I (mean |w|^2 = d) although single rows are neither
    orthogonal nor of fixed norm: the n real-part rows of a block share |w|^2 = 2 sum_k
    cos^2(theta_k), the imaginary-part rows 2 sum_k sin^2(theta_k) (mean d each). Rows are not
    N(0, I) marginally: biased for SM. Spectraformer draws a non-unit-modulus diagonal.
    """

    name = "romhybrid"
    unbiased = False
    defaults = {"k": 3, "pad": True}
    description = "S-Hybrid ROM (one complex unit-modulus diagonal), real and imaginary rows; biased for SM"
    reference = "Choromanski, Rowland, Weller, Structured Random Orthogonal Embeddings, NeurIPS 2017"

    def _rows_per_block(self, n: int) -> int:
        return 2 * n

    def _block(self, n: int, generator: torch.Generator) -> torch.Tensor:
        theta = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        k = self.params["k"]
        R = hd_product(torch.stack([rademacher(n, generator) for _ in range(k - 1)])) if k > 1 else None
        parts = []
        for c in (torch.cos(theta), torch.sin(theta)):
            inner = torch.diag(c) if R is None else c.unsqueeze(1) * R  # diag(c) R
            parts.append(fwht(inner.T).T)  # H diag(c) R, column by column
        return math.sqrt(2 * n) * torch.cat(parts, dim=0)


class FastFood(_PaddedHadamard):
    """FastFood: V = S H G Pi H B per n x n block, fixed (not learned).

    Le, Sarlos, Smola, "Fastfood: Approximating Kernel Expansions in Loglinear Time", ICML 2013
    (Sec. 3). B Rademacher diagonal, Pi a random permutation, G = diag(g), g ~ N(0, I_n), H
    normalised. Given B and Pi, each row of sqrt(n) H G Pi H B is linear in g with covariance
    I_n, so exactly N(0, I_n); all its rows have norm |g|. S = diag(s_i / |g|), s_i ~ chi_n
    independent, gives each row an independent chi_n norm while keeping its uniform direction:
    rows stay exactly N(0, I_n), and their first d coordinates N(0, I_d), even with padding.
    Unbiased; coupled within a block.
    """

    name = "fastfood"
    unbiased = True
    description = "FastFood S H G Pi H B blocks with chi norms (fixed, not learned); unbiased"
    reference = "Le, Sarlos, Smola, Fastfood, ICML 2013"

    def block_factors(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One block's factors ``(b, perm, g, s)``, each ``[n]``, in the order they are drawn:
        B's signs, Pi, g ~ N(0, I_n), the chi_n row norms. FastFood-L starts from the same factors."""
        b = rademacher(n, generator)
        perm = torch.randperm(n, generator=generator)
        g = normal((n,), generator)
        s = chi_norms(n, n, generator)
        return b, perm, g, s

    def _block(self, n: int, generator: torch.Generator) -> torch.Tensor:
        b, perm, g, s = self.block_factors(n, generator)
        # Columns of M = sqrt(n) H G Pi H B, computed as the rows of M^T, rightmost factor first.
        Mt = fwht(torch.diag(b))[:, perm] * g.unsqueeze(0)
        M = math.sqrt(n) * fwht(Mt).T
        return (s / g.norm()).unsqueeze(1) * M

    def _pad_note(self, d: int, n: int, rows: int) -> str:
        return (
            f"d={d} zero-padded to n={n} (power of two): W keeps the first {d} of {n} columns of "
            "each block; rows stay exactly N(0, I)"
        )
