"""Estimator: a feature map bound to one draw of a weight matrix.

    est = Estimator(PosRF(), ORF(), dim=64, num_features=256, seed=0)
    est.kernel(q, k)            # [..., Lq, Lk] estimate of exp(q . k), on the true scale
    est.attention(q, k, v)      # approximates softmax(q k^T / sqrt(d)) v

Stabilisers used (each exact; ``rfbench.ops.features.naive.stabiliser_constant``):
- a per-query constant (the query's max log-feature) is removed before exp(); it cancels
  between the numerator and the denominator of that query's attention row, and ``kernel()``
  multiplies it back;
- one constant shared by all keys (their global max log-feature) is removed; it scales every
  term of a row alike, so it cancels too. A per-key constant would not cancel (the defect of
  the Spectraformer code, docs/theory.md §0a).
- causal attention uses the prefix max over keys s <= t as query t's key constant, so no
  output depends on a future token, not even through rounding or underflow.
- ``kernel()`` normalises nothing, so it uses a per-key constant too and puts both constants
  back in log space (exact): another key's large features cannot underflow a key's, and
  exp(mq + mk) cannot overflow on its own. A pair whose dominant term lies ~e^-87 below both
  maxima still underflows in float32.
- a row whose features are all zero (log-features all -inf) gets the constant 0, so its
  features and kernel row are zeros, not NaN.

State (trailing underscore, all of it here; the feature map and weight matrix never change):
``draw_``, ``params_``, ``fit_scale_``, ``trained_`` and ``fit_result_``.
"""

from __future__ import annotations

import math

import torch

from rfbench import ops
from rfbench._checks import check_positive_int, check_qkv, check_scale, check_seed, check_sizes, check_tensor
from rfbench.errors import EstimatorError, UnsupportedError
from rfbench.features.base import FeatureMap, Params
from rfbench.features.target import TargetKernel, Trained
from rfbench.ops.features.naive import stabiliser_constant
from rfbench.ops.form import ExpForm
from rfbench.ops.rf_attention.naive import blocked_rf_attention, linear_attention
from rfbench.weights.base import WeightMatrix

__all__ = ["Estimator", "Trained"]


class Estimator:
    """A feature map x weight matrix pair with one drawn set of m random vectors.

    Attributes:
        num_features: m, the number of random vectors drawn.
        feature_dim: F, the number of output features (m * per_omega).
        dim: d, the input dimension.
        draw_: the WeightDraw (``W: [m, d]``).
        params_: fitted data-dependent parameters, or None; ``fit_scale_`` the scale they are for.
        trained_: None, or a ``Trained`` (set by rfbench.learning) saying what training changed.
        fit_result_: the trainer's FitResult after ``fit(..., train=...)``, else None.
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        weight_matrix: WeightMatrix,
        *,
        dim: int,
        num_features: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        check_sizes(dim, num_features)
        check_seed(seed)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise EstimatorError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        reasons = feature_map.supports(weight_matrix) + weight_matrix.supports(num_features, dim)
        if reasons:
            raise UnsupportedError([f"{feature_map.name}-{weight_matrix.name}: {r}" for r in reasons])
        self.feature_map = feature_map
        self.weight_matrix = weight_matrix
        self.dim = dim
        self.num_features = num_features
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        # Compute dtype: half types compute in float32 (features and sums need the range).
        self.compute_dtype = torch.promote_types(dtype, torch.float32)
        self.draw_ = self._draw(self.seed)
        self.params_: Params | None = None
        self.fit_scale_: float | None = None
        self.trained_: Trained | None = None
        self.fit_result_ = None

    # ----------------------------------------------------------------- descriptive
    @property
    def name(self) -> str:
        return f"{self.feature_map.name}-{self.weight_matrix.name}"

    @property
    def feature_dim(self) -> int:
        return self.num_features * self.feature_map.per_omega

    @property
    def unbiased(self) -> bool:
        """True when ``kernel()`` is an unbiased estimate of the target kernel."""
        return self.feature_map.unbiased and self.weight_matrix.unbiased

    @property
    def target_kernel(self) -> TargetKernel:
        """The kernel ``kernel()`` estimates: the trained one, else the map's at ``params_``."""
        if self.trained_ is not None:
            return self.trained_.target
        return self.feature_map.target_kernel(self.params_ or {})

    @property
    def target(self) -> str:
        """The target kernel's name (for results tables)."""
        if self.trained_ is not None:
            return self.trained_.target.name
        return self.feature_map.target

    def info(self) -> dict:
        """Plain-data description of this estimator (for results tables and reports)."""
        return {
            "estimator": self.name,
            "feature_map": self.feature_map.name,
            "weight_matrix": self.weight_matrix.name,
            "dim": self.dim,
            "num_features": self.num_features,
            "feature_dim": self.feature_dim,
            "unbiased": self.unbiased,
            "target": self.target,
            "notes": "; ".join(self.draw_.notes),
        }

    def __repr__(self) -> str:
        return (
            f"Estimator({self.name}, dim={self.dim}, num_features={self.num_features}, "
            f"seed={self.seed}, device={self.device}, dtype={self.dtype})"
        )

    # ----------------------------------------------------------------- randomness
    def _draw(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        return self.feature_map.draw(
            self.weight_matrix, self.num_features, self.dim,
            generator=generator, device=self.device, dtype=self.compute_dtype,
        )

    def redraw(self, seed: int) -> Estimator:
        """Draw new random vectors from ``seed`` (fitted parameters are kept)."""
        self.seed = check_seed(seed)
        self.draw_ = self._draw(self.seed)
        return self

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        scale: float = 1.0,
        train=None,
        progress=None,
    ) -> Estimator:
        """Fit data-dependent parameters (a no-op for data-independent maps).

        ``scale`` says which kernel the fit is for: the estimator sees ``q * scale**0.5`` and
        ``k * scale**0.5``. Use 1.0 (default) for ``kernel()``, and ``1/sqrt(d)`` (or the
        ``scale`` you pass to ``attention()``) for attention.

        Kernel learners (``darkl``, ``fastfoodl``) get only their starting point from a plain
        fit. ``train`` (a ``rfbench.learning.FitConfig``, or True for its defaults) also trains
        their learnable parts on these tokens (``v`` is needed by the attention objective), via
        ``rfbench.learning.fit_estimator``; its FitResult (training curve, fit time, kept step) is
        then ``self.fit_result_``. Keep held-out tokens out of what you pass here.
        """
        scale = check_scale(scale)
        if train is not None and train is not False:
            from rfbench.learning import FitConfig, fit_estimator

            config = FitConfig() if train is True else train
            self.fit_result_ = fit_estimator(self, q, k, v, config, scale=scale, progress=progress)
            return self
        check_qkv(q, k, dim=self.dim)
        s = math.sqrt(scale)
        self.params_ = self.feature_map.fit_params(self._cast(q) * s, self._cast(k) * s)
        self.fit_scale_ = float(scale)
        return self

    def _fitted(self, scale: float) -> Params | None:
        """The parameters in use at ``scale`` without fitting: {} (data-independent map), ``params_``
        (fitted at this scale), or None (to be fitted on the call's inputs)."""
        if not self.feature_map.data_dependent:
            return {}
        if self.params_ is not None and self.fit_scale_ is not None and math.isclose(self.fit_scale_, scale):
            return self.params_
        return None

    def _params(self, q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = False) -> Params:
        """Parameters for scaled inputs ``q``, ``k`` at ``scale`` (fitted on them if need be)."""
        params = self._fitted(scale)
        if params is not None:
            return params
        if causal:
            raise UnsupportedError(
                f"{self.name} fits its parameters to the whole sequence, which would let future "
                f"tokens change earlier causal outputs; call est.fit(q_train, k_train, scale={scale:.6g}) "
                "first (on held-out or the same tokens, knowingly)"
            )
        # Fitted on the inputs of this call: the attention-time behaviour of FAVOR++/FAVOR#.
        return self.feature_map.fit_params(q, k)

    # ----------------------------------------------------------------- features
    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.compute_dtype)

    def _row_terms(self) -> tuple[float | torch.Tensor, torch.Tensor | None]:
        """``(log_w, sign)``: what the average over the m rows adds to each feature's log-magnitude
        (the one place the 1/m or the row weights are applied), and the query-side sign ``[F]``
        (None when every weight is positive).

        sqrt of the weight on each side: -log(m)/2 (plain Monte Carlo), or log |w_i| / 2 with the
        sign of a (sparse-grid) weight on the query side.
        """
        rw = self.draw_.row_weights
        if rw is None:
            return -0.5 * math.log(self.num_features), None
        w = rw.repeat(self.feature_map.per_omega)
        return 0.5 * torch.log(w.abs()), (torch.sign(w) if self.draw_.signed else None)

    def form(self, params: Params, scale: float = 1.0) -> ExpForm | None:
        """The ExpForm of this estimator's features of ``scale**0.5 * x`` at ``params`` (1/m or the
        row weights and their signs folded in); None for maps that are not exponential."""
        form = self.feature_map.exp_form(self.draw_, params, self.dim)
        if form is None:
            return None
        log_w, sign = self._row_terms()
        form = ExpForm(form.W, form.bias + log_w, form.coef, form.P, sign)
        return form.scaled(math.sqrt(scale)) if scale != 1.0 else form

    def log_features(
        self, x: torch.Tensor, params: Params, is_query: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log_mag, factor)`` of the normalised features of ``x: [..., L, d]``."""
        log_mag, factor = self.feature_map.log_features(x, self.draw_, params, is_query)
        log_w, sign = self._row_terms()
        log_mag = log_mag + log_w
        if is_query and sign is not None:
            factor = sign if factor is None else factor * sign
        return log_mag, factor

    def features(self, x: torch.Tensor, is_query: bool = True) -> torch.Tensor:
        """Features ``[..., L, feature_dim]`` on the true scale: phi(q) . phi(k) estimates the kernel."""
        check_tensor(x, "x", dim=self.dim)
        if self.feature_map.data_dependent and self.params_ is None:
            raise EstimatorError(
                f"{self.name} has data-dependent parameters: call est.fit(q, k) before features()"
            )
        log_mag, factor = self.log_features(self._cast(x), self.params_ or {}, is_query)
        out = torch.exp(log_mag)
        return out if factor is None else out * factor

    def _stable_features(self, q, k, params, causal=False, per_key=False):
        """Query and key features with the exact stabilisers of the module docstring."""
        lq, fq = self.log_features(q, params, is_query=True)
        lk, fk = self.log_features(k, params, is_query=False)
        mq = stabiliser_constant(lq, "row")  # per-query constant: cancels in its own row
        # kernel() gives each entry its constants back (per key); attention needs one shared by
        # all keys, or the prefix max when causal
        mk = stabiliser_constant(lk, "row" if per_key else "prefix" if causal else "shared")
        Q = torch.exp(lq - mq)
        K = torch.exp(lk - mk)
        if fq is not None:
            Q = Q * fq
        if fk is not None:
            K = K * fk
        return Q, mq, K, mk

    # ----------------------------------------------------------------- estimates
    def kernel(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Estimate of the target kernel for all pairs: ``[..., Lq, Lk]``, on the true scale."""
        check_qkv(q, k, dim=self.dim)
        q, k = self._cast(q), self._cast(k)
        Q, mq, K, mk = self._stable_features(q, k, self._params(q, k, 1.0), per_key=True)
        P = Q @ K.transpose(-1, -2)
        # Constants go back in log space: exp(mq + mk) alone can overflow where the estimate does not.
        return torch.sign(P) * torch.exp(torch.log(P.abs()) + (mq + mk.transpose(-1, -2)))

    def fused_reasons(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, form: ExpForm | None
    ) -> list[str]:
        """Why ``attention(q, k, v)`` cannot run on the fused kernels with ``form`` (empty when it can)."""
        reasons = []
        if form is None:
            reasons.append(f"feature map {self.feature_map.name!r} is not exponential (no ExpForm)")
        if self.device.type != "cuda" or q.device != self.device:
            reasons.append(f"estimator on {self.device} with inputs on {q.device}; the kernels run on CUDA")
        if self.compute_dtype != torch.float32:
            reasons.append(
                f"the estimator computes in {self.compute_dtype}; the kernels accumulate in float32"
            )
        tensors = [q, k, v, self.draw_.W, *(self.params_ or {}).values()]
        if form is not None:
            tensors += [form.W, form.bias]
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            reasons.append(
                "gradients are needed: the fused kernels have no backward pass (the torch path has)"
            )
        return reasons + ops.not_supported_reasons(q, k, v, d=q.shape[-1], dv=v.shape[-1], form=form)

    def _fused_attention(self, q, k, v, params: Params, scale: float, causal: bool) -> torch.Tensor | None:
        """``ops.rf_attention`` on ``self.form(params, scale)``, or None where ``fused_reasons`` objects."""
        form = self.form(params, scale)
        if self.fused_reasons(q, k, v, form):
            return None
        return ops.rf_attention(q, k, v, form, causal)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = False,
        *,
        scale: float | None = None,
        chunk: int | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """Random-feature attention, approximating softmax(q k^T * scale) v.

        q ``[..., Lq, d]``, k ``[..., Lk, d]``, v ``[..., Lk, dv]`` -> ``[..., Lq, dv]`` in v's
        dtype. ``scale`` defaults to 1/sqrt(d); the feature map sees ``x * scale**0.5``.
        With ``causal`` (needs Lq == Lk), output t depends on tokens s <= t only. On CUDA the
        fused kernels of rfbench.ops run where ``fused_reasons`` is empty (same math); elsewhere
        exponential maps take ``ops.blocked_rf_attention`` (same math, fewer passes over memory)
        unless a gradient is needed.
        ``chunk``: tokens per causal chunk; None: the path's default (``ops.blocked_rf_attention``'s CHUNK;
        128 on the torch path).
        ``check=False`` skips the NaN/Inf scan of q, k and v (shapes are still checked): for a
        timed loop whose inputs were validated once (the scan is one read of each input).
        """
        check_qkv(q, k, v, dim=self.dim, finite=check)
        if chunk is not None:
            check_positive_int(chunk, "chunk", hint=" (tokens per causal block)")
        if causal and q.shape[-2] != k.shape[-2]:
            raise EstimatorError(
                f"causal attention needs as many queries as keys, got Lq={q.shape[-2]}, Lk={k.shape[-2]}"
            )
        scale = 1.0 / math.sqrt(self.dim) if scale is None else check_scale(scale)
        s = math.sqrt(scale)
        out_dtype = v.dtype
        params = self._fitted(scale)
        if q.is_cuda and params is not None:  # the kernels take q, k, v as given: no cast, no copy
            out = self._fused_attention(q, k, v, params, scale, causal)
            if out is not None:
                return out
        if params is None:  # fitted on this call's tokens (FAVOR++/FAVOR# at attention time)
            params = self._params(self._cast(q) * s, self._cast(k) * s, scale, causal=causal)
            out = self._fused_attention(q, k, v, params, scale, causal) if q.is_cuda else None
            if out is not None:
                return out
        v = self._cast(v)
        # the blocked path reads the ExpForm only: not for a map whose log_features override it
        own_features = type(self.feature_map).log_features is not FeatureMap.log_features
        form = None if own_features else self.form(params, scale)
        if form is not None and not self._needs_grad(q, k, v, params, form):
            # the scale is folded into the form (W s, coef s^2): q and k are read as given
            out = blocked_rf_attention(self._cast(q), self._cast(k), v, form, causal, chunk=chunk)
            return out.to(out_dtype)
        qs, ks = self._cast(q) * s, self._cast(k) * s
        Q, _, K, mk = self._stable_features(qs, ks, params, causal=causal)
        return linear_attention(Q, K, mk, v, causal, 128 if chunk is None else chunk).to(out_dtype)

    def _needs_grad(self, *tensors) -> bool:
        """True when autograd records the call (the blocked path builds its features in place)."""
        if not torch.is_grad_enabled():
            return False
        flat = []
        for t in tensors:
            if isinstance(t, dict):
                flat += list(t.values())
            else:
                flat += [t.W, t.bias, t.P] if isinstance(t, ExpForm) else [t]
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)
