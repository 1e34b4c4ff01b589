"""Error metrics of random-feature estimators, streamed over tiles (no L x L matrix is held).

Notation: an estimator sees q' = q * s and k' = k * s with s = scale**0.5 (scale = 1/sqrt(d)
for attention); K_ij = exp(q'_i . k'_j) is the softmax kernel on the true scale and K^s_ij the
estimate of seed s (of S). Means run over the scored pairs (i, j) and over every leading
(batch/head) index.

    kernel_mse      = mean_ij (K^_ij - K_ij)^2
    kernel_rel_mse  = sum_ij (K^_ij - K_ij)^2 / sum_ij K_ij^2
    attn_mse        = mean over visible pairs of (A^_ij - A_ij)^2, A_ij = K_ij / sum_{j' visible} K_ij'
                      (the row sums run over *all* keys, also when only a sample of pairs is
                      scored; visible: every key, or j <= i when causal)
    bias2           = mean_ij (mean_s K^s_ij - K_ij)^2
    mc_variance     = mean_ij var_s(K^s_ij)                   (unbiased over seeds, ddof = 1)
    bias2_rel, mc_variance_rel: the same divided by mean_ij K_ij^2
    out_rel_err     = ||out - out_exact||_F / ||out_exact||_F

Per entry, (1/S) sum_s (K^s - K)^2 = (Kbar - K)^2 + ((S-1)/S) var_s(K^s), so exactly
``mean_s kernel_mse_s = bias2 + (S-1)/S * mc_variance``. For an unbiased estimator
E[bias2] = mc_variance / S: bias2 is the squared error of the seed mean, not the bias alone.

Streaming: pairs are visited in ``tile x tile`` blocks, for a group of leading (batch/head)
indices at a time (as many as fit ``memory_budget``). For each query tile the S seeds' query
features are computed once (``[S, G, tile, F]``); key features are recomputed per tile pair (an
overhead of about d / tile over the pair products), so memory is O(G (L d S + S tile (F +
tile))) whatever the number of pairs. The exact side is computed in float64 (``dtype``).
Estimator features come from ``Estimator.log_features`` in the estimator's own compute dtype
and are combined in ``dtype`` with a per-row log-constant, multiplied back exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rfbench._checks import check_qkv
from rfbench.errors import DataError

_NEG_INF = -math.inf
#: Default working-memory budget of the streamed metrics (bytes); see ``kernel_errors``.
MEMORY_BUDGET = 256 * 2**20


def _same_params(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.shape == y.shape
                and torch.equal(x, y.to(x))
            ):
                return False
        elif x != y:
            return False
    return True


def _target_slots(estimators) -> tuple[list[int | None], list[int]]:
    """Which own (non-softmax) kernel each estimator is measured against.

    Returns ``(slots, owners)``: ``slots[i]`` indexes the distinct own kernels (None where the
    target is the softmax kernel, or has no closed form: a trained FastFood-L's learned spectral
    kernel), ``owners[j]`` the estimator whose feature map and fitted parameters define kernel j.
    Seeds that share their fitted parameters (the usual case, and darkl trained with a fixed
    ``FitConfig.seed``) share one kernel; seeds trained apart are each scored on their own.
    """
    slots: list[int | None] = []
    owners: list[int] = []
    for i, e in enumerate(estimators):
        if e.target == "softmax" or getattr(e.weight_matrix, "fitted_", False):
            slots.append(None)
            continue
        for j, o in enumerate(owners):
            other = estimators[o]
            if (
                other.target == e.target
                and type(other.feature_map) is type(e.feature_map)
                and _same_params(other.params_, e.params_)
            ):
                slots.append(j)
                break
        else:
            owners.append(i)
            slots.append(len(owners) - 1)
    return slots, owners


@dataclass
class KernelErrors:
    """Kernel and attention-matrix errors of S seeds of one estimator on one data tensor.

    Per-seed lists have one float per estimator given. ``attn_mse`` is None unless asked for;
    ``target_kernel_rel_mse`` is None unless some estimator's target kernel is not the softmax
    kernel (DARK, darkl), in which case it is measured against that estimator's own
    exp(T(q') . T(k')); NaN for estimators whose own kernel is the softmax or has no closed
    form (a trained FastFood-L).
    """

    kernel_mse: list[float]
    kernel_rel_mse: list[float]
    attn_mse: list[float] | None
    target_kernel_rel_mse: list[float] | None
    bias2: float
    mc_variance: float
    bias2_rel: float
    mc_variance_rel: float
    mean_k2: float
    n_pairs: int


def sample_rows(length: int, max_tokens: int | None, *, seed: int = 0) -> torch.Tensor | None:
    """Sorted indices of a fixed subset of ``max_tokens`` of ``length`` rows (None: use all).

    The subset depends on ``seed`` only (pass a seed derived from the data, not the estimator),
    so every estimator and seed of a data source is scored on the same pairs.
    """
    if max_tokens is None or max_tokens >= length:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(length, generator=g)[:max_tokens].sort().values


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F, computed in float64."""
    ref = ref.double()
    diff = out.to(device=ref.device, dtype=torch.float64) - ref
    return float(diff.norm() / ref.norm())


def _flat(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """``[..., L, d]`` broadcast to ``lead`` and flattened to ``[n_lead, L, d]``."""
    return x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])


def _index(rows: torch.Tensor | None, length: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(length, device=device)
    rows = torch.as_tensor(rows, device=device).long()
    if rows.ndim != 1 or rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= length:
        raise DataError(f"rows must be a non-empty 1-d index into 0..{length - 1}, got {tuple(rows.shape)}")
    if rows.numel() > 1 and bool((rows[1:] <= rows[:-1]).any()):
        raise DataError("rows must be sorted and without repeats")
    return rows


def _groups(n_lead: int, per_index_bytes: float, budget: int):
    """Consecutive ranges of leading indices processed together, each within ``budget`` bytes."""
    size = max(1, min(n_lead, int(budget // max(per_index_bytes, 1.0))))
    return [slice(b, min(b + size, n_lead)) for b in range(0, n_lead, size)]


def exact_row_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float = 1.0,
    rows: torch.Tensor | None = None,
    causal: bool = False,
    tile: int = 256,
    chunk: int = 1024,
    dtype: torch.dtype = torch.float64,
    memory_budget: int = MEMORY_BUDGET,
) -> torch.Tensor:
    """log sum_j exp(q'_i . k'_j) over every visible key, for the query rows ``rows``.

    q ``[..., L, d]``, k ``[..., L, d]``; returns ``[n_lead, n_rows]`` (leading dims flattened).
    Online log-sum-exp over key chunks (running max, rescaled sums: exact), tile by tile.
    """
    check_qkv(q, k)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    s = math.sqrt(scale)
    qf, kf = _flat(q, lead), _flat(k, lead)
    L, d = kf.shape[-2], kf.shape[-1]
    if causal and qf.shape[-2] != L:
        raise DataError(f"causal metrics need as many queries as keys, got {qf.shape[-2]} and {L}")
    ri = _index(rows, qf.shape[-2], qf.device)
    out = torch.empty(qf.shape[0], ri.numel(), dtype=dtype, device=qf.device)
    itemsize = torch.finfo(dtype).bits // 8
    for g in _groups(qf.shape[0], itemsize * (L * d + 3 * tile * chunk), memory_budget):
        kb = kf[g].to(dtype) * s  # [G, L, d]
        for i0 in range(0, ri.numel(), tile):
            r = ri[i0 : i0 + tile]
            qi = qf[g][:, r].to(dtype) * s  # [G, t, d]
            m = torch.full((qi.shape[0], r.numel()), _NEG_INF, dtype=dtype, device=qf.device)
            acc = torch.zeros_like(m)
            last = L if not causal else int(r.max()) + 1
            for j0 in range(0, last, chunk):
                j1 = min(j0 + chunk, last)
                logits = qi @ kb[:, j0:j1].transpose(-1, -2)  # [G, t, c]
                if causal:
                    cols = torch.arange(j0, j1, device=qf.device)
                    logits = logits.masked_fill(cols[None, :] > r[:, None], _NEG_INF)
                m_new = torch.maximum(m, logits.amax(dim=-1))
                acc = acc * torch.exp(m - m_new) + torch.exp(logits - m_new.unsqueeze(-1)).sum(dim=-1)
                m = m_new
            out[g, i0 : i0 + r.numel()] = m + torch.log(acc)
    return out


def _slice_params(params: dict, lead: torch.Size, g: slice) -> dict:
    """Parameters of the leading indices ``g`` (of the flattened ``lead``); shared ones pass unchanged.

    Fitted parameters carry the data's leading dims first (``[..., d, d]``, ``[...]``); a
    tensor whose first ``len(lead)`` dims broadcast to ``lead`` is sliced, anything else is
    taken to be shared by every leading index.
    """
    n_lead = math.prod(lead)
    if n_lead == 1 or not params:
        return params
    out = {}
    for key, p in params.items():
        if (
            torch.is_tensor(p)
            and p.ndim >= len(lead)
            and all(h in (1, n) for h, n in zip(p.shape[: len(lead)], lead))
        ):
            rest = p.shape[len(lead) :]
            out[key] = p.expand(*lead, *rest).reshape(n_lead, *rest)[g]
        else:
            out[key] = p
    return out


def _grouped(x: torch.Tensor, G: int) -> torch.Tensor:
    """``[..., r, F]`` -> ``[G, r, F]`` (broadcasting with fitted parameters may add unit dims)."""
    if x.shape[:-2].numel() != G:
        raise AssertionError(f"features of {G} leading indices expected, got shape {tuple(x.shape)}")
    return x.reshape(G, *x.shape[-2:])


def _log_features(est, x: torch.Tensor, params: dict, is_query: bool, dtype: torch.dtype):
    """``(log_mag [G, r, F], factor [G, r, F] or None)`` of the rows ``x: [G, r, d]``, in ``dtype``."""
    G = x.shape[0]
    log_mag, factor = est.log_features(x, params, is_query)
    log_mag = log_mag.to(dtype)
    if factor is None:
        return _grouped(log_mag, G), None
    shape = torch.broadcast_shapes(log_mag.shape, factor.shape)  # a sign factor may be [F] only
    return _grouped(log_mag.expand(shape), G), _grouped(factor.to(dtype).expand(shape), G)


def _features(est, x: torch.Tensor, params: dict, is_query: bool, dtype: torch.dtype):
    """``(Phi [G, r, F], c [G, r])``: features = Phi * exp(c[..., None]), c the row max of the log-magnitudes.

    Subtracting each row's max keeps every exp() <= 1; it is multiplied back exactly where
    estimates are formed. Rows whose features are all zero (log -inf) get c = 0.
    """
    log_mag, factor = _log_features(est, x, params, is_query, dtype)
    c = log_mag.amax(dim=-1)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    phi = torch.exp(log_mag - c.unsqueeze(-1))
    return (phi if factor is None else phi * factor), c


def _key_sums(est, qs, ks, params, rows, causal, chunk, dtype):
    """Sums of the key features over every visible key, relative to a per-index constant M.

    qs, ks ``[G, L, d]`` (scaled, in the estimator's compute dtype). Non-causal: returns
    ``(S [G, F], M [G])`` with sum_j phi(k_j) = S exp(M); the row normaliser of query i is then
    phi(q_i) . S exp(M). Causal: returns ``(dn, cn)``, each ``[G, n]``, with
    sum_{j <= i} K^_ij = dn_i exp(cn_i) for the query rows ``rows``, read from a within-chunk
    cumsum. Key features are summed chunk by chunk relative to a running max M (rescaling the
    sum when M grows is exact).
    """
    G, L = ks.shape[0], ks.shape[-2]
    S_vec = torch.zeros(G, 1, est.feature_dim, dtype=dtype, device=ks.device)
    M = torch.full((G, 1, 1), _NEG_INF, dtype=dtype, device=ks.device)
    if causal:
        dn = torch.empty(G, rows.numel(), dtype=dtype, device=ks.device)
        cn = torch.empty_like(dn)
    for j0 in range(0, L, chunk):
        j1 = min(j0 + chunk, L)
        log_mag, factor = _log_features(est, ks[:, j0:j1], params, False, dtype)  # [G, c, F]
        M_new = torch.maximum(M, log_mag.amax(dim=(-2, -1), keepdim=True))
        M_new = torch.where(torch.isfinite(M_new), M_new, torch.zeros_like(M_new))
        E = torch.exp(log_mag - M_new)
        if factor is not None:
            E = E * factor
        S_vec = S_vec * torch.exp(M - M_new)  # rescale to the new max (exact; 0 * 0 on the first chunk)
        M = M_new
        if causal:
            C = torch.cumsum(E, dim=-2)
            sel = ((rows >= j0) & (rows < j1)).nonzero().squeeze(-1)
            if sel.numel():
                phi, c = _features(est, qs[:, rows[sel]], params, True, dtype)  # [G, r, F], [G, r]
                dn[:, sel] = (phi * (S_vec + C[:, rows[sel] - j0])).sum(dim=-1)
                cn[:, sel] = c + M[:, :, 0]
            S_vec = S_vec + C[:, -1:]
        else:
            S_vec = S_vec + E.sum(dim=-2, keepdim=True)
    if causal:
        return dn, cn
    return S_vec[:, 0], M[:, 0, 0]


def kernel_errors(
    estimators: list,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float = 1.0,
    rows: torch.Tensor | None = None,
    causal: bool = False,
    attention_matrix: bool = True,
    row_lse: torch.Tensor | None = None,
    tile: int = 256,
    chunk: int = 1024,
    dtype: torch.dtype = torch.float64,
    memory_budget: int = MEMORY_BUDGET,
) -> KernelErrors:
    """Kernel errors of each estimator (one per seed) and their cross-seed bias^2 and variance.

    Args:
        estimators: S Estimators of one kind (one per seed); data-dependent ones are fitted on
            the whole q, k at ``scale`` here unless they already are (``est.fit(q, k, scale=scale)``).
        q, k: ``[..., L, d]`` as attention sees them, before the scale; ``q`` and ``k`` share L.
        scale: the attention scale; the metrics compare estimates on q' = q * scale**0.5.
        rows: sorted indices of the query and key rows scored (``sample_rows``); None: all.
            The attention-matrix row sums always run over all keys.
        causal: only for ``attn_mse``: rows are normalised over, and scored on, keys j <= i.
        row_lse: ``exact_row_lse(q, k, scale=scale, rows=rows, causal=causal)``, if already known.
        tile, chunk: pair-block size and key-chunk size.
        dtype: dtype of the exact side and of the combination of features (float64).
        memory_budget: bytes of working memory; leading (batch/head) indices are processed
            together in groups that fit it (one at a time at least).
    """
    if not estimators:
        raise DataError("kernel_errors needs at least one estimator")
    est0 = estimators[0]
    check_qkv(q, k, dim=est0.dim)
    if q.shape[-2] != k.shape[-2]:
        raise DataError(f"q and k must have the same length here, got {q.shape[-2]} and {k.shape[-2]}")
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    s = math.sqrt(scale)
    L, d = q.shape[-2:]
    ri = _index(rows, L, q.device)
    n = ri.numel()
    for est in estimators:
        if est.feature_map.data_dependent and (
            est.params_ is None or est.fit_scale_ is None or not math.isclose(est.fit_scale_, scale)
        ):
            est.fit(q, k, scale=scale)
    slots, owners = _target_slots(estimators)
    if attention_matrix and row_lse is None:
        row_lse = exact_row_lse(
            q, k, scale=scale, rows=rows, causal=causal, tile=tile, chunk=chunk, dtype=dtype
        )
    S = len(estimators)
    F = max(e.feature_dim for e in estimators)
    t = min(tile, n)
    itemsize = torch.finfo(dtype).bits // 8
    # Bytes per leading index: inputs (exact and per-seed copies), S query-feature tiles, the
    # S-seed stack of estimates, a few tile x tile blocks, one key chunk of features, and for each
    # distinct own kernel its transformed inputs and one tile.
    per_index = itemsize * (
        2 * L * d * (1 + S)
        + S * t * (F + t)
        + 8 * t * t
        + 3 * min(chunk, L) * F
        + len(owners) * (2 * L * d + t * t)
    )
    qf, kf = _flat(q, lead), _flat(k, lead)
    sse = torch.zeros(S, dtype=torch.float64)
    tsse = torch.zeros(S, dtype=torch.float64)
    asse = torch.zeros(S, dtype=torch.float64)
    tk2 = torch.zeros(len(owners), dtype=torch.float64)
    sk2 = bias_sum = var_sum = 0.0
    n_visible = 0
    for g in _groups(qf.shape[0], per_index, memory_budget):
        qx, kx = qf[g].to(dtype) * s, kf[g].to(dtype) * s  # exact side, [G, L, d]
        # Each seed sees the input exactly as its attention() does: cast first, then scaled.
        qe = [qf[g].to(device=e.device, dtype=e.compute_dtype) * s for e in estimators]
        ke = [kf[g].to(device=e.device, dtype=e.compute_dtype) * s for e in estimators]
        params = [
            _slice_params(e.params_ or {}, lead, g) if e.feature_map.data_dependent else {}
            for e in estimators
        ]
        # each distinct own kernel exp(T(q') . T(k')), transformed by the estimator that defines it
        tq = [estimators[o].feature_map.target_transform(qx, params[o], True) for o in owners]
        tk = [estimators[o].feature_map.target_transform(kx, params[o], False) for o in owners]
        sums = None
        if attention_matrix:
            sums = [
                _key_sums(e, qe[i], ke[i], params[i], ri, causal, chunk, dtype)
                for i, e in enumerate(estimators)
            ]
        for i0 in range(0, n, tile):
            r = ri[i0 : i0 + tile]
            qfeat = [_features(e, qe[i][:, r], params[i], True, dtype) for i, e in enumerate(estimators)]
            if attention_matrix:
                lse = row_lse[g, i0 : i0 + r.numel()]  # [G, ti]
                if causal:
                    norms = [(dn[:, i0 : i0 + r.numel()], cn[:, i0 : i0 + r.numel()]) for dn, cn in sums]
                else:  # phi(q_i) . S exp(M), with this tile's own query features
                    norms = [
                        ((phi * S_vec[:, None, :]).sum(dim=-1), c + M[:, None])
                        for (phi, c), (S_vec, M) in zip(qfeat, sums)
                    ]
            for j0 in range(0, n, tile):
                c_idx = ri[j0 : j0 + tile]
                logits = qx[:, r] @ kx[:, c_idx].transpose(-1, -2)  # [G, ti, tj], exact side
                K = torch.exp(logits)
                sk2 += float((K * K).sum())
                Kt = [torch.exp(a[:, r] @ b[:, c_idx].transpose(-1, -2)) for a, b in zip(tq, tk)]
                for j, Kj in enumerate(Kt):
                    tk2[j] += float((Kj * Kj).sum())
                if attention_matrix:
                    visible = c_idx[None, :] <= r[:, None] if causal else None
                    A = torch.exp(logits - lse.unsqueeze(-1))
                    if causal:
                        A = A.masked_fill(~visible, 0.0)
                        n_visible += int(visible.sum()) * A.shape[0]
                    else:
                        n_visible += A.numel()
                stack = torch.empty(S, *K.shape, dtype=dtype, device=K.device)
                for i, e in enumerate(estimators):
                    phi_q, cq = qfeat[i]
                    phi_k, ck = _features(e, ke[i][:, c_idx], params[i], False, dtype)
                    G_ = phi_q @ phi_k.transpose(
                        -1, -2
                    )  # [G, ti, tj]: products relative to the row constants
                    Kh = G_ * torch.exp(cq.unsqueeze(-1) + ck.unsqueeze(-2))
                    stack[i] = Kh
                    sse[i] += float(((Kh - K) ** 2).sum())
                    if slots[i] is not None:
                        tsse[i] += float(((Kh - Kt[slots[i]]) ** 2).sum())
                    if attention_matrix:
                        dn, cn = norms[i]
                        expo = cq.unsqueeze(-1) + ck.unsqueeze(-2) - cn.unsqueeze(-1)
                        if causal:  # masked pairs may have overflowing exponents; they score 0 anyway
                            expo = expo.masked_fill(~visible, _NEG_INF)
                        Ah = G_ / dn.unsqueeze(-1) * torch.exp(expo)
                        if causal:
                            Ah = Ah.masked_fill(~visible, 0.0)
                        asse[i] += float(((Ah - A) ** 2).sum())
                Kbar = stack.mean(dim=0)
                bias_sum += float(((Kbar - K) ** 2).sum())
                if S > 1:
                    var_sum += float(((stack - Kbar) ** 2).sum()) / (S - 1)
    n_pairs = qf.shape[0] * n * n
    mean_k2 = sk2 / n_pairs
    bias2 = bias_sum / n_pairs
    mc_variance = var_sum / n_pairs if S > 1 else math.nan
    return KernelErrors(
        kernel_mse=(sse / n_pairs).tolist(),
        kernel_rel_mse=(sse / sk2).tolist(),
        attn_mse=(asse / max(n_visible, 1)).tolist() if attention_matrix else None,
        target_kernel_rel_mse=[
            float(tsse[i] / tk2[j]) if j is not None else math.nan for i, j in enumerate(slots)
        ]
        if owners
        else None,
        bias2=bias2,
        mc_variance=mc_variance,
        bias2_rel=bias2 / mean_k2,
        mc_variance_rel=mc_variance / mean_k2,
        mean_k2=mean_k2,
        n_pairs=n_pairs,
    )
