"""FastFood-L: FastFood with learnable S, G, B scalings (a kernel learner, not an SM estimator).

Chowdhury et al., "Learning the Transformer Kernel", TMLR 2022 (FastFood-L): the FastFood
factorisation V = S H G Pi H B (Le, Sarlos, Smola, ICML 2013, Sec. 3) with the diagonals S, G
and B made trainable; Pi (a permutation) and H (normalised Walsh-Hadamard) stay fixed.
Spectraformer's best variant is OPRF-FastFoodL. Implemented from the formula, not ported.

``FastFoodL`` is the sampler: its draw is exactly the fixed ``fastfood`` draw of the same
generator (same factors, same W). ``FastFoodL.module(...)`` returns a ``FastFoodLModule`` holding
that draw's factors as ``torch.nn.Parameter``s, whose ``forward()`` builds ``W [m, d]``
differentiably; ``rfbench.learning.fit_estimator`` trains it and puts the learned W in the
estimator's ``draw_``.
"""

from __future__ import annotations

import math

import torch

from rfbench.errors import EstimatorError
from rfbench.weights.base import WeightDraw, next_pow2
from rfbench.weights.hadamard import FastFood, fwht

LEARNED_TARGET = "learned spectral kernel (FastFood-L), not exp(q.k)"


class FastFoodLModule(torch.nn.Module):
    """W = [S_b sqrt(n) H diag(G_b) Pi_b H diag(B_b)]_b, first m rows and d columns: ``[m, d]``.

    Parameters (one row per n x n block b, n = next_pow2(d)): ``S [nb, n]`` (row scalings,
    initially chi_n / |g|), ``G [nb, n]`` (initially N(0, 1)), ``B [nb, n]`` (initially +-1,
    trained as real numbers). ``perm [nb, n]`` is a fixed buffer. Factors named in ``learn``
    are trainable; the others are frozen buffers-in-effect (requires_grad False).
    """

    def __init__(self, S, G, B, perm, m: int, d: int, learn: str = "SGB"):
        super().__init__()
        self.m, self.d = m, d
        self.S = torch.nn.Parameter(S, requires_grad="S" in learn)
        self.G = torch.nn.Parameter(G, requires_grad="G" in learn)
        self.B = torch.nn.Parameter(B, requires_grad="B" in learn)
        self.register_buffer("perm", perm)

    def forward(self) -> torch.Tensor:
        n = self.G.shape[-1]
        # Rows of M^T = (H G Pi H B)^T, rightmost factor first, for all blocks at once: [nb, n, n].
        Mt = fwht(torch.diag_embed(self.B))
        Mt = torch.gather(Mt, -1, self.perm.unsqueeze(-2).expand_as(Mt)) * self.G.unsqueeze(-2)
        M = math.sqrt(n) * fwht(Mt).transpose(-1, -2)
        W = self.S.unsqueeze(-1) * M  # [nb, n, n]
        return W.reshape(-1, n)[: self.m, : self.d]


class FastFoodL(FastFood):
    """FastFood whose S, G, B are learned by ``rfbench.learning.fit_estimator``; its draw is ``fastfood``'s.

    A subclass of ``FastFood``: the same pad check, refusals, notes and block factors (drawn by
    ``FastFood.block_factors``, so the untrained draw equals ``fastfood``'s for the same generator).
    Flags. ``gaussian_marginal = True``: the untrained draw is exactly FastFood's, whose rows are
    N(0, I) (see ``fastfood``), so Gaussian-based maps (posrf, oprf) may pair with it.
    ``unbiased = False``, set on the class: the point of this class is to be trained, and a
    trained W is one deterministic matrix whose rows no longer follow N(0, I), so phi(q) . phi(k)
    estimates a learned spectral kernel, not exp(q . k). The flag describes the pair whatever its
    training state (an untrained FastFoodL is the unbiased ``fastfood``; use that name for it).
    ``learnable = True``: the trainer builds ``module(...)`` and trains it; the trained state
    lives on the Estimator, never on this instance.

    Parameters: pad (True: zero-pad d to the next power of two, as ``fastfood``); learn: which
    diagonals train, a string of the letters S, G, B (default "SGB").
    """

    name = "fastfoodl"
    gaussian_marginal = True
    unbiased = False
    learnable = True
    defaults = {"pad": True, "learn": "SGB"}
    description = "FastFood with learned S, G, B (FastFood-L kernel learner); biased for SM once trained"
    reference = "Chowdhury et al., Learning the Transformer Kernel, TMLR 2022; Le, Sarlos, Smola, ICML 2013"

    def _validate(self) -> None:
        super()._validate()  # FastFood's pad check and message
        learn = self.params["learn"]
        letters = set(learn) if isinstance(learn, str) else None
        if not learn or letters is None or letters - set("SGB") or len(letters) != len(learn):
            raise EstimatorError(
                f"fastfoodl: learn must name the trainable diagonals with the letters S, G, B "
                f"(e.g. 'SGB' or 'SG'), each at most once; got {learn!r}"
            )

    def factors(self, m: int, d: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The float64 factors ``S, G, B, perm`` (each ``[nb, n]``) of FastFood's draw from ``generator``.

        One ``block_factors`` call per block, as ``FastFood._block`` makes them, so the resulting W
        equals ``fastfood``'s draw (checked by the tests).
        """
        n = next_pow2(d)
        S, G, B, P = [], [], [], []
        for _ in range(-(-m // n)):
            b, perm, g, s = self.block_factors(n, generator)
            S.append(s / g.norm())
            G.append(g)
            B.append(b)
            P.append(perm)
        return {"S": torch.stack(S), "G": torch.stack(G), "B": torch.stack(B), "perm": torch.stack(P)}

    def module(
        self, m: int, d: int, *, generator: torch.Generator, device=None, dtype=torch.float32
    ) -> FastFoodLModule:
        """A trainable ``FastFoodLModule`` starting from the draw ``sample(m, d, generator=...)`` gives."""
        f = self.factors(m, d, generator)
        cast = {"device": device, "dtype": dtype}
        return FastFoodLModule(
            f["S"].to(**cast), f["G"].to(**cast), f["B"].to(**cast), f["perm"].to(device=device),
            m, d, learn=self.params["learn"],
        )

    # The learnable protocol of rfbench.learning (the instance itself never changes).
    def learnable_draw(self, m: int, d: int, *, generator: torch.Generator, device=None, dtype=torch.float32):
        """``(tensors, build)``: the factors named in ``learn`` of the draw ``sample(m, d,
        generator=...)`` gives, and ``build(tensors) -> W [m, d]`` (differentiable in them)."""
        module = self.module(m, d, generator=generator, device=device, dtype=dtype)
        start = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
        return start, lambda tensors: torch.func.functional_call(module, tensors, ())

    def trained_target(self, params=None):
        """A trained W estimates a learned spectral kernel: no closed form (a TargetKernel without
        log_kernel)."""
        from rfbench.features.target import TargetKernel

        return TargetKernel(LEARNED_TARGET, None)

    def _sample(self, m: int, d: int, generator: torch.Generator) -> WeightDraw:
        with torch.no_grad():
            W = self.module(m, d, generator=generator, dtype=torch.float64)()
        n = next_pow2(d)
        notes = () if n == d else (self._pad_note(d, n, n),)
        return WeightDraw(W.contiguous(), notes=notes)
