"""Positive-family feature map fused with its stabiliser: ``naive`` (torch) and ``fused`` (Triton)."""

from rfbench.ops.features.naive import STABILISERS, naive_features, naive_log_features

__all__ = ["STABILISERS", "naive_features", "naive_log_features"]
