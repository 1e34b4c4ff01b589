"""Randomised quasi-Monte Carlo rows: scrambled Sobol and scrambled Halton points through Phi^-1.

Yang, Sindhwani, Avron, Mahoney, "Quasi-Monte Carlo Feature Maps for Shift-Invariant Kernels",
ICML 2014 (Sec. 3): omega_i = Phi^-1(t_i) with t_1..t_m low-discrepancy points in [0, 1)^d.
Row i is *point* i (Spectraformer transposes the design and returns next_pow2(m) rows).
Scrambling makes every point uniform on [0, 1)^d, so each row is N(0, I_d) marginally and the
estimate is unbiased, while the points stay evenly spread (coupled rows).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.stats import qmc

from rfbench.weights.base import WeightDraw, WeightMatrix, next_pow2

#: Bits of scipy's Sobol generator. Points are multiples of 2^-52, exact in float64.
SOBOL_BITS = 52
#: scipy's Sobol direction numbers cover this many dimensions.
SOBOL_MAX_DIM = 21201


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy Generator seeded by one integer drawn from ``generator`` (never the global RNG)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.default_rng(seed)


def _to_tensor(u: np.ndarray) -> torch.Tensor:
    return torch.special.ndtri(torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64)))


class SobolQMC(WeightMatrix):
    """Rows Phi^-1(t_i), t_1..t_m the first m points of a scrambled Sobol sequence in [0, 1)^d.

    scipy's Sobol with LMS + digital-shift scrambling (each point uniform). For m a power of two
    the points form a (t, m, d)-net (each coordinate has one point per 1/m stratum); for other m
    they are the first m points of the sequence (scipy's balance warning is silenced and the
    draw's notes say so). Each point is moved to the centre of its 2^-52 cell so Phi^-1 never
    sees 0. Rows exactly m, in dimension d. Unbiased (to the 2^-52 grid), coupled.
    """

    name = "qmc"
    independent_rows = False
    description = "scrambled Sobol points through the normal inverse CDF (randomised QMC); unbiased"
    reference = "Yang, Sindhwani, Avron, Mahoney, Quasi-Monte Carlo Feature Maps, ICML 2014"

    def supports(self, m: int, d: int) -> list[str]:
        if d > SOBOL_MAX_DIM:
            return [f"scipy's Sobol sequence has direction numbers for d <= {SOBOL_MAX_DIM}; use 'halton'"]
        return []

    def _sample(self, m: int, d: int, generator: torch.Generator) -> WeightDraw:
        engine = qmc.Sobol(d, scramble=True, bits=SOBOL_BITS, rng=numpy_rng(generator))
        notes = ()
        if m != next_pow2(m):
            notes = (
                f"m={m} is not a power of two: rows are the first {m} Sobol points; the one-point-"
                f"per-stratum balance holds for powers of two (e.g. m={next_pow2(m)})",
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The balance properties of Sobol", category=UserWarning)
            u = engine.random(m)
        # Points are k * 2^-bits with k in [0, 2^bits); the cell centre is never 0 or 1 (finite
        # Phi^-1) and keeps each coordinate's mean exactly 1/2. Exact in float64 for bits <= 52.
        u = u + 2.0 ** -(SOBOL_BITS + 1)
        return WeightDraw(_to_tensor(u), notes=notes)


class HaltonQMC(WeightMatrix):
    """Rows Phi^-1(t_i), t_1..t_m the first m points of a scrambled Halton sequence in [0, 1)^d.

    scipy's Halton with Owen's random digit permutations ("A randomized Halton algorithm in R",
    2017), which make each point uniform; coordinate j uses the j-th prime as its base, so
    coordinate 1 (base 2) has one point per 1/m stratum when m is a power of two. Points are
    clipped to [2^-53, 1 - 2^-53] so Phi^-1 stays finite (|omega| <= 8.2; the clipped mass is
    ~1e-16). Unbiased (to that clip), coupled.
    """

    name = "halton"
    independent_rows = False
    description = "scrambled Halton points through the normal inverse CDF (randomised QMC); unbiased"
    reference = "Yang, Sindhwani, Avron, Mahoney, ICML 2014; Owen, A randomized Halton algorithm in R, 2017"

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor:
        engine = qmc.Halton(d, scramble=True, rng=numpy_rng(generator))
        # Truncated digit expansions can give exactly 0; the clip keeps Phi^-1 finite.
        u = np.clip(engine.random(m), 2.0**-53, 1.0 - 2.0**-53)
        return _to_tensor(u)
