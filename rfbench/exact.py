"""Exact softmax kernel and exact attention, the references every estimate is measured against.

Attention is computed tile by tile with an online softmax (running max and running sum over key
tiles), so no ``L x L`` matrix is held beyond one ``tile x tile`` block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from rfbench._checks import check_qkv
from rfbench.errors import DataError


def kernel(q: torch.Tensor, k: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """SM(q, k) = exp(q . k) for all pairs: ``[..., Lq, d] x [..., Lk, d] -> [..., Lq, Lk]``.

    This returns the whole matrix (that is what was asked for); use ``kernel_tiles`` to stream.
    """
    check_qkv(q, k)
    dt = dtype or torch.promote_types(q.dtype, torch.float32)
    return torch.exp(q.to(dt) @ k.to(dt).transpose(-1, -2))


def kernel_tiles(
    q: torch.Tensor, k: torch.Tensor, *, tile: int = 1024, dtype: torch.dtype | None = None
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(rows, cols, exp(q[rows] . k[cols]))`` blocks covering all pairs, one at a time."""
    check_qkv(q, k)
    dt = dtype or torch.promote_types(q.dtype, torch.float32)
    qd, kd = q.to(dt), k.to(dt)
    for i in range(0, q.shape[-2], tile):
        rows = slice(i, min(i + tile, q.shape[-2]))
        for j in range(0, k.shape[-2], tile):
            cols = slice(j, min(j + tile, k.shape[-2]))
            yield rows, cols, torch.exp(qd[..., rows, :] @ kd[..., cols, :].transpose(-1, -2))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    *,
    scale: float | None = None,
    dtype: torch.dtype | None = None,
    tile: int = 1024,
    log_kernel=None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v, ``scale`` defaulting to 1/sqrt(d). Returns ``[..., Lq, dv]``.

    ``dtype`` is the compute dtype (default: at least float32; pass torch.float64 for a
    reference); the result is returned in that dtype. With ``causal``, query i sees keys
    j <= i + (Lk - Lq), i.e. queries are aligned to the end of the keys.

    ``log_kernel(q_tile, k_tile) -> [..., tq, tk]`` replaces the logits q . k * scale (then
    ``scale`` must be left out): exact attention under another kernel, sum_j k(q_i, k_j) v_j /
    sum_j k(q_i, k_j), e.g. an estimator's declared target (``TargetKernel.log_kernel``).
    """
    check_qkv(q, k, v)
    d = q.shape[-1]
    if log_kernel is not None and scale is not None:
        raise DataError("exact.attention: pass either scale (softmax logits) or log_kernel, not both")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = dtype or torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if log_kernel is None:
        q = q * scale
    Lq, Lk = q.shape[-2], k.shape[-2]
    if causal and Lq > Lk:
        raise DataError(
            f"causal attention aligns queries to the end of the keys; Lq={Lq} > Lk={Lk} would leave the "
            f"first {Lq - Lk} queries with no key to attend to"
        )
    offset = Lk - Lq
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = torch.empty(*lead, Lq, v.shape[-1], dtype=dt, device=q.device)
    for i in range(0, Lq, tile):
        rows = slice(i, min(i + tile, Lq))
        qi = q[..., rows, :]
        # Online softmax: m is the running max, s the running sum, acc the running numerator;
        # rescaling by exp(m_old - m_new) keeps every exp() <= 1 and is exact.
        m = torch.full((*lead, qi.shape[-2], 1), -math.inf, dtype=dt, device=q.device)
        s = torch.zeros_like(m)
        acc = torch.zeros(*lead, qi.shape[-2], v.shape[-1], dtype=dt, device=q.device)
        last = Lk if not causal else min(Lk, rows.stop + offset)
        for j in range(0, last, tile):
            cols = slice(j, min(j + tile, last))
            if log_kernel is None:
                logits = qi @ k[..., cols, :].transpose(-1, -2)
            else:
                logits = log_kernel(qi, k[..., cols, :]).to(dt)
            if causal:
                qpos = torch.arange(rows.start, rows.stop, device=q.device)[:, None] + offset
                kpos = torch.arange(cols.start, cols.stop, device=q.device)[None, :]
                logits = logits.masked_fill(kpos > qpos, -math.inf)
            m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
            # Rows with every key masked so far keep m = -inf; guard exp(-inf - -inf).
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(logits - safe)
            alpha = torch.exp(m - safe)
            s = s * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + p @ v[..., cols, :]
            m = m_new
        out[..., rows, :] = acc / s
    return out
