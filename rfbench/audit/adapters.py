"""Adapters: how the audit reaches an implementation's projection, kernel estimate and attention.

An adapter wraps one implementation of positive random-feature (FAVOR+) softmax attention and
answers, for a projection drawn from ``seed``:

    projection(seed)             -> W [m, d] float64: the random rows omega_i, or None
    kernel(x, y, seed)           -> [P] estimates of exp(x_p . y_p) on the true scale (x, y [P, d])
    attention(q, k, v, seed, causal) -> [B, H, L, dv] in the implementation's own code path
                                    (scale 1/sqrt(d): features of x d^-1/4, as Performer does)

The audit builds its references from ``projection(seed)`` (``rfbench.audit.checks``), so an
adapter adds no math of its own beyond undoing a documented stabiliser where the implementation
gives its features only up to a known constant (said in each adapter's docstring).

Third-party adapters sit behind an optional extra; ``missing()`` says why one cannot run (the
package is absent: the install command) and the audit reports it as skipped.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from typing import ClassVar

import torch

from rfbench.errors import EstimatorError

F64 = torch.float64


class Adapter:
    """Base class. Class attributes say what the implementation is and which checks apply."""

    name: ClassVar[str] = ""
    #: What the adapter wraps, in words (printed above its table).
    describes: ClassVar[str] = ""
    #: Command that installs the implementation (printed when it is missing).
    install: ClassVar[str] = ""
    #: "orthogonal" or "iid": the law its projection claims (None: none reachable).
    projection_law: ClassVar[str | None] = "orthogonal"
    #: Whether the implementation has a causal mode.
    causal: ClassVar[bool] = True
    #: The dtype it computes in (sets the float-rounding tolerances).
    dtype: ClassVar[torch.dtype] = torch.float32
    #: Whether it has a non-causal mode (fla's Based attention is causal only).
    noncausal: ClassVar[bool] = True
    #: A deterministic map (no random draw): its kernel is checked against ``closed_form``, not
    #: for unbiasedness for exp(x . y), and its attention against ``reference_attention``.
    deterministic: ClassVar[bool] = False

    def __init__(self, dim: int = 16, num_features: int = 128):
        self.dim, self.num_features = int(dim), int(num_features)

    def missing(self) -> list[str]:
        """Why the implementation cannot be audited here (empty: it can)."""
        return []

    def version(self) -> str:
        return ""

    def projection(self, seed: int) -> torch.Tensor | None:
        raise NotImplementedError

    def kernel(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor | None:
        raise NotImplementedError

    def attention(self, q, k, v, seed: int, causal: bool) -> torch.Tensor:
        raise NotImplementedError

    def variance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Closed-form variance of ``kernel`` per pair (x, y ``[P, d]`` -> ``[P]``), or None."""
        return None

    def closed_form(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """A deterministic map's exact kernel per pair (float64), or None."""
        return None

    def reference_attention(self, q, k, v, causal: bool) -> torch.Tensor | None:
        """The exact normalised attention of the kernel ``closed_form`` (float64), or None (then the
        audit builds FAVOR+'s from ``projection``)."""
        return None


# --------------------------------------------------------------------------- rfbench (the control)
class EstimatorAdapter(Adapter):
    """An rfbench Estimator (the control, and the deliberately broken copies of the tests).

    ``make(seed) -> Estimator`` builds it once; each seed is an ``est.redraw(seed)``; kernel and
    attention are its own ``kernel()`` and ``attention()``; the projection is ``draw_.W``. The
    variance is ``theory.mse`` where the map has a closed form and the rows are independent.
    """

    name = "rfbench"
    install = "pip install -e ."

    def __init__(self, make, label: str, *, dim: int = 16, num_features: int = 128):
        super().__init__(dim, num_features)
        self._make = make
        self._est = est = make(0)
        self.label = label
        self.describes = f"rfbench {est.name} (control), {est.compute_dtype}"
        self.dtype = est.compute_dtype
        self.projection_law = "iid" if est.weight_matrix.independent_rows else "orthogonal"

    @classmethod
    def from_name(cls, estimator: str, *, dim: int = 16, num_features: int = 128, dtype=torch.float32):
        import rfbench as rb

        def make(seed):
            return rb.make_estimator(estimator, dim=dim, num_features=num_features, seed=seed, dtype=dtype)

        make(0)  # an unknown name or pair fails here, with the registry's message
        return cls(make, f"rfbench:{estimator}", dim=dim, num_features=num_features)

    def projection(self, seed):
        return self._est.redraw(seed).draw_.W.to(F64)

    def kernel(self, x, y, seed):
        est = self._est.redraw(seed)
        return est.kernel(x.unsqueeze(-2), y.unsqueeze(-2))[..., 0, 0].to(F64)

    def attention(self, q, k, v, seed, causal):
        return self._est.redraw(seed).attention(q, k, v, causal=causal)

    def variance(self, x, y):
        from rfbench import theory

        est = self._est
        if not est.weight_matrix.independent_rows or theory.formula(type(est.feature_map)) is None:
            return None
        return theory.mse(est.feature_map, x, y, est.num_features)


# --------------------------------------------------------------------------- performer-pytorch
class PerformerAdapter(Adapter):
    """performer-pytorch's ``FastAttention`` (softmax kernel path, default ``ortho_scaling=0``).

    Projection: ``gaussian_orthogonal_random_matrix(m, d)`` under ``torch.manual_seed(seed)`` (the
    function FastAttention calls; its RNG is torch's global one). Kernel: ``softmax_kernel`` with
    the default ``eps=1e-4``, queries ``is_query=True``, keys ``is_query=False``, on x d^(1/4) (the
    function scales by d^-1/4 itself); it returns ratio * (exp(w.x - |x|^2/2 - c) + eps) with a
    max-subtraction c that the adapter multiplies back (c = max_i w_i.x for a query, the max over
    the one key's logits for a key: each pair is its own call), so what remains on the true scale
    is the implementation's estimate, epsilon included. Attention: ``FastAttention.forward`` with
    that projection copied into its buffer (causal: its non-CUDA path on CPU).
    """

    name = "performer"
    describes = "performer-pytorch FastAttention (softmax kernel, ortho_scaling=0), float32"
    install = 'pip install -e ".[audit]"   (performer-pytorch>=1.1.4)'

    def missing(self):
        try:
            importlib.import_module("performer_pytorch")
        except ImportError as exc:
            return [f"performer-pytorch is not installed ({exc}); {self.install}"]
        return []

    def version(self):
        from importlib.metadata import version

        return version("performer-pytorch")

    def _module(self):
        return importlib.import_module("performer_pytorch.performer_pytorch")

    def projection(self, seed):
        pp = self._module()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            W = pp.gaussian_orthogonal_random_matrix(self.num_features, self.dim, scaling=0)
        return W.to(F64)

    def kernel(self, x, y, seed):
        pp = self._module()
        W = self.projection(seed).float()
        s = self.dim**0.25  # softmax_kernel multiplies by d^-1/4: feed x d^1/4 to estimate exp(x . y)
        xs, ys = (t.float().reshape(1, 1, -1, self.dim) * s for t in (x, y))
        fq = pp.softmax_kernel(xs, projection_matrix=W, is_query=True)[0, 0]
        # each key alone: the (-1, -2) max of a one-token call is that key's own max
        fk = torch.stack([
            pp.softmax_kernel(ys[..., i : i + 1, :], projection_matrix=W, is_query=False)[0, 0, 0]
            for i in range(ys.shape[-2])
        ])
        cq = (x.float() @ W.T).amax(-1)  # the constants softmax_kernel subtracted (its data_dash max)
        ck = (y.float() @ W.T).amax(-1)
        return ((fq.double() * fk.double()).sum(-1)) * torch.exp(cq.double() + ck.double())

    def attention(self, q, k, v, seed, causal):
        pp = self._module()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints when the CUDA causal kernel is absent
            fa = pp.FastAttention(self.dim, nb_features=self.num_features, causal=causal)
        with torch.no_grad():
            fa.projection_matrix.copy_(self.projection(seed).float())
            return fa(q.float(), k.float(), v.float())


# --------------------------------------------------------------------------- darkformer-pytorch
class DarkformerAdapter(Adapter):
    """darkformer-pytorch's ``DarkformerKernelAttention`` at its initial (identity) geometry, where its
    kernel is exp(q . k / sqrt(d)) (FAVOR+ with a learnable M = I). Projection: its
    ``random_features.projection_matrix`` at ``projection_seed=seed`` (orthogonal by default).
    Kernel: those features with ``stabilize=False`` (documented as the unbiased kernel estimator)
    of x d^(1/4). Attention: the module's own ``forward(q, k, v)`` (linear mode, causal or not).
    """

    name = "darkformer"
    describes = "darkformer-pytorch DarkformerKernelAttention (identity geometry, linear mode), float32"
    install = 'pip install -e ".[audit]"   (darkformer-pytorch>=1.0)'

    def missing(self):
        try:
            importlib.import_module("darkformer_pytorch")
        except ImportError as exc:
            return [f"darkformer-pytorch is not installed ({exc}); {self.install}"]
        return []

    def version(self):
        from importlib.metadata import version

        return version("darkformer-pytorch")

    def _attn(self, seed, heads: int = 1, causal: bool = False):
        dk = importlib.import_module("darkformer_pytorch")
        return dk.DarkformerKernelAttention(
            self.dim, heads, num_features=self.num_features, causal=causal, projection_seed=seed
        )

    def projection(self, seed):
        return self._attn(seed).random_features.projection_matrix.detach().to(F64)

    def kernel(self, x, y, seed):
        rf = self._attn(seed).random_features
        s = self.dim**0.25
        with torch.no_grad():
            fq = rf.query_feature_map(x.float().reshape(1, 1, -1, self.dim) * s, stabilize=False)[0, 0]
            fk = rf.key_feature_map(y.float().reshape(1, 1, -1, self.dim) * s, stabilize=False)[0, 0]
        return (fq.double() * fk.double()).sum(-1)

    def attention(self, q, k, v, seed, causal):
        with torch.no_grad():
            return self._attn(seed, heads=q.shape[1], causal=causal)(q.float(), k.float(), v.float())


# --------------------------------------------------------------------------- flash-linear-attention
def taylor2_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 + t + t^2 / 2 at t = x . y (float64): the second-order Taylor kernel of exp(x . y)."""
    t = (x.double() * y.double()).sum(-1)
    return 1 + t + t * t / 2


def taylor2_attention(q, k, v, causal: bool) -> torch.Tensor:
    """Exact normalised Taylor-2 attention in float64: A = 1 + t + t^2/2 at t = q . k / sqrt(d)."""
    d = q.shape[-1]
    A = taylor2_kernel(q.unsqueeze(-2) * d**-0.25, k.unsqueeze(-3) * d**-0.25)
    if causal:
        A = A.tril()
    return (A @ v.double()) / A.sum(-1, keepdim=True)


class FLAAdapter(Adapter):
    """flash-linear-attention's Based attention (Arora et al., ICML 2024): the Taylor-2 feature map
    ``fla.modules.feature_map.TaylorFeatureMap`` (1, x / d^(1/4), and the upper triangle of x x^T /
    sqrt(d), the diagonal over sqrt(2)) and the fused causal kernel ``fla.ops.based.parallel_based``,
    which normalises as o / (z + 1e-6). The map is deterministic and biased for exp(q . k) by
    design, so the unbiasedness, variance and projection checks do not apply; its kernel is checked
    against 1 + t + t^2/2 (t = q . k / sqrt(d)) and its attention against the exact normalised
    Taylor-2 attention in float64. fla's other maps (Hedgehog, T2R, DPFP, ReBased) are learned, with
    no closed form to check. Without CUDA the Triton kernel runs in Triton's interpreter (fla is
    imported under ``TRITON_INTERPRET=1``; small sizes only)."""

    name = "fla"
    describes = "flash-linear-attention Based: TaylorFeatureMap + parallel_based (causal), float32"
    install = 'pip install -e ".[audit]"   (fla-core>=0.6)'
    projection_law = None
    noncausal = False
    deterministic = True

    def missing(self):
        try:
            _import_fla("fla.modules.feature_map")
        except Exception as exc:  # ImportError, or a platform probe of the package failing
            return [f"flash-linear-attention (fla-core) cannot be imported ({type(exc).__name__}: {exc}); "
                    f"{self.install}"]
        return []

    def version(self):
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("fla-core", "flash-linear-attention"):
            with contextlib.suppress(PackageNotFoundError):
                return version(dist)
        return ""

    def projection(self, seed):
        return None

    def kernel(self, x, y, seed):
        fm = _import_fla("fla.modules.feature_map").TaylorFeatureMap(self.dim)
        s = self.dim**0.25  # the map divides by d^(1/4): feed x d^(1/4) for the kernel of x . y
        with torch.no_grad(), warnings.catch_warnings():  # its checkpoint wrapper warns without grad
            warnings.simplefilter("ignore")
            fx, fy = fm(x.float() * s), fm(y.float() * s)
        return (fx.double() * fy.double()).sum(-1)

    def closed_form(self, x, y):
        return taylor2_kernel(x, y)

    def reference_attention(self, q, k, v, causal):
        return taylor2_attention(q, k, v, causal)

    def attention(self, q, k, v, seed, causal):
        if not causal:
            raise EstimatorError("fla's Based attention (parallel_based) is causal only")
        with torch.no_grad():  # fla takes [B, L, H, d]
            out = _import_fla("fla.ops.based").parallel_based(
                *(t.float().transpose(1, 2).contiguous() for t in (q, k, v)))
        return out.transpose(1, 2)


def _import_fla(module: str):
    """An fla module. Without CUDA the first fla import runs under TRITON_INTERPRET=1 (Triton reads
    it when a kernel is decorated, i.e. at import; the package imports its kernels with it), and
    the variable is restored afterwards."""
    import os
    import sys

    if torch.cuda.is_available() or any(m == "fla" or m.startswith("fla.") for m in sys.modules):
        return importlib.import_module(module)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with warnings.catch_warnings():  # "Triton is not supported on current platform, roll back to CPU"
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


#: Audit targets: name -> adapter factory(dim, num_features). ``rfbench:<estimator>`` audits any
#: rfbench estimator; ``rfbench`` alone is the control pair posrf-iid and posrf-orf.
TARGETS = {
    "performer": PerformerAdapter,
    "darkformer": DarkformerAdapter,
    "fla": FLAAdapter,
}
CONTROL = ("posrf-iid", "posrf-orf")


def adapters_for(target: str, *, dim: int = 16, num_features: int = 128) -> list[Adapter]:
    """The adapters a CLI TARGET names (``performer``, ``darkformer``, ``fla``, ``rfbench``,
    ``rfbench:<estimator>`` or ``all``)."""
    if target == "all":
        return [a for t in ("rfbench", *TARGETS) for a in adapters_for(t, dim=dim, num_features=num_features)]
    if target == "rfbench" or target.startswith("rfbench:"):
        names = CONTROL if target == "rfbench" else (target.split(":", 1)[1],)
        return [EstimatorAdapter.from_name(n, dim=dim, num_features=num_features) for n in names]
    if target not in TARGETS:
        known = ", ".join(["rfbench", "rfbench:<estimator>", *TARGETS, "all"])
        raise EstimatorError(f"unknown audit target {target!r}; known: {known}")
    return [TARGETS[target](dim=dim, num_features=num_features)]


def label(adapter: Adapter) -> str:
    return getattr(adapter, "label", adapter.name)

