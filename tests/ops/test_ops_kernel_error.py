"""Kernel error over all query-key pairs (rfbench/ops/kernel_error): the tiled torch path and the
fused Triton kernel against the dense reference, which itself is checked against the Estimator's
own ``kernel()`` and rfbench.exact.

Runs the Triton kernel in its interpreter on CPU tensors, and on CUDA when there is one.
"""

from __future__ import annotations

import pytest
import torch

import rfbench as rb
from rfbench import ops
from rfbench.ops.kernel_error.naive import naive_kernel_error
from rfbench.ops.testing import KERNEL_ERROR_TOL

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


def _x(*shape, seed=0, scale=0.35):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol):
    for name in ("sse", "sum_exact2", "sum_rel2"):
        x, y = getattr(a, name).double().cpu(), getattr(b, name).double().cpu()
        torch.testing.assert_close(x, y, rtol=tol, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert a.count == b.count


def test_dense_reference_matches_estimator_kernel_and_exact():
    """The oracle itself: sums of (exact.kernel - est.kernel)^2 over the full matrices, in float64."""
    est = rb.make_estimator("posrf-orf", dim=8, num_features=16, seed=2, dtype=F64)
    q, k = _x(2, 13, 8, seed=1).double(), _x(2, 17, 8, seed=2).double()
    exact, approx = rb.exact.kernel(q, k), est.kernel(q, k)
    sums = naive_kernel_error(q, k, est.form({}), dtype=F64)
    torch.testing.assert_close(sums.sse, ((exact - approx) ** 2).sum(dim=(-2, -1)))
    torch.testing.assert_close(sums.sum_exact2, (exact**2).sum(dim=(-2, -1)))
    torch.testing.assert_close(sums.sum_rel2, (((exact - approx) / exact) ** 2).sum(dim=(-2, -1)))
    assert sums.count == 13 * 17
    torch.testing.assert_close(sums.mse, sums.sse / (13 * 17))


@pytest.mark.parametrize("tile", [1, 5, 64])
def test_tiled_torch_path_equals_dense(tile):
    form = rb.make_estimator("hyprf-iid", dim=16, num_features=24, seed=1).form({})
    q, k = _x(3, 21, 16, seed=3), _x(3, 29, 16, seed=4)
    _close(naive_kernel_error(q, k, form, tile=tile), naive_kernel_error(q, k, form), 1e-5)


def test_target_inputs_for_the_dark_kernel():
    """DARK estimates exp((Mq) . (Mk)): given those inputs, the error is taken against that target."""
    A = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    M = torch.eye(8, dtype=F64) + 0.3 * A
    est = rb.make_estimator("dark-iid", dim=8, num_features=32, seed=0, dtype=F64, feature_params={"M": M})
    q, k = _x(12, 8, seed=5).double(), _x(15, 8, seed=6).double()
    tq, tk = est.target_kernel.exponential_inputs(q, k)
    torch.testing.assert_close(tq, q @ M.T)
    sums = ops.kernel_error(q, k, est.form({}), tq, tk)
    target = torch.exp((q @ M.T) @ (k @ M.T).T)
    torch.testing.assert_close(est.target_kernel.log_kernel(q, k).exp(), target)
    torch.testing.assert_close(sums.sse, ((target - est.kernel(q, k)) ** 2).sum())


def test_signed_forms_on_the_torch_path():
    """A sparse grid's negative row weights: signed estimates, against the dense kernel."""
    est = rb.make_estimator("posrf-sgq", dim=4, num_features=16, seed=0, dtype=F64)
    form = est.form({})
    q, k = _x(9, 4, seed=1).double(), _x(7, 4, seed=2).double()
    assert form.signed  # this grid (d = 4, m = 16) has negative weights
    sums = naive_kernel_error(q, k, form, dtype=F64)
    exact, approx = rb.exact.kernel(q, k), est.kernel(q, k)
    torch.testing.assert_close(sums.sse, ((exact - approx) ** 2).sum())
    torch.testing.assert_close(sums.sum_rel2, (((exact - approx) / exact) ** 2).sum())


@pytest.mark.triton
@pytest.mark.parametrize(
    "name,d,m,Lq,Lk,lead",
    [
        ("posrf-iid", 16, 16, 37, 70, (2,)),
        ("hyprf-orf", 32, 40, 65, 33, (1, 2)),
        ("gerf-iid", 64, 100, 20, 45, (1,)),
        ("dark-iid", 128, 24, 17, 19, (1,)),
    ],
)
def test_fused_kernel_error_matches_dense(name, d, m, Lq, Lk, lead):
    pytest.importorskip("triton")
    from rfbench.ops.kernel_error.fused import fused_kernel_error

    fparams = {"M": torch.eye(d) * 0.9} if name.startswith("dark") else {}
    est = rb.make_estimator(name, dim=d, num_features=m, seed=4, feature_params=fparams)
    form = est.form({}, d**-0.5).to(device=DEV)
    q, k = _x(*lead, Lq, d, seed=7, scale=1.0).to(DEV), _x(*lead, Lk, d, seed=8, scale=1.0).to(DEV)
    tq, tk = q * d**-0.25, k * d**-0.25  # the target of the scaled map: exp(q . k / sqrt(d))
    out = fused_kernel_error(q, k, form, tq, tk, block_q=32, block_k=16, precision="ieee")
    _close(out, naive_kernel_error(q, k, form, tq, tk), KERNEL_ERROR_TOL["ieee"])


@pytest.mark.triton
def test_fused_kernel_error_groups_and_per_head_params():
    """A tiny feature-memory budget forces one (batch, head) per group; OPRF's A* differs per head."""
    pytest.importorskip("triton")
    from rfbench.ops.kernel_error.fused import fused_kernel_error

    est = rb.make_estimator("oprf-iid", dim=16, num_features=20, seed=1)
    q, k = _x(2, 2, 19, 16, seed=9), _x(2, 2, 23, 16, seed=10)
    form = est.form(est.feature_map.fit_params(q, k)).to(device=DEV)
    q, k = q.to(DEV), k.to(DEV)
    ref = naive_kernel_error(q, k, form)
    tiny = fused_kernel_error(q, k, form, max_feature_bytes=1, precision="ieee")
    _close(tiny, ref, KERNEL_ERROR_TOL["ieee"])
    _close(ops.kernel_error(q, k, form, backend="triton", precision="ieee"), ref, KERNEL_ERROR_TOL["ieee"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fused_kernel_error_gpu_size(precision):
    from rfbench.ops.kernel_error.fused import fused_kernel_error

    est = rb.make_estimator("posrf-orf", dim=64, num_features=256, seed=0)
    form = est.form({}, 64**-0.5).to(device="cuda")
    q, k = _x(1, 8, 2049, 64, seed=1, scale=1.0).cuda(), _x(1, 8, 2051, 64, seed=2, scale=1.0).cuda()
    tq, tk = q * 64**-0.25, k * 64**-0.25
    out = fused_kernel_error(q, k, form, tq, tk, precision=precision)
    _close(out, naive_kernel_error(q, k, form, tq, tk, tile=512), KERNEL_ERROR_TOL[precision])


def _row_norms(exact, approx, causal):
    """Each row's log-normalisers over its visible keys: of the exact kernel and of the estimate."""
    if causal:
        keep = torch.ones(exact.shape[-2:], dtype=torch.bool).tril()
        exact, approx = exact * keep, approx * keep
    return exact.sum(-1).log(), approx.sum(-1).log()


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matrix_error_on_the_torch_path(causal):
    """Given each row's normalisers, the attention-matrix error over the visible pairs, against the
    row-normalised dense matrices (float64); tiling does not change it."""
    est = rb.make_estimator("hyprf-iid", dim=8, num_features=12, seed=3, dtype=F64)
    q, k = _x(2, 15, 8, seed=11).double(), _x(2, 15, 8, seed=12).double()
    exact, approx = rb.exact.kernel(q, k), est.kernel(q, k)
    norms = _row_norms(exact, approx, causal)
    keep = torch.ones(15, 15, dtype=torch.bool).tril() if causal else torch.ones(15, 15, dtype=torch.bool)
    A, Ah = exact / norms[0].exp().unsqueeze(-1), approx / norms[1].exp().unsqueeze(-1)
    want = (((Ah - A) * keep) ** 2).sum(dim=(-2, -1))
    for tile in (None, 4):
        sums = naive_kernel_error(q, k, est.form({}), dtype=F64, tile=tile, row_norms=norms, causal=causal)
        torch.testing.assert_close(sums.attn_sse, want)
        assert sums.attn_count == int(keep.sum())
        torch.testing.assert_close(sums.sse, ((exact - approx) ** 2).sum(dim=(-2, -1)))  # all pairs still
    assert naive_kernel_error(q, k, est.form({}), dtype=F64).attn_sse is None
    with pytest.raises(rb.DataError, match="causal needs as many queries as keys"):
        naive_kernel_error(q, k[:, :9], est.form({}), row_norms=norms, causal=True)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_matrix_error_matches_torch(causal):
    pytest.importorskip("triton")
    from rfbench.ops.kernel_error.fused import fused_kernel_error

    est = rb.make_estimator("posrf-iid", dim=16, num_features=24, seed=5)
    q, k = _x(2, 37, 16, seed=13, scale=0.5), _x(2, 37, 16, seed=14, scale=0.5)
    form = est.form({})
    norms = _row_norms(rb.exact.kernel(q.double(), k.double()), est.kernel(q, k).double(), causal)
    ref = naive_kernel_error(q, k, form, row_norms=norms, causal=causal)
    q, k, form = q.to(DEV), k.to(DEV), form.to(device=DEV)
    norms = tuple(x.to(DEV) for x in norms)
    out = fused_kernel_error(
        q, k, form, row_norms=norms, causal=causal, block_q=16, block_k=16, precision="ieee"
    )
    _close(out, ref, KERNEL_ERROR_TOL["ieee"])
    torch.testing.assert_close(out.attn_sse.cpu(), ref.attn_sse, rtol=KERNEL_ERROR_TOL["ieee"], atol=0)
    assert out.attn_count == ref.attn_count == (37 * 38 // 2 if causal else 37 * 37)
    one = fused_kernel_error(
        q, k, form, row_norms=norms, causal=causal, max_feature_bytes=1, precision="ieee"
    )
    torch.testing.assert_close(one.attn_sse.cpu(), ref.attn_sse, rtol=KERNEL_ERROR_TOL["ieee"], atol=0)
