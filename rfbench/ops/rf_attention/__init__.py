"""Random-feature attention with fused exponential features: ``naive`` (torch) and ``fused`` (Triton)."""

from rfbench.ops.rf_attention.naive import linear_attention, naive_rf_attention, torch_rf_attention

__all__ = ["linear_attention", "naive_rf_attention", "torch_rf_attention"]
