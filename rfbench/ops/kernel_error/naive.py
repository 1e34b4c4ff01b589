"""Plain-torch kernel error: the target exp(tq . tk) against phi(q) . phi(k) over all query-key pairs.

``naive_kernel_error`` builds the whole ``[..., Lq, Lk]`` matrices (the oracle, and the dense
baseline of the CPU speed check); with ``tile`` it streams over key tiles, holding one
``[..., Lq, tile]`` block at a time: the torch path where the fused kernel does not run.

Both sides are stabilised per row (each row's constant is multiplied back, so the estimate is
on the true scale): est = exp(c_q + c_k) phi~(q) . phi~(k) with every phi~ <= 1, computed as
exp(log(phi~ . phi~) + c_q + c_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rfbench.ops.features.naive import naive_features
from rfbench.ops.form import ExpForm


@dataclass(frozen=True)
class KernelErrorSums:
    """Sums over all ``count`` query-key pairs, one per leading index (float64 ``[...]``).

    sse: sum (exp(q.k) - est)^2; sum_exact2: sum exp(q.k)^2; sum_rel2: sum ((exp(q.k) - est) / exp(q.k))^2.
    """

    sse: torch.Tensor
    sum_exact2: torch.Tensor
    sum_rel2: torch.Tensor
    count: int

    @property
    def mse(self) -> torch.Tensor:
        """Mean squared error of the kernel estimate over all pairs."""
        return self.sse / self.count

    @property
    def nmse(self) -> torch.Tensor:
        """Normalised MSE: sum of squared errors over the sum of squared exact values."""
        return self.sse / self.sum_exact2

    @property
    def mean_rel2(self) -> torch.Tensor:
        """Mean over pairs of the squared relative error."""
        return self.sum_rel2 / self.count


def _pair_sums(log_est, logit, sgn=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log_est`` is log |est|; ``sgn`` its sign (None: all positive)."""
    exact = torch.exp(logit)
    if sgn is None:
        err = exact - torch.exp(log_est)
        rel = -torch.expm1(log_est - logit)  # (exact - est) / exact without dividing two huge numbers
    else:  # signed forms (negative quadrature weights): an estimate may be <= 0
        err = exact - sgn * torch.exp(log_est)
        rel = 1 - sgn * torch.exp(log_est - logit)
    sums = [(t * t).sum(dim=(-2, -1), dtype=torch.float64) for t in (err, exact, rel)]
    return sums[0], sums[1], sums[2]


def naive_kernel_error(
    q: torch.Tensor,
    k: torch.Tensor,
    form: ExpForm,
    tq: torch.Tensor | None = None,
    tk: torch.Tensor | None = None,
    *,
    tile: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> KernelErrorSums:
    """Kernel error of the features of ``form`` against exp(tq . tk) (tq, tk default to q, k).

    q ``[..., Lq, d]``, k ``[..., Lk, d]``; ``tq``/``tk`` are the inputs of the target kernel
    where it is not exp(q . k) (DARK's exp((Mq) . (Mk))). ``tile``: key-tile size, None for dense.
    """
    tq = q if tq is None else tq
    tk = k if tk is None else tk
    Q, cq = naive_features(q, form, "row", dtype, is_query=True)
    K, ck = naive_features(k, form, "row", dtype)
    tq, tk = tq.to(dtype), tk.to(dtype)
    Lk = k.shape[-2]
    step = Lk if tile is None else tile
    total = None
    for j in range(0, Lk, step):
        cols = slice(j, min(j + step, Lk))
        P = Q @ K[..., cols, :].transpose(-1, -2)
        sgn = torch.sign(P) if form.signed else None
        log_est = torch.log(P if sgn is None else P.abs()) + cq + ck[..., cols, :].transpose(-1, -2)
        logit = tq @ tk[..., cols, :].transpose(-1, -2)
        part = _pair_sums(log_est, logit, sgn)
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    return KernelErrorSums(*total, count=q.shape[-2] * Lk)
