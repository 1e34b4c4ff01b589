"""Pair-tile iteration for the streamed metrics: leading-index groups, row tiles, parameter slices.

The metrics visit the scored pairs (i, j) in ``tile x tile`` blocks, for a group of leading
(batch/head) indices at a time (as many as fit a memory budget), so no ``L x L`` matrix is held.
Tensors are flattened to ``[n_lead, L, d]`` first; a group is a slice of the flattened leading
indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from rfbench.errors import DataError


def flatten_lead(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """``[..., L, d]`` broadcast to ``lead`` and flattened to ``[n_lead, L, d]``."""
    return x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])


def row_index(rows: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """The scored rows as a sorted index tensor (all ``length`` rows when ``rows`` is None)."""
    if rows is None:
        return torch.arange(length, device=device)
    rows = torch.as_tensor(rows, device=device).long()
    if rows.ndim != 1 or rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= length:
        raise DataError(f"rows must be a non-empty 1-d index into 0..{length - 1}, got {tuple(rows.shape)}")
    if rows.numel() > 1 and bool((rows[1:] <= rows[:-1]).any()):
        raise DataError("rows must be sorted and without repeats")
    return rows


def lead_groups(n_lead: int, per_index_bytes: float, budget: int) -> list[slice]:
    """Consecutive ranges of leading indices processed together, each within ``budget`` bytes."""
    size = max(1, min(n_lead, int(budget // max(per_index_bytes, 1.0))))
    return [slice(b, min(b + size, n_lead)) for b in range(0, n_lead, size)]


def row_tiles(index: torch.Tensor, tile: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, rows)``: consecutive tiles of at most ``tile`` entries of ``index``."""
    for i0 in range(0, index.numel(), tile):
        yield i0, index[i0 : i0 + tile]


def slice_params(params: dict, lead: torch.Size, g: slice) -> dict:
    """Parameters of the leading indices ``g`` (of the flattened ``lead``); shared ones pass unchanged.

    Fitted parameters carry the data's leading dims first (``[..., d, d]``, ``[...]``); a
    tensor whose first ``len(lead)`` dims broadcast to ``lead`` is sliced, anything else is
    taken to be shared by every leading index.
    """
    n_lead = math.prod(lead)
    if n_lead == 1 or not params:
        return params
    out = {}
    for key, p in params.items():
        if (
            torch.is_tensor(p)
            and p.ndim >= len(lead)
            and all(h in (1, n) for h, n in zip(p.shape[: len(lead)], lead))
        ):
            rest = p.shape[len(lead) :]
            out[key] = p.expand(*lead, *rest).reshape(n_lead, *rest)[g]
        else:
            out[key] = p
    return out
