"""Kernel error over all query-key pairs without an L x L matrix: ``naive`` (torch) and ``fused`` (Triton)."""

from rfbench.ops.kernel_error.naive import KernelErrorSums, naive_kernel_error

__all__ = ["KernelErrorSums", "naive_kernel_error"]
