"""Fused Triton kernels for positive random features, each beside its plain-torch reference.

Layout (as fla's ``fla/ops/<family>/``): ``features/``, ``rf_attention/``, ``kernel_error/``, each
with ``naive.py`` (plain torch, float32: the reference the kernel is tested against, and the
fallback) and ``fused.py`` (Triton). ``params.py`` holds ``PositiveFeatures``, the parameters
every op takes (W ``[..., F, d]``, a per-feature bias, the norm coefficient, an optional norm
projection P), and the adapters that read them off an Estimator; ``common.py`` the shared
Triton pieces.

Dispatch (``backend="auto"``): the Triton kernel runs when ``not_supported_reasons`` is empty
and the tensors are on CUDA; otherwise the torch path runs. ``backend="triton"`` insists (and
also runs on CPU tensors under TRITON_INTERPRET=1, which is how the tests run it);
``backend="torch"`` never uses Triton. RFBENCH_DISABLE_TRITON=1 turns the kernels off.

``Estimator.attention`` calls ``estimator_attention`` for CUDA tensors when ``attention_reasons``
is empty; elsewhere it keeps its own torch path. Importing this package does not import Triton.
"""

from __future__ import annotations

import math
import os

import torch

from rfbench.errors import UnsupportedError
from rfbench.ops.features.naive import naive_features
from rfbench.ops.kernel_error.naive import KernelErrorSums, naive_kernel_error
from rfbench.ops.params import PositiveFeatures, from_estimator
from rfbench.ops.params import not_supported_reasons as params_reasons
from rfbench.ops.rf_attention.naive import naive_rf_attention, torch_rf_attention
from rfbench.ops.utils import SUPPORTED_DTYPES, device_reasons, shape_reasons

__all__ = [
    "KernelErrorSums",
    "PositiveFeatures",
    "SUPPORTED_DTYPES",
    "attention_reasons",
    "estimator_attention",
    "estimator_kernel_error",
    "features",
    "from_estimator",
    "kernel_error",
    "naive_features",
    "naive_kernel_error",
    "naive_rf_attention",
    "not_supported_reasons",
    "rf_attention",
    "torch_rf_attention",
]

BACKENDS = ("auto", "triton", "torch")


def not_supported_reasons(*tensors: torch.Tensor, d: int, dv: int | None = None) -> list[str]:
    """Why the Triton kernels cannot serve these tensors (empty when they can)."""
    reasons = []
    if os.environ.get("RFBENCH_DISABLE_TRITON", "0") == "1":
        reasons.append("disabled by RFBENCH_DISABLE_TRITON=1")
    reasons += device_reasons(*tensors) + shape_reasons(d, dv)
    if len({t.dtype for t in tensors}) > 1:
        dtypes = sorted(str(t.dtype) for t in tensors)
        reasons.append(f"inputs have different dtypes {dtypes}; cast them alike")
    return reasons


def _use_triton(backend: str, tensors, d: int, dv: int | None = None) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    reasons = not_supported_reasons(*tensors, d=d, dv=dv)
    if backend == "triton":
        if reasons:
            raise UnsupportedError(reasons)
        return True
    return not reasons and tensors[0].is_cuda


def features(
    x: torch.Tensor, fp: PositiveFeatures, stabiliser: str = "row", *, backend: str = "auto", **kw
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stabilised features ``[..., L, F]`` and their constants ``[..., L, 1]`` (see features.naive)."""
    if _use_triton(backend, (x,), fp.dim):
        from rfbench.ops.features.fused import fused_features

        return fused_features(x, fp, stabiliser, **kw)
    return naive_features(x, fp, stabiliser)


def rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fp: PositiveFeatures,
    causal: bool = False,
    *,
    backend: str = "auto",
    **kw,
) -> torch.Tensor:
    """Random-feature attention ``[..., Lq, dv]`` in v's dtype (fused kernel or the linear torch path)."""
    if _use_triton(backend, (q, k, v), fp.dim, v.shape[-1]):
        from rfbench.ops.rf_attention.fused import fused_rf_attention

        return fused_rf_attention(q, k, v, fp, causal, **kw)
    return torch_rf_attention(q, k, v, fp, causal).to(v.dtype)


def kernel_error(
    q: torch.Tensor,
    k: torch.Tensor,
    fp: PositiveFeatures,
    tq: torch.Tensor | None = None,
    tk: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    tile: int = 1024,
    **kw,
) -> KernelErrorSums:
    """Kernel-error sums over all pairs, never holding an L x L matrix (torch path: key tiles of ``tile``)."""
    tensors = [t for t in (q, k, tq, tk) if t is not None]
    if _use_triton(backend, tensors, fp.dim, (q if tq is None else tq).shape[-1]):
        from rfbench.ops.kernel_error.fused import fused_kernel_error

        return fused_kernel_error(q, k, fp, tq, tk, **kw)
    return naive_kernel_error(q, k, fp, tq, tk, tile=tile)


# ----------------------------------------------------------------------------- Estimator glue
def attention_reasons(
    est, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> list[str]:
    """Why ``est.attention(q, k, v)`` cannot run on the fused kernels (empty when it can)."""
    reasons = params_reasons(est)
    if est.device.type != "cuda" or q.device != est.device:
        reasons.append(f"estimator on {est.device} with inputs on {q.device}; the kernels run on CUDA")
    if est.compute_dtype != torch.float32:
        reasons.append(f"the estimator computes in {est.compute_dtype}; the kernels accumulate in float32")
    tensors = [q, k, v, est.draw_.W, *(est.params_ or {}).values()]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        reasons.append("gradients are needed: the fused kernels have no backward pass (the torch path has)")
    return reasons + not_supported_reasons(q, k, v, d=q.shape[-1], dv=v.shape[-1])


def estimator_attention(
    est,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """``est.attention`` on the fused kernels: same estimator, stabilisers and output dtype (v's)."""
    from rfbench.ops.rf_attention.fused import fused_rf_attention

    scale = 1.0 / math.sqrt(est.dim) if scale is None else float(scale)
    params = {}
    if est.feature_map.data_dependent:
        s = math.sqrt(scale)  # fit on the scaled inputs, exactly as the torch path does
        params = est._params(est._cast(q) * s, est._cast(k) * s, scale, causal=causal)
    return fused_rf_attention(q, k, v, from_estimator(est, params, scale), causal)


def estimator_kernel_error(
    est, q: torch.Tensor, k: torch.Tensor, *, backend: str = "auto", **kw
) -> KernelErrorSums:
    """Kernel-error sums of ``est`` against its target kernel (exp(q . k), or DARK's exp((Mq) . (Mk)))."""
    qc, kc = est._cast(q), est._cast(k)
    params = est._params(qc, kc, 1.0)
    fm = est.feature_map
    tq, tk = fm.target_transform(qc, params, True), fm.target_transform(kc, params, False)
    return kernel_error(qc, kc, from_estimator(est, params), tq, tk, backend=backend, **kw)
