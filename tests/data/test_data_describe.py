"""describe: per layer/head norms and anisotropy, checked against quantities built in."""

from __future__ import annotations

import math

import pytest
import torch

from rfbench.cli import main_entry
from rfbench.data.describe import covariance_stats, describe, summarize
from rfbench.data.io import Capture, save_capture
from rfbench.data.synthetic import make


def _with_covariance(lam: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Rows ``[n, d]`` whose sample covariance is exactly diag(lam) (up to rounding)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, lam.numel(), generator=g, dtype=torch.float64)
    a = a - a.mean(dim=0)
    u, _ = torch.linalg.qr(a)  # orthonormal columns, each orthogonal to the ones vector
    return 3.0 + u * (lam.sqrt() * math.sqrt(n - 1))  # a shift changes no covariance


def test_covariance_stats_exact_on_a_known_covariance():
    lam = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    cond, erank = covariance_stats(_with_covariance(lam, 50))
    assert math.isclose(cond, 16.0, rel_tol=1e-9)
    p = lam / lam.sum()
    assert math.isclose(erank, math.exp(-float((p * p.log()).sum())), rel_tol=1e-9)
    # Equal eigenvalues: condition number 1, effective rank d.
    cond, erank = covariance_stats(_with_covariance(torch.ones(6, dtype=torch.float64), 40))
    assert math.isclose(cond, 1.0, rel_tol=1e-9) and math.isclose(erank, 6.0, rel_tol=1e-9)


def test_covariance_stats_singular_cases():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert covariance_stats(x)[0] == math.inf  # L < d
    flat = torch.randn(100, 1, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0, 2.0, 0.0]])
    cond, erank = covariance_stats(flat)
    assert cond == math.inf and math.isclose(erank, 1.0, rel_tol=1e-9)


def _capture_from(kind: str, L: int = 300, **params) -> Capture:
    q, k, v = make(kind, heads=2, seq_len=L, dim=8, seed=0, dtype=torch.float64, **params)
    return Capture(q=q, k=k, v=v, layers=[3], heads=[0, 7], scale=8**-0.5, meta={})


def test_describe_matches_direct_computation():
    cap = _capture_from("anisotropic", L=120, cond=30.0, q_norm=2.0, k_norm=5.0)
    table = describe(cap)
    assert list(table[["layer", "head"]].itertuples(index=False, name=None)) == [(3, 0), (3, 7)]
    row = table.iloc[1]
    q, k, s = cap.q[0, 1], cap.k[0, 1], cap.scale
    assert math.isclose(row.q_norm, float(q.norm(dim=-1).mean()), rel_tol=1e-12)
    assert math.isclose(row.k_norm_max, float(k.norm(dim=-1).max()), rel_tol=1e-12)
    logits = q @ k.T * s
    assert math.isclose(row.logit_abs, float(logits.abs().mean()), rel_tol=1e-12)
    assert math.isclose(row.logit_max, float(logits.max()), rel_tol=1e-12)
    brute = ((q[:, None, :] + k[None, :, :]).pow(2).sum(-1) * s).mean()
    assert math.isclose(row.sum_sq, float(brute), rel_tol=1e-10)
    assert math.isclose(row.q_offset, float(q.mean(0).norm() / q.norm(dim=-1).mean()), rel_tol=1e-12)
    assert (row.tokens, row.d) == (120, 8)


def test_describe_separates_isotropic_from_anisotropic():
    iso = describe(_capture_from("isotropic", L=4000))
    ani = describe(_capture_from("anisotropic", L=4000, cond=100.0))
    assert (iso.q_cond < 1.5).all() and (iso.q_erank > 7.8).all()
    # Sample condition numbers of 4000 rows scatter by a few percent around the target 100.
    assert ((ani.q_cond > 80) & (ani.q_cond < 125)).all()
    assert (ani.q_erank < 6).all()


def test_summarize_takes_medians():
    cap = _capture_from("isotropic")
    table = describe(cap)
    by_layer = summarize(table, "layer")
    assert len(by_layer) == 1 and math.isclose(by_layer.q_norm[0], table.q_norm.median())
    assert len(summarize(table, "head")) == 2
    assert summarize(table, "pair") is table


def test_cli_describe_bundled(capsys):
    assert main_entry(["describe", "bundled", "--by", "layer"]) == 0
    out = capsys.readouterr().out
    assert "6 layers x 6 heads x 512 tokens, d=32" in out and "medians over heads" in out
    norms, spectrum = out.split("\n\n")  # two tables, one row per layer each
    for table in (norms, spectrum):
        lines = [ln for ln in table.splitlines() if ln.strip()[:1].isdigit()]
        assert [int(ln.split()[0]) for ln in lines] == [0, 1, 2, 3, 4, 5]
    assert "lam_max" in spectrum and "sigma_star" in spectrum


def test_cli_describe_file_selection_and_csv(tmp_path, capsys):
    path = save_capture(tmp_path / "c.npz", _capture_from("lowrank", rank=2))
    csv = tmp_path / "t.csv"
    assert main_entry(["describe", str(path), "--heads", "7", "--max-tokens", "50", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "1 layers x 1 heads x 50 tokens" in out
    import pandas as pd

    saved = pd.read_csv(csv)
    assert list(saved.head(1)[["layer", "head", "tokens"]].iloc[0]) == [3, 7, 50]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["describe", "missing.safetensors"], "missing.safetensors: no such file"),
        (["describe", "bundled", "--layers", "7"], "layer 7 is not in this capture; available layers: 0-5"),
        (["describe", "bundled", "--heads", "x"], "--heads 'x'"),
    ],
)
def test_cli_describe_errors_exit_2(capsys, argv, needle):
    assert main_entry(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


# --------------------------------------------------------------------------- spectrum and closed forms
def _monte_carlo(lam: torch.Tensor, s: torch.Tensor, n: int = 2_000_000, seed: int = 0):
    """Draws of the one-sample importance-weighted PosRF estimate P of exp(x.y): x, y ~ N(0,
    diag lam), w ~ N(0, diag s), weight p_I(w)/p_S(w) (its square root on each side)."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(n, lam.numel(), generator=g, dtype=torch.float64) * lam.sqrt() for _ in range(2))
    w = torch.randn(n, lam.numel(), generator=g, dtype=torch.float64) * s.sqrt()
    log_weight = (0.5 * s.log() - 0.5 * w.pow(2) + w.pow(2) / (2 * s)).sum(-1)
    log_p = log_weight + (w * (x + y)).sum(-1) - 0.5 * (x.pow(2).sum(-1) + y.pow(2).sum(-1))
    return log_p.exp(), (x * y).sum(-1).exp()


@pytest.mark.parametrize("proposal", ["isotropic", "optimal", "s=1.2"])
def test_averaged_second_moments_match_monte_carlo(proposal):
    """E_{x,y,w}[P^2] closed forms against 2e6 draws, within 4 standard errors. The eigenvalues are
    small enough (< 1/28 for S = I) that P^4 has a finite mean, so the standard error is meaningful."""
    from rfbench.data.describe import optimal_second_moment, posrf_second_moment, proposal_second_moment

    lam = torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64)
    if proposal == "isotropic":
        s, closed = torch.ones(3, dtype=torch.float64), posrf_second_moment(lam)
    elif proposal == "optimal":
        s, closed = (1 + 2 * lam) / (1 - 2 * lam), optimal_second_moment(lam)
    else:
        s = torch.full((3,), 1.2, dtype=torch.float64)
        closed = proposal_second_moment(lam, s)
    p, target = _monte_carlo(lam, s)
    n = p.numel()
    # Bias apart from variance: E[P] = E[exp(x.y)] = prod (1 - lam^2)^-1/2 (unbiased for any proposal).
    mean, se_mean = float(p.mean()), float(p.std() / math.sqrt(n))
    assert abs(mean - float((1 - lam**2).rsqrt().prod())) < 4 * se_mean
    m2, se = float(p.pow(2).mean()), float(p.pow(2).std() / math.sqrt(n))
    assert se < 0.01 * float(closed)  # enough draws that 4 SE is a sharp test
    assert abs(m2 - float(closed)) < 4 * se, (m2, float(closed), se)
    # The factor is above the squared target's own average: the estimator's variance is > 0.
    assert float(closed) > float(target.pow(2).mean())


def test_closed_form_values_and_limits():
    from rfbench.data.describe import optimal_second_moment, posrf_second_moment, proposal_second_moment

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert math.isclose(float(optimal_second_moment(t(0.1))), 1.25, rel_tol=1e-12)
    assert math.isclose(float(optimal_second_moment(t(0.3))), 2.5, rel_tol=1e-12)
    assert math.isclose(float(optimal_second_moment(t(0.1, 0.3))), 1.25 * 2.5, rel_tol=1e-12)
    assert math.isclose(float(posrf_second_moment(t(0.1))), (1.2 * 0.4) ** -0.5, rel_tol=1e-12)
    assert float(posrf_second_moment(t(0.01, 1 / 6))) == math.inf
    assert math.isfinite(float(posrf_second_moment(t(0.01, 1 / 6 - 1e-6))))
    assert float(optimal_second_moment(t(0.01, 0.5))) == math.inf
    assert float(proposal_second_moment(t(0.49), 1e6)) < math.inf  # a wide enough proposal works ...
    assert float(proposal_second_moment(t(0.5), 1e9)) == math.inf  # ... until lambda reaches 1/2
    # The best proposal is best: s* beats any other s.
    lam = t(0.2)
    best = float(proposal_second_moment(lam, (1 + 2 * lam) / (1 - 2 * lam)))
    assert math.isclose(best, float(optimal_second_moment(lam)), rel_tol=1e-12)
    for s in (1.5, 2.0, 2.5, 4.0):
        assert float(proposal_second_moment(lam, s)) > best


def _spectrum_capture(top: float, causal: bool) -> Capture:
    """q, k whose pooled second moment at scale 1/4 has eigenvalues top * (1, 1/2, 1/4, 1/8)."""
    lam = top * torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    n = 64
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(2 * n, 4, generator=g, dtype=torch.float64))
    x = u * (lam * 2 * n).sqrt() / math.sqrt(0.25)  # (x^T x) / 2n = diag(lam) / scale
    q, k = x[:n].reshape(1, 1, n, 4), x[n:].reshape(1, 1, n, 4)
    meta = {"causal": "true"} if causal else {}
    return Capture(q=q, k=k, v=torch.ones(1, 1, n, 2, dtype=torch.float64), layers=[0], heads=[0],
                   scale=0.25, meta=meta)


@pytest.mark.parametrize("top, sigma_star, posrf_finite",
                         [(0.1, True, True), (0.4, True, False), (3.0, False, False)])
def test_describe_spectrum_columns(top, sigma_star, posrf_finite):
    from rfbench.data.describe import optimal_second_moment, posrf_second_moment

    row = describe(_spectrum_capture(top, causal=False)).iloc[0]
    lam = top * torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    assert math.isclose(row.lam_max, top, rel_tol=1e-9) and math.isclose(row.lam_cond, 8.0, rel_tol=1e-9)
    assert math.isclose(row.lam_half, float((lam >= 0.5).double().mean()))
    assert bool(row.sigma_star) is sigma_star and bool(row.posrf_finite) is posrf_finite
    assert row.posrf_m2 == pytest.approx(float(posrf_second_moment(lam)), rel=1e-9)
    assert row.opt_m2 == pytest.approx(float(optimal_second_moment(lam)), rel=1e-9)


def test_attention_entropy_of_uniform_attention():
    """q = 0: every row attends uniformly, entropy log(keys seen): log L, or log(i + 1) causally."""
    from rfbench.data.describe import attention_entropy

    L = 50
    q, k = torch.zeros(L, 4), torch.randn(L, 4, generator=torch.Generator().manual_seed(0))
    assert math.isclose(attention_entropy(q, k, 0.5, causal=False), math.log(L), rel_tol=1e-12)
    causal = sum(math.log(i + 1) for i in range(L)) / L
    assert math.isclose(attention_entropy(q, k, 0.5, causal=True), causal, rel_tol=1e-12)
    cap = _spectrum_capture(0.1, causal=True)
    row = describe(cap).iloc[0]
    direct = attention_entropy(cap.q[0, 0], cap.k[0, 0], 0.25, True)
    assert math.isclose(row.attn_entropy, direct, rel_tol=1e-12)
