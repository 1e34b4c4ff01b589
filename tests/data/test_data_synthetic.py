"""Synthetic q/k/v generators: shapes, determinism, achieved statistics, parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from rfbench.data import synthetic
from rfbench.data.io import load_bundled
from rfbench.data.synthetic import KINDS, make, parameters, spectrum
from rfbench.errors import DataError


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def _cov(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=0)
    return x.T @ x / (x.shape[0] - 1)


def _dim(kind: str) -> int:
    return 32 if kind == "matched" else 16  # matched data must have the capture's d


# --------------------------------------------------------------------------- API
def test_kinds_and_parameters_are_declared():
    assert set(KINDS) == {"isotropic", "anisotropic", "clustered", "heavytailed", "lowrank", "matched"}
    for kind in KINDS:
        p = parameters(kind)
        assert isinstance(p, dict)
        p["junk"] = 1  # a copy: the declared defaults do not change
        assert "junk" not in parameters(kind)
    assert parameters("anisotropic")["cond"] == 100.0


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtype_and_finiteness(kind):
    d = _dim(kind)
    out = make(kind, batch=2, heads=3, seq_len=17, dim=d, seed=1, dtype=torch.float16)
    assert isinstance(out, synthetic.QKV)
    assert out.q.shape == out.k.shape == (2, 3, 17, d)
    assert out.v.shape == (2, 3, 17, d)
    for x in out:
        assert x.dtype == torch.float16 and bool(torch.isfinite(x).all())
    if kind != "matched":
        assert make(kind, seq_len=5, dim=d, dim_v=7).v.shape == (1, 1, 5, 7)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_numbers_other_seed_other_numbers(kind):
    d = _dim(kind)
    a = make(kind, heads=2, seq_len=64, dim=d, seed=7)
    b = make(kind, heads=2, seq_len=64, dim=d, seed=7)
    c = make(kind, heads=2, seq_len=64, dim=d, seed=8)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    # Drawn in float64 and cast: float32 data is the rounding of the float64 data.
    e = make(kind, heads=2, seq_len=64, dim=d, seed=7, dtype=torch.float64)
    assert torch.equal(e.q.float(), a.q)


def test_draws_ignore_the_global_rng():
    torch.manual_seed(0)
    a = make("isotropic", seq_len=32, dim=8, seed=3)
    torch.manual_seed(123)
    b = make("isotropic", seq_len=32, dim=8, seed=3)
    assert torch.equal(a.q, b.q)


def test_structure_does_not_depend_on_seq_len_or_batch():
    # The subspace of a low-rank head is structure: the same for any L and batch.
    def projector(**kw):
        q = _rows(make("lowrank", dim=16, rank=3, noise=0.0, seed=5, dtype=torch.float64, **kw).q)
        u, _, _ = torch.linalg.svd(q.T, full_matrices=False)
        return u[:, :3] @ u[:, :3].T

    assert torch.allclose(projector(seq_len=20), projector(seq_len=300, batch=2), atol=1e-10)


# --------------------------------------------------------------------------- achieved statistics
@pytest.mark.parametrize("q_norm,k_norm", [(None, None), (3.0, 9.0)])
def test_isotropic_rms_norm_within_4_standard_errors(q_norm, k_norm):
    d = 32
    out = make("isotropic", heads=4, seq_len=2048, dim=d, q_norm=q_norm, k_norm=k_norm, seed=0)
    for x, target in ((out.q, q_norm or math.sqrt(d)), (out.k, k_norm or math.sqrt(d))):
        sq = _rows(x).pow(2).sum(-1)
        se = float(sq.std() / math.sqrt(sq.numel()))
        assert abs(float(sq.mean()) - target**2) < 4 * se
    # Default: unit-variance entries, so |q| ~ sqrt(d).
    entries = _rows(make("isotropic", seq_len=4096, dim=d, seed=1).q)
    assert abs(float(entries.var()) - 1.0) < 4 * math.sqrt(2.0 / entries.numel())


def test_isotropic_sphere_puts_rows_on_the_sphere():
    q = make("isotropic", seq_len=100, dim=8, q_norm=2.5, sphere=True, dtype=torch.float64).q
    assert torch.allclose(q.norm(dim=-1), torch.full((1, 1, 100), 2.5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("kind_of_spectrum", ["geometric", "linear"])
def test_spectrum_has_the_exact_condition_number(kind_of_spectrum):
    lam = spectrum(24, 250.0, kind_of_spectrum)
    assert lam.shape == (24,)
    assert math.isclose(float(lam[0] / lam[-1]), 250.0, rel_tol=1e-12)
    assert math.isclose(float(lam.mean()), 1.0, rel_tol=1e-12)
    assert bool((lam[:-1] >= lam[1:]).all())


def test_anisotropic_sample_covariance_matches_the_target_spectrum():
    d, n, cond, norm = 16, 40_000, 50.0, 6.0
    q = _rows(make("anisotropic", seq_len=n, dim=d, cond=cond, q_norm=norm, seed=2).q)
    lam = torch.linalg.eigvalsh(_cov(q)).flip(0)
    target = spectrum(d, cond) * norm**2 / d
    # Sample eigenvalues of n Gaussian rows: relative spread ~ sqrt(2/n) + sqrt(d/n) ~ 2.7% here.
    assert torch.allclose(lam, target, rtol=0.08)
    assert abs(float(lam[0] / lam[-1]) / cond - 1) < 0.15
    # Rotated: the covariance is not diagonal in the standard basis.
    off = _cov(q) - torch.diag(torch.diagonal(_cov(q)))
    assert float(off.abs().max()) > 0.1 * float(target[0])


def test_anisotropic_without_rotation_is_axis_aligned_and_shared_flag_works():
    q = _rows(make("anisotropic", seq_len=20_000, dim=8, cond=10.0, rotate=False, seed=0).q)
    var = torch.diagonal(_cov(q))
    target = spectrum(8, 10.0)  # q_norm default sqrt(d): mean eigenvalue 1
    assert torch.allclose(var, target, rtol=0.08)
    same = make("anisotropic", seq_len=20_000, dim=8, seed=0)
    other = make("anisotropic", seq_len=20_000, dim=8, seed=0, shared=False)
    top = [torch.linalg.eigh(_cov(_rows(x)))[1][:, -1] for x in (same.q, same.k, other.k)]
    assert abs(float(top[0] @ top[1])) > 0.99  # shared rotation: same leading direction
    assert abs(float(top[0] @ top[2])) < 0.9


def test_clustered_without_noise_has_exactly_the_clusters():
    out = make("clustered", heads=2, seq_len=500, dim=8, clusters=5, spread=1.0, q_norm=3.0, seed=4,
               dtype=torch.float64)
    for h in range(2):
        rows = torch.unique(out.q[0, h].round(decimals=9), dim=0)
        assert rows.shape[0] == 5
        assert torch.allclose(rows.norm(dim=-1), torch.full((5,), 3.0, dtype=torch.float64))
    # shared=True: keys sit on the same centre directions as queries.
    kd = torch.unique((out.k[0, 0] / out.k[0, 0].norm(dim=-1, keepdim=True)).round(decimals=9), dim=0)
    qd = torch.unique((out.q[0, 0] / 3.0).round(decimals=9), dim=0)
    assert torch.allclose(kd, qd)


def test_clustered_rms_norm_within_4_standard_errors():
    q = _rows(make("clustered", heads=2, seq_len=4096, dim=16, q_norm=5.0, spread=0.6, seed=0).q)
    sq = q.pow(2).sum(-1)
    assert abs(float(sq.mean()) - 25.0) < 4 * float(sq.std()) / math.sqrt(sq.numel())


def test_heavytailed_norm_and_tail():
    # df = 10: E|x|^4 is finite, so the sample mean of |x|^2 has a standard error.
    q = _rows(make("heavytailed", heads=4, seq_len=4096, dim=16, df=10.0, q_norm=4.0, seed=3).q)
    sq = q.pow(2).sum(-1)
    assert abs(float(sq.mean()) - 16.0) < 4 * float(sq.std()) / math.sqrt(sq.numel())
    # df = 3 has a far heavier tail of norms than Gaussian data of the same RMS norm.
    t = _rows(make("heavytailed", heads=4, seq_len=4096, dim=16, df=3.0, seed=3).q).norm(dim=-1)
    g = _rows(make("isotropic", heads=4, seq_len=4096, dim=16, seed=3).q).norm(dim=-1)
    assert float(t.max() / t.median()) > 3 * float(g.max() / g.median())


def test_gamma_sampler_mean_and_variance():
    gen = torch.Generator().manual_seed(0)
    for a in (1.0, 1.5, 5.0):
        x = synthetic._gamma(a, (200_000,), gen)
        n = x.numel()
        assert abs(float(x.mean()) - a) < 4 * math.sqrt(a / n)  # Var = a
        # Var of the sample variance ~ (mu4 - a^2)/n with mu4 = 3a^2 + 6a for Gamma(a, 1).
        assert abs(float(x.var()) - a) < 4 * math.sqrt((2 * a * a + 6 * a) / n)


def test_lowrank_rank_and_noise_fraction():
    q = _rows(make("lowrank", seq_len=500, dim=16, rank=3, noise=0.0, seed=1, dtype=torch.float64).q)
    assert int(torch.linalg.matrix_rank(q)) == 3
    x = _rows(make("lowrank", seq_len=20_000, dim=16, rank=3, noise=0.25, seed=1, dtype=torch.float64).q)
    lam = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).flip(0)
    # The 13 smallest eigenvalues hold only noise: noise * norm^2 * (13 / d) of the energy.
    tail = float(lam[3:].sum() / lam.sum())
    assert abs(tail - 0.25 * 13 / 16) < 0.02


def test_matched_reproduces_the_capture_mean_and_covariance():
    cap = load_bundled()
    out = make("matched", heads=2, seq_len=20_000, dim=32, capture_layers=[2], seed=0)
    for h in range(2):
        ref = cap.q[cap.layers.index(2), h].to(torch.float64)
        x = _rows(out.q[0, h])
        # Means: within 5 standard errors per coordinate.
        se = ref.std(dim=0) / math.sqrt(x.shape[0])
        assert bool(((x.mean(0) - ref.mean(0)).abs() < 5 * se + 1e-9).all())
        c_ref, c_gen = _cov(ref), _cov(x)
        assert float((c_gen - c_ref).norm() / c_ref.norm()) < 0.05


def test_matched_selection_cycles_and_checks_dim():
    cap = load_bundled()
    out = make("matched", heads=3, seq_len=4000, dim=32, capture_layers=[5], capture_heads=[4], seed=1)
    ref_var = cap.k[cap.layers.index(5), cap.heads.index(4)].double().var(0).sum()
    for h in range(3):  # one pair selected: every generated head copies it
        assert abs(float(_rows(out.k[0, h]).var(0).sum() / ref_var) - 1) < 0.1
    with pytest.raises(DataError, match="dim=32"):
        make("matched", seq_len=8, dim=16)
    with pytest.raises(DataError, match="dim_v=32"):
        make("matched", seq_len=8, dim=32, dim_v=8)
    with pytest.raises(DataError, match="available layers: 0-5"):
        make("matched", seq_len=8, dim=32, capture_layers=[9])
    with pytest.raises(DataError, match="not found"):
        make("matched", seq_len=8, dim=32, source="/nonexistent/capture.safetensors")


def test_matched_rescales_a_model_with_another_scale(tmp_path):
    from rfbench.data.io import Capture, save_capture

    cap = load_bundled().select(layers=[0], heads=[0])
    path = save_capture(tmp_path / "unscaled.safetensors",
                        Capture(q=cap.q, k=cap.k, v=cap.v, layers=[0], heads=[0], scale=1.0, meta={}))
    a = make("matched", seq_len=16, dim=32, source=str(path), seed=3, dtype=torch.float64)
    b = make("matched", seq_len=16, dim=32, source=str(path), seed=3, rescale=False, dtype=torch.float64)
    # The model's logits q.k * 1 equal the runner's q'.k' / sqrt(d) when q' = q * d**0.25.
    torch.testing.assert_close(a.q, b.q * 32**0.25)
    torch.testing.assert_close(a.v, b.v)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kind,kwargs,match",
    [
        ("gaussian", {}, "known: isotropic, anisotropic"),
        ("isotropic", {"cond": 3.0}, r"unknown parameter\(s\) \['cond'\]; allowed: q_norm, k_norm, sphere"),
        ("anisotropic", {"cond": 0.5}, "cond must be a number"),
        ("anisotropic", {"spectrum": "cubic"}, "spectrum must be one of geometric, linear"),
        ("anisotropic", {"rotate": 1}, "rotate must be true or false"),
        ("heavytailed", {"df": 2.0}, "df must be a number in"),
        ("lowrank", {"rank": 17}, r"rank must be an integer in 1..16"),
        ("lowrank", {"rank": True}, "rank must be an integer"),
        ("clustered", {"spread": 1.5}, "spread must be a number"),
        ("isotropic", {"q_norm": -1.0}, "q_norm must be a number"),
        ("isotropic", {"q_norm": float("nan")}, "q_norm must be a number"),
        ("matched", {"capture_layers": "0-2"}, "capture_layers must be an integer or a list"),
    ],
)
def test_bad_parameters_raise_data_error(kind, kwargs, match):
    with pytest.raises(DataError, match=match):
        make(kind, seq_len=8, dim=16 if kind != "matched" else 32, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seq_len": 0}, "seq_len must be an integer >= 1"),
        ({"dim": 2.5}, "dim must be an integer"),
        ({"heads": 0}, "heads must be an integer"),
        ({"dim_v": 0}, "dim_v must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"dtype": torch.int32}, "dtype must be a floating"),
    ],
)
def test_bad_sizes_raise_data_error(kwargs, match):
    base = {"seq_len": 8, "dim": 16}
    with pytest.raises(DataError, match=match):
        make("isotropic", **{**base, **kwargs})


def test_unknown_kind_in_parameters():
    with pytest.raises(DataError, match="known:"):
        parameters("nope")
