"""Plain-torch reference of the positive-family feature map and its stabilisers (fp32 by default)."""

from __future__ import annotations

import torch

from rfbench.ops.params import PositiveFeatures

STABILISERS = ("row", "shared", "prefix", "none")


def naive_log_features(
    x: torch.Tensor, fp: PositiveFeatures, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """log phi(x) ``[..., L, F]`` for x ``[..., L, d]``, computed in ``dtype`` (float32 unless told)."""
    x = x.to(dtype)
    fp = fp.to(device=x.device, dtype=dtype)
    y = x if fp.P is None else x @ fp.P.transpose(-1, -2)
    return x @ fp.W.transpose(-1, -2) + fp.bias.unsqueeze(-2) + fp.coef * (y * y).sum(-1, keepdim=True)


def stabiliser_constant(log_phi: torch.Tensor, stabiliser: str) -> torch.Tensor:
    """``[..., L, 1]`` constant subtracted from ``log_phi [..., L, F]`` (see rfbench/estimator.py).

    row: per-row max (a query's constant cancels in its own attention row);
    shared: one max over all rows and features (a key constant must be shared by all keys);
    prefix: the max over rows s <= t (causal keys: nothing depends on later tokens);
    none: 0.
    """
    if stabiliser == "row":
        return log_phi.amax(dim=-1, keepdim=True)
    if stabiliser == "shared":
        return log_phi.amax(dim=(-2, -1), keepdim=True).expand(*log_phi.shape[:-1], 1)
    if stabiliser == "prefix":
        return torch.cummax(log_phi.amax(dim=-1), dim=-1).values.unsqueeze(-1)
    if stabiliser == "none":
        return torch.zeros_like(log_phi[..., :1])
    raise ValueError(f"stabiliser must be one of {STABILISERS}, got {stabiliser!r}")


def naive_features(
    x: torch.Tensor, fp: PositiveFeatures, stabiliser: str = "row", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi, c)``: stabilised features ``[..., L, F]`` and constants ``[..., L, 1]``.

    phi * exp(c) are the features on the true scale.
    """
    log_phi = naive_log_features(x, fp, dtype)
    c = stabiliser_constant(log_phi, stabiliser)
    return torch.exp(log_phi - c), c
