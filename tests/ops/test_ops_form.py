"""ExpForm (rfbench/ops/form.py) and the Estimator's forms: each exponential map's form gives the
textbook features of its paper (written out here, independently of rfbench), row weights and the
attention scale fold in, unsupported cases say why, and the torch references and the Estimator
agree with an O(L^2) formula written in this file.

No Triton here: plain torch checks (float64 where exactness is asserted).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import rfbench as rb
from rfbench import ops
from rfbench.errors import UnsupportedError
from rfbench.estimator import Estimator
from rfbench.features.taylor import taylor2_size
from rfbench.ops.features.naive import log_features, naive_features, stabiliser_constant
from rfbench.ops.form import ExpForm
from rfbench.registry import get_feature_map
from rfbench.weights.base import WeightDraw, WeightMatrix

F64 = torch.float64
D = 8


def _x(*shape, seed=0, scale=0.5):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _spd(d, seed):
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return A @ A.T / d + 0.5 * torch.eye(d, dtype=F64)


def _fit(est, q, k, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # whitening a tiny sample: floor warning
        return est.feature_map.fit_params(q * s, k * s)


# (estimator name, feature params, needs fit): every exponential family, fixed and fitted parameters.
CASES = [
    ("posrf-iid", {}, False),
    ("posrf-orf", {}, False),
    ("hyprf-iid", {}, False),
    ("gerf-iid", {"A": -0.1}, False),
    ("oprf-orf", {}, True),  # A* fitted per (batch, head)
    ("sderf-iid", {}, True),  # Q and a fitted per (batch, head)
    ("dark-iid", {"sigma": _spd(D, 1)}, False),
    ("dark-iid", {}, True),  # whitening M fitted per (batch, head)
    ("darkis-iid", {}, True),
    ("darkis-iid", {"M": _spd(D, 2)}, True),
    ("darkl-iid", {"mode": "aligned"}, True),
    ("darkl-iid", {"mode": "is", "param": "diag", "init": "proposal"}, True),
]


@pytest.mark.parametrize("name,fparams,fit", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("scale", [1.0, D**-0.5])
def test_form_reproduces_estimator_log_features(name, fparams, fit, scale):
    est = rb.make_estimator(name, dim=D, num_features=12, seed=3, dtype=F64, feature_params=fparams)
    q, k = _x(2, 3, 9, D, seed=1), _x(2, 3, 7, D, seed=2)
    s = math.sqrt(scale)
    params = _fit(est, q, k, s) if fit else {}
    form = est.form(params, scale)
    assert form.feature_dim == est.feature_dim and not form.signed
    for x, is_query in ((q, True), (k, False)):
        ref, factor = est.log_features(x * s, params, is_query)
        assert factor is None
        out = log_features(x, form)
        torch.testing.assert_close(out, ref.expand_as(out), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- textbook features
# phi_i(x) of one omega_i, written from the papers, with nothing from rfbench but the draw W
# (rows w_i ~ N(0, I)) and the fitted parameters; the Estimator divides by sqrt(m).
def _posrf(W, x):  # Performer Lemma 1
    return torch.exp(x @ W.T - 0.5 * (x * x).sum(-1, keepdim=True))


def _hyprf(W, x):  # Performer Lemma 1, antithetic pair
    base = torch.exp(-0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(2)
    return torch.cat([base * torch.exp(x @ W.T), base * torch.exp(-(x @ W.T))], dim=-1)


def _gerf(W, x, A):  # CRT sec. 3: D exp(A|w|^2 + B w.x + C|x|^2), B = sqrt(1 - 4A), C = -1/2
    A = torch.as_tensor(A, dtype=F64)
    d = x.shape[-1]
    Dc = (1 - 4 * A) ** (d / 4)
    return Dc * torch.exp(
        A * (W * W).sum(-1) + torch.sqrt(1 - 4 * A) * (x @ W.T) - 0.5 * (x * x).sum(-1, keepdim=True)
    )


def _dark(W, x, M):  # DARKFormer eq. (3): PosRF on M x
    return _posrf(W, x @ M.T)


def _importance(omega, x, sigma):  # sqrt(p_I / p_Sigma)(omega) exp(omega . x - |x|^2 / 2)
    d = x.shape[-1]
    p_i = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    p_s = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), covariance_matrix=sigma)
    w = torch.exp(0.5 * (p_i.log_prob(omega) - p_s.log_prob(omega)))  # [m]
    return w * torch.exp(x @ omega.T - 0.5 * (x * x).sum(-1, keepdim=True))


def _sderf(W, x, Q, a):
    # FAVOR# DERF: D exp(w^T A w + w^T B x - |x|^2/2), A = diag(a), B = diag(sqrt(1 - 4a)) Q^T
    Dc = torch.prod((1 - 4 * a) ** 0.25)
    B = torch.diag(torch.sqrt(1 - 4 * a)) @ Q.T
    quad = (W * W * a).sum(-1)
    return Dc * torch.exp(quad + x @ (W @ B).T - 0.5 * (x * x).sum(-1, keepdim=True))


def _lara(W, x, mu):
    # LARA-style MIS (balance heuristic): omega_i = g_i + mu_(i mod C), weight sqrt(N / qbar)
    C, m, d = mu.shape[0], W.shape[0], x.shape[-1]
    omega = W + mu[torch.arange(m) % C]
    n_c = torch.bincount(torch.arange(m) % C, minlength=C).to(F64)
    eye = torch.eye(d, dtype=F64)
    dens = [torch.distributions.MultivariateNormal(c, eye).log_prob(omega).exp() for c in mu]
    qbar = sum(n / m * p for n, p in zip(n_c, dens))
    p0 = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    w = torch.sqrt(p0.log_prob(omega).exp() / qbar)
    return w * torch.exp(x @ omega.T - 0.5 * (x * x).sum(-1, keepdim=True))


def _textbook(name, fm, W, x, params):
    if name == "posrf":
        return _posrf(W, x)
    if name == "hyprf":
        return _hyprf(W, x)
    if name == "gerf":
        return _gerf(W, x, fm.params["A"])
    if name == "oprf":
        return _gerf(W, x, params["A"].reshape(()))
    if name == "sderf":
        return _sderf(W, x, params["Q"], params["a"].reshape(-1))
    if name == "dark":
        return _dark(W, x, params["M"] if "M" in params else fm.params["M"])
    if name == "darkis":
        R = params["sqrt_sigma_star"]
        return _importance(W @ R, x, params["sigma_star"])
    if name == "darkl":
        M = params["M"]
        if fm.params["mode"] == "aligned":
            return _dark(W, x, M)
        return _importance(W @ M, x, M.T @ M)  # omega = M^T w ~ N(0, M^T M)
    if name == "lara":
        return _lara(W, x, params["mu"])
    raise KeyError(name)


TEXTBOOK = [
    ("posrf", {}),
    ("hyprf", {}),
    ("gerf", {"A": -0.1}),
    ("oprf", {}),
    ("sderf", {}),
    ("dark", {"M": torch.eye(D, dtype=F64) + 0.2 * _spd(D, 3)}),
    ("dark", {}),
    ("darkis", {}),
    ("darkl", {"mode": "aligned"}),
    ("darkl", {"mode": "is", "init": "proposal"}),
    ("lara", {"proposals": 3}),
]


@pytest.mark.parametrize("name,fparams", TEXTBOOK, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TEXTBOOK)])
def test_forms_give_the_textbook_features(name, fparams):
    m = 10
    est = rb.make_estimator(f"{name}-iid", dim=D, num_features=m, seed=2, dtype=F64, feature_params=fparams)
    q, k = _x(11, D, seed=1), _x(9, D, seed=2)
    params = _fit(est, q, k, 1.0) if est.feature_map.data_dependent else {}
    if est.feature_map.data_dependent:
        est.params_ = params
    W = est.draw_.W
    for x in (q, k):
        ref = _textbook(name, est.feature_map, W, x, params) / math.sqrt(m)
        form = est.form(params)
        torch.testing.assert_close(torch.exp(log_features(x, form)), ref, rtol=1e-10, atol=1e-300)
        torch.testing.assert_close(est.features(x), ref, rtol=1e-10, atol=1e-300)


def test_every_exponential_map_has_a_textbook_check():
    """A map with an ExpForm is checked above against its paper's formula (add one for a new map)."""
    covered = {n for n, _ in TEXTBOOK}
    for name in rb.feature_maps():
        m = taylor2_size(D) if name == "taylor2" else 4  # the deterministic map has one size
        est = rb.make_estimator(f"{name}-iid", dim=D, num_features=m)
        q = _x(6, D, seed=1).float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # whitening 6 tokens in d = 8
            params = est.feature_map.fit_params(q, q) if est.feature_map.data_dependent else {}
        form = est.form(params)
        assert (form is not None) == (name in covered), name


class _Weighted(WeightMatrix):
    """Test sampler with fixed quadrature row weights."""

    name = "weighted"
    defaults = {"weights": None}

    def _sample(self, m, d, generator):
        W = torch.randn(m, d, generator=generator, dtype=F64)
        return WeightDraw(W, row_weights=torch.as_tensor(self.params["weights"], dtype=F64))


def test_positive_row_weights_fold_into_the_bias():
    w = torch.tensor([0.1, 0.3, 0.2, 0.4], dtype=F64)
    est = Estimator(get_feature_map("hyprf"), _Weighted(weights=w), dim=D, num_features=4, seed=0, dtype=F64)
    x = _x(5, D)
    form = est.form({})
    assert not form.signed
    ref = _hyprf(est.draw_.W, x) * w.repeat(2).sqrt()  # sqrt(w_i) on each side
    torch.testing.assert_close(torch.exp(log_features(x, form)), ref, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(est.features(x), ref, rtol=1e-12, atol=1e-300)


def test_negative_row_weights_give_a_signed_form_that_the_kernels_refuse():
    w = torch.tensor([0.6, -0.1, 0.5], dtype=F64)
    est = Estimator(get_feature_map("posrf"), _Weighted(weights=w), dim=D, num_features=3, seed=0, dtype=F64)
    form = est.form({})
    assert form.signed and torch.equal(form.sign, torch.sign(w))
    q, k = _x(5, D, seed=1), _x(4, D, seed=2)
    phi_q, c_q = naive_features(q, form, "row", F64, is_query=True)
    phi_k, c_k = naive_features(k, form, "row", F64)
    torch.testing.assert_close(phi_q * torch.exp(c_q), est.features(q, is_query=True))
    torch.testing.assert_close(phi_k * torch.exp(c_k), est.features(k, is_query=False))
    kernel = (_posrf(est.draw_.W, q) * w) @ _posrf(est.draw_.W, k).T  # sum_i w_i f(q) f(k)
    torch.testing.assert_close(est.kernel(q, k), kernel)
    assert any("signed" in r for r in ops.not_supported_reasons(q, d=D, form=form))
    assert any("signed" in r for r in est.fused_reasons(q, k, k, form))
    with pytest.raises(UnsupportedError, match="signed"):
        ops.rf_attention(q.float(), k.float(), k.float(), form, backend="triton")


@pytest.mark.parametrize("name", ["trigrf-iid", "saderf-iid", "gerftrig-iid", "poisrf-iid"])
def test_maps_outside_the_family_have_no_form_and_say_why(name):
    est = rb.make_estimator(name, dim=D, num_features=4)
    assert est.form({}) is None
    q = _x(3, D).float()
    assert any("not exponential" in r for r in est.fused_reasons(q, q, q, None))


def test_scaled_form_is_the_form_of_scaled_inputs():
    form = ExpForm(_x(6, D, seed=4, scale=1.0), _x(6, seed=5), -0.5, _spd(D, 6))
    x = _x(3, D, seed=7)
    torch.testing.assert_close(log_features(x, form.scaled(0.3)), log_features(0.3 * x, form))


# ----------------------------------------------------------------------------- the stabiliser
def test_stabiliser_constants():
    lp = _x(2, 7, 5, seed=3, scale=4.0)
    torch.testing.assert_close(stabiliser_constant(lp, "row"), lp.max(dim=-1, keepdim=True).values)
    shared = stabiliser_constant(lp, "shared")
    assert shared.shape == (2, 7, 1)
    assert torch.equal(shared, lp.flatten(-2).max(-1).values[:, None, None].expand(2, 7, 1))
    prefix = stabiliser_constant(lp, "prefix")
    for t in range(7):
        assert torch.equal(prefix[:, t, 0], lp[:, : t + 1].flatten(-2).max(-1).values)
    assert torch.equal(stabiliser_constant(lp, "none"), torch.zeros(2, 7, 1, dtype=F64))
    with pytest.raises(ValueError, match="stabiliser"):
        stabiliser_constant(lp, "max")


def test_stabiliser_gives_zero_for_rows_of_all_zero_features():
    lp = _x(6, 4, seed=1)
    lp[0] = -math.inf  # a first row with no mass: nothing so far for shared/prefix either
    lp[3] = -math.inf
    for kind in ("row", "shared", "prefix", "none"):
        c = stabiliser_constant(lp, kind)
        assert bool(torch.isfinite(c).all()), kind
        phi = torch.exp(lp - c)
        assert bool(torch.isfinite(phi).all()) and torch.equal(phi[0], torch.zeros(4, dtype=F64)), kind
    assert float(stabiliser_constant(lp, "row")[0]) == 0.0
    assert float(stabiliser_constant(lp, "prefix")[0]) == 0.0
    assert float(stabiliser_constant(torch.full((3, 2), -math.inf), "shared").abs().max()) == 0.0


def test_prefix_features_ignore_later_rows():
    est = rb.make_estimator("posrf-iid", dim=D, num_features=10, dtype=F64)
    k = _x(2, 11, D, seed=2)
    form = est.form({})
    phi, c = naive_features(k, form, "prefix", dtype=F64)
    torch.testing.assert_close(phi * torch.exp(c), est.features(k, is_query=False))  # the true scale
    k2 = k.clone()
    k2[:, 6:] *= 50
    phi2, c2 = naive_features(k2, form, "prefix", dtype=F64)
    assert torch.equal(c2[:, :6], c[:, :6]) and torch.equal(phi2[:, :6], phi[:, :6])


# ----------------------------------------------------------------------------- attention
def _quadratic_attention(est, q, k, v, causal, scale):
    """phi(q) phi(k)^T v / phi(q) phi(k)^T 1 from the true-scale features, causal mask by hand."""
    s = math.sqrt(scale)
    A = est.features(q * s, is_query=True) @ est.features(k * s, is_query=False).transpose(-1, -2)
    if causal:
        L = q.shape[-2]
        mask = torch.tensor([[float(j <= i) for j in range(L)] for i in range(L)], dtype=A.dtype)
        A = A * mask
    return (A @ v) / A.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_paths_and_the_estimator_equal_the_quadratic_formula(causal):
    est = rb.make_estimator("hyprf-orf", dim=D, num_features=16, seed=1, dtype=F64)
    q, k, v = _x(2, 40, D, seed=1), _x(2, 40, D, seed=2), _x(2, 40, 5, seed=3)
    ref = _quadratic_attention(est, q, k, v, causal, D**-0.5)
    form = est.form({}, D**-0.5)
    torch.testing.assert_close(ops.naive_rf_attention(q, k, v, form, causal, dtype=F64), ref)
    torch.testing.assert_close(ops.torch_rf_attention(q, k, v, form, causal, chunk=16, dtype=F64), ref)
    torch.testing.assert_close(est.attention(q, k, v, causal, chunk=16), ref)


def test_cpu_estimator_keeps_its_torch_path():
    est = rb.make_estimator("posrf-iid", dim=D, num_features=16)
    q, k, v = (t.float() for t in (_x(2, 9, D, seed=1), _x(2, 9, D, seed=2), _x(2, 9, 4, seed=3)))
    reasons = est.fused_reasons(q, k, v, est.form({}, D**-0.5))
    assert any("CUDA" in r for r in reasons)
    est64 = rb.make_estimator("posrf-iid", dim=D, num_features=16, dtype=F64)  # the same draw, unrounded
    ref = _quadratic_attention(est64, q.double(), k.double(), v.double(), False, D**-0.5)
    torch.testing.assert_close(est.attention(q, k, v).double(), ref, rtol=1e-5, atol=1e-6)


def test_attention_needing_gradients_keeps_the_torch_path():
    """Training (rfbench.learning) differentiates through attention: the kernels have no backward."""
    est = rb.make_estimator("posrf-iid", dim=D, num_features=8)
    q, k, v = (t.float() for t in (_x(9, D, seed=1), _x(9, D, seed=2), _x(9, 4, seed=3)))
    form = est.form({}, D**-0.5)
    grad = "gradients are needed: the fused kernels have no backward pass (the torch path has)"
    assert grad not in est.fused_reasons(q, k, v, form)
    assert grad in est.fused_reasons(q.requires_grad_(True), k, v, form)
    with torch.no_grad():
        assert grad not in est.fused_reasons(q, k, v, form)


def test_backend_auto_uses_torch_on_cpu_and_triton_can_be_disabled(monkeypatch):
    form = rb.make_estimator("posrf-iid", dim=D, num_features=8).form({})
    q, k, v = (t.float() for t in (_x(9, D, seed=1), _x(9, D, seed=2), _x(9, 4, seed=3)))
    assert torch.equal(ops.rf_attention(q, k, v, form), ops.torch_rf_attention(q, k, v, form))
    monkeypatch.setenv("RFBENCH_DISABLE_TRITON", "1")
    assert "disabled by RFBENCH_DISABLE_TRITON=1" in ops.not_supported_reasons(q, k, v, d=D, dv=4)
    with pytest.raises(UnsupportedError, match="RFBENCH_DISABLE_TRITON"):
        ops.rf_attention(q, k, v, form, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ops.rf_attention(q, k, v, form, backend="cuda")


def test_capability_reasons_name_dtype_and_size():
    x = torch.zeros(2, 3, dtype=F64)
    reasons = ops.not_supported_reasons(x, d=256, dv=300)
    assert any("float64" in r for r in reasons)
    assert any("d=256" in r for r in reasons) and any("dv=300" in r for r in reasons)
    mixed = ops.not_supported_reasons(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16), d=3)
    assert any("different dtypes" in r for r in mixed)


def test_ops_imports_nothing_outside_ops_and_errors():
    """ops is a leaf: its modules import only rfbench.errors and rfbench.ops.* (parsed, not run)."""
    import ast
    from pathlib import Path

    root = Path(ops.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                if n.startswith("rfbench"):
                    assert n == "rfbench.errors" or n.startswith("rfbench.ops"), f"{path.name}: {n}"
