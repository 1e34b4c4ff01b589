"""Plain-torch random-feature attention: the linear-time tail and the references (float32).

``linear_attention`` is phi(Q) (phi(K)^T v) / phi(Q) (phi(K)^T 1) from stabilised features, chunked
for causal: the Estimator's torch path and ``torch_rf_attention`` (the fallback where the fused
kernels do not run) both end in it. ``naive_rf_attention`` materialises the ``[..., Lq, Lk]``
matrix of RF scores: the oracle the fused kernels are tested against, and the quadratic baseline
of the CPU speed check.

Stabilisers (``rfbench.ops.features.naive.stabiliser_constant``; each exact): a per-query max
(cancels in its own row), one key constant shared by all keys (non-causal), the prefix max over
keys s <= t (causal: no output depends on a later token, not even through rounding).
"""

from __future__ import annotations

import math

import torch

from rfbench.ops.features.naive import naive_features
from rfbench.ops.form import ExpForm


def linear_attention(
    Q: torch.Tensor, K: torch.Tensor, mk: torch.Tensor, v: torch.Tensor, causal: bool, chunk: int = 128
) -> torch.Tensor:
    """Attention ``[..., Lq, dv]`` from stabilised features.

    Q ``[..., Lq, F]`` (query constants removed: they cancel), K ``[..., Lk, F]`` holding
    exp(lk - mk) (times any factor), ``mk`` ``[..., Lk, 1]`` the keys' constants (shared, or the
    prefix max when causal), v ``[..., Lk, dv]``. Causal (Lq == Lk): chunks of ``chunk`` tokens.
    """
    if causal:
        return _causal_linear_attention(Q, K, mk.squeeze(-1), v, chunk)
    kv = K.transpose(-1, -2) @ v  # [..., F, dv]
    z = K.sum(dim=-2)  # [..., F]
    return (Q @ kv) / (Q @ z.unsqueeze(-1))


def _causal_linear_attention(
    Q: torch.Tensor, K: torch.Tensor, mk: torch.Tensor, v: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Chunked causal linear attention with a running key constant.

    ``mk`` ``[..., L]`` is the prefix max of the keys' log-features. Query t uses the constant
    mk_t for all keys s <= t: the term of key s is rescaled by exp(mk_s - mk_t) <= 1, so nothing
    overflows and nothing depends on tokens after t. The carried state is kept relative to the
    constant at the end of the previous chunk. Every exponent is clamped at 0: it is <= 0 already
    except after a prefix of all-zero keys (constant 0 by the stabiliser's rule), whose terms are
    0, so the clamp only stops 0 * inf = NaN.
    """
    L = Q.shape[-2]
    lead = torch.broadcast_shapes(Q.shape[:-2], K.shape[:-2], v.shape[:-2])
    F, dv = Q.shape[-1], v.shape[-1]
    out = torch.empty(*lead, L, dv, dtype=Q.dtype, device=Q.device)
    S = torch.zeros(*lead, F, dv, dtype=Q.dtype, device=Q.device)
    z = torch.zeros(*lead, F, dtype=Q.dtype, device=Q.device)
    c = torch.full(lead, -math.inf, dtype=Q.dtype, device=Q.device)
    future_full = torch.ones(chunk, chunk, dtype=torch.bool, device=Q.device).triu(1)  # [t, s]: s > t
    for i in range(0, L, chunk):
        sl = slice(i, min(i + chunk, L))
        Qc, Kc, vc, mc = Q[..., sl, :], K[..., sl, :], v[..., sl, :], mk[..., sl]
        n = mc.shape[-1]
        decay = torch.exp((c.unsqueeze(-1) - mc).clamp(max=0))  # [..., n]: state constant -> each query's own
        num = (Qc @ S) * decay.unsqueeze(-1)
        den = (Qc @ z.unsqueeze(-1)).squeeze(-1) * decay
        diff = (mc.unsqueeze(-2) - mc.unsqueeze(-1)).clamp(max=0)  # [..., t, s] = mk_s - mk_t
        future = future_full[:n, :n]
        A = (Qc @ Kc.transpose(-1, -2)) * torch.exp(diff.masked_fill(future, -math.inf))
        num = num + A @ vc
        den = den + A.sum(dim=-1)
        out[..., sl, :] = num / den.unsqueeze(-1)
        c_new = mc[..., -1]
        Kr = Kc * torch.exp((mc - c_new.unsqueeze(-1)).clamp(max=0)).unsqueeze(-1)
        carry = torch.exp((c - c_new).clamp(max=0))
        S = S * carry[..., None, None] + Kr.transpose(-1, -2) @ vc
        z = z * carry.unsqueeze(-1) + Kr.sum(dim=-2)
        c = c_new
    return out


def naive_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    form: ExpForm,
    causal: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s) via the full score matrix.

    q ``[..., Lq, d]``, k ``[..., Lk, d]``, v ``[..., Lk, dv]`` -> ``[..., Lq, dv]`` in ``dtype``.
    Causal needs Lq == Lk; query t sees keys s <= t.
    """
    Q, _ = naive_features(q, form, "row", dtype, is_query=True)
    K, mk = naive_features(k, form, "prefix" if causal else "shared", dtype)
    A = Q @ K.transpose(-1, -2)  # [..., Lq, Lk]
    if causal:
        L = q.shape[-2]
        past = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        # key s carries exp(-mk_s); query t's constant is mk_t: rescale by exp(mk_s - mk_t) <= 1
        diff = (mk.transpose(-1, -2) - mk).clamp(max=0).masked_fill(~past, float("-inf"))
        A = A * torch.exp(diff)
    return (A @ v.to(dtype)) / A.sum(dim=-1, keepdim=True)


def torch_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    form: ExpForm,
    causal: bool = False,
    *,
    chunk: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Linear-time torch path: O(L F (d + dv)) time, ``[..., L, F]`` features in memory."""
    Q, _ = naive_features(q, form, "row", dtype, is_query=True)
    K, mk = naive_features(k, form, "prefix" if causal else "shared", dtype)
    return linear_attention(Q, K, mk, v.to(dtype), causal, chunk)
