"""Triton kernel of the kernel error over all query-key pairs, without an L x L matrix.

The stabilised features phi~(q), phi~(k) (float32, per-row constants) come from the fused
feature kernel; one program then takes ``BQ`` queries and streams over key tiles:
est = exp(log(phi~(q) . phi~(k)) + c_q + c_k) against exp(tq . tk), accumulating per-query
sums of squared error, squared exact value and squared relative error, and, given each query
row's log-normalisers (``row_norms``), the squared error of the attention matrix
exp(log est - lse^_i) against exp(tq . tk - lse_i) over the visible pairs (j <= i when causal).
Memory: the two feature matrices of a group of leading indices (bounded by
``max_feature_bytes``) and ``[N, Lq, 4]`` sums, never a ``[Lq, Lk]`` block.

Precision: the products run as ``precision`` (default "tf32" on a GPU: the features and the
logits are rounded to 10-bit mantissas, a relative error ~1e-3 on each estimate and exact
value, far below random-feature errors (~10 % at m = 256); pass "ieee" for full float32,
about 3-8x slower on tensor-core GPUs). The interpreter computes in full float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rfbench.ops.common import launch_options, load_tile
from rfbench.ops.features.fused import fused_features
from rfbench.ops.form import ExpForm
from rfbench.ops.kernel_error.naive import KernelErrorSums, check_causal, visible_pairs
from rfbench.ops.utils import flatten, next_pow2, refuse_signed


@triton.jit
def _kernel_error_kernel(
    pq_ptr, s_pqn, s_pql, s_pqf,
    cq_ptr, s_cqn, s_cql,
    pk_ptr, s_pkn, s_pkl, s_pkf,
    ck_ptr, s_ckn, s_ckl,
    tq_ptr, s_tqn, s_tql, s_tqd,
    tk_ptr, s_tkn, s_tkl, s_tkd,
    le_ptr, s_len, s_lel,
    lh_ptr, s_lhn, s_lhl,
    o_ptr, s_on, s_ol, s_os,
    Lq, Lk, F, D,
    BQ: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    HAS_ATTN: tl.constexpr, CAUSAL: tl.constexpr,
):
    n = tl.program_id(0)
    q0 = tl.program_id(1) * BQ
    rows = q0 + tl.arange(0, BQ)
    rmask = rows < Lq
    tq = load_tile(tq_ptr + n * s_tqn, s_tql, s_tqd, q0, Lq, D, BQ, BD).to(tl.float32)
    cq = tl.load(cq_ptr + n * s_cqn + rows * s_cql, mask=rmask, other=0.0)
    sse = tl.zeros([BQ], tl.float32)
    sx2 = tl.zeros([BQ], tl.float32)
    srel = tl.zeros([BQ], tl.float32)
    sattn = tl.zeros([BQ], tl.float32)
    if HAS_ATTN:  # log-normalisers of each query row: exact (lse) and estimated (lse^)
        le = tl.load(le_ptr + n * s_len + rows * s_lel, mask=rmask, other=0.0)
        lh = tl.load(lh_ptr + n * s_lhn + rows * s_lhl, mask=rmask, other=0.0)
    for k0 in range(0, Lk, BK):
        cols = k0 + tl.arange(0, BK)
        est = tl.zeros([BQ, BK], tl.float32)
        for f0 in range(0, F, BF):
            a = load_tile(pq_ptr + n * s_pqn + f0 * s_pqf, s_pql, s_pqf, q0, Lq, F - f0, BQ, BF)
            b = load_tile(pk_ptr + n * s_pkn + f0 * s_pkf, s_pkl, s_pkf, k0, Lk, F - f0, BK, BF)
            est += tl.dot(a, tl.trans(b), input_precision=PREC)
        tk = load_tile(tk_ptr + n * s_tkn, s_tkl, s_tkd, k0, Lk, D, BK, BD).to(tl.float32)
        logit = tl.dot(tq, tl.trans(tk), input_precision=PREC)
        ck = tl.load(ck_ptr + n * s_ckn + cols * s_ckl, mask=cols < Lk, other=0.0)
        valid = rmask[:, None] & (cols < Lk)[None, :]
        # Constants multiplied back in log space: log(0) = -inf gives an estimate of exactly 0
        # (padded pairs take log(1), masked below).
        log_est = tl.log(tl.where(valid, est, 1.0)) + cq[:, None] + ck[None, :]
        exact = tl.where(valid, tl.exp(logit), 0.0)
        err = tl.where(valid, exact - tl.exp(log_est), 0.0)
        rel = tl.where(valid, 1.0 - tl.exp(log_est - logit), 0.0)  # (exact - est) / exact
        sse += tl.sum(err * err, axis=1)
        sx2 += tl.sum(exact * exact, axis=1)
        srel += tl.sum(rel * rel, axis=1)
        if HAS_ATTN:
            vis = valid
            if CAUSAL:
                vis = vis & (cols[None, :] <= rows[:, None])
            # both entries <= 1 once divided by their row's normaliser (subtracted in log space)
            da = tl.where(vis, tl.exp(log_est - lh[:, None]) - tl.exp(logit - le[:, None]), 0.0)
            sattn += tl.sum(da * da, axis=1)
    base = o_ptr + n * s_on + rows * s_ol
    tl.store(base, sse, mask=rmask)
    tl.store(base + s_os, sx2, mask=rmask)
    tl.store(base + 2 * s_os, srel, mask=rmask)
    tl.store(base + 3 * s_os, sattn, mask=rmask)


def fused_kernel_error(
    q: torch.Tensor,
    k: torch.Tensor,
    form: ExpForm,
    tq: torch.Tensor | None = None,
    tk: torch.Tensor | None = None,
    *,
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    block_f: int = 32,
    precision: str | None = None,
    max_feature_bytes: int = 512 * 2**20,
    num_warps: int = 8,
    num_stages: int | None = None,
) -> KernelErrorSums:
    """Same contract as ``naive_kernel_error`` (tq, tk: inputs of the target kernel, default q, k)."""
    refuse_signed(form)
    check_causal(q, k, causal)
    tq = q if tq is None else tq
    tk = k if tk is None else tk
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], tq.shape[:-2], tk.shape[:-2], form.lead_shape())
    qf, kf, tqf, tkf = (flatten(t, lead) for t in (q, k, tq, tk))
    N, Lq, d = qf.shape
    Lk, dt = kf.shape[1], tqf.shape[2]
    F = form.feature_dim
    if precision is None:
        precision = "tf32" if q.device.type == "cuda" else "ieee"
    # form with per-index parameters is flattened over the same lead; slice both alike per group.
    formf = _flatten_params(form, lead)
    if row_norms is not None:
        le, lh = (flatten(x.float().unsqueeze(-1), lead).squeeze(-1) for x in row_norms)  # [N, Lq]
    else:  # not read (HAS_ATTN off); any float32 tensor fills the pointer slots
        le = lh = torch.zeros(N, Lq, dtype=torch.float32, device=q.device)
    sums = torch.empty(N, Lq, 4, dtype=torch.float32, device=q.device)
    group = max(1, max_feature_bytes // (4 * F * (Lq + Lk)))  # float32 features of both sides
    for g0 in range(0, N, group):
        sl = slice(g0, min(g0 + group, N))
        formg = _slice_params(formf, sl)
        pq, cq = fused_features(qf[sl], formg, "row", num_warps=num_warps, num_stages=num_stages)
        pk, ck = fused_features(kf[sl], formg, "row", num_warps=num_warps, num_stages=num_stages)
        cq, ck = cq.squeeze(-1), ck.squeeze(-1)
        tqs, tks, out, les, lhs = tqf[sl], tkf[sl], sums[sl], le[sl], lh[sl]
        _kernel_error_kernel[(sl.stop - sl.start, triton.cdiv(Lq, block_q))](
            pq, *pq.stride(), cq, *cq.stride(), pk, *pk.stride(), ck, *ck.stride(),
            tqs, *tqs.stride(), tks, *tks.stride(), les, *les.stride(), lhs, *lhs.stride(),
            out, *out.stride(),
            Lq, Lk, F, dt,
            BQ=block_q, BK=block_k, BF=min(block_f, next_pow2(F)), BD=next_pow2(dt), PREC=precision,
            HAS_ATTN=row_norms is not None, CAUSAL=causal,
            **launch_options(num_warps, num_stages),
        )
    total = sums.sum(dim=1, dtype=torch.float64).reshape(*lead, 4)
    attn = None if row_norms is None else total[..., 3]
    return KernelErrorSums(
        total[..., 0], total[..., 1], total[..., 2], count=Lq * Lk, attn_sse=attn,
        attn_count=visible_pairs(Lq, Lk, causal) if row_norms is not None else 0,
    )


def _flatten_params(form: ExpForm, lead: torch.Size) -> ExpForm:
    """form with leading dims either absent (shared) or flattened to ``[N, ...]``."""
    if len(form.lead_shape()) == 0:
        return form
    W = flatten(form.W, lead)
    bias = flatten(form.bias.unsqueeze(-2), lead).squeeze(-2)
    P = None if form.P is None else flatten(form.P, lead)
    return ExpForm(W, bias, form.coef, P)


def _slice_params(form: ExpForm, sl: slice) -> ExpForm:
    if form.W.ndim == 2 and form.bias.ndim == 1 and (form.P is None or form.P.ndim == 2):
        return form
    P = None if form.P is None else (form.P[sl] if form.P.ndim == 3 else form.P)
    W = form.W[sl] if form.W.ndim == 3 else form.W
    bias = form.bias[sl] if form.bias.ndim == 2 else form.bias
    return ExpForm(W, bias, form.coef, P)
