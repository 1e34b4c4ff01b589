"""Kernel and attention-matrix errors of random-feature estimators, streamed over pair tiles.

Notation: an estimator sees q' = q * s and k' = k * s with s = scale**0.5 (scale = 1/sqrt(d)
for attention); K_ij = exp(q'_i . k'_j) is the softmax kernel on the true scale and K^s_ij the
estimate of seed s (of S). Means run over the scored pairs (i, j) and over every leading
(batch/head) index.

    kernel_mse      = mean_ij (K^_ij - K_ij)^2
    kernel_rel_mse  = sum_ij (K^_ij - K_ij)^2 / sum_ij K_ij^2
    target_kernel_rel_mse = the same against the estimator's declared target kernel
                      (``est.target_kernel``: log k(q', k') on each tile) where that is not the
                      softmax kernel; NaN where it is, or has no closed form
    attn_mse        = mean over visible pairs of (A^_ij - A_ij)^2, A_ij = K_ij / sum_{j' visible} K_ij'
                      (the row sums run over *all* keys, also when only a sample of pairs is
                      scored; visible: every key, or j <= i when causal)
    bias2           = mean_ij (mean_s K^s_ij - K_ij)^2
    mc_variance     = mean_ij var_s(K^s_ij)                   (unbiased over seeds, ddof = 1)
    bias2_rel, mc_variance_rel: the same divided by mean_ij K_ij^2

For an unbiased estimator E[bias2] = mc_variance / S: bias2 is the squared error of the seed
mean, not the bias alone.

Streaming (``tiles``): pairs are visited in ``tile x tile`` blocks, for a group of leading
indices at a time (as many as fit ``memory_budget``). For each query tile the S seeds' query
features are computed once (``[S, G, tile, F]``); key features are recomputed per tile pair (an
overhead of about d / tile over the pair products), so memory is O(G (L d S + S tile (F +
tile))) whatever the number of pairs. The exact side is computed in float64 (``dtype``).

Nothing is fitted here: data-dependent estimators must be fitted at the ``scale`` measured
(``est.fit(q, k, scale=scale)``), else EstimatorError.

Backends (``backend``): "torch" is the streamed float64 path above. "triton" runs the fused
kernel-error op (``rfbench.metrics.fused``: one call per seed, attention matrix included, one per
seed against a DARK-type target, one for the seeds' mean), and refuses with ``fused_reasons``'
list where it cannot serve the call. "auto" takes the fused op where ``fused_reasons`` is empty
(CUDA, Triton, exponential unsigned maps computing in float32, seeds sharing their norm term,
targets softmax or exp((Mq) . (Mk)), d <= 128) and the torch path otherwise, and also when the
op's float32 squares overflow (kernel values above ~exp(44)). The two agree to ~1e-6 relative
(see ``rfbench.metrics.fused``); ``KernelErrors.backend`` says which ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rfbench._checks import check_qkv
from rfbench.errors import DataError, EstimatorError, UnsupportedError
from rfbench.metrics.accumulate import AttentionSums, KernelSums
from rfbench.metrics.features import key_sums, row_features
from rfbench.metrics.fused import FusedOverflow, check_backend, fused_kernel_sums, fused_reasons
from rfbench.metrics.reference import MEMORY_BUDGET, exact_row_lse
from rfbench.metrics.tiles import flatten_lead, lead_groups, row_index, row_tiles, slice_params

_NEG_INF = -math.inf


def same_params(a: dict | None, b: dict | None) -> bool:
    """Whether two fitted-parameter dicts hold the same values (tensors compared exactly)."""
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


def same_target(a, b) -> bool:
    """Whether estimators ``a`` and ``b`` declare the same target kernel: the same name, the same
    kind of feature map and the same fitted parameters (seeds that share their fit, and darkl
    trained with a fixed ``FitConfig.seed``, do; seeds fitted or trained apart do not)."""
    return (
        a.target == b.target
        and type(a.feature_map) is type(b.feature_map)
        and same_params(a.params_, b.params_)
    )


def _target_slots(estimators) -> tuple[list[int | None], list]:
    """Which declared target kernel each estimator is measured against.

    Returns ``(slots, kernels)``: ``slots[i]`` indexes the distinct non-softmax target kernels
    with a closed form (None where the target is the softmax kernel or has no closed form, e.g.
    a trained FastFood-L's learned spectral kernel), ``kernels[j]`` its ``log_kernel``;
    estimators with ``same_target`` share one kernel.
    """
    slots: list[int | None] = []
    owners: list = []  # (estimator, its TargetKernel)
    for e in estimators:
        target = e.target_kernel
        if target.is_softmax or target.log_kernel is None:
            slots.append(None)
            continue
        j = next((j for j, (other, _) in enumerate(owners) if same_target(other, e)), None)
        if j is None:
            owners.append((e, target))
            j = len(owners) - 1
        slots.append(j)
    return slots, [t.log_kernel for _, t in owners]


def _check_fitted(estimators, scale: float) -> None:
    for est in estimators:
        if est.feature_map.data_dependent and (
            est.params_ is None or est.fit_scale_ is None or not math.isclose(est.fit_scale_, scale)
        ):
            at = "not fitted" if est.fit_scale_ is None else f"fitted at scale={est.fit_scale_:.6g}"
            raise EstimatorError(
                f"kernel_errors measures {est.name} at scale={scale:.6g}, but its data-dependent "
                f"parameters are {at}; call est.fit(q, k, scale={scale:.6g}) first (metrics fit nothing)"
            )


@dataclass
class KernelErrors:
    """Kernel and attention-matrix errors of S seeds of one estimator on one data tensor.

    Per-seed lists have one float per estimator given. ``attn_mse`` is None unless asked for;
    ``target_kernel_rel_mse`` is None unless some estimator's declared target kernel is not the
    softmax kernel and has a closed form (DARK, darkl), in which case it is measured against
    that estimator's own kernel; NaN for estimators whose target is the softmax kernel or has
    no closed form (a trained FastFood-L).
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
    backend: str = "torch"


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
    backend: str = "auto",
) -> KernelErrors:
    """Kernel errors of each estimator (one per seed) and their cross-seed bias^2 and variance.

    Args:
        estimators: S Estimators of one kind (one per seed); data-dependent ones must already be
            fitted at ``scale`` (``est.fit(q, k, scale=scale)``, on these or other tokens).
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
        backend: "auto", "torch" or "triton" (the fused kernel-error op; see the module docstring
            and ``rfbench.metrics.fused.fused_reasons``).
    """
    if not estimators:
        raise DataError("kernel_errors needs at least one estimator")
    est0 = estimators[0]
    check_backend(backend)
    check_qkv(q, k, dim=est0.dim)
    if q.shape[-2] != k.shape[-2]:
        raise DataError(f"q and k must have the same length here, got {q.shape[-2]} and {k.shape[-2]}")
    _check_fitted(estimators, scale)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    s = math.sqrt(scale)
    L, d = q.shape[-2:]
    ri = row_index(rows, L, q.device)
    n = ri.numel()
    slots, targets = _target_slots(estimators)
    fused = False
    if backend != "torch":
        reasons = fused_reasons(estimators, q, k, backend=backend)
        if backend == "triton" and reasons:
            raise UnsupportedError(reasons)
        fused = not reasons
    if attention_matrix and row_lse is None:
        row_lse = exact_row_lse(
            q, k, scale=scale, rows=rows, causal=causal, tile=tile, chunk=chunk, dtype=dtype
        )
    if fused:
        try:
            sums = fused_kernel_sums(
                estimators,
                q,
                k,
                scale=scale,
                rows=ri,
                slots=slots,
                causal=causal,
                chunk=chunk,
                tile=tile,
                row_lse=row_lse if attention_matrix else None,
                memory_budget=memory_budget,
            )
            return KernelErrors(**sums, backend="triton")
        except FusedOverflow:
            if backend == "triton":
                raise
    S = len(estimators)
    F = max(e.feature_dim for e in estimators)
    t = min(tile, n)
    itemsize = torch.finfo(dtype).bits // 8
    # Bytes per leading index: inputs (exact and per-seed copies), S query-feature tiles, the
    # S-seed stack of estimates, a few tile x tile blocks, one key chunk of features, and one
    # tile of each distinct target kernel.
    per_index = itemsize * (
        2 * L * d * (1 + S) + S * t * (F + t) + 8 * t * t + 3 * min(chunk, L) * F + len(targets) * t * t
    )
    qf, kf = flatten_lead(q, lead), flatten_lead(k, lead)
    if targets:  # a target's log_kernel takes the data's own leading dims (its parameters have them)
        qt, kt = (x.expand(*lead, L, d).to(dtype) * s for x in (q, k))
    ksum = KernelSums(slots, len(targets))
    asum = AttentionSums(S)
    for g in lead_groups(qf.shape[0], per_index, memory_budget):
        qx, kx = qf[g].to(dtype) * s, kf[g].to(dtype) * s  # exact side, [G, L, d]
        # Each seed sees the input exactly as its attention() does: cast first, then scaled.
        qe = [qf[g].to(device=e.device, dtype=e.compute_dtype) * s for e in estimators]
        ke = [kf[g].to(device=e.device, dtype=e.compute_dtype) * s for e in estimators]
        params = [
            slice_params(e.params_ or {}, lead, g) if e.feature_map.data_dependent else {} for e in estimators
        ]
        sums = None
        if attention_matrix:
            sums = [
                key_sums(e, qe[i], ke[i], params[i], ri, causal, chunk, dtype)
                for i, e in enumerate(estimators)
            ]
        for i0, r in row_tiles(ri, tile):
            qfeat = [row_features(e, qe[i][:, r], params[i], True, dtype) for i, e in enumerate(estimators)]
            if attention_matrix:
                lse = row_lse[g, i0 : i0 + r.numel()]  # [G, ti]
                if causal:
                    norms = [(dn[:, i0 : i0 + r.numel()], cn[:, i0 : i0 + r.numel()]) for dn, cn in sums]
                else:  # phi(q_i) . S exp(M), with this tile's own query features
                    norms = [
                        ((phi * S_vec[:, None, :]).sum(dim=-1), c + M[:, None])
                        for (phi, c), (S_vec, M) in zip(qfeat, sums)
                    ]
            for _, c_idx in row_tiles(ri, tile):
                logits = qx[:, r] @ kx[:, c_idx].transpose(-1, -2)  # [G, ti, tj], exact side
                K = torch.exp(logits)
                Kt = [
                    torch.exp(lk(qt[..., r, :], kt[..., c_idx, :]).to(dtype).reshape(-1, *K.shape[-2:])[g])
                    for lk in targets
                ]
                ksum.add_exact(K, Kt)
                if attention_matrix:
                    visible = c_idx[None, :] <= r[:, None] if causal else None
                    A = torch.exp(logits - lse.unsqueeze(-1))
                    if causal:
                        A = A.masked_fill(~visible, 0.0)
                        asum.add_visible(int(visible.sum()) * A.shape[0])
                    else:
                        asum.add_visible(A.numel())
                stack = torch.empty(S, *K.shape, dtype=dtype, device=K.device)
                for i, e in enumerate(estimators):
                    phi_q, cq = qfeat[i]
                    phi_k, ck = row_features(e, ke[i][:, c_idx], params[i], False, dtype)
                    G_ = phi_q @ phi_k.transpose(
                        -1, -2
                    )  # [G, ti, tj]: products relative to the row constants
                    Kh = G_ * torch.exp(cq.unsqueeze(-1) + ck.unsqueeze(-2))
                    stack[i] = Kh
                    ksum.add_seed(i, Kh, K, Kt)
                    if attention_matrix:
                        dn, cn = norms[i]
                        expo = cq.unsqueeze(-1) + ck.unsqueeze(-2) - cn.unsqueeze(-1)
                        if causal:  # masked pairs may have overflowing exponents; they score 0 anyway
                            expo = expo.masked_fill(~visible, _NEG_INF)
                        Ah = G_ / dn.unsqueeze(-1) * torch.exp(expo)
                        if causal:
                            Ah = Ah.masked_fill(~visible, 0.0)
                        asum.add_seed(i, Ah, A)
                ksum.add_seeds(stack, K)
    n_pairs = qf.shape[0] * n * n
    mean_k2 = ksum.sk2 / n_pairs
    bias2 = ksum.bias_sum / n_pairs
    mc_variance = ksum.var_sum / n_pairs if S > 1 else math.nan
    return KernelErrors(
        kernel_mse=(ksum.sse / n_pairs).tolist(),
        kernel_rel_mse=(ksum.sse / ksum.sk2).tolist(),
        attn_mse=asum.mse() if attention_matrix else None,
        target_kernel_rel_mse=[
            float(ksum.tsse[i] / ksum.tk2[j]) if j is not None else math.nan for i, j in enumerate(slots)
        ]
        if targets
        else None,
        bias2=bias2,
        mc_variance=mc_variance,
        bias2_rel=bias2 / mean_k2,
        mc_variance_rel=mc_variance / mean_k2,
        mean_k2=mean_k2,
        n_pairs=n_pairs,
    )
