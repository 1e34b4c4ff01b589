"""Input validation shared by the public entry points (one declared place for it)."""

from __future__ import annotations

import math

import torch

from rfbench.errors import DataError, EstimatorError


def check_positive_int(value, what: str, *, hint: str = "", error: type = EstimatorError) -> int:
    """``value`` if it is a positive int (not a bool); ``error`` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise error(f"{what} must be a positive integer{hint}, got {_clip(value)}")
    return value


#: The largest m x d draw an estimator makes (elements): beyond it the allocation itself fails.
MAX_DRAW_ELEMENTS = 2**34
#: What ``torch.Generator.manual_seed`` accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)
#: Logit scales an estimator accepts: q . k * scale beyond 1e6 overflows exp for any real input.
MAX_SCALE = 1e6


def check_seed(value, what: str = "seed", *, error: type = EstimatorError) -> int:
    """``value`` if it is an int ``torch.Generator.manual_seed`` takes; ``error`` otherwise."""
    lo, hi = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise error(f"{what} must be an integer in [-2**63, 2**64 - 1], got {_clip(value)}")
    return value


def check_scale(value, what: str = "scale", *, error: type = EstimatorError) -> float:
    """``value`` as a float if it is a finite logit scale in (0, MAX_SCALE]; ``error`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value) and 0 < value <= MAX_SCALE
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise error(
            f"{what} must be a finite number in (0, {MAX_SCALE:g}] (the logit scale, e.g. 1/sqrt(d)), "
            f"got {_clip(value)}"
        )
    return float(value)


def check_sizes(dim, num_features) -> None:
    """dim and num_features positive ints whose m x d draw can be allocated."""
    check_positive_int(dim, "dim")
    check_positive_int(num_features, "num_features")
    if dim * num_features > MAX_DRAW_ELEMENTS:
        raise EstimatorError(
            f"num_features x dim = {num_features} x {dim} exceeds {MAX_DRAW_ELEMENTS:.3g} elements; "
            "lower num_features"
        )


def _clip(value) -> str:
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_tensor(
    x, name: str, *, dim: int | None = None, min_ndim: int = 2, finite: bool = True
) -> torch.Tensor:
    """Check that ``x`` is a floating tensor ``[..., L, dim]``, finite unless ``finite=False``
    (shapes only: for a timed loop whose inputs were checked once); return it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DataError(f"{name} must have a floating dtype, got {x.dtype}; convert with .float()")
    if x.ndim < min_ndim:
        raise DataError(
            f"{name} must have shape [..., L, d] (at least {min_ndim} dims), got {tuple(x.shape)}"
        )
    if dim is not None and x.shape[-1] != dim:
        raise DataError(
            f"{name} has last dimension {x.shape[-1]} but the estimator was built for dim={dim}; "
            f"build it with dim={x.shape[-1]} or project the input"
        )
    if x.shape[-2] == 0:
        raise DataError(f"{name} has no tokens (L=0), shape {tuple(x.shape)}")
    if finite and not is_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{name} contains {bad} NaN/Inf value(s); clean the input before estimating")
    return x


def is_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN or +-Inf: one read-only pass (aminmax propagates NaN, and an
    infinity is the min or the max), where ``isfinite(x).all()`` writes a bool tensor of x's size."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(torch.stack([lo, hi])).all())


def check_qkv(q, k, v=None, *, dim: int | None = None, finite: bool = True) -> None:
    """Check q ``[..., Lq, d]``, k ``[..., Lk, d]`` and optionally v ``[..., Lk, dv]`` (finite unless
    ``finite=False``)."""
    check_tensor(q, "q", dim=dim, finite=finite)
    check_tensor(k, "k", dim=dim if dim is not None else q.shape[-1], finite=finite)
    if q.shape[-1] != k.shape[-1]:
        raise DataError(f"q and k must share d, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    except RuntimeError:
        raise DataError(
            f"q and k leading (batch/head) dims do not broadcast: {tuple(q.shape)} vs {tuple(k.shape)}"
        ) from None
    if v is not None:
        check_tensor(v, "v", finite=finite)
        if v.shape[-2] != k.shape[-2]:
            raise DataError(
                f"v must have one row per key: k has L={k.shape[-2]}, v has {v.shape[-2]} "
                f"(shapes {tuple(k.shape)} and {tuple(v.shape)})"
            )
        try:
            torch.broadcast_shapes(k.shape[:-2], v.shape[:-2])
        except RuntimeError:
            raise DataError(
                f"k and v leading dims do not broadcast: {tuple(k.shape)} vs {tuple(v.shape)}"
            ) from None
