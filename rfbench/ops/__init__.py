"""Fused Triton kernels for exponential random features, each beside its plain-torch reference.

Layout (as fla's ``fla/ops/<family>/``): ``features/``, ``rf_attention/``, ``kernel_error/``, each
with ``naive.py`` (plain torch, float32: the reference the kernel is tested against, and the
fallback) and ``fused.py`` (Triton). ``form.py`` holds ``ExpForm``, the one thing every op takes
besides tensors (W ``[..., F, d]``, a per-feature bias, the norm coefficient, an optional norm
projection P, an optional query-side sign); ``common.py`` the shared Triton pieces.
``features/naive.py`` holds the one stabiliser (``stabiliser_constant``) and
``rf_attention/naive.py`` the linear-attention tail (``linear_attention``) that the Estimator
uses too.

Dispatch (``backend="auto"``): the Triton kernel runs when ``not_supported_reasons`` is empty
and the tensors are on CUDA; otherwise the torch path runs. ``backend="triton"`` insists (and
also runs on CPU tensors under TRITON_INTERPRET=1, which is how the tests run it);
``backend="torch"`` never uses Triton. RFBENCH_DISABLE_TRITON=1 turns the kernels off.

This package takes tensors and forms only: it never sees an Estimator (``Estimator.attention``
builds ``est.form(params, scale)`` and calls ``rf_attention`` itself). It imports only
``rfbench.errors`` and ``rfbench.ops.*``; importing it does not import Triton.
"""

from __future__ import annotations

import os

import torch

from rfbench.errors import UnsupportedError
from rfbench.ops.features.naive import log_features, naive_features, stabiliser_constant
from rfbench.ops.form import ExpForm
from rfbench.ops.kernel_error.naive import KernelErrorSums, naive_kernel_error
from rfbench.ops.rf_attention.naive import linear_attention, naive_rf_attention, torch_rf_attention
from rfbench.ops.utils import SUPPORTED_DTYPES, device_reasons, form_reasons, shape_reasons

__all__ = [
    "ExpForm",
    "KernelErrorSums",
    "SUPPORTED_DTYPES",
    "features",
    "kernel_error",
    "linear_attention",
    "log_features",
    "naive_features",
    "naive_kernel_error",
    "naive_rf_attention",
    "not_supported_reasons",
    "rf_attention",
    "stabiliser_constant",
    "torch_rf_attention",
]

BACKENDS = ("auto", "triton", "torch")


def not_supported_reasons(
    *tensors: torch.Tensor, d: int, dv: int | None = None, form: ExpForm | None = None
) -> list[str]:
    """Why the Triton kernels cannot serve these tensors (and ``form``, if given); empty when they can."""
    reasons = form_reasons(form)
    if os.environ.get("RFBENCH_DISABLE_TRITON", "0") == "1":
        reasons.append("disabled by RFBENCH_DISABLE_TRITON=1")
    reasons += device_reasons(*tensors) + shape_reasons(d, dv)
    if len({t.dtype for t in tensors}) > 1:
        dtypes = sorted(str(t.dtype) for t in tensors)
        reasons.append(f"inputs have different dtypes {dtypes}; cast them alike")
    return reasons


def _use_triton(backend: str, tensors, form: ExpForm, dv: int | None = None) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    reasons = not_supported_reasons(*tensors, d=form.dim, dv=dv, form=form)
    if backend == "triton":
        if reasons:
            raise UnsupportedError(reasons)
        return True
    return not reasons and tensors[0].is_cuda


def features(
    x: torch.Tensor,
    form: ExpForm,
    stabiliser: str = "row",
    *,
    is_query: bool = False,
    backend: str = "auto",
    **kw,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stabilised features ``[..., L, F]`` and their constants ``[..., L, 1]`` (see features.naive).

    ``is_query`` applies the form's sign (signed forms take the torch path)."""
    if _use_triton(backend, (x,), form):
        from rfbench.ops.features.fused import fused_features

        return fused_features(x, form, stabiliser, **kw)
    return naive_features(x, form, stabiliser, is_query=is_query)


def rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    form: ExpForm,
    causal: bool = False,
    *,
    backend: str = "auto",
    **kw,
) -> torch.Tensor:
    """Random-feature attention ``[..., Lq, dv]`` in v's dtype (fused kernel or the linear torch path)."""
    if _use_triton(backend, (q, k, v), form, v.shape[-1]):
        from rfbench.ops.rf_attention.fused import fused_rf_attention

        return fused_rf_attention(q, k, v, form, causal, **kw)
    return torch_rf_attention(q, k, v, form, causal).to(v.dtype)


def kernel_error(
    q: torch.Tensor,
    k: torch.Tensor,
    form: ExpForm,
    tq: torch.Tensor | None = None,
    tk: torch.Tensor | None = None,
    *,
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool = False,
    backend: str = "auto",
    tile: int = 1024,
    **kw,
) -> KernelErrorSums:
    """Kernel-error sums of ``form`` against exp(tq . tk) over all pairs (tq, tk default to q, k: the
    softmax kernel; pass the target's inputs, e.g. DARK's M q, M k), never holding an L x L matrix
    (torch path: key tiles of ``tile``). ``row_norms = (lse, lse^)``, each ``[..., Lq]``: each query
    row's log-normaliser of exp(tq . tk) and of the estimate; with them the attention-matrix error
    is summed too (over j <= i when ``causal``)."""
    tensors = [t for t in (q, k, tq, tk) if t is not None]
    if _use_triton(backend, tensors, form, (q if tq is None else tq).shape[-1]):
        from rfbench.ops.kernel_error.fused import fused_kernel_error

        return fused_kernel_error(q, k, form, tq, tk, row_norms=row_norms, causal=causal, **kw)
    return naive_kernel_error(q, k, form, tq, tk, tile=tile, row_norms=row_norms, causal=causal)
