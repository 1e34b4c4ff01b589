"""Plain-torch references of random-feature attention with positive features (float32).

``naive_rf_attention`` materialises phi(Q), phi(K) and the ``[..., Lq, Lk]`` matrix of RF scores:
the oracle the fused kernels are tested against, and the quadratic baseline of the CPU speed
check. ``torch_rf_attention`` is the linear-time torch path (materialised features, K^T V and
key sums; chunked for causal): the fallback where the fused kernels do not run.

Stabilisers as in rfbench/estimator.py: a per-query max (cancels in its own row), one key
constant shared by all keys (non-causal), the prefix max over keys s <= t (causal).
"""

from __future__ import annotations

import torch

from rfbench.ops.features.naive import naive_features
from rfbench.ops.params import PositiveFeatures


def naive_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fp: PositiveFeatures,
    causal: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s) via the full score matrix.

    q ``[..., Lq, d]``, k ``[..., Lk, d]``, v ``[..., Lk, dv]`` -> ``[..., Lq, dv]`` in ``dtype``.
    Causal needs Lq == Lk; query t sees keys s <= t.
    """
    Q, _ = naive_features(q, fp, "row", dtype)
    K, mk = naive_features(k, fp, "prefix" if causal else "shared", dtype)
    A = Q @ K.transpose(-1, -2)  # [..., Lq, Lk]
    if causal:
        L = q.shape[-2]
        past = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        # key s carries exp(-mk_s); query t's constant is mk_t: rescale by exp(mk_s - mk_t) <= 1
        diff = (mk.transpose(-1, -2) - mk).masked_fill(~past, float("-inf"))
        A = A * torch.exp(diff)
    return (A @ v.to(dtype)) / A.sum(dim=-1, keepdim=True)


def torch_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fp: PositiveFeatures,
    causal: bool = False,
    *,
    chunk: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Linear-time torch path: O(L F (d + dv)) time, ``[..., L, F]`` features in memory."""
    from rfbench.estimator import _linear_attention

    Q, _ = naive_features(q, fp, "row", dtype)
    K, mk = naive_features(k, fp, "prefix" if causal else "shared", dtype)
    return _linear_attention(Q, K, mk, v.to(dtype), causal, chunk)
