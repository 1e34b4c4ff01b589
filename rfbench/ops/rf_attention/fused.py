"""Triton kernels of random-feature attention with the feature maps fused in.

phi(K) and phi(Q) never reach memory: every program recomputes its tile of log-features from
x and W (log_feature_tile), so memory traffic is that of q, k, v, the output and small states.

Non-causal (three steps):
1. ``_kv_state_kernel``, grid (N, splits, F tiles): each program reduces one split of the keys
   into sum_s exp(lk_sf - g_f) v_s and sum_s exp(lk_sf - g_f), with g_f its own running max
   (online rescaling, as in FlashAttention's softmax).
2. torch, on ``[N, splits, F, dv]``: rescale every partial to G = max over all keys and
   features and sum. G is the single constant shared by all keys of rfbench/estimator.py, so
   the result is exactly K^T V and the key sum of the reference (up to rounding).
3. ``_output_kernel``, grid (N, query blocks): a running per-query max over the feature tiles
   (online rescaling again) gives exp(lq - mq) tile by tile; num = phi(q) KV, den = phi(q) z.

Causal (chunked, BT tokens per chunk; the prefix-max stabiliser of rfbench/estimator.py):
1. ``_kv_state_kernel`` with one block per chunk: per-chunk states h_c (own constants g_cf).
2. torch: e_c = max of the log-features of all keys up to the end of chunk c (a cummax of
   ``[N, chunks]`` numbers); ``_scan_kernel`` turns h into the state *before* each chunk,
   relative to e_{c-1}, in place.
3. ``_output_kernel`` (CAUSAL): query t adds the state times exp(e_{c-1} - mk_t) and its
   chunk's keys s <= t times exp(r_s - mk_t), mk_t = max(e_{c-1}, max_{s <= t} r_s) the prefix
   max, r_s key s's own max over features. Each factor is <= 1, and no value for t reads a
   key after t: future keys are masked with ``where`` (never multiplied by 0, which would let
   an overflowing future key turn into NaN).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rfbench.ops.common import (
    NEG_INF,
    cast_out,
    dot_config,
    launch_options,
    load_tile,
    log_feature_tile,
    mma,
    norm_term,
    param_blocks,
)
from rfbench.ops.form import ExpForm
from rfbench.ops.utils import flatten, flatten_param, next_pow2, refuse_signed


@triton.jit
def _kv_state_kernel(
    k_ptr, s_kn, s_kl, s_kd,
    v_ptr, s_vn, s_vl, s_vd,
    w_ptr, s_wn, s_wf, s_wd,
    b_ptr, s_bn, s_bf,
    p_ptr, s_pn, s_pi, s_pj,
    h_ptr, s_hn, s_hc, s_hf, s_hv,
    z_ptr, s_zn, s_zc, s_zf,
    g_ptr, s_gn, s_gc, s_gf,
    L, F, D, DV, coef, CHUNK,
    HAS_P: tl.constexpr, BL: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
    F32_PREC: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1)
    f0 = tl.program_id(2) * BF
    f = f0 + tl.arange(0, BF)
    fmask = f < F
    acc = tl.zeros([BF, BV], tl.float32)
    zacc = tl.zeros([BF], tl.float32)
    g = tl.full([BF], NEG_INF, tl.float32)
    for l0 in range(c * CHUNK, c * CHUNK + CHUNK, BL):
        rows = l0 + tl.arange(0, BL)
        x = load_tile(k_ptr + n * s_kn, s_kl, s_kd, l0, L, D, BL, BD)
        nrm = norm_term(x, p_ptr + n * s_pn, s_pi, s_pj, D, coef, HAS_P, BD, F32_PREC)
        lf = log_feature_tile(
            x, nrm, w_ptr + n * s_wn, s_wf, s_wd, b_ptr + n * s_bn, s_bf, f0, F, D,
            BF, BD, DOT_DTYPE, EMULATE, PREC, SPLIT,
        )
        lf = tl.where((rows < L)[:, None], lf, NEG_INF)  # tokens past L are not keys
        g_new = tl.maximum(g, tl.max(lf, axis=0))
        # Running max per feature; -inf only for padded features (kept out of -inf - -inf = NaN).
        g_safe = tl.where(g_new == NEG_INF, 0.0, g_new)
        alpha = tl.exp(g - g_safe)
        p = tl.exp(lf - g_safe[None, :])  # [BL, BF], <= 1
        vt = load_tile(v_ptr + n * s_vn, s_vl, s_vd, l0, L, DV, BL, BV)
        acc = acc * alpha[:, None] + mma(tl.trans(p), vt, DOT_DTYPE, EMULATE, PREC)
        zacc = zacc * alpha + tl.sum(p, axis=0)
        g = g_new
    vcol = tl.arange(0, BV)
    tl.store(
        h_ptr + n * s_hn + c * s_hc + f[:, None] * s_hf + vcol[None, :] * s_hv,
        cast_out(acc, h_ptr.dtype.element_ty, EMULATE), mask=fmask[:, None] & (vcol[None, :] < DV),
    )
    tl.store(z_ptr + n * s_zn + c * s_zc + f * s_zf, zacc, mask=fmask)
    tl.store(g_ptr + n * s_gn + c * s_gc + f * s_gf, g, mask=fmask)


@triton.jit
def _scan_kernel(
    h_ptr, s_hn, s_hc, s_hf, s_hv,
    z_ptr, s_zn, s_zc, s_zf,
    g_ptr, s_gn, s_gc, s_gf,
    e_ptr, s_en, s_ec,
    NC, F, DV,
    BF: tl.constexpr, BV: tl.constexpr, EMULATE: tl.constexpr,
):
    """In place: h[c] <- sum_{c' < c} h[c'] exp(g_c' - e_{c-1}), the state before chunk c."""
    n = tl.program_id(0)
    f = tl.program_id(1) * BF + tl.arange(0, BF)
    vcol = tl.program_id(2) * BV + tl.arange(0, BV)
    fmask = f < F
    mask = fmask[:, None] & (vcol[None, :] < DV)
    zmask = f + tl.program_id(2) * F < F  # the key sums are one column: value tile 0 owns them
    S = tl.zeros([BF, BV], tl.float32)
    zS = tl.zeros([BF], tl.float32)
    for c in range(0, NC):
        hp = h_ptr + n * s_hn + c * s_hc + f[:, None] * s_hf + vcol[None, :] * s_hv
        zp = z_ptr + n * s_zn + c * s_zc + f * s_zf
        hc = tl.load(hp, mask=mask, other=0.0).to(tl.float32)
        zc = tl.load(zp, mask=zmask, other=0.0)
        tl.store(hp, cast_out(S, h_ptr.dtype.element_ty, EMULATE), mask=mask)
        tl.store(zp, zS, mask=zmask)
        e_c = tl.load(e_ptr + n * s_en + c * s_ec)
        e_prev = tl.load(e_ptr + n * s_en + (c - 1) * s_ec, mask=c > 0, other=NEG_INF)
        gc = tl.load(g_ptr + n * s_gn + c * s_gc + f * s_gf, mask=fmask, other=0.0)
        # Move the state to the constant e_c of the keys up to chunk c; both factors <= 1.
        decay = tl.exp(e_prev - e_c)
        grow = tl.exp(gc - e_c)
        S = S * decay + hc * grow[:, None]
        zS = zS * decay + zc * grow


@triton.jit
def _output_kernel(
    q_ptr, s_qn, s_ql, s_qd,
    k_ptr, s_kn, s_kl, s_kd,
    v_ptr, s_vn, s_vl, s_vd,
    w_ptr, s_wn, s_wf, s_wd,
    b_ptr, s_bn, s_bf,
    p_ptr, s_pn, s_pi, s_pj,
    h_ptr, s_hn, s_hc, s_hf, s_hv,
    z_ptr, s_zn, s_zc, s_zf,
    e_ptr, s_en, s_ec,
    o_ptr, s_on, s_ol, s_ov,
    L, F, D, DV, coef,
    CAUSAL: tl.constexpr, HAS_P: tl.constexpr,
    BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
    F32_PREC: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1)
    t0 = c * BT
    w = w_ptr + n * s_wn
    b = b_ptr + n * s_bn
    pp = p_ptr + n * s_pn
    xq = load_tile(q_ptr + n * s_qn, s_ql, s_qd, t0, L, D, BT, BD)
    nq = norm_term(xq, pp, s_pi, s_pj, D, coef, HAS_P, BD, F32_PREC)
    hc = h_ptr + n * s_hn + c * s_hc  # non-causal: s_hc = 0, one state for every block
    zc = z_ptr + n * s_zn + c * s_zc
    mq = tl.full([BT], NEG_INF, tl.float32)
    num = tl.zeros([BT, BV], tl.float32)
    den = tl.zeros([BT], tl.float32)
    if CAUSAL:
        xk = load_tile(k_ptr + n * s_kn, s_kl, s_kd, t0, L, D, BT, BD)
        nk = norm_term(xk, pp, s_pi, s_pj, D, coef, HAS_P, BD, F32_PREC)
        rk = tl.full([BT], NEG_INF, tl.float32)
        A = tl.zeros([BT, BT], tl.float32)
    for f0 in range(0, F, BF):
        f = f0 + tl.arange(0, BF)
        lq = log_feature_tile(xq, nq, w, s_wf, s_wd, b, s_bf, f0, F, D,
                BF, BD, DOT_DTYPE, EMULATE, PREC, SPLIT)
        # Running per-query max (finite: every tile holds a real feature, padded rows read x = 0);
        # the query's constant cancels between num and den.
        mq_new = tl.maximum(mq, tl.max(lq, axis=1))
        aq = tl.exp(mq - mq_new)
        p = tl.exp(lq - mq_new[:, None])
        mq = mq_new
        S = load_tile(hc, s_hf, s_hv, f0, F, DV, BF, BV)
        zf = tl.load(zc + f * s_zf, mask=f < F, other=0.0)
        num = num * aq[:, None] + mma(p, S, DOT_DTYPE, EMULATE, PREC)
        den = den * aq + tl.sum(p * zf[None, :], axis=1)
        if CAUSAL:
            lk = log_feature_tile(xk, nk, w, s_wf, s_wd, b, s_bf, f0, F, D,
                BF, BD, DOT_DTYPE, EMULATE, PREC, SPLIT)
            rk_new = tl.maximum(rk, tl.max(lk, axis=1))  # key s's own max r_s, running
            ak = tl.exp(rk - rk_new)
            kt = tl.exp(lk - rk_new[:, None])
            rk = rk_new
            A = A * (aq[:, None] * ak[None, :]) + mma(p, tl.trans(kt), DOT_DTYPE, EMULATE, PREC)
    if CAUSAL:
        t = tl.arange(0, BT)
        past = t[None, :] <= t[:, None]  # [query t, key s]: s <= t
        e = tl.load(e_ptr + n * s_en + c * s_ec)  # max over keys before this chunk; -inf for the first
        mk = tl.maximum(e, tl.max(tl.where(past, rk[None, :], NEG_INF), axis=1))  # prefix max
        decay = tl.exp(e - mk)  # the state's constant -> the query's; 0 for the first chunk
        Ad = tl.where(past, A * tl.exp(rk[None, :] - mk[:, None]), 0.0)
        vt = load_tile(v_ptr + n * s_vn, s_vl, s_vd, t0, L, DV, BT, BV)
        num = num * decay[:, None] + mma(Ad, vt, DOT_DTYPE, EMULATE, PREC)
        den = den * decay + tl.sum(Ad, axis=1)
    out = num / den[:, None]
    rows = t0 + tl.arange(0, BT)
    vcol = tl.arange(0, BV)
    tl.store(
        o_ptr + n * s_on + rows[:, None] * s_ol + vcol[None, :] * s_ov,
        cast_out(out, o_ptr.dtype.element_ty, EMULATE), mask=(rows[:, None] < L) & (vcol[None, :] < DV),
    )


# ----------------------------------------------------------------------------- host side
def _param_args(form: ExpForm, lead: torch.Size, device) -> tuple[list, bool]:
    W, s_wn = flatten_param(form.W.to(device=device, dtype=torch.float32), lead, 2)
    b, s_bn = flatten_param(form.bias.to(device=device, dtype=torch.float32), lead, 1)
    P = None if form.P is None else form.P.to(device=device, dtype=torch.float32)
    P, s_pn = flatten_param(P, lead, 2)
    Pt = P if P is not None else W  # a valid pointer, never read without HAS_P
    args = [W, s_wn, W.stride(-2), W.stride(-1), b, s_bn, b.stride(-1)]
    args += [Pt, s_pn, Pt.stride(-2), Pt.stride(-1)]
    return args, P is not None


def _default_splits(N: int, n_ftiles: int, L: int, block: int, device: torch.device) -> int:
    """Key splits of the non-causal reduction: enough programs to fill the GPU (~4 per SM)."""
    target = 4
    if device.type == "cuda":
        target *= torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(L, block), triton.cdiv(target, N * n_ftiles)))


def fused_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    form: ExpForm,
    causal: bool = False,
    *,
    block_t: int = 64,
    block_f: int | None = None,
    splits: int | None = None,
    precision: str | None = None,
    num_warps: int = 8,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Random-feature attention with fused positive features; ``[..., Lq, dv]`` in v's dtype.

    q ``[..., Lq, d]``, k ``[..., Lk, d]``, v ``[..., Lk, dv]`` (same dtype: fp32, bf16 or fp16),
    leading dims broadcast with each other and with ``form``'s. Causal needs Lq == Lk and uses
    chunks of ``block_t`` tokens. ``splits`` (non-causal): how many programs share the keys
    of one (batch, head) and feature tile; default fills the GPU. Accumulation is float32.
    ``block_f``, ``num_warps``, ``num_stages``: tuning knobs (not tuned on a GPU yet).
    """
    refuse_signed(form)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], form.lead_shape())
    qf, kf, vf = flatten(q, lead), flatten(k, lead), flatten(v, lead)
    N, Lq, d = qf.shape
    Lk, dv = kf.shape[1], vf.shape[2]
    F = form.feature_dim
    dev = q.device
    blocks = param_blocks(d, F, block_f)
    BF, BV = blocks["BF"], next_pow2(dv)
    n_ftiles = triton.cdiv(F, BF)
    dots = dot_config(q.dtype, precision, device=q.device)
    pargs, has_p = _param_args(form, lead, dev)
    consts = {"HAS_P": has_p, **blocks, "BV": BV, **dots}
    coef = float(form.coef)
    out = torch.empty(N, Lq, dv, dtype=v.dtype, device=dev)
    opts = launch_options(num_warps, num_stages)

    if causal:
        if Lq != Lk:
            raise ValueError(f"causal attention needs Lq == Lk, got {Lq} and {Lk}")
        chunk = block_t
        NC = triton.cdiv(Lk, chunk)
        # The chunk states are read by tensor-core products in the input dtype anyway (they are
        # rounded to it there); storing them so halves the largest buffer. The scan sums in fp32.
        h = torch.empty(N, NC, F, dv, dtype=q.dtype, device=dev)
    else:
        ns = splits or _default_splits(N, n_ftiles, Lk, block_t, dev)
        chunk = triton.cdiv(triton.cdiv(Lk, ns), block_t) * block_t
        NC = triton.cdiv(Lk, chunk)
        h = torch.empty(N, NC, F, dv, dtype=torch.float32, device=dev)
    z = torch.empty(N, NC, F, dtype=torch.float32, device=dev)
    g = torch.empty(N, NC, F, dtype=torch.float32, device=dev)
    _kv_state_kernel[(N, NC, n_ftiles)](
        kf, *kf.stride(), vf, *vf.stride(), *pargs,
        h, *h.stride(), z, *z.stride(), g, *g.stride(),
        Lk, F, d, dv, coef, chunk,
        BL=block_t, **consts, **opts,
    )
    if causal:
        e = torch.cummax(g.amax(dim=-1), dim=-1).values.contiguous()  # [N, NC]: max up to chunk c
        BVs = min(BV, 32)  # more programs for the sequential scan
        _scan_kernel[(N, n_ftiles, triton.cdiv(dv, BVs))](
            h, *h.stride(), z, *z.stride(), g, *g.stride(), e, *e.stride(),
            NC, F, dv, BF=BF, BV=BVs, EMULATE=dots["EMULATE"], **opts,
        )
        e_prev = torch.cat([e.new_full((N, 1), -math.inf), e[:, :-1]], dim=1).contiguous()
        state, zs, s_hc, s_zc = h, z, h.stride(1), z.stride(1)
    else:
        # One constant G for all keys and features (per batch-head): the exact key stabiliser.
        G = g.amax(dim=(1, 2), keepdim=True)
        scale = torch.exp(g - G)
        state = (h * scale.unsqueeze(-1)).sum(dim=1, keepdim=True)  # [N, 1, F, dv] = phi(K)^T V / e^G
        zs = (z * scale).sum(dim=1, keepdim=True)
        s_hc = s_zc = 0
        e_prev = g  # unused without CAUSAL
    _output_kernel[(N, triton.cdiv(Lq, block_t))](
        qf, *qf.stride(), kf, *kf.stride(), vf, *vf.stride(), *pargs,
        state, state.stride(0), s_hc, state.stride(2), state.stride(3),
        zs, zs.stride(0), s_zc, zs.stride(2),
        e_prev, e_prev.stride(0), e_prev.stride(1),
        out, *out.stride(),
        Lq, F, d, dv, coef,
        CAUSAL=causal, BT=block_t, **consts, **opts,
    )
    return out.reshape(*lead, Lq, dv)
