"""The closed-form expectation of ``kernel_rel_mse`` over seeds, where rfbench.theory has one.

``kernel_errors`` measures, per seed, kernel_rel_mse = sum_ij (K^_ij - K_ij)^2 / sum_ij K_ij^2
over the scored pairs and every leading index (``rfbench.metrics.kernel``). The data and the
scored rows are the same for every seed of a cell, so the denominator is a constant and

    E[kernel_rel_mse] = sum_ij E[(K^_ij - K_ij)^2] / sum_ij K_ij^2 = sum_ij Var1(x_i, y_j) / (m sum_ij K_ij^2)

for an unbiased estimate averaged over m independent omegas (E (K^ - K)^2 = Var K^ = Var1 / m,
``rfbench.theory.mse``), x_i = q_i scale^(1/2), y_j = k_j scale^(1/2). Var1 is the map's one-sample
variance: docs/theory.md §1.1 (trigrf), §1.2 (posrf), §1.3 (hyprf), §1.5 (gerf, gerftrig), §1.7
(poisrf, geomrf with a fixed parameter), §1.9 (maclaurin, unbiased up to its degree cap).

No closed form here (``theory_reasons`` says why; the value is NaN): coupled rows
(``independent_rows`` False: orf, sorf, qmc, ...), rows that are not exactly N(0, I) (gq, sgq:
``unbiased`` False) or are learnable (fastfoodl), data-dependent or trained maps (their parameters
are fitted to the whole cell, the formulas to one pair), maps biased for the softmax kernel or
aimed at another target (relu, dark, hedgehog), and maps without a formula.

Overflow: the formulas are evaluated in float64 on the linear scale (``rfbench.theory``). The sum
of K^2 is a log-sum-exp of 2 x.y, so it neither overflows nor underflows; the sum of the MSEs is
inf where some pair's variance is infinite or beyond float64. A pair float64 cannot evaluate (an
overflowing factor times an underflowed or zero one, NaN) counts as infinite too: this needs an
exponent beyond ~700, where for random data the expectation is beyond float64 anyway (though not
for every pair: trigrf at x = y has Var1 = 0). The result is then inf, never NaN.
"""

from __future__ import annotations

import math

import torch

from rfbench.metrics.tiles import flatten_lead, lead_groups, row_index, row_tiles

F64 = torch.float64
#: Bytes of float64 working memory for the per-pair formulas: a few ``[G, tile, tile, d]`` blocks.
WORK_BYTES = 2**26


def theory_reasons(est) -> list[str]:
    """Why ``est``'s expected ``kernel_rel_mse`` has no closed form here; empty when it has one."""
    from rfbench import theory

    fm, wm = est.feature_map, est.weight_matrix
    checks = (
        (not wm.independent_rows, f"weight matrix {wm.name!r} couples its rows"),
        (not wm.unbiased, f"weight matrix {wm.name!r} does not draw exact N(0, I) rows"),
        (wm.learnable or est.trained_ is not None, f"{est.name} is learnable or trained"),
        (fm.data_dependent, f"feature map {fm.name!r} is fitted to the data"),
        (not fm.unbiased or fm.target != "softmax",
         f"feature map {fm.name!r} does not estimate the softmax kernel unbiased"),
        (theory.formula(type(fm)) is None, f"feature map {fm.name!r} has no closed-form variance"),
    )
    return [why for failed, why in checks if failed]


def expected_kernel_rel_mse(
    est,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float = 1.0,
    rows: torch.Tensor | None = None,
    tile: int = 128,
) -> float:
    """E[kernel_rel_mse] of ``est`` over its seeds on these pairs (module docstring), float64.

    q, k: ``[..., L, d]`` before the scale, as ``kernel_errors`` takes them; ``rows``: the scored
    rows (None: all). NaN where ``theory_reasons(est)`` is not empty; inf where the expectation is
    infinite or overflows float64. Costs about one seed's pair products (``tile x tile`` blocks).
    """
    from rfbench import theory

    if theory_reasons(est):
        return math.nan
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    s = math.sqrt(scale)
    qf, kf = (flatten_lead(x, lead).to(F64) * s for x in (q, k))  # [n_lead, L, d]
    ri = row_index(rows, q.shape[-2], q.device)
    total = torch.zeros((), dtype=F64, device=q.device)  # sum_ij Var1 / m
    lse = torch.full((), -math.inf, dtype=F64, device=q.device)  # log sum_ij K_ij^2
    t = min(tile, ri.numel())
    groups = lead_groups(qf.shape[0], 4 * 8 * t * t * q.shape[-1], WORK_BYTES)  # ~4 float64 blocks
    pairs = [(r, c) for _, r in row_tiles(ri, t) for _, c in row_tiles(ri, t)]
    for g in groups:
        for r, c in pairs:
            x, y = qf[g][:, r], kf[g][:, c]  # [G, ti, d], [G, tj, d]
            lse = torch.logaddexp(lse, torch.logsumexp((2 * x @ y.transpose(-1, -2)).flatten(), 0))
            mse = theory.mse(est.feature_map, x.unsqueeze(-2), y.unsqueeze(-3), est.num_features)
            # NaN only from inf * 0 (the inputs are finite): a variance beyond float64
            total = total + torch.nan_to_num(mse, nan=math.inf).sum()
    if torch.isinf(total):
        return math.inf
    return float(torch.exp(torch.log(total) - lse))  # exp, not math.exp: overflow gives inf, no error
