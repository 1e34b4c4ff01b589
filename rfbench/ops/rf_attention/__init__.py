"""Random-feature attention with fused positive features: ``naive`` (torch) and ``fused`` (Triton)."""

from rfbench.ops.rf_attention.naive import naive_rf_attention, torch_rf_attention

__all__ = ["naive_rf_attention", "torch_rf_attention"]
