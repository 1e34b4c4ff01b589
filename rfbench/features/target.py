"""Target kernels: what an estimator's phi(q) . phi(k) estimates, declared by its feature map.

Every map says ``target_kernel(params) -> TargetKernel``: the softmax maps ``SOFTMAX``
(exp(q . k)), DARK the data-aligned exp((Mq) . (Mk)), a ReLU map the arc-cosine kernel. Metrics
measure each estimator against its declared target; ``log_kernel`` is None when the target has
no closed form (e.g. a trained FastFood-L's learned kernel).

``Trained`` records what training changed; it lives on the Estimator (``est.trained_``), never
on a component, and is defined here (re-exported as ``rfbench.estimator.Trained``) so that the
trainer can build one without importing the estimator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

LogKernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TargetKernel:
    """A kernel k(q, k) by name, with ``log_kernel(q, k)``: scaled q ``[..., tq, d]``, k ``[..., tk, d]``
    -> log k(q, k) ``[..., tq, tk]`` (any float dtype; float64 works), or None without a closed form.

    ``transform``: M ``[..., d, d]`` when the kernel is exp((Mq) . (Mk)) (so tiled or fused code
    may feed q M^T and k M^T to an exp(q . k) routine); None otherwise (also for the softmax
    kernel itself, M = I: see ``exponential_inputs``)."""

    name: str
    log_kernel: LogKernel | None = field(compare=False)
    transform: torch.Tensor | None = field(default=None, compare=False)

    @property
    def is_softmax(self) -> bool:
        return self.name == "softmax"

    def exponential_inputs(self, q: torch.Tensor, k: torch.Tensor):
        """``(q', k')`` with k(q, k) = exp(q' . k'): (q, k) for the softmax kernel, (Mq, Mk) for a
        transformed one; None when the kernel is not of that form (arc-cosine, no closed form).
        q ``[..., tq, d]``, k ``[..., tk, d]``; returns tensors of the same shapes, or None."""
        if self.is_softmax:
            return q, k
        if self.transform is None:
            return None
        Mt = self.transform.to(device=q.device, dtype=q.dtype).transpose(-1, -2)
        return q @ Mt, k @ Mt


def _softmax_log_kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-1, -2)


#: exp(q . k): the target of every softmax-kernel estimator.
SOFTMAX = TargetKernel("softmax", _softmax_log_kernel)


def transformed_softmax(name: str, M: torch.Tensor) -> TargetKernel:
    """exp((Mq) . (Mk)) = exp(q^T M^T M k) for M ``[..., d, d]`` (DARK's data-aligned kernel)."""

    def log_kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        Mt = M.to(device=q.device, dtype=q.dtype).transpose(-1, -2)
        return (q @ Mt) @ (k @ Mt).transpose(-1, -2)

    return TargetKernel(name, log_kernel, M)


@dataclass(frozen=True)
class Trained:
    """What training changed: ``parts`` (e.g. ("weights",) or ("features",)) and the kernel the
    trained estimator now estimates (``TargetKernel(label, None)`` when it has no closed form)."""

    parts: tuple[str, ...]
    target: TargetKernel
