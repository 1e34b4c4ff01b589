"""Fused positive-family feature map (rfbench/ops/features/fused.py) against its torch reference.

Runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without
a GPU) and on CUDA when there is one. The reference is the float32 torch map fed the same
(already rounded) inputs; tolerances are relative RMS per dtype (rfbench/ops/testing.py).
Shapes are deliberately not multiples of the block sizes.
"""

from __future__ import annotations

import pytest
import torch

import rfbench as rb
from rfbench.ops.features.naive import naive_features
from rfbench.ops.testing import FEATURE_TOL, assert_close

pytest.importorskip("triton")
from rfbench.ops.features.fused import fused_features  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STABILISERS = ["row", "shared", "prefix", "none"]

# (estimator, feature params, d, m, L, block_f): d in {16, 32, 64, 128}, m from 16 to 512, F not a
# multiple of the feature tile, L not a multiple of the row block (64).
GRID = [
    ("posrf-iid", {}, 16, 16, 37, None),
    ("hyprf-orf", {}, 32, 100, 70, None),
    ("gerf-iid", {"A": -0.08}, 64, 48, 33, 32),
    ("dark-iid", {"M": "spd"}, 128, 24, 19, None),
    ("posrf-orf", {}, 64, 512, 20, 256),
]


def _make(name, fparams, d, m, seed=0):
    if fparams.get("M") == "spd":
        A = torch.randn(d, d, generator=torch.Generator().manual_seed(5))
        fparams = {"M": torch.eye(d) + 0.2 * A / d**0.5}
    return rb.make_estimator(name, dim=d, num_features=m, seed=seed, feature_params=fparams)


def _inputs(shape, dtype, seed=0, scale=1.0):
    x = scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.to(device=DEV, dtype=dtype)


def _grid_params():
    out = []
    for case, g in enumerate(GRID):
        for dtype in DTYPES:
            # m = 512 in half precision: the interpreter's slowest case, under -m slow.
            marks = [pytest.mark.slow] if g[3] == 512 and dtype != torch.float32 else []
            out.append(pytest.param(case, dtype, marks=marks, id=f"{g[0]}-d{g[2]}-m{g[3]}-L{g[4]}-{dtype}"))
    return out


@pytest.mark.parametrize("case,dtype", _grid_params())
def test_features_match_reference(case, dtype):
    name, fparams, d, m, L, block_f = GRID[case]
    form = _make(name, fparams, d, m).form({}, d**-0.5).to(device=DEV)
    x = _inputs((2, L, d), dtype, seed=case)
    # Every stabiliser on every dtype across the grid, one per (case, dtype): rotated.
    stabiliser = STABILISERS[(case + DTYPES.index(dtype)) % len(STABILISERS)]
    phi, c = fused_features(x, form, stabiliser, block_f=block_f)
    phi0, c0 = naive_features(x, form, stabiliser)
    assert phi.shape == (2, L, form.feature_dim) and c.shape == (2, L, 1)
    # The true scale is what the map means; the constants are checked on their own as well.
    assert_close(f"features/{stabiliser}", phi0 * torch.exp(c0), phi * torch.exp(c), FEATURE_TOL[dtype])
    torch.testing.assert_close(c, c0, rtol=0, atol=50 * FEATURE_TOL[dtype])
    assert float(phi.max()) <= 1.0 + 1e-6 or stabiliser == "none"


def test_all_stabilisers_and_half_precision_storage():
    form = _make("hyprf-iid", {}, 32, 20).form({}, 32**-0.5).to(device=DEV)
    x = _inputs((3, 45, 32), torch.float32, seed=9)
    for stabiliser in STABILISERS:
        phi, c = fused_features(x, form, stabiliser, out_dtype=torch.bfloat16, block_l=16)
        phi0, c0 = naive_features(x, form, stabiliser)
        assert phi.dtype == torch.bfloat16
        torch.testing.assert_close(c, c0, rtol=0, atol=1e-5)
        # Storage rounds each feature to 8 bits: relative RMS <= 2^-9 (round to nearest).
        assert_close(f"bf16 storage/{stabiliser}", phi0, phi.float(), 2.0**-9)


def test_prefix_constants_ignore_later_rows():
    form = _make("posrf-iid", {}, 16, 16).form({}, 0.25).to(device=DEV)
    x = _inputs((1, 40, 16), torch.float32, seed=3)
    x2 = x.clone()
    x2[:, 25:] *= 30  # huge later rows: their log-features dwarf every earlier one
    phi, c = fused_features(x, form, "prefix", block_l=16)
    phi2, c2 = fused_features(x2, form, "prefix", block_l=16)
    assert torch.equal(c[:, :25], c2[:, :25]) and torch.equal(phi[:, :25], phi2[:, :25])


def test_per_head_parameters_broadcast():
    """OPRF's A* is fitted per (batch, head): W and bias carry leading dims."""
    est = _make("oprf-iid", {}, 16, 24)
    q, k = _inputs((2, 3, 21, 16), torch.float32, seed=1), _inputs((2, 3, 21, 16), torch.float32, seed=2)
    form = est.form(est.feature_map.fit_params(q.cpu() * 0.5, k.cpu() * 0.5), 0.25).to(device=DEV)
    assert form.W.shape[:2] == (2, 3)
    phi, c = fused_features(q, form, "row")
    phi0, c0 = naive_features(q, form, "row")
    assert_close("per-head features", phi0 * torch.exp(c0), phi * torch.exp(c), FEATURE_TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_features_match_reference_gpu_size(dtype):
    form = _make("posrf-orf", {}, 64, 256).form({}, 64**-0.5).to(device="cuda")
    x = _inputs((8, 4099, 64), dtype, seed=11)
    phi, c = fused_features(x, form, "shared")
    phi0, c0 = naive_features(x, form, "shared")
    assert_close("features gpu", phi0 * torch.exp(c0), phi * torch.exp(c), FEATURE_TOL[dtype])
