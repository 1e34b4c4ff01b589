"""Fused random-feature attention (rfbench/ops/rf_attention/fused.py) against its torch reference.

Non-causal (split key reduction, one shared key constant) and causal (chunked, prefix-max key
constant) kernels with the feature maps fused in. The reference is ``naive_rf_attention``
(materialised features and the full L x L score matrix, float32) on the same rounded inputs;
tolerances are relative RMS per dtype (rfbench/ops/testing.py). Runs in Triton's interpreter on
CPU tensors, and on CUDA when there is one.
"""

from __future__ import annotations

import pytest
import torch

import rfbench as rb
from rfbench import ops
from rfbench.ops.rf_attention.naive import naive_rf_attention
from rfbench.ops.testing import ATTENTION_TOL, assert_close

pytest.importorskip("triton")
from rfbench.ops.rf_attention.fused import fused_rf_attention  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (estimator, feature params, lead, L, d, dv, m, block_t, splits, block_f): d in {16, 32, 64, 128},
# m from 16 to 512; L, F and dv not multiples of the blocks; splits > 1 exercises the merge of
# partial states; dv = 64 > 32 gives the causal scan two value tiles.
GRID = [
    ("posrf-iid", {}, (1, 2), 37, 16, 16, 16, 16, 2, None),
    ("hyprf-orf", {}, (2,), 70, 32, 24, 40, 32, None, None),
    ("gerf-iid", {"A": -0.05}, (1,), 50, 64, 64, 100, 32, 1, None),
    ("dark-iid", {"M": "spd"}, (1,), 33, 128, 32, 24, 16, 3, None),
    ("posrf-orf", {}, (1,), 20, 64, 16, 512, 16, None, 128),
]
# The interpreter's cost grows with d and F; the two largest cases run in half precision under -m slow.
HEAVY = {3, 4}


def _grid_params():
    out = []
    for case, g in enumerate(GRID):
        for dtype in DTYPES:
            marks = [pytest.mark.slow] if case in HEAVY and dtype != torch.float32 else []
            out.append(pytest.param(case, dtype, marks=marks, id=f"{g[0]}-d{g[4]}-m{g[6]}-L{g[3]}-{dtype}"))
    return out


def _make(name, fparams, d, m, seed=0):
    if fparams.get("M") == "spd":
        A = torch.randn(d, d, generator=torch.Generator().manual_seed(5))
        fparams = {"M": torch.eye(d) + 0.2 * A / d**0.5}
    return rb.make_estimator(name, dim=d, num_features=m, seed=seed, feature_params=fparams)


def _qkv(lead, Lq, Lk, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(*lead, Lq, d, generator=g), torch.randn(*lead, Lk, d, generator=g)
    v = torch.randn(*lead, Lk, dv, generator=g)
    return (t.to(device=DEV, dtype=dtype) for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case,dtype", _grid_params())
def test_attention_matches_reference(case, dtype, causal):
    name, fparams, lead, L, d, dv, m, block_t, splits, block_f = GRID[case]
    form = _make(name, fparams, d, m).form({}, d**-0.5).to(device=DEV)
    q, k, v = _qkv(lead, L, L, d, dv, dtype, seed=case)
    out = fused_rf_attention(q, k, v, form, causal, block_t=block_t, splits=splits, block_f=block_f)
    assert out.dtype == dtype and out.shape == (*lead, L, dv)
    ref = naive_rf_attention(q, k, v, form, causal)
    assert_close(f"attention causal={causal}", ref, out.float(), ATTENTION_TOL[dtype])


@pytest.mark.parametrize("splits", [1, 4])
def test_more_queries_than_keys_and_broadcast_heads(splits):
    """Non-causal Lq != Lk; k, v shared by every head (leading dims broadcast)."""
    form = _make("hyprf-iid", {}, 32, 24).form({}, 32**-0.5).to(device=DEV)
    q, _, _ = _qkv((2, 3), 45, 1, 32, 8, torch.float32, seed=1)
    _, k, v = _qkv((1, 1), 1, 71, 32, 8, torch.float32, seed=2)
    out = fused_rf_attention(q, k, v, form, block_t=16, splits=splits)
    assert_close("Lq != Lk", naive_rf_attention(q, k, v, form), out, ATTENTION_TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_per_head_parameters_and_the_estimator(causal):
    """OPRF (A* per head) and DARK (M per head): the form the Estimator builds, on the kernels (as
    ``Estimator.attention`` runs them on CUDA), vs the Estimator's torch path."""
    for name in ("oprf-iid", "dark-iid"):
        est = _make(name, {}, 16, 20)
        q, k, v = _qkv((2, 2), 26, 26, 16, 16, torch.float32, seed=3)
        params = {}
        if causal:  # fitted beforehand: causal attention refuses fitting on the sequence itself
            est.fit(q.cpu(), k.cpu(), scale=16**-0.5)
        else:
            params = est.feature_map.fit_params(q.cpu() * 0.5, k.cpu() * 0.5)
        ref = est.attention(q.cpu(), k.cpu(), v.cpu(), causal)
        form = est.form(est.params_ if causal else params, 16**-0.5)
        assert form.W.ndim == 4  # per (batch, head)
        out = fused_rf_attention(q, k, v, form.to(device=DEV), causal, block_t=16)
        assert_close(f"{name} causal={causal}", ref, out.cpu(), 1e-5)
        dispatched = ops.rf_attention(q, k, v, form.to(device=DEV), causal, backend="triton")
        assert_close(f"{name} ops.rf_attention", ref, dispatched.cpu(), 1e-5)


@pytest.mark.parametrize("t", [9, 15, 16, 30])  # mid-chunk, chunk end, chunk start, last chunk
def test_causal_outputs_ignore_future_tokens(t):
    """Outputs 0..t are bit-identical when every token after t changes, including a key of huge norm."""
    form = _make("posrf-iid", {}, 16, 24).form({}, 0.25).to(device=DEV)
    q, k, v = _qkv((1,), 40, 40, 16, 16, torch.float32, seed=4)
    out = fused_rf_attention(q, k, v, form, causal=True, block_t=16)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(7)
    q2[..., t + 1:, :] = torch.randn(q2[..., t + 1:, :].shape, generator=g).to(DEV)
    k2[..., t + 1:, :] = torch.randn(k2[..., t + 1:, :].shape, generator=g).to(DEV)
    v2[..., t + 1:, :] = 1e3 * torch.randn(v2[..., t + 1:, :].shape, generator=g).to(DEV)
    k2[..., t + 1, :] *= 1e3  # log-features ~ 1e3 * |w| |k|: exp() overflows if it leaked anywhere
    out2 = fused_rf_attention(q2, k2, v2, form, causal=True, block_t=16)
    assert bool(torch.isfinite(out2[..., : t + 1, :]).all())
    assert torch.equal(out[..., : t + 1, :], out2[..., : t + 1, :])


def test_huge_past_key_stays_finite_and_exact():
    """A past key far above the others only moves the (prefix) constants; nothing overflows."""
    form = _make("hyprf-iid", {}, 16, 16).form({}, 0.25).to(device=DEV)
    q, k, v = _qkv((1,), 34, 34, 16, 16, torch.float32, seed=5)
    k[:, 3] *= 8.0
    for causal in (False, True):
        out = fused_rf_attention(q, k, v, form, causal, block_t=16, splits=2)
        ref = naive_rf_attention(q.double(), k.double(), v.double(), form, causal, dtype=torch.float64)
        assert_close(f"huge key causal={causal}", ref, out, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_matches_reference_gpu_size(causal, dtype):
    """The benchmark's shape family (d=64, m=256) at a length with many chunks and splits."""
    form = _make("posrf-orf", {}, 64, 256).form({}, 64**-0.5).to(device="cuda")
    q, k, v = _qkv((1, 8), 4099, 4099, 64, 64, dtype, seed=6)
    out = fused_rf_attention(q, k, v, form, causal)
    ref = ops.torch_rf_attention(q, k, v, form, causal)
    assert_close(f"gpu causal={causal}", ref, out.float(), ATTENTION_TOL[dtype])


@pytest.mark.gpu
def test_estimator_attention_dispatches_on_cuda(monkeypatch):
    est = rb.make_estimator("posrf-orf", dim=64, num_features=256, device="cuda")
    q, k, v = _qkv((1, 4), 1000, 1000, 64, 64, torch.bfloat16, seed=8)
    assert est.fused_reasons(q, k, v, est.form({}, 64**-0.5)) == []
    out = est.attention(q, k, v)
    monkeypatch.setenv("RFBENCH_DISABLE_TRITON", "1")
    ref = est.attention(q, k, v)  # the torch path now
    assert_close("dispatch", ref.float(), out.float(), ATTENTION_TOL[torch.bfloat16])


def test_every_buffer_is_written_before_it_is_read(monkeypatch):
    """As fla's conftest: torch.empty filled with NaN; a kernel reading an unwritten element shows it."""
    form = _make("hyprf-iid", {}, 16, 20).form({}, 0.25).to(device=DEV)
    q, k, v = _qkv((2,), 37, 37, 16, 24, torch.bfloat16, seed=6)
    refs = {c: fused_rf_attention(q, k, v, form, c, block_t=16, splits=3) for c in (False, True)}
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    for causal in (False, True):
        out = fused_rf_attention(q, k, v, form, causal, block_t=16, splits=3)
        assert torch.equal(out, refs[causal])
