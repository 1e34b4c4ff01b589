"""The quick suite's synthetic data are as peaked as real attention: their attention entropy
matches the bundled MiniLM capture's heads (rfbench.data.synthetic's docstring has the figures)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rfbench.data import synthetic
from rfbench.data.io import load_bundled
from rfbench.suite.spec import load_suite

QUICK = Path(__file__).resolve().parents[2] / "suites" / "quick.toml"


def test_attention_entropy_limits():
    q = torch.zeros(1, 8, 4, dtype=torch.float64)
    assert torch.allclose(synthetic.attention_entropy(q, q), torch.tensor([math.log(8)], dtype=torch.float64))
    peaked = torch.eye(8, dtype=torch.float64).unsqueeze(0) * 100
    assert float(synthetic.attention_entropy(peaked, peaked, scale=1.0)) < 1e-6


def test_quick_synthetic_sources_match_the_capture_entropy():
    cap = load_bundled()
    L = 512
    target = float(synthetic.attention_entropy(cap.q[..., :L, :], cap.k[..., :L, :], cap.scale).mean())
    assert abs(target - 4.32) < 0.01  # the figure the docstring and quick.toml state
    suite = load_suite(QUICK)
    sources = [d for d in suite.data if d.source == "synthetic"]
    assert sources
    for d in sources:
        x = synthetic.make(d.kind, heads=d.heads, seq_len=L, dim=d.dim, seed=d.seed, **d.params)
        got = float(synthetic.attention_entropy(x.q, x.k).mean())
        # 0.25 nats: the spread between data seeds is ~0.05; the default norm is 1.4 nats off
        assert abs(got - target) < 0.25, (d.label, got, target)
        default = synthetic.make(d.kind, heads=d.heads, seq_len=L, dim=d.dim, seed=d.seed,
                                 **{k: v for k, v in d.params.items() if k not in ("q_norm", "k_norm")})
        assert float(synthetic.attention_entropy(default.q, default.k).mean()) > target + 0.5
