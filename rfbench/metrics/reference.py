"""Exact references of the streamed metrics: row log-sum-exp of the softmax kernel, relative
error, and the fixed row sample every estimator of a data source is scored on."""

from __future__ import annotations

import math

import torch

from rfbench._checks import check_qkv
from rfbench.errors import DataError
from rfbench.metrics.tiles import flatten_lead, lead_groups, row_index

_NEG_INF = -math.inf
#: Default working-memory budget of the streamed metrics (bytes); see ``kernel_errors``.
MEMORY_BUDGET = 256 * 2**20


def sample_rows(length: int, max_tokens: int | None, *, seed: int = 0) -> torch.Tensor | None:
    """Sorted indices of a fixed subset of ``max_tokens`` of ``length`` rows (None: use all).

    The subset depends on ``seed`` only (pass a seed derived from the data, not the estimator),
    so every estimator and seed of a data source is scored on the same pairs.
    """
    if max_tokens is None or max_tokens >= length:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(length, generator=g)[:max_tokens].sort().values


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F, computed in float64."""
    ref = ref.double()
    diff = out.to(device=ref.device, dtype=torch.float64) - ref
    return float(diff.norm() / ref.norm())


def exact_row_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float = 1.0,
    rows: torch.Tensor | None = None,
    causal: bool = False,
    tile: int = 256,
    chunk: int = 1024,
    dtype: torch.dtype = torch.float64,
    memory_budget: int = MEMORY_BUDGET,
) -> torch.Tensor:
    """log sum_j exp(q'_i . k'_j) over every visible key, for the query rows ``rows``.

    q ``[..., L, d]``, k ``[..., L, d]``; returns ``[n_lead, n_rows]`` (leading dims flattened).
    Online log-sum-exp over key chunks (running max, rescaled sums: exact), tile by tile.
    """
    check_qkv(q, k)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    s = math.sqrt(scale)
    qf, kf = flatten_lead(q, lead), flatten_lead(k, lead)
    L, d = kf.shape[-2], kf.shape[-1]
    if causal and qf.shape[-2] != L:
        raise DataError(f"causal metrics need as many queries as keys, got {qf.shape[-2]} and {L}")
    ri = row_index(rows, qf.shape[-2], qf.device)
    out = torch.empty(qf.shape[0], ri.numel(), dtype=dtype, device=qf.device)
    itemsize = torch.finfo(dtype).bits // 8
    for g in lead_groups(qf.shape[0], itemsize * (L * d + 3 * tile * chunk), memory_budget):
        kb = kf[g].to(dtype) * s  # [G, L, d]
        for i0 in range(0, ri.numel(), tile):
            r = ri[i0 : i0 + tile]
            qi = qf[g][:, r].to(dtype) * s  # [G, t, d]
            m = torch.full((qi.shape[0], r.numel()), _NEG_INF, dtype=dtype, device=qf.device)
            acc = torch.zeros_like(m)
            last = L if not causal else int(r.max()) + 1
            for j0 in range(0, last, chunk):
                j1 = min(j0 + chunk, last)
                logits = qi @ kb[:, j0:j1].transpose(-1, -2)  # [G, t, c]
                if causal:
                    cols = torch.arange(j0, j1, device=qf.device)
                    logits = logits.masked_fill(cols[None, :] > r[:, None], _NEG_INF)
                m_new = torch.maximum(m, logits.amax(dim=-1))
                acc = acc * torch.exp(m - m_new) + torch.exp(logits - m_new.unsqueeze(-1)).sum(dim=-1)
                m = m_new
            out[g, i0 : i0 + r.numel()] = m + torch.log(acc)
    return out
