"""Pointwise Monte Carlo of a kernel estimate at chosen pairs (x, y), and the page of a closed-form figure.

The closed-form reproductions (Lemma 2, FAVOR++) are functions of one pair (x, y), not attention
sweeps: each grid point is a pair, drawn as a leading index ``[P, 1, d]`` so that one estimator
draw serves every point (and a data-dependent map such as OPRF fits each pair on its own, as
``est.fit`` does at L = 1). The estimate is rfbench's own ``est.kernel``; its MSE over ``seeds``
independent draws has a CLT interval, and a ratio of two such MSEs a delta-method one on the log
scale (the two estimators draw from different seeds, so their errors are independent).
"""

from __future__ import annotations

import html as _html
import math
from pathlib import Path

import numpy as np
import torch

from rfbench.errors import EstimatorError

Z95 = 1.959964
INTERVAL = "log scale, delta method, normal: CLT standard errors of the Monte Carlo means"


def mc_mse(name: str, x: torch.Tensor, y: torch.Tensor, num_features: int, seeds: int,
           seed0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MSE of ``name``'s estimate of exp(x . y) at each pair, and its standard error.

    x, y ``[P, d]`` float64 -> two arrays ``[P]``: the mean over ``seeds`` draws of
    (K_hat - exp(x . y))^2 and the standard error of that mean.
    """
    from rfbench.registry import make_estimator

    if seeds < 2:
        raise EstimatorError(f"seeds must be >= 2 for an interval, got {seeds}")
    q, k = x.to(torch.float64).unsqueeze(-2), y.to(torch.float64).unsqueeze(-2)  # [P, 1, d]
    exact = torch.exp((x * y).sum(-1)).to(torch.float64)
    errs = torch.empty(seeds, x.shape[0], dtype=torch.float64)
    for s in range(seeds):
        est = make_estimator(name, dim=x.shape[-1], num_features=num_features, seed=seed0 + s,
                             dtype=torch.float64)
        est.fit(q, k)
        errs[s] = (est.kernel(q, k)[:, 0, 0] - exact) ** 2
    mean = errs.mean(0).numpy()
    se = (errs.std(0) / math.sqrt(seeds)).numpy()
    return mean, se


def mc_var1(name: str, x: torch.Tensor, y: torch.Tensor, draws: int, chunk: int = 20000,
            seed0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One-sample variance Var1 of ``name`` at each pair from ``draws`` omegas, and its standard error.

    x, y ``[P, d]`` -> two arrays ``[P]``. Estimators of ``chunk`` omegas are drawn with seeds
    seed0, seed0 + 1, ...; the per-omega estimates P_j = m sum_k f_k(x) f_k(y) are read off
    ``est.features`` (the feature layout of rfbench.features.base: ``per_omega`` blocks of m), and
    checked to average to ``est.kernel``. Var1 = mean_j (P_j - exp(x . y))^2 (the maps are unbiased),
    with the CLT standard error of that mean. For iid rows the MSE at m features is Var1 / m.
    """
    from rfbench.registry import make_estimator

    q, k = x.to(torch.float64).unsqueeze(-2), y.to(torch.float64).unsqueeze(-2)  # [P, 1, d]
    exact = torch.exp((x * y).sum(-1)).to(torch.float64)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    total2 = torch.zeros_like(total)
    n, s = 0, 0
    while n < draws:
        m = min(chunk, draws - n)
        est = make_estimator(name, dim=x.shape[-1], num_features=m, seed=seed0 + s, dtype=torch.float64)
        est.fit(q, k)
        fx, fy = est.features(q, is_query=True)[:, 0], est.features(k, is_query=False)[:, 0]  # [P, F]
        per = m * (fx * fy).reshape(x.shape[0], -1, m).sum(1)  # [P, m]: one estimate per omega
        K = est.kernel(q, k)[:, 0, 0]
        if not torch.allclose(per.mean(1), K, rtol=1e-8, atol=1e-300):
            raise EstimatorError(f"{name}: per-omega estimates do not average to est.kernel "
                                 "(feature layout?)")
        sq = (per - exact[:, None]) ** 2
        total += sq.sum(1)
        total2 += (sq * sq).sum(1)
        n, s = n + m, s + 1
    mean = total / n
    var = (total2 / n - mean**2).clamp_min(0) * n / (n - 1)
    return mean.numpy(), (var / n).sqrt().numpy()


def mean_ci(mean: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 95% CLT interval of a mean, clipped at 0 (an MSE is never negative)."""
    return np.maximum(mean - Z95 * se, 0.0), mean + Z95 * se


def ratio_ci(m1, se1, m2, se2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m1 / m2 and its 95% delta-method interval on the log scale (independent estimates)."""
    m1, se1, m2, se2 = (np.asarray(v, dtype=float) for v in (m1, se1, m2, se2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = m1 / m2
        s = np.sqrt((se1 / m1) ** 2 + (se2 / m2) ** 2)
    return ratio, ratio * np.exp(-Z95 * s), ratio * np.exp(Z95 * s)


def pair(r: float, theta: float, d: int, r2: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x = r e1 and y = r2 (cos theta e1 + sin theta e2) in R^d (r2 defaults to r), float64 ``[d]``."""
    x = torch.zeros(d, dtype=torch.float64)
    y = torch.zeros(d, dtype=torch.float64)
    x[0] = r
    r2 = r if r2 is None else r2
    y[0], y[1] = r2 * math.cos(theta), r2 * math.sin(theta)
    return x, y


def write_page(out: Path, title: str, claims_fragment: str, figures: list[tuple[str, str]],
               table_md: str, setting: str) -> Path:
    """A small offline report.html: the claim table first, then the figures, setting and grid table."""
    from rfbench.report.html import CSS
    from rfbench.results.atomic import write_text

    e = _html.escape
    figs = "\n".join(f'<figure><img src="{e(f)}" alt="{e(c)}"><figcaption>{e(c)}</figcaption></figure>'
                     for f, c in figures)
    body = "\n".join([
        "<!doctype html>", '<html lang="en">', '<head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{CSS}</style></head>", "<body><main>", f"<header><h1>{e(title)}</h1></header>",
        claims_fragment, '<section id="figures"><h2>Figures</h2>', figs, "</section>",
        '<section id="setting"><h2>Setting</h2>', f"<p>{e(setting)}</p>",
        "<details><summary>Grid (closed form and Monte Carlo)</summary>", f"<pre>{e(table_md)}</pre>",
        "</details></section>", "</main></body></html>",
    ])
    page = out / "report.html"
    write_text(page, body + "\n")
    return page
