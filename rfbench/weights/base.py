"""The weight-matrix interface: how the m random vectors omega_1..omega_m are produced.

A weight matrix is a *sampler*: ``sample(m, d, generator=...)`` returns a ``WeightDraw`` whose
``W`` is exactly ``[m, d]``. Rows are drawn on the CPU in float64 from the ``torch.Generator``
given, then cast, so the same seed gives the same numbers on every device (up to the cast).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rfbench.errors import EstimatorError, UnsupportedError


@dataclass(frozen=True)
class WeightDraw:
    """One draw of m random vectors.

    W: ``[m, d]``, row i is omega_i.
    row_weights: ``[m]`` or None. None means the plain Monte Carlo average 1/m. Otherwise
        the estimate is sum_i row_weights[i] * f1(omega_i, x) f2(omega_i, y) (quadrature
        weights, which may be negative for sparse grids; they sum to 1 in expectation).
    notes: human-readable facts about this draw (e.g. "d padded from 48 to 64").
    """

    W: torch.Tensor
    row_weights: torch.Tensor | None = None
    notes: tuple[str, ...] = field(default=())

    def to(self, device=None, dtype=None) -> WeightDraw:
        rw = None if self.row_weights is None else self.row_weights.to(device=device, dtype=dtype)
        return WeightDraw(self.W.to(device=device, dtype=dtype), rw, self.notes)

    @functools.cached_property
    def signed(self) -> bool:
        """Whether some row weight is negative (signed features). Read once per draw: on a GPU
        the check waits for the device, so the attention path must not repeat it per call."""
        return self.row_weights is not None and bool((self.row_weights < 0).any())


class WeightMatrix:
    """Base class of weight-matrix samplers.

    Subclasses set the class attributes and implement ``_sample``. Constructors only store
    their (keyword) parameters, validated in ``_validate``; an instance never changes after
    construction (trained or fitted state lives on the Estimator).
    """

    name: ClassVar[str] = ""
    #: True when the rows stand in for N(0, I) draws, so Gaussian-based feature maps may use
    #: them (possibly biased, e.g. fixed-norm rows); False for samplers of other distributions.
    gaussian_marginal: ClassVar[bool] = True
    #: True when each row's marginal is exactly N(0, I_d), so the estimate of E_omega[f1 f2] stays
    #: unbiased. Couplings between rows (orthogonality, simplex) keep this True.
    unbiased: ClassVar[bool] = True
    #: True when the rows are drawn independently of each other, so the MSE of the average is
    #: Var1 / m (theory.mse). Couplings (orthogonal blocks, shared circulant or Hadamard factors,
    #: low-discrepancy points, antithetic pairs) set it False.
    independent_rows: ClassVar[bool] = True
    #: True when the draw has trainable parts (``rfbench.learning`` trains them); see FastFoodL.
    learnable: ClassVar[bool] = False
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    #: Names of the constructor parameters and their defaults.
    defaults: ClassVar[dict] = {}

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise EstimatorError(
                f"weight matrix {self.name!r} got unknown parameter(s) {unknown}; allowed: {allowed}"
            )
        self.params = {**self.defaults, **params}
        self._validate()

    def _validate(self) -> None:
        """Check ``self.params``; raise EstimatorError naming the parameter and the fix."""

    def supports(self, m: int, d: int) -> list[str]:
        """Reasons this sampler cannot serve (m, d); empty when it can."""
        return []

    def sample(
        self,
        m: int,
        d: int,
        *,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WeightDraw:
        """Draw m random vectors in R^d. Returns a WeightDraw with ``W`` of shape ``[m, d]``."""
        for value, what in ((m, "num_features m"), (d, "dim d")):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EstimatorError(f"{what} must be a positive integer, got {value!r}")
        reasons = self.supports(m, d)
        if reasons:
            raise UnsupportedError([f"weight matrix {self.name!r} with m={m}, d={d}: {r}" for r in reasons])
        out = self._sample(m, d, generator)
        draw = out if isinstance(out, WeightDraw) else WeightDraw(out)
        if tuple(draw.W.shape) != (m, d):  # a bug in the sampler, not the user's fault
            raise AssertionError(f"{self.name} returned shape {tuple(draw.W.shape)}, expected {(m, d)}")
        return draw.to(device=device, dtype=dtype)

    def _sample(self, m: int, d: int, generator: torch.Generator) -> torch.Tensor | WeightDraw:
        """Return float64 CPU ``[m, d]`` drawn from ``generator``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard normal float64 CPU tensor drawn from ``generator``."""
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def chi_norms(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` independent chi_d variables: the norms of n standard normal vectors in R^d."""
    return normal((n, d), generator).norm(dim=1)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
