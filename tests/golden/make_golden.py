"""Write the golden fixed-seed outputs that guard refactors (``python -m tests.golden.make_golden``).

Run once before a refactor and commit ``golden.safetensors``; ``test_golden.py`` recomputes every
entry with the current code and requires a match (float64 inputs: to 1e-10 relative). Regenerate
only when a change of numbers is intended, and say so in the commit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

PATH = Path(__file__).with_name("golden.safetensors")

#: (estimator, extra params): a spread of families, weight matrices and stabiliser paths.
CASES = [
    ("posrf-orf", {}),
    ("posrf-iid", {}),
    ("hyprf-sorf", {}),
    ("trigrf-iid", {}),
    ("gerf-qmc", {}),
    ("oprf-orf", {}),
    ("saderf-iid", {}),
    ("poisrf-iid", {}),
    ("posrf-sgq", {}),
    ("dark-iid", {}),
    ("darkis-iid", {}),
    ("posrf-fastfood", {}),
]
D, M, L = 8, 32, 24


def data():
    g = torch.Generator().manual_seed(1234)
    q = 0.6 * torch.randn(2, L, D, generator=g, dtype=torch.float64)
    k = 0.6 * torch.randn(2, L, D, generator=g, dtype=torch.float64) + 0.1
    v = torch.randn(2, L, 4, generator=g, dtype=torch.float64)
    return q, k, v


def outputs() -> dict[str, torch.Tensor]:
    import rfbench as rb
    from rfbench import metrics

    q, k, v = data()
    out: dict[str, torch.Tensor] = {}
    for name, params in CASES:
        est = rb.make_estimator(name, dim=D, num_features=M, seed=7, dtype=torch.float64, **params)
        scale = D**-0.5
        if est.feature_map.data_dependent:
            est.fit(q, k)
        out[f"{name}/kernel"] = est.kernel(q * scale**0.5, k * scale**0.5)
        if est.feature_map.data_dependent:
            est.fit(q, k, scale=scale)
        out[f"{name}/attention"] = est.attention(q, k, v)
        out[f"{name}/causal"] = est.attention(q, k, v, causal=True, chunk=5)
        ests = [
            rb.make_estimator(name, dim=D, num_features=M, seed=s, dtype=torch.float64, **params)
            for s in range(3)
        ]
        for e in ests:
            if e.feature_map.data_dependent:
                e.fit(q, k, scale=scale)
        ke = metrics.kernel_errors(ests, q, k, scale=scale, causal=True, tile=7, chunk=9)
        out[f"{name}/metrics"] = torch.tensor(
            [*ke.kernel_mse, *ke.kernel_rel_mse, *ke.attn_mse, ke.bias2, ke.mc_variance],
            dtype=torch.float64,
        )
        if ke.target_kernel_rel_mse is not None:
            out[f"{name}/target_metrics"] = torch.tensor(ke.target_kernel_rel_mse, dtype=torch.float64)
    # trained learners (a fitted map and a learned weight matrix): a few Adam steps
    for name in ("darkl-iid", "oprf-fastfoodl"):
        est = rb.make_estimator(name, dim=D, num_features=M, seed=3, dtype=torch.float64)
        cfg = rb.FitConfig(steps=6, eval_every=2, batch_tokens=16, n_blocks=4, lr=0.05)
        est.fit(q, k, v, scale=D**-0.5, train=cfg)
        out[f"{name}/trained_attention"] = est.attention(q, k, v)
        out[f"{name}/trained_causal"] = est.attention(q, k, v, causal=True, chunk=5)
    return {key: t.detach().contiguous().to(torch.float64) for key, t in out.items()}


if __name__ == "__main__":
    save_file(outputs(), str(PATH))
    print(f"wrote {PATH}")
