"""Estimator features for the streamed metrics, relative to per-row constants (exact).

Features come from ``Estimator.log_features`` in the estimator's own compute dtype and are
combined in the metrics' dtype (float64) as Phi * exp(c): c is the constant of the one
stabiliser (``rfbench.ops.features.naive.stabiliser_constant``), so every exp() here is <= 1
and c is multiplied back exactly where estimates are formed; a row whose features are all zero
gets c = 0 (zeros, never NaN).
"""

from __future__ import annotations

import torch

from rfbench.ops.features.naive import stabiliser_constant

_NEG_INF = float("-inf")


def _grouped(x: torch.Tensor, G: int) -> torch.Tensor:
    """``[..., r, F]`` -> ``[G, r, F]`` (broadcasting with fitted parameters may add unit dims)."""
    if x.shape[:-2].numel() != G:
        raise AssertionError(f"features of {G} leading indices expected, got shape {tuple(x.shape)}")
    return x.reshape(G, *x.shape[-2:])


def log_features(est, x: torch.Tensor, params: dict, is_query: bool, dtype: torch.dtype):
    """``(log_mag [G, r, F], factor [G, r, F] or None)`` of the rows ``x: [G, r, d]``, in ``dtype``."""
    G = x.shape[0]
    log_mag, factor = est.log_features(x, params, is_query)
    log_mag = log_mag.to(dtype)
    if factor is None:
        return _grouped(log_mag, G), None
    shape = torch.broadcast_shapes(log_mag.shape, factor.shape)  # a sign factor may be [F] only
    return _grouped(log_mag.expand(shape), G), _grouped(factor.to(dtype).expand(shape), G)


def row_features(est, x: torch.Tensor, params: dict, is_query: bool, dtype: torch.dtype):
    """``(Phi [G, r, F], c [G, r])``: features = Phi * exp(c[..., None]), c each row's constant."""
    log_mag, factor = log_features(est, x, params, is_query, dtype)
    c = stabiliser_constant(log_mag, "row")
    phi = torch.exp(log_mag - c)
    return (phi if factor is None else phi * factor), c.squeeze(-1)


def key_sums(est, qs, ks, params, rows, causal: bool, chunk: int, dtype: torch.dtype):
    """Sums of the key features over every visible key, relative to a per-index constant M.

    qs, ks ``[G, L, d]`` (scaled, in the estimator's compute dtype). Non-causal: returns
    ``(S [G, F], M [G])`` with sum_j phi(k_j) = S exp(M); the row normaliser of query i is then
    phi(q_i) . S exp(M). Causal: returns ``(dn, cn)``, each ``[G, n]``, with
    sum_{j <= i} K^_ij = dn_i exp(cn_i) for the query rows ``rows``, read from a within-chunk
    cumsum. Key features are summed chunk by chunk relative to the shared constant of all keys
    so far (rescaling the sum when it grows is exact).
    """
    G, L = ks.shape[0], ks.shape[-2]
    S_vec = torch.zeros(G, 1, est.feature_dim, dtype=dtype, device=ks.device)
    M = torch.full((G, 1, 1), _NEG_INF, dtype=dtype, device=ks.device)
    if causal:
        dn = torch.empty(G, rows.numel(), dtype=dtype, device=ks.device)
        cn = torch.empty_like(dn)
    for j0 in range(0, L, chunk):
        j1 = min(j0 + chunk, L)
        log_mag, factor = log_features(est, ks[:, j0:j1], params, False, dtype)  # [G, c, F]
        # the shared constant of the keys so far: the previous one joins this chunk's rows
        so_far = torch.cat([M.expand(G, 1, log_mag.shape[-1]), log_mag], dim=-2)
        M_new = stabiliser_constant(so_far, "shared")[:, :1]
        E = torch.exp(log_mag - M_new)
        if factor is not None:
            E = E * factor
        S_vec = S_vec * torch.exp(M - M_new)  # rescale to the new constant (exact; 0 * 0 on the first chunk)
        M = M_new
        if causal:
            C = torch.cumsum(E, dim=-2)
            sel = ((rows >= j0) & (rows < j1)).nonzero().squeeze(-1)
            if sel.numel():
                phi, c = row_features(est, qs[:, rows[sel]], params, True, dtype)  # [G, r, F], [G, r]
                dn[:, sel] = (phi * (S_vec + C[:, rows[sel] - j0])).sum(dim=-1)
                cn[:, sel] = c + M[:, :, 0]
            S_vec = S_vec + C[:, -1:]
        else:
            S_vec = S_vec + E.sum(dim=-2, keepdim=True)
    if causal:
        return dn, cn
    return S_vec[:, 0], M[:, 0, 0]


def estimate_row_lse(est, qs, ks, params, rows, causal: bool, chunk: int, tile: int, dtype: torch.dtype):
    """``[G, n]``: log sum_{j visible} K^_ij of the query rows ``rows`` (every key, or j <= i when
    causal), the estimated attention matrix's row normaliser in log space; qs, ks as ``key_sums``."""
    if causal:
        dn, cn = key_sums(est, qs, ks, params, rows, True, chunk, dtype)
        return torch.log(dn) + cn
    S_vec, M = key_sums(est, qs, ks, params, rows, False, chunk, dtype)
    out = torch.empty(qs.shape[0], rows.numel(), dtype=dtype, device=qs.device)
    for i0 in range(0, rows.numel(), tile):
        r = rows[i0 : i0 + tile]
        phi, c = row_features(est, qs[:, r], params, True, dtype)
        out[:, i0 : i0 + r.numel()] = torch.log((phi * S_vec[:, None, :]).sum(dim=-1)) + c + M[:, None]
    return out
