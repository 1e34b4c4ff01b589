"""Exponential feature map fused with its stabiliser: ``naive`` (torch) and ``fused`` (Triton)."""

from rfbench.ops.features.naive import STABILISERS, log_features, naive_features, stabiliser_constant

__all__ = ["STABILISERS", "log_features", "naive_features", "stabiliser_constant"]
