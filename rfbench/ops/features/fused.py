"""Triton kernel of the positive-family feature map fused with its stabiliser.

One program maps ``BL`` rows of x to all F features: pass 1 over the feature tiles finds the row
max of the log-features (when the stabiliser needs it), pass 2 writes exp(log phi - c). The
shared and prefix key constants need every row's max first: a max-only launch, a torch
reduction over L (``[N, L]`` floats), then a write launch.
"""

from __future__ import annotations

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
    norm_term,
    param_blocks,
)
from rfbench.ops.features.naive import STABILISERS
from rfbench.ops.form import ExpForm
from rfbench.ops.utils import flatten, flatten_param, refuse_signed

ROW_MAX, MAX_ONLY, GIVEN = 0, 1, 2


@triton.jit
def _features_kernel(
    x_ptr, s_xn, s_xl, s_xd,
    w_ptr, s_wn, s_wf, s_wd,
    b_ptr, s_bn, s_bf,
    p_ptr, s_pn, s_pi, s_pj,
    o_ptr, s_on, s_ol, s_of,
    c_ptr, s_cn, s_cl,
    L, F, D, coef,
    MODE: tl.constexpr, HAS_P: tl.constexpr,
    BL: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
    F32_PREC: tl.constexpr,
):
    n = tl.program_id(0)
    l0 = tl.program_id(1) * BL
    rows = l0 + tl.arange(0, BL)
    rmask = rows < L
    x = load_tile(x_ptr + n * s_xn, s_xl, s_xd, l0, L, D, BL, BD)
    nrm = norm_term(x, p_ptr + n * s_pn, s_pi, s_pj, D, coef, HAS_P, BD, F32_PREC)
    w = w_ptr + n * s_wn
    b = b_ptr + n * s_bn
    if MODE == 2:
        c = tl.load(c_ptr + n * s_cn + rows * s_cl, mask=rmask, other=0.0)
    else:
        c = tl.full([BL], NEG_INF, tl.float32)
        for f0 in range(0, F, BF):
            lf = log_feature_tile(x, nrm, w, s_wf, s_wd, b, s_bf, f0, F, D,
                BF, BD, DOT_DTYPE, EMULATE, PREC, SPLIT)
            c = tl.maximum(c, tl.max(lf, axis=1))
        tl.store(c_ptr + n * s_cn + rows * s_cl, c, mask=rmask)
    if MODE != 1:
        for f0 in range(0, F, BF):
            lf = log_feature_tile(x, nrm, w, s_wf, s_wd, b, s_bf, f0, F, D,
                BF, BD, DOT_DTYPE, EMULATE, PREC, SPLIT)
            f = f0 + tl.arange(0, BF)
            # exp(lf - c) <= 1 for the row max; the constant is returned so the caller can undo it.
            phi = tl.exp(lf - c[:, None])
            tl.store(
                o_ptr + n * s_on + rows[:, None] * s_ol + f[None, :] * s_of,
                cast_out(phi, o_ptr.dtype.element_ty, EMULATE), mask=rmask[:, None] & (f[None, :] < F),
            )


def _launch(x, form, lead, mode, phi, c, block_l, block_f, precision, opts):
    N, L, d = x.shape
    F = form.feature_dim
    W, s_wn = flatten_param(form.W.to(device=x.device, dtype=torch.float32), lead, 2)
    b, s_bn = flatten_param(form.bias.to(device=x.device, dtype=torch.float32), lead, 1)
    P = None if form.P is None else form.P.to(device=x.device, dtype=torch.float32)
    P, s_pn = flatten_param(P, lead, 2)
    Pt = P if P is not None else W  # any pointer; never read without HAS_P
    out = phi if phi is not None else c  # never written with MAX_ONLY
    blocks = param_blocks(d, F, block_f)
    grid = (N, triton.cdiv(L, block_l))
    _features_kernel[grid](
        x, *x.stride(),
        W, s_wn, W.stride(-2), W.stride(-1),
        b, s_bn, b.stride(-1),
        Pt, s_pn, Pt.stride(-2), Pt.stride(-1),
        out, *(out.stride() if out.ndim == 3 else (out.stride(0), out.stride(1), 0)),
        c, *c.stride(),
        L, F, d, float(form.coef),
        MODE=mode, HAS_P=P is not None, BL=block_l, **blocks,
        **dot_config(x.dtype, precision, device=x.device),
        **opts,
    )


def fused_features(
    x: torch.Tensor,
    form: ExpForm,
    stabiliser: str = "row",
    *,
    out_dtype: torch.dtype = torch.float32,
    block_l: int = 64,
    block_f: int | None = None,
    precision: str | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stabilised features ``[..., L, F]`` (``out_dtype``) and constants ``[..., L, 1]`` (float32).

    Same contract as ``naive_features``: phi * exp(c) are the features on the true scale.
    """
    refuse_signed(form)
    if stabiliser not in STABILISERS:
        raise ValueError(f"stabiliser must be one of {STABILISERS}, got {stabiliser!r}")
    lead = torch.broadcast_shapes(x.shape[:-2], form.lead_shape())
    xf = flatten(x, lead)
    N, L, _ = xf.shape
    F = form.feature_dim
    phi = torch.empty(N, L, F, dtype=out_dtype, device=x.device)
    c = torch.empty(N, L, dtype=torch.float32, device=x.device)
    args = (block_l, block_f, precision, launch_options(num_warps, num_stages))
    if stabiliser == "row":
        _launch(xf, form, lead, ROW_MAX, phi, c, *args)
    else:
        if stabiliser == "none":
            c.zero_()
        else:
            _launch(xf, form, lead, MAX_ONLY, None, c, *args)
            if stabiliser == "shared":
                c = c.amax(dim=-1, keepdim=True).expand(N, L).contiguous()
            else:
                c = torch.cummax(c, dim=-1).values.contiguous()
            c = c.masked_fill(c == float("-inf"), 0.0)  # all-zero features so far: 0, as stabiliser_constant
        _launch(xf, form, lead, GIVEN, phi, c, *args)
    return phi.reshape(*lead, L, F), c.reshape(*lead, L, 1)
