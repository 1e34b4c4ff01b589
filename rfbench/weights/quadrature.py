"""Gaussian quadrature rows: subsampled dense Gauss-Hermite grids and Smolyak sparse grids.

Dao, De Sa, Re, "Gaussian Quadrature for Kernel Features", NeurIPS 2017 (Sec. 4: dense grids,
sparse grids, and subsampling). All rules are for the standard normal N(0, I_d), built from
probabilists' Gauss-Hermite rules whose weights sum to 1. A rule is exact for polynomials up to
its degree, not for exp(), so these estimators are biased for SM (the bias falls fast with the
number of points / the level).
"""

from __future__ import annotations

import functools
import math
from itertools import combinations

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss

from rfbench.errors import EstimatorError
from rfbench.weights.base import WeightDraw, WeightMatrix

#: Largest sparse grid (distinct nodes) ``sgq`` builds; larger ones are refused.
MAX_SPARSE_NODES = 200_000


def _positive_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise EstimatorError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


@functools.lru_cache(maxsize=64)
def _gauss_hermite(p: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = hermegauss(p)
    # Exact symmetry (and an exact 0 node for odd p), so nodes of different rules and signs
    # merge exactly in the sparse grid.
    x = (x - x[::-1]) / 2
    if p % 2:
        x[p // 2] = 0.0
    return x, w / math.sqrt(2 * math.pi)  # hermegauss weights integrate exp(-x^2/2): sum sqrt(2 pi)


def gauss_hermite(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p-point probabilists' Gauss-Hermite rule for N(0, 1): nodes ``[p]``, weights ``[p]`` (sum 1).

    Exact for polynomials of degree <= 2p - 1.
    """
    x, w = _gauss_hermite(p)
    return torch.from_numpy(x.copy()), torch.from_numpy(w.copy())


def tensor_grid(points: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full tensor-product rule: nodes ``[points^d, d]``, weights ``[points^d]`` (small d only)."""
    if points**d > 10**7:
        raise EstimatorError(f"tensor grid of {points}^{d} nodes is too large to list; use fewer points or d")
    x, w = gauss_hermite(points)
    idx = torch.cartesian_prod(*[torch.arange(points)] * d).reshape(-1, d)
    return x[idx], w[idx].prod(dim=1)


class GridQuadrature(WeightMatrix):
    """Rows drawn from the dense tensor-product Gauss-Hermite rule with probability = weight.

    The rule with ``points`` nodes per coordinate has points^d nodes; drawing a node with
    probability equal to its (product) weight is drawing each coordinate independently from
    the 1-D rule, so d = 128 costs nothing. All rows have weight 1/m (``row_weights`` None).
    Rows are independent but discrete (not N(0, I)): the estimate is unbiased for the rule,
    biased for SM. (Dao, De Sa, Re, NeurIPS 2017, Sec. 4, "subsampled dense grid".)
    """

    name = "gq"
    unbiased = False
    defaults = {"points": 5}
    description = "subsampled dense Gauss-Hermite grid (nodes drawn by weight); biased for SM"
    reference = "Dao, De Sa, Re, Gaussian Quadrature for Kernel Features, NeurIPS 2017"

    def _validate(self) -> None:
        _positive_int("gq: points (Gauss-Hermite nodes per coordinate)", self.params["points"], 1, 100)

    def rule(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole tensor-product rule (nodes ``[points^d, d]``, weights); for tests, small d."""
        return tensor_grid(self.params["points"], d)

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        x, w = gauss_hermite(self.params["points"])
        idx = torch.multinomial(w, m * d, replacement=True, generator=generator)
        return x[idx].reshape(m, d)


def _compositions(total: int, parts: int):
    """All tuples of ``parts`` integers >= 1 summing to ``total``."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _smolyak_terms(d: int, level: int):
    """Terms of Smolyak's combination formula A(q, d), q = d + level - 1.

    A(q, d) = sum_{q-d+1 <= |i| <= q} (-1)^(q-|i|) C(d-1, q-|i|) U^(i_1) x ... x U^(i_d),
    i_k >= 1, with U^(i) the (2i - 1)-point Gauss-Hermite rule (U^(1) is the point 0). Yields
    (coefficient, active dims, their levels) for the dims with i_k > 1; the others sit at 0.
    """
    for extra in range(max(0, level - d), level):  # extra = |i| - d
        coef = (-1) ** (level - 1 - extra) * math.comb(d - 1, level - 1 - extra)
        if coef == 0:
            continue
        if extra == 0:
            yield coef, (), ()
            continue
        for r in range(1, min(extra, d) + 1):
            for ups in _compositions(extra, r):
                levels = tuple(u + 1 for u in ups)
                for dims in combinations(range(d), r):
                    yield coef, dims, levels


def sparse_grid_size(d: int, level: int) -> int:
    """Nodes listed by the combination formula before merging (an upper bound on distinct nodes)."""
    total = 0
    for extra in range(max(0, level - d), level):
        if math.comb(d - 1, level - 1 - extra) == 0:
            continue
        if extra == 0:
            total += 1
            continue
        for r in range(1, min(extra, d) + 1):
            per = sum(math.prod(2 * u + 1 for u in ups) for ups in _compositions(extra, r))
            total += math.comb(d, r) * per
    return total


@functools.lru_cache(maxsize=16)
def _sparse_grid_compact(d: int, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged sparse grid in compact form: dims ``[N, a]``, values ``[N, a]``, weights ``[N]``.

    a = min(level - 1, d) nonzero coordinates at most per node (padding: dim 0, value 0).
    """
    width = max(1, min(level - 1, d))
    merged: dict[tuple, list[float]] = {}
    for coef, dims, levels in _smolyak_terms(d, level):
        rules = [_gauss_hermite(2 * lv - 1) for lv in levels]
        for picks in np.ndindex(*[len(x) for x, _ in rules]) if rules else [()]:
            weight = float(coef)
            key = []
            for dim, (x, w), j in zip(dims, rules, picks):
                weight *= w[j]
                if x[j] != 0.0:
                    key.append((dim, float(x[j])))
            merged.setdefault(tuple(key), []).append(weight)
    n = len(merged)
    dims_t = torch.zeros(n, width, dtype=torch.long)
    vals_t = torch.zeros(n, width, dtype=torch.float64)
    weights = torch.empty(n, dtype=torch.float64)
    for row, (key, parts) in enumerate(merged.items()):
        for col, (dim, value) in enumerate(key):
            dims_t[row, col], vals_t[row, col] = dim, value
        # Terms with coefficients up to C(d-1, level-1) cancel; fsum keeps the merged weight exact.
        weights[row] = math.fsum(parts)
    return dims_t, vals_t, weights


def _densify(dims: torch.Tensor, vals: torch.Tensor, d: int) -> torch.Tensor:
    return torch.zeros(dims.shape[0], d, dtype=torch.float64).scatter_add_(1, dims, vals)


def sparse_grid(d: int, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smolyak sparse grid for N(0, I_d): distinct nodes ``[N, d]`` and weights ``[N]`` (sum 1, some < 0).

    Exact for every monomial prod x_k^(a_k) with sum_k ceil((a_k + 3) / 4) <= d + level - 1
    (degree 4 i_k - 3 in coordinate k at level i_k): level 2 integrates x_1^2 and x_1^4 exactly,
    level 3 also x_1^2 x_2^2.
    """
    dims, vals, weights = _sparse_grid_compact(d, level)
    return _densify(dims, vals, d), weights.clone()


class SparseGridQuadrature(WeightMatrix):
    """Rows drawn from a Smolyak sparse grid of Gauss-Hermite rules, with signed row weights.

    The grid (``sparse_grid``; Dao, De Sa, Re, NeurIPS 2017, Sec. 4.2, with the non-nested
    (2i - 1)-point probabilists' rules) has weights w_I that sum to 1 but can be negative.
    m nodes are drawn i.i.d. with probability |w_I| / sum|w| and get row weight
    sign(w_I) sum|w| / m, so the weighted sum is an unbiased estimate of the rule (the Estimator
    puts sqrt|w| on both sides and the sign on the query side). Biased for SM (the rule is not
    exact for exp), and the variance grows with sum|w| (recorded in the notes; it grows with d).
    ``level`` >= 2 (level 1 is the single node 0); nodes: 2d + 1 at level 2, ~2 d^2 at level 3.
    """

    name = "sgq"
    unbiased = False
    defaults = {"level": 2}
    description = "Smolyak sparse Gauss-Hermite grid, nodes drawn by |weight|, signed weights; biased for SM"
    reference = "Dao, De Sa, Re, Gaussian Quadrature for Kernel Features, NeurIPS 2017"

    def _validate(self) -> None:
        _positive_int("sgq: level", self.params["level"], 2, 6)

    def supports(self, m: int, d: int) -> list[str]:
        size = sparse_grid_size(d, self.params["level"])
        if size > MAX_SPARSE_NODES:
            return [
                f"a level-{self.params['level']} sparse grid in d={d} lists {size} nodes "
                f"(limit {MAX_SPARSE_NODES}); use a lower level"
            ]
        return []

    def rule(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sparse grid: nodes ``[N, d]`` and weights ``[N]``."""
        return sparse_grid(d, self.params["level"])

    def _sample(self, m: int, d: int, generator: torch.Generator) -> WeightDraw:
        dims, vals, weights = _sparse_grid_compact(d, self.params["level"])
        total = float(weights.abs().sum())
        idx = torch.multinomial(weights.abs(), m, replacement=True, generator=generator)
        W = _densify(dims[idx], vals[idx], d)
        row_weights = torch.sign(weights[idx]) * (total / m)
        note = f"level-{self.params['level']} sparse grid: {len(weights)} nodes, sum|w| = {total:.4g}"
        return WeightDraw(W, row_weights=row_weights, notes=(note,))
