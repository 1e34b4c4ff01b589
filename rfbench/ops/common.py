"""Triton pieces shared by the fused kernels: tile loads, the feature-map tile, dot configuration.

Importing this module imports Triton; the ops import it lazily.

Precision: loads are upcast to float32; dot products take operands rounded to the input dtype
(bf16/fp16 tensor cores) and accumulate in float32. float32 inputs use float32-accurate
products ("tf32x3" on GPUs, see ``dot_config``) unless a caller asks otherwise. For half
inputs the projection W x is split (SPLIT): W = W_hi + W_lo, both halves in the input dtype,
two tensor-core products. x is exact in its own dtype, so only W's rounding could err, and
log-features are large (|W x| ~ 20 at d = 64): one rounding of W (2^-9 in bf16) would put
~2-4 % error on every feature (measured); the split leaves ~2^-17, at the cost of one more
product of the size of the projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rfbench.ops.utils import interpreted, next_pow2

NEG_INF = tl.constexpr(float("-inf"))  # a constexpr: jit code may read it

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
#: Set by compile_check (no GPU there) to the float32 precision a GPU would pick; None otherwise.
FORCE_F32_PRECISION: str | None = None


def dot_config(
    dtype: torch.dtype, precision: str | None = None, split: bool = True, device: torch.device | None = None
) -> dict:
    """Constexpr kwargs of ``mma`` / ``log_feature_tile`` for inputs of ``dtype``.

    float32 products default to "tf32x3" on GPUs with TF32 (three tensor-core passes, about
    float32-accurate; plain "ieee" products spill registers heavily at these tile sizes) and
    to "ieee" elsewhere; the interpreter always computes in float32.

    Triton's CPU interpreter multiplies bfloat16 tensors as their raw uint16 bits and casts
    float32 to bfloat16 by truncation, so there (EMULATE) operands are rounded to the input dtype
    to nearest even by ``rounded`` and multiplied in float32: the rounding of a tensor-core
    product on a GPU, with fp32 accumulation either way.
    """
    f32 = "ieee"
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        f32 = "tf32x3"
    f32 = FORCE_F32_PRECISION or f32
    if precision is None:
        precision = f32 if dtype == torch.float32 else "tf32"  # ignored for half operands
    elif dtype == torch.float32:
        f32 = precision
    return {
        "DOT_DTYPE": _TL_DTYPES[dtype], "EMULATE": interpreted(), "PREC": precision, "F32_PREC": f32,
        "SPLIT": split and dtype != torch.float32,
    }


def param_blocks(d: int, F: int, block_f: int | None) -> dict:
    """Block sizes of the feature dimension F and head dim d."""
    bf = block_f or min(64, next_pow2(F))
    return {"BF": bf, "BD": next_pow2(d)}


def launch_options(num_warps: int, num_stages: int | None) -> dict:
    """Launch kwargs; num_stages None keeps Triton's default (software pipelining of loops)."""
    opts = {"num_warps": num_warps}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    return opts


@triton.jit
def rounded(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """x rounded to DTYPE to nearest even, as float32."""
    if EMULATE and DTYPE == tl.bfloat16:
        # The interpreter's float32 -> bfloat16 cast truncates: round the bits here instead.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def cast_out(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """x as DTYPE for a store, rounded to nearest even (also in the interpreter)."""
    if EMULATE:
        return rounded(x, DTYPE, EMULATE).to(DTYPE)  # exact in DTYPE now: the truncating cast keeps it
    else:
        return x.to(DTYPE)


@triton.jit
def mma(a, b, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr):
    """a @ b with operands rounded to DOT_DTYPE and a float32 accumulator."""
    if EMULATE:
        return tl.dot(rounded(a, DOT_DTYPE, EMULATE), rounded(b, DOT_DTYPE, EMULATE), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PREC)


@triton.jit
def load_tile(ptr, stride_r, stride_c, r0, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """Rows r0..r0+BR and columns 0..BC of an ``[R, C]`` matrix; zeros outside, as stored."""
    r = r0 + tl.arange(0, BR)
    c = tl.arange(0, BC)
    mask = (r[:, None] < R) & (c[None, :] < C)
    return tl.load(ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def norm_term(
    x, p_ptr, stride_pi, stride_pj, D, coef, HAS_P: tl.constexpr, BD: tl.constexpr, F32_PREC: tl.constexpr
):
    """``[BR]`` coef * |P x|^2 of each row of x ``[BR, BD]`` (P = I without HAS_P), in float32."""
    xf = x.to(tl.float32)
    if HAS_P:
        i = tl.arange(0, BD)
        mask = (i[:, None] < D) & (i[None, :] < D)
        pt = tl.load(p_ptr + i[:, None] * stride_pj + i[None, :] * stride_pi, mask=mask, other=0.0)  # P^T
        xf = tl.dot(xf, pt, input_precision=F32_PREC)
    return coef * tl.sum(xf * xf, axis=1)


@triton.jit
def log_feature_tile(
    x, nrm, w_ptr, stride_wf, stride_wd, b_ptr, stride_bf, f0, F, D,
    BF: tl.constexpr, BD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """``[BR, BF]`` log-features f0..f0+BF of the rows of x: W x + bias + nrm; -inf past F."""
    f = f0 + tl.arange(0, BF)
    dd = tl.arange(0, BD)
    fmask = f < F
    wt = tl.load(
        w_ptr + f[None, :] * stride_wf + dd[:, None] * stride_wd,
        mask=fmask[None, :] & (dd[:, None] < D), other=0.0,
    )  # W^T tile [BD, BF]
    b = tl.load(b_ptr + f * stride_bf, mask=fmask, other=0.0)
    proj = mma(x, wt, DOT_DTYPE, EMULATE, PREC)
    if SPLIT:  # add x . (W - round(W)): the projection as exact as float32 (module docstring)
        proj += mma(x, wt - rounded(wt, DOT_DTYPE, EMULATE), DOT_DTYPE, EMULATE, PREC)
    lf = proj + b[None, :] + nrm[:, None]
    return tl.where(fmask[None, :], lf, NEG_INF)  # exp(-inf) = 0: padded features drop out of every sum
