"""pytest-benchmark harness for rfbench's attention and kernel-error paths.

Default test runs call each benchmarked function once (a smoke test of the path and its
correctness gate); timing happens with ``--benchmark-only`` (see README, "Benchmarks"):

    python -m pytest tests/bench/test_bench_ops.py --benchmark-only -p no:xdist \
        --benchmark-storage=file://.benchmarks/$GPU --benchmark-autosave

Every benchmark first checks its output against the reference of the same path (no speed
number without a green check). GPU benchmarks (marker gpu) time with CUDA synchronisation and
also record ``triton.testing.do_bench``'s kernel-only median in ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

import rfbench as rb
from rfbench import ops
from rfbench.ops.testing import ATTENTION_TOL, assert_close

# Default runs call each function once, untimed: "fixture was not used" is expected then.
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
D, M = 64, 64


def _qkv(L, dtype=torch.float32, device="cpu", heads=(1, 1)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*heads, L, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


# ----------------------------------------------------------------------------- CPU (torch paths)
@pytest.mark.benchmark(group="cpu-attention")
@pytest.mark.parametrize("L", [512, 2048])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("impl", ["estimator", "quadratic"])
def test_bench_cpu_attention(run_bench, impl, causal, L):
    """Estimator.attention and the quadratic reference it is checked against (the CI ratio check)."""
    est = rb.make_estimator("posrf-iid", dim=D, num_features=M)
    q, k, v = _qkv(L)
    form = est.form({}, D**-0.5)
    if impl == "estimator":
        fn = lambda: est.attention(q, k, v, causal)  # noqa: E731
        assert_close(impl, ops.naive_rf_attention(q, k, v, form, causal), fn(), ATTENTION_TOL[torch.float32])
    else:  # the reference itself (tested against Estimator.attention in float64: tests/ops/test_ops_form.py)
        fn = lambda: ops.naive_rf_attention(q, k, v, form, causal)  # noqa: E731
    run_bench(fn, L=L, m=M, d=D, causal=causal)


@pytest.mark.benchmark(group="cpu-kernel-error")
@pytest.mark.parametrize("impl", ["tiled", "dense"])
def test_bench_cpu_kernel_error(run_bench, impl):
    form = rb.make_estimator("posrf-iid", dim=D, num_features=M).form({})
    q, k, _ = _qkv(1024)
    q, k = q * D**-0.25, k * D**-0.25
    fn = {
        "tiled": lambda: ops.kernel_error(q, k, form, backend="torch", tile=256),
        "dense": lambda: ops.naive_kernel_error(q, k, form),
    }[impl]
    torch.testing.assert_close(fn().sse, ops.naive_kernel_error(q, k, form).sse, rtol=1e-4, atol=0)
    run_bench(fn, L=1024, m=M, d=D)


# ----------------------------------------------------------------------------- GPU (Triton vs torch)
GPU_LENGTHS = [4096, 16384, 65536]


@pytest.mark.gpu
@pytest.mark.benchmark(group="gpu-attention")
@pytest.mark.parametrize("L", GPU_LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bench_gpu_attention(run_bench, impl, dtype, causal, L):
    est = rb.make_estimator("posrf-orf", dim=D, num_features=256)
    form = est.form({}, D**-0.5).to(device="cuda")
    # The correctness gate at a shorter length of the same path (the torch reference is O(L m d) too,
    # but its float32 features at L = 65536 x 8 heads take 0.5 GiB).
    qs, ks, vs = _qkv(4099, dtype, "cuda", heads=(1, 8))
    gate = ops.rf_attention(qs, ks, vs, form, causal, backend=impl)
    assert_close("gate", ops.torch_rf_attention(qs, ks, vs, form, causal), gate.float(), ATTENTION_TOL[dtype])
    q, k, v = _qkv(L, dtype, "cuda", heads=(1, 8))
    run_bench(lambda: ops.rf_attention(q, k, v, form, causal, backend=impl), gpu=True,
              L=L, m=256, d=D, heads=8, dtype=str(dtype), causal=causal)


@pytest.mark.gpu
@pytest.mark.benchmark(group="gpu-kernel-error")
@pytest.mark.parametrize("L", [8192, 65536])
def test_bench_gpu_kernel_error(run_bench, L):
    form = rb.make_estimator("posrf-orf", dim=D, num_features=256).form({}).to(device="cuda")
    qs, ks, _ = _qkv(2049, torch.float32, "cuda", heads=(1, 8))
    qs, ks = qs * D**-0.25, ks * D**-0.25
    gate = ops.kernel_error(qs, ks, form, backend="triton")
    ref = ops.kernel_error(qs, ks, form, backend="torch").sse
    torch.testing.assert_close(gate.sse, ref, rtol=2e-2, atol=0)
    q, k, _ = _qkv(L, torch.float32, "cuda", heads=(1, 8))
    q, k = q * D**-0.25, k * D**-0.25
    run_bench(lambda: ops.kernel_error(q, k, form, backend="triton"), gpu=True, L=L, m=256, d=D, heads=8)
