"""Comparison helpers for the ops' tests and correctness gates (as fla's ``assert_close``).

Tolerances are relative RMS errors, ||ref - out||_rms / ||ref||_rms, per op and input dtype.
The reference is the float32 torch path fed the *same* (already rounded) inputs, so a
tolerance measures the kernel's own rounding: products with operands in the input dtype and
float32 accumulation, and the output's rounding to its dtype (values measured on the CPU
interpreter, which rounds like a GPU here, are in the comments; bounds are ~4x those).
"""

from __future__ import annotations

import torch

# Worst case measured over tests/ops/test_ops_rf_attention.py's grid (interpreter, which rounds
# half-precision operands like a tensor core), then a margin of 4-15x:
# fp32 6.4e-7 (summation order; "tf32x3" products on a GPU add ~1e-6); bf16 3.1e-3 (the
# operands of the phi x state products and the output rounded to 8 bits, 2^-9 relative each);
# fp16 3.4e-4 (11 bits).
ATTENTION_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
# Features on the true scale (tests/ops/test_ops_features.py's grid). log-features reach ~20, so
# float32 rounding of the logit alone is ~1e-6 relative on a feature: fp32 2.3e-6 measured
# (GPU "tf32x3" about doubles it); the split projection leaves bf16 1.6e-5, fp16 2.5e-6.
FEATURE_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-4, torch.float16: 2e-5}
# Kernel-error sums (float32 features, full-precision products in the interpreter and "ieee";
# TF32 on a GPU rounds both the estimate and the exact value by ~1e-3).
KERNEL_ERROR_TOL = {"ieee": 1e-4, "tf32": 2e-2}


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||ref - out|| / ||ref|| in float64."""
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm().clamp(min=1e-300))


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> float:
    """Fail unless ``out`` has no NaN/Inf where ``ref`` has none and rel_rms(ref, out) <= ratio."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert bool(torch.isfinite(out)[finite].all()), f"{name}: NaN/Inf where the reference is finite"
    err = rel_rms(ref, out)
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e}"
    return err
