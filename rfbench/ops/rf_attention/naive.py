"""Plain-torch random-feature attention: the linear-time tail and the references (float32).

``linear_attention`` is phi(Q) (phi(K)^T v) / phi(Q) (phi(K)^T 1) from stabilised features, chunked
for causal: the Estimator's torch path and ``torch_rf_attention`` (the fallback where the fused
kernels do not run) both end in it. ``naive_rf_attention`` materialises the ``[..., Lq, Lk]``
matrix of RF scores: the oracle the fused kernels are tested against, and the quadratic baseline
of the CPU speed check.

Stabilisers (``rfbench.ops.features.naive.stabiliser_constant``; each exact): a per-query max
(cancels in its own row), one key constant shared by all keys (non-causal), the prefix max over
keys s <= t (causal: no output depends on a later token, not even through rounding).

The shared key constant makes the largest key term 1 and the per-query max the largest query
term 1, but not the largest term of a denominator sum_f phi_f(q) sum_s phi_f(k_s): at large
logits (q, k norms 64, d = 64) the feature where the query peaks is one where every key is far
below the keys' overall max, so the whole sum underflows to 0 and the output is 0/0. Where a
non-causal denominator underflows (small enough that terms flushed to zero may matter, or not
finite; ``_underflowed``), those rows are recomputed with one key constant per feature,
c_f = max_s l_f(k_s), moved onto the query side: phi_f(q) phi_f(k) = e^(l_f(q) + c_f)
e^(l_f(k) - c_f), exact. The query's largest term is then 1 at some f*, and the keys' sum at f*
is >= 1 (the key attaining c_f* gives 1), so the denominator is >= 1 (``per_feature_attention``).
Every other row is left as it was, to the bit. Causal attention keeps its prefix constants (a per-feature
prefix max would need a per-feature decay inside each chunk).
"""

from __future__ import annotations

import math

import torch

from rfbench.ops.features.naive import log_features, naive_features
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
    """Linear-time torch path: O(L F (d + dv)) time, ``[..., L, F]`` features in memory.

    Non-causal rows whose denominator underflowed (a 0/0, or terms flushed to zero) are
    recomputed with per-feature key constants (``per_feature_attention``; module docstring)."""
    Q, _ = naive_features(q, form, "row", dtype, is_query=True)
    K, mk = naive_features(k, form, "prefix" if causal else "shared", dtype)
    out = linear_attention(Q, K, mk, v.to(dtype), causal, chunk)
    if not causal:
        bad = _underflowed(Q @ K.sum(dim=-2).unsqueeze(-1), K.shape[-2] * K.shape[-1])  # [..., Lq, 1]
        if bool(bad.any()):
            sign = None if form.sign is None else form.sign.to(device=q.device, dtype=dtype)
            alt = per_feature_attention(log_features(q, form, dtype), log_features(k, form, dtype),
                                        v.to(dtype), sign)
            out = torch.where(bad, alt, out)
    return out


def per_feature_attention(
    lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor, sign: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-causal RF attention ``[..., Lq, dv]`` from log-features with one key constant per
    feature (exact; its denominator is >= 1 for unsigned maps, see the module docstring).

    lq ``[..., Lq, F]``, lk ``[..., Lk, F]`` (log |phi|), v ``[..., Lk, dv]``, ``sign`` ``[..., F]``
    or None. Holds ``[..., L, F]`` matrices: the fallback for the rows whose shared-constant
    denominator underflowed, not the fast path.
    """
    c = lk.amax(dim=-2, keepdim=True)  # [..., 1, F]: c_f, the largest key log-feature of feature f
    c = c.masked_fill(c == -math.inf, 0.0)  # a feature that is 0 for every key stays 0
    K = torch.exp(lk - c)  # <= 1, and 1 for the key attaining c_f
    a = lq + c  # c_f moved onto the query side: the product is unchanged
    r = a.amax(dim=-1, keepdim=True)  # a per-query constant: cancels in its own row
    Q = torch.exp(a - r.masked_fill(r == -math.inf, 0.0))
    if sign is not None:
        Q = Q * sign
    return (Q @ (K.transpose(-1, -2) @ v)) / (Q @ K.sum(dim=-2).unsqueeze(-1))


def _underflowed(den: torch.Tensor, n_terms: int) -> torch.Tensor:
    """Where a denominator of ``n_terms`` (Lk x F) terms may have lost more than a rounding error
    to terms flushed below the dtype's smallest normal number: those lose at most
    n_terms x tiny, so below n_terms x tiny / eps (1.6e-24 in float32 at Lk = 16k, F = 512), or
    not finite. Far below any denominator of ordinary logits, whose largest term is near 1."""
    fi = torch.finfo(den.dtype)
    return ~(den.abs() >= n_terms * fi.tiny / fi.eps)


# --------------------------------------------------------------------------- the CPU/torch fast path
BLOCK = 512  # tokens per feature block: a [H, 512, 256] float32 block (4 MiB at H = 8) stays in L3


def _split_bias(bias: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(bias_f or None, b0 [..., 1])``: a bias equal across features is a per-token constant.

    Every map with a plain 1/m average (PosRF, hyperbolic, ...) has one; it then joins the norm
    term (a per-token vector) instead of being added to the ``[..., L, F]`` matrix.
    """
    b0 = bias[..., :1]
    if bool((bias == b0).all()) and bool(torch.isfinite(b0).all()):
        return None, b0
    return bias, torch.zeros_like(b0)


def _row_term(x: torch.Tensor, form: ExpForm, b0: torch.Tensor) -> torch.Tensor:
    """``[..., L]``: coef |P x|^2 + b0, the part of every log-feature of a token shared by its features."""
    y = x if form.P is None else x @ form.P.transpose(-1, -2)
    return form.coef * (y * y).sum(-1) + b0


def _exp_block(
    x: torch.Tensor, Wt: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, r)``: E = exp(a - r) ``[..., n, F]`` built in place, a = x W^T (+ bias_f), r ``[..., n]``
    its row max (the per-token stabiliser; -inf -> 0 as in ``stabiliser_constant``)."""
    a = x @ Wt
    if bias is not None:
        a.add_(bias.unsqueeze(-2))
    r = a.amax(dim=-1)
    r_eff = r.masked_fill(r == -math.inf, 0.0)
    a.sub_(r_eff.unsqueeze(-1)).exp_()
    return a, r


def blocked_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    form: ExpForm,
    causal: bool = False,
    *,
    chunk: int = 128,
    block: int = BLOCK,
) -> torch.Tensor:
    """``torch_rf_attention``'s result (same math, float rounding apart) with fewer passes over memory.

    q ``[..., Lq, d]``, k ``[..., Lk, d]``, v ``[..., Lk, dv]`` in one floating dtype (the compute
    dtype) -> ``[..., Lq, dv]``. Features are built ``block`` tokens at a time (one GEMM, one row
    max, in-place sub and exp), so no ``[..., L, F]`` matrix is held whole.

    Each token's log-features are l_tf = a_tf + t_t with a = x W^T (+ a per-feature bias) and t_t
    = coef |P x_t|^2 (+ a bias shared by all features). The features are stored as
    E_tf = exp(a_tf - r_t), r_t = max_f a_tf, and the token's own max log-feature l_t = r_t + t_t
    is kept as a vector. Queries: r_t + t_t is a per-query constant (it cancels in its own row),
    so phi(q_t) is E_t up to that constant. Keys: exp(l_tf - c) = E_tf exp(l_t - c), so the
    key constant c (shared, or the prefix max) and every per-key factor go onto ``[v, 1]``, a
    ``[..., n, dv + 1]`` matrix whose last column yields the denominators in the same GEMM.
    Non-causal: c is the running max of l over the key blocks; the state sum_s E_s^T [v_s, 1]
    e^(l_s - c) is rescaled by e^(c_old - c_new) <= 1 when c grows (exact, like the
    online softmax). Causal: the chunked recurrence of ``linear_attention`` with the prefix max.
    """
    form = form.to(device=q.device, dtype=q.dtype)
    Wt = form.W.transpose(-1, -2)  # [..., d, F]
    bias, b0 = _split_bias(form.bias)
    sign = form.sign
    # [v, 1]: the ones column gives each row's denominator from the numerator's GEMM
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    if causal:
        block = chunk * max(1, block // chunk)
        return _blocked_causal(q, k, v1, Wt, bias, b0, sign, form, chunk, block)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], form.lead_shape())
    F, dv1 = Wt.shape[-1], v1.shape[-1]
    # S^T = sum_s [v_s, 1]^T E_s e^(l_s - c), held transposed: ([v, 1] w)^T E runs ~15 % faster
    # than E^T ([v, 1] w) (BLAS prefers the long F = 256 side as the output's columns)
    ST = q.new_zeros(*lead, dv1, F)
    c = q.new_full(lead, -math.inf)  # the running key constant (max l so far)
    for i in range(0, k.shape[-2], block):
        kb = k[..., i : i + block, :]
        E, r = _exp_block(kb, Wt, bias)
        lk = r + _row_term(kb, form, b0)  # [..., n]: each key's max log-feature
        c_new = torch.maximum(c, lk.amax(dim=-1))
        c_eff = c_new.masked_fill(c_new == -math.inf, 0.0)  # all-zero keys so far: constant 0
        w = torch.exp(lk - c_eff.unsqueeze(-1))  # <= 1
        vw = (v1[..., i : i + block, :] * w.unsqueeze(-1)).transpose(-1, -2)
        ST = ST * torch.exp(c - c_eff)[..., None, None] + vw @ E
        c = c_new
    out = q.new_empty(*lead, q.shape[-2], dv1 - 1)
    rescue = []  # query blocks with an underflowed denominator (module docstring)
    for i in range(0, q.shape[-2], block):
        Q, _ = _exp_block(q[..., i : i + block, :], Wt, bias)  # per-query constant dropped: it cancels
        if sign is not None:
            Q.mul_(sign)
        nd = Q @ ST.transpose(-1, -2)
        torch.div(nd[..., :-1], nd[..., -1:], out=out[..., i : i + block, :])
        bad = _underflowed(nd[..., -1:], k.shape[-2] * F)
        if bool(bad.any()):
            rescue.append((i, bad))
    if rescue:
        lk = k @ Wt + (_row_term(k, form, b0).unsqueeze(-1) if bias is None else
                       bias.unsqueeze(-2) + _row_term(k, form, b0).unsqueeze(-1))
        for i, bad in rescue:
            qb = q[..., i : i + block, :]
            lq = qb @ Wt if bias is None else qb @ Wt + bias.unsqueeze(-2)
            alt = per_feature_attention(lq, lk, v1[..., :-1], sign)
            sl = out[..., i : i + block, :]
            sl.copy_(torch.where(bad, alt.expand_as(sl), sl))
    return out


def _blocked_causal(q, k, v1, Wt, bias, b0, sign, form, chunk, block):
    """Causal ``blocked_rf_attention``: query t sees keys s <= t, each weighted e^(l_s - m_t) with
    m_t the prefix max of l (``stabiliser_constant(., "prefix")``: -inf -> 0), never a later token.

    Per chunk of ``chunk`` tokens: the carried state (relative to the constant c at the end of the
    previous chunk) times e^(c - m_t), plus the masked intra-chunk scores. Exponents are clamped
    at 0 as in ``_causal_linear_attention`` (they are <= 0 but after a prefix of all-zero keys).
    """
    L = q.shape[-2]
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v1.shape[:-2], form.lead_shape())
    F, dv1 = Wt.shape[-1], v1.shape[-1]
    out = q.new_empty(*lead, L, dv1 - 1)
    S = q.new_zeros(*lead, F, dv1)
    c = q.new_full(lead, -math.inf)
    run = q.new_full(lead, -math.inf)  # prefix max of l before this block
    future_full = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)  # [t, s]: s > t
    for b in range(0, L, block):
        Q, _ = _exp_block(q[..., b : b + block, :], Wt, bias)
        if sign is not None:
            Q.mul_(sign)
        kb = k[..., b : b + block, :]
        E, r = _exp_block(kb, Wt, bias)
        lk = (r + _row_term(kb, form, b0)).expand(*lead, -1)  # [..., n]
        pm = torch.maximum(torch.cummax(lk, dim=-1).values, run.unsqueeze(-1))
        run = pm[..., -1]
        mk = pm.masked_fill(pm == -math.inf, 0.0)
        for j in range(0, Q.shape[-2], chunk):
            sl = slice(j, j + chunk)
            Qc, Ec, lc, mc = Q[..., sl, :], E[..., sl, :], lk[..., sl], mk[..., sl]
            vc = v1[..., b + j : b + j + chunk, :]
            n = mc.shape[-1]
            nd = (Qc @ S).mul_(torch.exp((c.unsqueeze(-1) - mc).clamp(max=0)).unsqueeze(-1))
            dec = (lc.unsqueeze(-2) - mc.unsqueeze(-1)).clamp(max=0)  # [..., t, s] = l_s - m_t
            A = (Qc @ Ec.transpose(-1, -2)).mul_(dec.masked_fill_(future_full[:n, :n], -math.inf).exp_())
            nd.add_(A @ vc)
            torch.div(nd[..., :-1], nd[..., -1:], out=out[..., b + j : b + j + n, :])
            c_new = mc[..., -1]
            wr = torch.exp((lc - c_new.unsqueeze(-1)).clamp(max=0))
            carry = torch.exp((c - c_new).clamp(max=0))[..., None, None]
            S = S * carry + Ec.transpose(-1, -2) @ (vc * wr.unsqueeze(-1))
            c = c_new
    return out
