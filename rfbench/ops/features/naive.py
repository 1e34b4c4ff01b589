"""Plain-torch reference of exponential random features (``ExpForm``) and THE stabiliser.

``stabiliser_constant`` is the one definition of the constants subtracted from log-features
before exp(): the Estimator, the ops' references and the metrics all call it.
"""

from __future__ import annotations

import math

import torch

from rfbench.ops.form import ExpForm

STABILISERS = ("row", "shared", "prefix", "none")


def log_features(x: torch.Tensor, form: ExpForm, dtype: torch.dtype | None = None) -> torch.Tensor:
    """log |phi(x)| ``[..., L, F]`` for x ``[..., L, d]``, computed in ``dtype`` (x's when None).

    Differentiable in x and in the form's tensors (the trainer learns through it).
    """
    if dtype is not None:
        x = x.to(dtype)
    form = form.to(device=x.device, dtype=x.dtype)
    y = x if form.P is None else x @ form.P.transpose(-1, -2)
    return x @ form.W.transpose(-1, -2) + form.bias.unsqueeze(-2) + form.coef * (y * y).sum(-1, keepdim=True)


def stabiliser_constant(log_phi: torch.Tensor, kind: str) -> torch.Tensor:
    """``[..., L, 1]`` constant c subtracted from ``log_phi [..., L, F]`` before exp().

    row: per-row max (a query's constant cancels in its own attention row);
    shared: one max over all rows and features (a key constant must be shared by all keys);
    prefix: the max over rows s <= t (causal keys: nothing depends on later tokens);
    none: 0.
    Where that max is -inf (a row, or for shared/prefix everything so far, of all-zero
    features) c = 0: exp(-inf - 0) = 0 gives zero features instead of exp(-inf + inf) = NaN.
    """
    if kind == "row":
        c = log_phi.amax(dim=-1, keepdim=True)
    elif kind == "shared":
        c = log_phi.amax(dim=(-2, -1), keepdim=True).expand(*log_phi.shape[:-1], 1)
    elif kind == "prefix":
        c = torch.cummax(log_phi.amax(dim=-1), dim=-1).values.unsqueeze(-1)
    elif kind == "none":
        return torch.zeros_like(log_phi[..., :1])
    else:
        raise ValueError(f"stabiliser must be one of {STABILISERS}, got {kind!r}")
    return c.masked_fill(c == -math.inf, 0.0)


def naive_features(
    x: torch.Tensor,
    form: ExpForm,
    stabiliser: str = "row",
    dtype: torch.dtype = torch.float32,
    *,
    is_query: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi, c)``: stabilised features ``[..., L, F]`` and constants ``[..., L, 1]``.

    phi * exp(c) are the features on the true scale; ``is_query`` applies the form's sign.
    """
    log_phi = log_features(x, form, dtype)
    c = stabiliser_constant(log_phi, stabiliser)
    phi = torch.exp(log_phi - c)
    if is_query and form.sign is not None:
        phi = phi * form.sign.to(device=phi.device, dtype=phi.dtype)
    return phi, c
