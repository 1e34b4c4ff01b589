"""Baselines: exact attention computed other ways, as cells of their own (one run, no seeds).

Each entry of ``BASELINES`` says what it is, which (dtype, device) it serves (``supports``
returns the reasons it cannot, empty when it can: the cell is then ``skipped`` with them) and
builds the forward the runner measures. A new baseline is one entry here.

This module imports torch only inside the forwards, so the suite parser can list the names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    make: Callable  # (q, k, v, scale, causal) -> a forward with no arguments returning [..., L, dv]
    devices: tuple[str, ...] | None = None  # None: any device
    dtypes: tuple[str, ...] | None = None  # None: any dtype

    def supports(self, dtype: str, device: str) -> list[str]:
        """Why this baseline cannot run in ``dtype`` on ``device`` (empty: it can)."""
        reasons = []
        if self.devices is not None and device not in self.devices:
            reasons.append(f"{self.description} runs on {' or '.join(d.upper() for d in self.devices)} only")
        if self.dtypes is not None and dtype not in self.dtypes:
            reasons.append(f"{self.description} needs {' or '.join(self.dtypes)}, not {dtype}")
        return reasons


def _exact(q, k, v, scale, causal):
    from rfbench import exact

    return lambda: exact.attention(q, k, v, causal, scale=scale)


def _sdpa(q, k, v, scale, causal):
    import torch.nn.functional as F

    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _flash(q, k, v, scale, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    return fn


def _taylor2(q, k, v, scale, causal):
    from rfbench.features.taylor import taylor2_size
    from rfbench.registry import make_estimator

    d = q.shape[-1]
    est = make_estimator("taylor2-iid", d, taylor2_size(d), device=q.device, dtype=q.dtype)
    return lambda: est.attention(q, k, v, causal, scale=scale, check=False)


def _uniform(q, k, v, scale, causal):
    return lambda: uniform_attention(v, causal)


def uniform_attention(v, causal: bool):
    """Attention with a constant kernel: each query gets the mean of the values it sees.

    v: [..., L, dv] -> [..., L, dv]. Counted in float32 for half inputs (counts past 256 are not
    exact in bfloat16).
    """
    import torch

    x = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    if not causal:
        out = x.mean(dim=-2, keepdim=True).expand_as(x)
    else:
        count = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=x.dtype).unsqueeze(-1)
        out = x.cumsum(dim=-2) / count
    return out.to(v.dtype)


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("exact", "exact attention (rfbench.exact, tiled)", _exact),
        Baseline("sdpa", "torch's scaled_dot_product_attention", _sdpa),
        Baseline("flash", "FlashAttention", _flash, devices=("cuda",), dtypes=HALF),
        # a constant kernel: the floor any estimator should beat
        Baseline("uniform", "uniform attention (the mean of the values seen)", _uniform),
        # deterministic and biased, with one size (1 + d + d(d+1)/2 features): a baseline, not a cell per m
        Baseline("taylor2", "Taylor-2 attention (Based's map, 1 + d + d(d+1)/2 features)", _taylor2),
    )
}


def names() -> tuple[str, ...]:
    return tuple(BASELINES)


def get(name: str) -> Baseline:
    try:
        return BASELINES[name]
    except KeyError:
        from rfbench.errors import SpecError

        raise SpecError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}") from None
