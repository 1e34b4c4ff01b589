"""``kernel_errors`` on the fused kernel-error op (``rfbench.ops.kernel_error``), for exponential maps.

What it computes, per leading index and summed (q' = q s, k' = k s, s = scale**0.5, rows gathered
first, so the sums run over the scored pairs only):

- seed s: sum (K - K^s)^2 and sum K^2 from one op call on ``est.form(params_)`` (1/m folded in),
  giving ``kernel_mse`` and ``kernel_rel_mse``; in the same call, given each scored row's exact
  log-normaliser (``exact_row_lse``) and the seed's estimated one (``estimate_row_lse``: its own
  features of every key, on the torch side, O(L F)), sum (A^ - A)^2 over the visible pairs,
  giving ``attn_mse`` (sorted unique rows keep j <= i among the gathered rows);
- seed s against its declared target exp((Mq') . (Mk')): the op fed
  ``est.target_kernel.exponential_inputs(q', k')`` as (tq, tk), giving ``target_kernel_rel_mse``
  (NaN where the target is the softmax kernel or has no closed form, as on the torch path);
- ``bias2`` from ONE more call: Kbar = (1/S) sum_s phi_s(q) . phi_s(k) is the estimate of the S
  forms concatenated along F, each bias lowered by log(S)/2 (a factor 1/sqrt(S) on each side), so
  no per-pair stack of S estimates is needed; ``mc_variance`` then follows from the exact identity
  mean_s kernel_mse_s = bias2 + (S-1)/S * mc_variance (``rfbench.metrics.accumulate``).

Dispatch: ``fused_reasons`` lists why the op cannot serve a call (empty: it can).

Precision: features, pair products and each query row's sums over keys are float32; rows are
summed in float64. Products are float32-accurate (``_f32_precision``): "tf32x3" on GPUs with
TF32, "ieee" elsewhere (the interpreter computes in float32 anyway); not the op's GPU default
"tf32", whose 10-bit operands would move every exact value by ~1e-3. The torch path combines the
same float32 features in float64 against a float64 exact side, so the two agree to ~1e-6
relative on each sum. mc_variance, a difference of such sums, carries an absolute error of
~1e-6 * mean kernel_mse: negligible unless the seeds barely differ. Squares of kernel values
overflow float32 above exp(44); such sums come back non-finite and the call is redone on the
torch path (float64), or refused with ``backend="triton"``.
"""

from __future__ import annotations

import math

import torch

from rfbench import ops
from rfbench.errors import DataError, UnsupportedError
from rfbench.metrics.features import estimate_row_lse
from rfbench.metrics.tiles import flatten_lead, lead_groups, slice_params
from rfbench.ops.form import ExpForm

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise DataError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _forms(estimators) -> list[ExpForm | None]:
    """Each seed's form of the scaled inputs (the 1/m average folded in; params fitted at the scale)."""
    return [e.form(e.params_ or {}) for e in estimators]


def _same_norm(forms: list[ExpForm]) -> bool:
    """Whether the forms share coef and P, so that their features concatenate into one ExpForm."""
    a = forms[0]
    for b in forms[1:]:
        if b.coef != a.coef or (a.P is None) != (b.P is None):
            return False
        if a.P is not None and not (a.P.shape == b.P.shape and torch.equal(a.P, b.P.to(a.P))):
            return False
    return True


def _f32_precision(device: torch.device) -> str:
    # three TF32 tensor-core passes are about float32-accurate; plain "ieee" products spill ~1 KB
    # of registers per thread at the op's default tiles on sm_90 (compile_check), "tf32x3" ~16 B
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def fused_reasons(
    estimators: list,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    backend: str = "auto",
) -> list[str]:
    """Why the fused kernel-error op cannot serve ``kernel_errors(estimators, q, k, ...)``; empty when
    it can. Never imports Triton. ``backend="auto"`` also needs CUDA tensors ("triton" runs the op
    in the interpreter on CPU tensors under TRITON_INTERPRET=1)."""
    check_backend(backend)
    reasons = []
    forms = _forms(estimators)
    for e, f in zip(estimators, forms):
        if f is None:
            reasons.append(f"feature map {e.feature_map.name!r} is not exponential (no ExpForm)")
        else:
            reasons += [f"{e.name}: {r}" for r in ops.form_reasons(f)]  # the ops' own rule, once
        target = e.target_kernel
        if not target.is_softmax and target.log_kernel is not None and target.transform is None:
            reasons.append(
                f"{e.name}'s target kernel {target.name!r} is not exp((Mq) . (Mk)) (no exponential "
                "inputs), so the op cannot score against it"
            )
        if e.compute_dtype != torch.float32:
            reasons.append(f"{e.name} computes in {e.compute_dtype}; the op computes in float32")
    devices = {e.device for e in estimators}
    if len(devices) > 1:
        reasons.append(f"the estimators are on different devices {sorted(map(str, devices))}")
    good = [f for f in forms if f is not None]
    if good and not _same_norm(good):
        reasons.append(
            "the seeds' forms differ in their norm term (coef or P, e.g. DARK seeds fitted apart), "
            "so their mean is not one ExpForm and bias2 cannot come from one call"
        )
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    for e, f in zip(estimators, forms):
        if f is not None and torch.broadcast_shapes(lead, f.lead_shape()) != lead:
            reasons.append(
                f"{e.name}'s parameters carry leading dims {tuple(f.lead_shape())} beyond the data's "
                f"{tuple(lead)}"
            )
            break
    dev = next(iter(devices))
    if backend == "auto" and dev.type != "cuda":
        reasons.append(
            f"estimators on {dev}: backend='auto' uses the fused op on CUDA only "
            "(backend='triton' runs it in Triton's interpreter on CPU under TRITON_INTERPRET=1)"
        )
    else:  # the op's own reasons (Triton installed, device, RFBENCH_DISABLE_TRITON, d <= 128)
        probe = torch.empty(0, q.shape[-1], device=dev)  # it is handed float32 copies on ``dev``
        reasons += ops.not_supported_reasons(probe, d=q.shape[-1])
    return reasons


def mean_form(forms: list[ExpForm]) -> ExpForm:
    """The form whose phi(q) . phi(k) is the mean over the S forms' estimates: features
    concatenated along F, each scaled by 1/sqrt(S) on each side (bias - log(S)/2). The forms must
    share coef and P (``_same_norm``)."""
    S = len(forms)
    lead = torch.broadcast_shapes(*(f.lead_shape() for f in forms))  # () when all are shared
    W = torch.cat([f.W.expand(*lead, *f.W.shape[-2:]) for f in forms], dim=-2)
    bias = torch.cat([f.bias.expand(*lead, f.bias.shape[-1]) for f in forms], dim=-1)
    return ExpForm(W, bias - 0.5 * math.log(S), forms[0].coef, forms[0].P)


class FusedOverflow(UnsupportedError):
    """The op's float32 sums are not usable (kernel values above ~exp(44) overflow their squares;
    all below ~exp(-52) underflow to a zero sum of K^2): use the torch path."""


def combine(
    per_seed: list[tuple[float, float]], target_rel: list[float], bias_sse: float, n_pairs: int
) -> dict:
    """``KernelErrors`` fields (attn_mse None) from the sums: ``per_seed[s] = (sse_s, sum K^2)``,
    ``target_rel[s]`` (NaN: not measured; empty: no seed has a target), and ``bias_sse``, the sse
    of the mean form (``mean_form``) over ``n_pairs`` pairs."""
    S = len(per_seed)
    sk2 = per_seed[0][1]
    mse = [sse / n_pairs for sse, _ in per_seed]
    bias2 = bias_sse / n_pairs
    # mean_s kernel_mse_s = bias2 + (S-1)/S * mc_variance, entry by entry (exact algebra).
    mc_variance = (sum(mse) / S - bias2) * S / (S - 1) if S > 1 else math.nan
    mean_k2 = sk2 / n_pairs
    return dict(
        kernel_mse=mse,
        kernel_rel_mse=[sse / sk2 for sse, _ in per_seed],
        attn_mse=None,
        target_kernel_rel_mse=list(target_rel) if target_rel else None,
        bias2=bias2,
        mc_variance=mc_variance,
        bias2_rel=bias2 / mean_k2,
        mc_variance_rel=mc_variance / mean_k2,
        mean_k2=mean_k2,
        n_pairs=n_pairs,
    )


def _estimate_norms(estimators, q, k, s, rows, causal, lead, chunk, tile, memory_budget):
    """Each seed's ``[n_lead, n]`` log row normalisers of its estimate (``estimate_row_lse``), from
    the seed's own features of every key (not only the scored rows), in float64."""
    qf, kf = flatten_lead(q, lead), flatten_lead(k, lead)
    L, d = q.shape[-2:]
    F = max(e.feature_dim for e in estimators)
    per_index = 8 * (2 * L * d + 3 * min(chunk, L) * F + min(tile, rows.numel()) * F)
    out = [torch.empty(qf.shape[0], rows.numel(), dtype=torch.float64, device=e.device) for e in estimators]
    for g in lead_groups(qf.shape[0], per_index, memory_budget):
        for e, o in zip(estimators, out):
            # as the torch path: cast first, then scaled; parameters of these leading indices
            qe, ke = (x[g].to(device=e.device, dtype=e.compute_dtype) * s for x in (qf, kf))
            params = slice_params(e.params_ or {}, lead, g) if e.feature_map.data_dependent else {}
            o[g] = estimate_row_lse(e, qe, ke, params, rows.to(e.device), causal, chunk, tile, torch.float64)
    return out


def fused_kernel_sums(
    estimators,
    q,
    k,
    *,
    scale: float,
    rows,
    slots,
    row_lse=None,
    causal: bool = False,
    chunk: int = 1024,
    tile: int = 256,
    memory_budget: int,
) -> dict:
    """The fused path's ``KernelErrors`` fields. q, k ``[..., L, d]`` unscaled; ``rows`` the scored
    row index; ``slots`` as ``kernel._target_slots`` (None: no target column); ``row_lse``
    (``exact_row_lse``, ``[n_lead, n]``) asks for attn_mse, scored over j <= i when ``causal``.
    Raises FusedOverflow when a float32 sum is not finite."""
    est0 = estimators[0]
    s = math.sqrt(scale)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    rows = rows.to(est0.device)
    # Cast first, then scaled, as each seed's torch path (and attention()) sees the input. Sorted
    # unique rows keep the order, so j <= i among the gathered rows is j <= i in the sequence.
    qs, ks = (
        x.to(device=est0.device, dtype=torch.float32).expand(*lead, *x.shape[-2:])[..., rows, :] * s
        for x in (q, k)
    )
    forms = _forms(estimators)
    precision = _f32_precision(qs.device)
    attn: list[float] = []

    def run(form, tq=None, tk=None, row_norms=None) -> tuple[float, float]:
        out = ops.kernel_error(
            qs,
            ks,
            form.to(device=qs.device),
            tq,
            tk,
            row_norms=row_norms,
            causal=causal and row_norms is not None,
            backend="triton",
            precision=precision,
            max_feature_bytes=memory_budget,
        )
        sse, k2 = float(out.sse.sum()), float(out.sum_exact2.sum())
        if not (math.isfinite(sse) and math.isfinite(k2) and k2 > 0):  # k2 = 0: every K^2 underflowed
            raise FusedOverflow(["kernel values overflow (or all underflow) the fused op's float32 squares"])
        if row_norms is not None:
            attn.append(float(out.attn_sse.sum()) / (lead.numel() * out.attn_count))
        return sse, k2

    with torch.no_grad():
        if row_lse is None:
            per_seed = [run(f) for f in forms]
        else:
            lse = row_lse.to(qs.device).reshape(*lead, rows.numel())
            norms = _estimate_norms(estimators, q, k, s, rows, causal, lead, chunk, tile, memory_budget)
            per_seed = [run(f, row_norms=(lse, lh.reshape(*lead, -1))) for f, lh in zip(forms, norms)]
        target_rel = []
        if any(j is not None for j in slots):
            for e, f, j in zip(estimators, forms, slots):
                if j is None:
                    target_rel.append(math.nan)
                else:
                    sse, k2 = run(f, *e.target_kernel.exponential_inputs(qs, ks))
                    target_rel.append(sse / k2)
        bias_sse = per_seed[0][0] if len(forms) == 1 else run(mean_form(forms))[0]
    out = combine(per_seed, target_rel, bias_sse, lead.numel() * rows.numel() ** 2)
    return dict(out, attn_mse=attn if row_lse is not None else None)
