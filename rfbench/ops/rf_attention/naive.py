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
LOG2E = 1.0 / math.log(2.0)


#: Tokens per feature block and per causal chunk of the CPU path. Small blocks, above all, because
#: of the allocator: with glibc, a temporary of a few MiB freed every block comes back as fresh
#: pages (a page fault per 4 KiB, ~1.7 us here), and at L = 1,024 512-token blocks took ~4,800
#: faults per call (~8 ms of ~27 ms, 1 thread); with ``[H, 128, F]`` temporaries (1 MiB at H = 8,
#: F = 256) they were mostly gone and, with the faults switched off (MALLOC_TRIM_THRESHOLD_),
#: blocks of 128-1,024 ran alike. Causal chunks of 64 (two per block): the masked chunk-local
#: scores cost 2 C (F + dv + 1) per token; 32 made the chunk states' GEMMs too thin, a block of one
#: 128-chunk did twice the local work (tests/bench/README.md). The same sizes won from 1,024 to
#: 16,384 tokens, so they do not depend on L.
BLOCK, CHUNK = 128, 64


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
    """``[..., L]``: coef |P x|^2 + b0, the part of every log-feature of a token shared by its features
    (a norm, not (y * y).sum(): no ``[..., L, d]`` temporary)."""
    y = x if form.P is None else x @ form.P.transpose(-1, -2)
    return torch.linalg.vector_norm(y, dim=-1).square_().mul_(form.coef).add_(b0)


def _exp_block(
    x: torch.Tensor, Wt: torch.Tensor, bias: torch.Tensor | None, finite: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, r)``: E = 2^(a - r) ``[..., n, F]`` built in place (in ``out`` if given), a = x W^T
    (+ bias_f) (base-2 log-features), r ``[..., n]`` its row max (the per-token stabiliser; -inf -> 0
    as in ``stabiliser_constant``, a case only a bias of -inf for every feature makes: ``finite``
    False)."""
    a = x @ Wt if out is None else torch.matmul(x, Wt, out=out)
    if bias is not None:
        a.add_(bias.unsqueeze(-2))
    r = a.amax(dim=-1)
    a.sub_((r if finite else r.masked_fill(r == -math.inf, 0.0)).unsqueeze(-1)).exp2_()
    return a, r


def _fits(buf: torch.Tensor, left: int) -> torch.Tensor | None:
    """``buf`` when the block starting here has all its ``buf.shape[-2]`` tokens (``left`` remain),
    else None (the ragged last block gets a fresh matrix)."""
    return buf if left >= buf.shape[-2] else None


def _exp2_nonpos(x: torch.Tensor, finite: bool) -> torch.Tensor:
    """2^x in place for exponents <= 0. They are so whenever every log-feature is finite
    (differences to a running max); otherwise (a prefix of all-zero keys) the clamp stops
    0 * inf = NaN, as in ``_causal_linear_attention``."""
    return (x if finite else x.clamp_(max=0)).exp2_()


def blocked_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    form: ExpForm,
    causal: bool = False,
    *,
    chunk: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """``torch_rf_attention``'s result (same math, float rounding apart) with fewer passes over memory.

    q ``[..., Lq, d]``, k ``[..., Lk, d]``, v ``[..., Lk, dv]`` in one floating dtype (the compute
    dtype) -> ``[..., Lq, dv]``. Features are built ``block`` tokens at a time (one GEMM, one row
    max, in-place sub and exp), so no ``[..., L, F]`` matrix is held whole; causal attention
    works in chunks of ``chunk`` tokens. None: ``BLOCK``, ``CHUNK``.

    Each token's log-features are l_tf = a_tf + t_t with a = x W^T (+ a per-feature bias) and t_t
    = coef |P x_t|^2 (+ a bias shared by all features). The features are stored as
    E_tf = exp(a_tf - r_t), r_t = max_f a_tf, and the token's own max log-feature l_t = r_t + t_t
    is kept as a vector. Queries: r_t + t_t is a per-query constant (it cancels in its own row),
    so phi(q_t) is E_t up to that constant. Keys: exp(l_tf - c) = E_tf exp(l_t - c), so the
    key constant c (shared, or the prefix max) and every per-key factor go onto ``[v, 1]``, a
    ``[..., n, dv + 1]`` matrix whose last column yields the denominators in the same GEMM.
    Non-causal: c is the running max of l over the key blocks; the state sum_s E_s^T [v_s, 1]
    e^(l_s - c) is rescaled by e^(c_old - c_new) <= 1 when c grows (exact, like the
    online softmax). Causal: ``_causal_chunks``, with the prefix max.

    Everything runs in base 2: the form's W, bias and coef times log2(e) give l log2(e), and
    exp(l - c) = 2^((l - c) log2 e), exact up to the rounding of the products (torch's exp2 runs ~3x
    faster than its exp on CPU float32; the stabilisers are unchanged, only their unit).
    """
    form = form.to(device=q.device, dtype=q.dtype)
    nat = form  # natural-log form: the rescue of underflowed rows (per_feature_attention) uses it
    form = ExpForm(form.W * LOG2E, form.bias * LOG2E, form.coef * LOG2E, form.P, form.sign)
    Wt = form.W.transpose(-1, -2)  # [..., d, F]
    bias, b0 = _split_bias(form.bias)
    # every token has a finite largest log-feature unless some row of bias is -inf throughout
    finite = bias is None or bool(torch.isfinite(bias.amax(dim=-1)).all())
    sign = form.sign
    block = BLOCK if block is None else block
    if causal:
        chunk = CHUNK if chunk is None else chunk
        block = chunk * max(1, block // chunk)
        return _blocked_causal(q, k, v, Wt, bias, b0, sign, form, chunk, block, finite)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], form.lead_shape())
    F, dv1 = Wt.shape[-1], v.shape[-1] + 1
    # S^T = sum_s [v_s, 1]^T E_s e^(l_s - c), held transposed: ([v, 1] w)^T E runs ~15 % faster
    # than E^T ([v, 1] w) (BLAS prefers the long F = 256 side as the output's columns)
    ST = None
    c = q.new_full(lead, -math.inf)  # the running key constant (max l so far)
    lk_all = _row_term(k, form, b0)  # [..., Lk]: the shared part of each key's log-features
    # one feature buffer for all whole blocks (each block's E and Q are used up before the next):
    # warm in cache, no allocation per block
    kbuf = k.new_empty(*torch.broadcast_shapes(k.shape[:-2], Wt.shape[:-2]), min(block, k.shape[-2]), F)
    for i in range(0, k.shape[-2], block):
        E, r = _exp_block(k[..., i : i + block, :], Wt, bias, finite, _fits(kbuf, k.shape[-2] - i))
        lk = r + lk_all[..., i : i + block]  # [..., n]: each key's max log-feature
        c_new = torch.maximum(c, lk.amax(dim=-1))
        c_eff = c_new if finite else c_new.masked_fill(c_new == -math.inf, 0.0)  # all-zero keys: 0
        w = torch.exp2(lk - c_eff.unsqueeze(-1))  # <= 1
        # [v w, w]: the last column gives the denominators' state from the numerators' GEMM (built per
        # block: a whole [..., L, dv + 1] copy would come as fresh pages each call)
        w = w.unsqueeze(-1)
        vw = torch.cat([v[..., i : i + block, :] * w, w], dim=-1).transpose(-1, -2)
        if ST is None:
            ST = vw @ E
        else:
            ST = ST * torch.exp2(c - c_eff)[..., None, None] + vw @ E
        c = c_new
    out = q.new_empty(*lead, q.shape[-2], dv1 - 1)
    dens = []
    qbuf = q.new_empty(*torch.broadcast_shapes(q.shape[:-2], Wt.shape[:-2]), min(block, q.shape[-2]), F)
    for i in range(0, q.shape[-2], block):
        # the per-query constant is dropped: it cancels
        Q, _ = _exp_block(q[..., i : i + block, :], Wt, bias, finite, _fits(qbuf, q.shape[-2] - i))
        if sign is not None:
            Q.mul_(sign)
        # numerators and denominators apart: a GEMM with N = dv (64) runs ~15 % faster than with
        # dv + 1, and a GEMV through bmm ~7x slower than vecdot
        num = Q @ ST[..., :-1, :].transpose(-1, -2)
        dens.append(torch.linalg.vecdot(Q, ST[..., -1:, :]).unsqueeze(-1))  # [..., n, 1]
        torch.div(num, dens[-1], out=out[..., i : i + block, :])
    bad = _underflowed(torch.cat(dens, dim=-2), k.shape[-2] * F)  # one check for all rows
    rescue = []  # query blocks with an underflowed denominator (module docstring)
    if bool(bad.any()):
        rescue = [(i, bad[..., i : i + block, :]) for i in range(0, q.shape[-2], block)]
        rescue = [(i, b) for i, b in rescue if bool(b.any())]
    if rescue:
        Wn, bn, b0n = nat.W.transpose(-1, -2), *_split_bias(nat.bias)
        lk = k @ Wn + (_row_term(k, nat, b0n).unsqueeze(-1) if bn is None else
                       bn.unsqueeze(-2) + _row_term(k, nat, b0n).unsqueeze(-1))
        for i, bad in rescue:
            qb = q[..., i : i + block, :]
            lq = qb @ Wn if bn is None else qb @ Wn + bn.unsqueeze(-2)
            alt = per_feature_attention(lq, lk, v, sign)
            sl = out[..., i : i + block, :]
            sl.copy_(torch.where(bad, alt.expand_as(sl), sl))
    return out


def _blocked_causal(q, k, v, Wt, bias, b0, sign, form, chunk, block, finite):
    """Causal ``blocked_rf_attention``: query t sees keys s <= t, each weighted 2^(l_s - m_t) with
    m_t the prefix max of l (``stabiliser_constant(., "prefix")``: -inf -> 0), never a later token.

    All chunks of a block at once (``_causal_chunks``); the state carried between blocks is
    sum_s E_s^T [v_s, 1] 2^(l_s - c), c the prefix max at the end of the previous block.
    """
    L = q.shape[-2]
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], form.lead_shape())
    F, dv1 = Wt.shape[-1], v.shape[-1] + 1
    out = q.new_empty(*lead, L, dv1 - 1)
    ST, c, run = q.new_zeros(*lead, dv1, F), None, None  # the carried state (transposed), its constant
    lk_all = _row_term(k, form, b0)  # [..., L]: the shared part of each key's log-features
    # one pair of feature buffers for all whole blocks, as in the non-causal path
    qlead, klead = (torch.broadcast_shapes(x.shape[:-2], Wt.shape[:-2]) for x in (q, k))
    qbuf, kbuf = q.new_empty(*qlead, min(block, L), F), k.new_empty(*klead, min(block, L), F)
    # and for the scores and the chunk states of a whole block: two of the states, since the state
    # a block reads (ST) is a view of the previous block's
    nc, slead = block // chunk, torch.broadcast_shapes(qlead, klead)
    ws = {"A": q.new_empty(*slead, nc, chunk, chunk), "dec": q.new_empty(*lead, nc, chunk, chunk),
          "nd": q.new_empty(*lead, nc, chunk, dv1), "vw": q.new_empty(*lead, nc, chunk, dv1)}
    pts = [q.new_empty(*lead, nc, dv1, F) for _ in range(2)]
    v1buf = v.new_empty(*v.shape[:-2], min(block, L), dv1)
    v1buf[..., -1] = 1  # [v, 1]: the ones give the denominators
    for b in range(0, L, block):
        Q, _ = _exp_block(q[..., b : b + block, :], Wt, bias, finite, _fits(qbuf, L - b))
        if sign is not None:
            Q.mul_(sign)
        E, r = _exp_block(k[..., b : b + block, :], Wt, bias, finite, _fits(kbuf, L - b))
        lk = (r + lk_all[..., b : b + block]).expand(*lead, -1)  # [..., n]: each key's max log-feature
        pm = torch.cummax(lk, dim=-1).values
        if run is not None:  # prefix max of l before this block
            pm = torch.maximum(pm, run.unsqueeze(-1))
        run = pm[..., -1]
        mk = pm if finite else pm.masked_fill(pm == -math.inf, 0.0)
        if c is None:  # no state yet (S = 0): any constant <= m_t will do; m_0 keeps 2^(c - m_t) <= 1
            c = mk[..., 0]
        n = lk.shape[-1]
        vb = v[..., b : b + block, :]
        if vb.shape[-2] == v1buf.shape[-2]:
            v1 = v1buf
            v1[..., :-1].copy_(vb)
        else:
            v1 = torch.cat([vb, vb.new_ones(*vb.shape[:-1], 1)], dim=-1)
        full = n - n % chunk
        for lo, hi in ((0, full), (full, n)):  # whole chunks, then the ragged tail (if any)
            if hi > lo:
                bufs = dict(ws, PT=pts[(b // block) % 2]) if hi - lo == block else {}
                ST, c = _causal_chunks(
                    Q[..., lo:hi, :], E[..., lo:hi, :], lk[..., lo:hi], mk[..., lo:hi],
                    v1[..., lo:hi, :], ST, c, min(chunk, hi - lo), out[..., b + lo : b + hi, :], finite, bufs,
                )
    return out


def _causal_chunks(Q, E, lk, mk, v1, ST, c, C, out, finite, bufs):
    """Causal attention of ``n = nc * C`` tokens in ``nc`` chunks of ``C``, written into ``out``;
    returns the state after them and its constant. ``bufs``: matrices to reuse, by name (scores
    ``A``, decays ``dec``, ``nd``, ``vw``, chunk states ``PT``, not ST's), or {} for fresh ones.

    Q, E ``[..., n, F]`` (query / key features), lk, mk ``[..., n]`` (key log-maxima l and prefix
    maxima m, base 2), v1 ``[..., n, dv + 1]``, ST ``[..., dv + 1, F]`` the incoming state
    (transposed) relative to c ``[...]``. With c_j = m at the end of chunk j (c_-1 = c) and
    P_j = E_j^T ([v, 1] 2^(l - c_j)), the state before chunk j is
    S_j = 2^(c_(j-2) - c_(j-1)) S_(j-1) + P_(j-1) (S_0 = ST). Query t of chunk j gets
    2^(c_(j-1) - m_t) phi(q_t) S_j plus its own chunk's scores times the exact decay 2^(l_s - m_t),
    s <= t. Every factor is 2^(x <= 0) and depends on tokens <= t only; a later token of the
    chunk enters only times an exact 0 (the zeroed upper triangle).
    """
    n = Q.shape[-2]
    nc = n // C
    Qc, Ec, vc = Q.unflatten(-2, (nc, C)), E.unflatten(-2, (nc, C)), v1.unflatten(-2, (nc, C))
    lc, mc = lk.unflatten(-1, (nc, C)), mk.unflatten(-1, (nc, C))
    cs = torch.cat([c.unsqueeze(-1), mc[..., -1]], dim=-1)  # [..., nc + 1]: c, c_0, ..., c_(nc-1)
    # intra-chunk scores [..., nc, t, s] times 2^(l_s - m_t); tril_ zeroes s > t (any value there)
    dec = torch.sub(lc.unsqueeze(-2), mc.unsqueeze(-1), out=bufs.get("dec")).exp2_().tril_()
    A = torch.matmul(Qc, Ec.transpose(-1, -2), out=bufs.get("A")).mul_(dec)
    nd = torch.matmul(A, vc, out=bufs.get("nd"))  # [..., nc, C, dv1]
    # P_j transposed: ([v, 1] w)^T E is the faster GEMM, as for the non-causal state
    vw = torch.mul(vc, _exp2_nonpos(lc - cs[..., 1:, None], finite).unsqueeze(-1), out=bufs.get("vw"))
    PT = torch.matmul(vw.transpose(-1, -2), Ec, out=bufs.get("PT"))
    carry = _exp2_nonpos(cs[..., :-1] - cs[..., 1:], finite)[..., None, None].unbind(-3)
    if PT.shape[:-3] != ST.shape[:-2]:  # queries with more leading dims than keys: one state each
        PT = PT.expand(*ST.shape[:-2], *PT.shape[-3:]).contiguous()
    # in place, PT[j] becomes S_(j+1) (relative to c_j): no separate buffer of states
    P = PT.unbind(-3)
    P[0].addcmul_(ST, carry[0])
    for j in range(1, nc):
        P[j].addcmul_(P[j - 1], carry[j])
    w = _exp2_nonpos(cs[..., :-1, None] - mc, finite).unsqueeze(-1)  # [..., nc, C, 1]: 2^(c_(j-1) - m_t)
    nd[..., 0, :, :].add_((Qc[..., 0, :, :] @ ST.transpose(-1, -2)).mul_(w[..., 0, :, :]))
    if nc > 1:
        prev = PT[..., :-1, :, :].transpose(-1, -2)  # S_1 .. S_(nc-1)
        nd[..., 1:, :, :].add_((Qc[..., 1:, :, :] @ prev).mul_(w[..., 1:, :, :]))
    ST = P[-1]
    torch.div(nd[..., :-1], nd[..., -1:], out=out.unflatten(-2, (nc, C)))
    return ST, cs[..., -1]
