"""Plain-torch kernel error: the target exp(tq . tk) against phi(q) . phi(k) over all query-key pairs.

``naive_kernel_error`` builds the whole ``[..., Lq, Lk]`` matrices (the oracle, and the dense
baseline of the CPU speed check); with ``tile`` it streams over key tiles, holding one
``[..., Lq, tile]`` block at a time: the torch path where the fused kernel does not run.

Both sides are stabilised per row (each row's constant is multiplied back, so the estimate is
on the true scale): est = exp(c_q + c_k) phi~(q) . phi~(k) with every phi~ <= 1, computed as
exp(log(phi~ . phi~) + c_q + c_k).

Given each query row's log-normalisers ``row_norms = (lse, lse^)`` (of the exact kernel and of the
estimate, over every visible key), the attention-matrix error is summed too: A_ij = exp(tq_i . tk_j
- lse_i) against A^_ij = exp(log est_ij - lse^_i) over the visible pairs (all, or j <= i when
causal, in the order given: a sorted subset of rows keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rfbench.errors import DataError
from rfbench.ops.features.naive import naive_features
from rfbench.ops.form import ExpForm


@dataclass(frozen=True)
class KernelErrorSums:
    """Sums over all ``count`` query-key pairs, one per leading index (float64 ``[...]``).

    sse: sum (exp(q.k) - est)^2; sum_exact2: sum exp(q.k)^2; sum_rel2: sum ((exp(q.k) - est) / exp(q.k))^2.
    attn_sse: sum (A^ - A)^2 over the ``attn_count`` visible pairs (None without ``row_norms``).
    """

    sse: torch.Tensor
    sum_exact2: torch.Tensor
    sum_rel2: torch.Tensor
    count: int
    attn_sse: torch.Tensor | None = None
    attn_count: int = 0

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


def check_causal(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if causal and q.shape[-2] != k.shape[-2]:
        raise DataError(f"causal needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")


def visible_pairs(Lq: int, Lk: int, causal: bool) -> int:
    """Pairs scored by the attention-matrix error per leading index (j <= i when causal)."""
    return Lq * (Lq + 1) // 2 if causal else Lq * Lk


def _attn_sse(log_est, logit, row_norms, rows, cols, sgn=None) -> torch.Tensor:
    """sum (A^ - A)^2 of one key tile; ``cols`` its key indices, ``rows`` None or the query indices
    (causal: pairs with j > i are not visible)."""
    le, lh = (x.to(logit.dtype).unsqueeze(-1) for x in row_norms)
    est = torch.exp(log_est - lh)
    da = (est if sgn is None else sgn * est) - torch.exp(logit - le)
    if rows is not None:
        da = da.masked_fill(cols[None, :] > rows[:, None], 0.0)
    return (da * da).sum(dim=(-2, -1), dtype=torch.float64)


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
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool = False,
) -> KernelErrorSums:
    """Kernel error of the features of ``form`` against exp(tq . tk) (tq, tk default to q, k).

    q ``[..., Lq, d]``, k ``[..., Lk, d]``; ``tq``/``tk`` are the inputs of the target kernel
    where it is not exp(q . k) (DARK's exp((Mq) . (Mk))). ``tile``: key-tile size, None for dense.
    ``row_norms``: ``(lse, lse^)``, each ``[..., Lq]``, to sum the attention-matrix error too
    (``causal``: over j <= i only; needs Lq == Lk).
    """
    check_causal(q, k, causal)
    tq = q if tq is None else tq
    tk = k if tk is None else tk
    Q, cq = naive_features(q, form, "row", dtype, is_query=True)
    K, ck = naive_features(k, form, "row", dtype)
    tq, tk = tq.to(dtype), tk.to(dtype)
    Lk = k.shape[-2]
    step = Lk if tile is None else tile
    total = None
    attn = None
    rows = torch.arange(q.shape[-2], device=q.device) if causal else None
    for j in range(0, Lk, step):
        cols = slice(j, min(j + step, Lk))
        P = Q @ K[..., cols, :].transpose(-1, -2)
        sgn = torch.sign(P) if form.signed else None
        log_est = torch.log(P if sgn is None else P.abs()) + cq + ck[..., cols, :].transpose(-1, -2)
        logit = tq @ tk[..., cols, :].transpose(-1, -2)
        part = _pair_sums(log_est, logit, sgn)
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
        if row_norms is not None:
            cidx = torch.arange(cols.start, cols.stop, device=q.device)
            a = _attn_sse(log_est, logit, row_norms, rows, cidx, sgn)
            attn = a if attn is None else attn + a
    count = visible_pairs(q.shape[-2], Lk, causal) if row_norms is not None else 0
    return KernelErrorSums(*total, count=q.shape[-2] * Lk, attn_sse=attn, attn_count=count)
