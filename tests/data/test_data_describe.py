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
    lines = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(ln.split()[0]) for ln in lines] == [0, 1, 2, 3, 4, 5]


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
