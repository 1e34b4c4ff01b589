"""Host-side helpers shared by the ops: Triton availability, capabilities, leading-dim flattening.

Nothing here imports Triton at module import time, so ``import rfbench.ops`` stays cheap and works
where Triton is absent.
"""

from __future__ import annotations

import importlib.util
import os

import torch

#: Input dtypes the fused kernels serve (accumulation is always float32).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Largest head dim d and value dim dv one program holds in a tile.
MAX_DIM = 128


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Why Triton cannot run on these tensors here (empty when it can)."""
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed (pip install 'rfbench[triton]')")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors are on different devices: {sorted(map(str, devices))}")
    dev = next(iter(devices))
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreted()):
        reasons.append(f"tensors are on {dev}; the fused kernels need CUDA (or TRITON_INTERPRET=1 on CPU)")
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {t.dtype} is not one of {[str(d) for d in SUPPORTED_DTYPES]}")
            break
    return reasons


def shape_reasons(d: int, dv: int | None = None) -> list[str]:
    reasons = []
    if d > MAX_DIM:
        reasons.append(f"head dim d={d} > {MAX_DIM}: one tile of a program holds a whole row")
    if dv is not None and dv > MAX_DIM:
        reasons.append(f"value dim dv={dv} > {MAX_DIM}: one tile of a program holds a whole row")
    return reasons


def form_reasons(form) -> list[str]:
    """Why the fused kernels cannot serve this ExpForm (empty when they can)."""
    if form is not None and form.signed:
        return [
            "a signed form (negative quadrature row weights): the fused kernels serve positive "
            "features only; the torch path serves signed ones"
        ]
    return []


def refuse_signed(form) -> None:
    """Raise UnsupportedError (with the reason) when a fused kernel is handed a signed form."""
    reasons = form_reasons(form)
    if reasons:
        from rfbench.errors import UnsupportedError

        raise UnsupportedError(reasons)


def next_pow2(n: int, least: int = 16) -> int:
    """Block size covering n: a power of two, at least ``least`` (tl.dot needs >= 16)."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def flatten(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """``x [..., R, C]`` broadcast to ``[*lead, R, C]``, viewed as ``[N, R, C]`` (a copy only if needed)."""
    n = 1
    for s in lead:
        n *= s
    return x.expand(*lead, *x.shape[-2:]).reshape(n, *x.shape[-2:])


def flatten_param(
    t: torch.Tensor | None, lead: torch.Size, item_dims: int
) -> tuple[torch.Tensor | None, int]:
    """A parameter with ``item_dims`` trailing dims flattened over ``lead``: (tensor, stride over N).

    A parameter without leading dims is shared: stride 0, no copy.
    """
    if t is None:
        return None, 0
    if t.ndim == item_dims:
        return t.contiguous(), 0
    n = 1
    for s in lead:
        n *= s
    item = t.shape[t.ndim - item_dims:]
    flat = t.expand(*lead, *item).reshape(n, *item).contiguous()
    return flat, flat.stride(0)
