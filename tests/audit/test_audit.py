"""rfbench audit: each check fails on a deliberately broken copy of an in-repo estimator (one defect
per copy, of the kind that check exists to catch) and passes on rfbench's own (the control).

The broken copies are small subclasses of rfbench's own PosRF, IID, ORF and Estimator, wrapped by
the same EstimatorAdapter as the control, so a check sees nothing but the defect. The kernel tests
run at the audit's default settings (the power they claim is for those), the others are
deterministic or use their own defaults.
"""

from __future__ import annotations

import math

import pytest
import torch

from rfbench import cli
from rfbench.audit import EstimatorAdapter, Settings, checks
from rfbench.audit.adapters import (
    FLAAdapter,
    PerformerAdapter,
    adapters_for,
    taylor2_attention,
    taylor2_kernel,
)
from rfbench.audit.report import audit, markdown, terminal, to_html
from rfbench.estimator import Estimator
from rfbench.features.positive import PosRF
from rfbench.ops.form import ExpForm
from rfbench.weights._blocks import stack_blocks
from rfbench.weights.base import chi_norms, normal
from rfbench.weights.iid import IID
from rfbench.weights.orthogonal import ORF, haar_orthogonal

D, M = 16, 128


def _adapter(feature=None, weights=None, cls=Estimator, label="broken"):
    def make(seed):
        return cls(feature or PosRF(), weights or IID(), dim=D, num_features=M, seed=seed)

    return EstimatorAdapter(make, label, dim=D, num_features=M)


def _verdicts(results):
    return {c.check: c.verdict for c in results}


# =========================================================================== the broken copies
class BiasedPosRF(PosRF):
    """Defect: each side's log-feature is 0.01 too large, so the kernel is 2.02% high."""

    def exp_form(self, draw, params, d):
        form = super().exp_form(draw, params, d)
        return ExpForm(form.W, form.bias + 0.01, form.coef, form.P, form.sign)


class DuplicatedRows(IID):
    """Defect: m/2 Gaussian rows, each used twice, while claiming independent rows: unbiased, but
    the variance is twice the closed form's Var1 / m."""

    def _sample(self, m, d, generator):
        return normal((m // 2, d), generator).repeat(2, 1)


class FixedNormORF(ORF):
    """Defect: orthogonal rows all of norm sqrt(d) (not chi_d) while claiming Gaussian marginals."""

    def _sample(self, m, d, generator):
        return stack_blocks(m, lambda: math.sqrt(d) * haar_orthogonal(d, generator))


class UnsignedQRORF(ORF):
    """Defect: Q of a plain QR (no sign correction of diag R, Mezzadri 2007): not Haar."""

    def _sample(self, m, d, generator):
        def block():
            Q = torch.linalg.qr(normal((d, d), generator))[0]
            return chi_norms(d, d, generator).unsqueeze(1) * Q.T

        return stack_blocks(m, block)


class LeakyCausal(Estimator):
    """Defect: the causal denominator sums over every key, future ones included."""

    def attention(self, q, k, v, causal=False, **kw):
        if not causal:
            return super().attention(q, k, v, causal=False, **kw)
        s = self.dim**-0.25
        A = self.features(q * s, True) @ self.features(k * s, False).transpose(-1, -2)
        return (A.tril() @ v.to(A.dtype)) / A.sum(-1, keepdim=True)


class PerKeyStabiliser(Estimator):
    """Defect: each key's own max log-feature is subtracted and never put back (the constant is not
    shared by the keys, so it does not cancel; docs/theory.md §0a)."""

    def attention(self, q, k, v, causal=False, **kw):
        s = self.dim**-0.25
        params = {}
        Q, _, K, _ = self._stable_features(self._cast(q) * s, self._cast(k) * s, params, per_key=True)
        A = Q @ K.transpose(-1, -2)
        if causal:
            A = A.tril()
        return (A @ v.to(A.dtype)) / A.sum(-1, keepdim=True)


class NoStabiliser(Estimator):
    """Defect: plain exp of the log-features, no max-subtraction: overflows at large norms."""

    def attention(self, q, k, v, causal=False, **kw):
        s = self.dim**-0.25
        Q, K = self.features(q * s, True), self.features(k * s, False)
        A = Q @ K.transpose(-1, -2)
        if causal:
            A = A.tril()
        return (A @ v.to(A.dtype)) / A.sum(-1, keepdim=True)


# =========================================================================== the control passes
@pytest.fixture(scope="module")
def control_iid():
    return checks.run_checks(EstimatorAdapter.from_name("posrf-iid", dim=D, num_features=M))


@pytest.mark.slow
def test_control_passes_every_check(control_iid):
    assert all(c.verdict == "pass" for c in control_iid), [c for c in control_iid if c.verdict != "pass"]
    assert len(control_iid) == 9  # orthogonality applies to orthogonal laws only


@pytest.mark.slow
def test_orthogonal_control_passes_and_states_what_does_not_apply():
    a = EstimatorAdapter.from_name("posrf-orf", dim=D, num_features=M)
    s = Settings()
    assert checks.variance(a, s).verdict == "n/a"  # coupled rows: no closed form
    assert all(c.verdict == "pass" for c in checks.projection(a, s))
    assert _verdicts(checks.projection(a, s))["blocks orthogonal"] == "pass"


# =========================================================================== each defect is caught
def test_unbiased_catches_a_two_percent_bias_at_default_settings(control_iid):
    result = checks.unbiased(_adapter(BiasedPosRF()), Settings())
    assert result.verdict == "fail", result
    assert "power(2%) = 1.000" in result.figure or float(result.figure.split("power(2%) = ")[1][:5]) >= 0.95


@pytest.mark.slow
def test_variance_catches_duplicated_rows():
    result = checks.variance(_adapter(weights=DuplicatedRows()), Settings())
    assert result.verdict == "fail", result
    assert checks.unbiased(_adapter(weights=DuplicatedRows()), Settings(seeds=300)).verdict == "pass"


@pytest.mark.slow
def test_projection_catches_fixed_norms_and_unsigned_qr():
    fixed = _verdicts(checks.projection(_adapter(weights=FixedNormORF()), Settings()))
    assert fixed["row norms ~ chi_d (KS)"] == "fail", fixed
    unsigned = _verdicts(checks.projection(_adapter(weights=UnsignedQRORF()), Settings()))
    assert unsigned["entry signs symmetric"] == "fail"
    assert unsigned["Haar invariance (2-sample KS)"] == "fail"
    assert unsigned["row norms ~ chi_d (KS)"] == "pass"  # the one defect only


def test_causal_leakage_catches_a_non_causal_denominator():
    a = _adapter(cls=LeakyCausal)
    assert checks.causal_leakage(a, Settings()).verdict == "fail"
    assert _verdicts(checks.attention_exact(a, Settings()))["attention = exact estimator"] == "pass"


def test_attention_exact_catches_a_per_key_stabiliser():
    a = _adapter(cls=PerKeyStabiliser)
    got = _verdicts(checks.attention_exact(a, Settings()))
    assert got["attention = exact estimator"] == "fail"
    assert got["attention = exact estimator (causal)"] == "fail"
    assert checks.causal_leakage(a, Settings()).verdict == "pass"  # per-key constants do not leak


def test_finite_catches_a_missing_stabiliser():
    a = _adapter(cls=NoStabiliser)
    assert checks.finite_large_norms(a, Settings()).verdict == "fail"
    assert _verdicts(checks.attention_exact(a, Settings()))["attention = exact estimator"] == "pass"


# =========================================================================== report and command
@pytest.mark.slow
def test_tables_and_exit_status(tmp_path, capsys):
    small = Settings(seeds=200, projection_draws=60)
    good = audit(EstimatorAdapter.from_name("posrf-orf", dim=8, num_features=32), small)
    bad = audit(_adapter(cls=NoStabiliser, label="nostab"), small)
    assert not good.failed and bad.failed
    assert "finite at large norms" in terminal(bad) and "FAIL" in terminal(bad)
    md = markdown([good, bad])
    assert md.count("| check | figure | verdict |") == 2 and "| fail |" in md
    assert "<table>" in to_html([good, bad])
    out = tmp_path / "audit.md"
    rc = cli.main_entry(["audit", "rfbench:posrf-iid", "--seeds", "300",
                         "--markdown", str(out), "--html", str(tmp_path / "a.html")])
    assert rc == 0 and out.read_text().startswith("# rfbench audit")
    assert cli.main_entry(["audit", "nosuch"]) == 2
    assert "unknown audit target" in capsys.readouterr().err


def test_fla_is_skipped_with_a_reason_when_absent(monkeypatch):
    (a,) = adapters_for("fla")
    monkeypatch.setattr(type(a), "missing", lambda self: ["fla-core is not installed; pip install ..."])
    result = audit(a)
    assert result.skipped and not result.failed and result.checks == []


# =========================================================================== deterministic maps
class Taylor2Control(EstimatorAdapter):
    """rfbench's own Taylor-2 map (Based) audited as a deterministic map: kernel against 1 + t + t^2/2,
    attention against the exact normalised Taylor-2 attention, both modes."""

    deterministic = True

    def __init__(self):
        import rfbench as rb

        super().__init__(lambda seed: rb.make_estimator("taylor2-iid", dim=D, num_features=153, seed=seed),
                         "rfbench:taylor2-iid", dim=D, num_features=153)
        self.projection_law = None

    def closed_form(self, x, y):
        return taylor2_kernel(x, y)

    def reference_attention(self, q, k, v, causal):
        return taylor2_attention(q, k, v, causal)


class Taylor2WrongSquare(Taylor2Control):
    """Defect: the squares x_l^2 enter without their 1/sqrt(2), a classic slip of the Taylor map:
    phi(x) . phi(y) = 1 + t + t^2/2 + sum_l x_l^2 y_l^2 / 2."""

    def kernel(self, x, y, seed):
        return super().kernel(x, y, seed) + ((x.double() * y.double()) ** 2).sum(-1) / 2


class Taylor2Epsilon(Taylor2Control):
    """Defect: an additive 1e-2 in the attention denominator (the epsilon of many implementations)."""

    def attention(self, q, k, v, seed, causal):
        est = self._est
        phi_q, phi_k = (est.features(t.float() * D**-0.25) for t in (q, k))  # attention's 1/sqrt(d)
        A = phi_q @ phi_k.transpose(-1, -2)
        A = A.tril() if causal else A
        return (A @ v.float()) / (A.sum(-1, keepdim=True) + self.eps)

    eps = 1e-2


def test_deterministic_checks_pass_on_rfbench_taylor2():
    got = _verdicts(checks.run_checks(Taylor2Control()))
    assert got["kernel = closed form"] == "pass"
    assert got["attention = exact estimator"] == "pass"
    assert got["attention = exact estimator (causal)"] == "pass"
    assert got["causal: no future leakage"] == "pass" and got["finite at large norms"] == "pass"
    assert got["unbiased kernel"] == "n/a" and got["MC variance = closed form"] == "n/a"


def test_closed_form_check_fails_on_a_wrong_coefficient():
    assert checks.closed_form(Taylor2WrongSquare(), Settings()).verdict == "fail"


def test_deterministic_attention_check_fails_on_an_epsilon():
    broken = Taylor2Epsilon()
    assert _verdicts(checks.attention_exact(broken, Settings()))["attention = exact estimator"] == "fail"
    broken.eps = 0.0  # the same hand-built attention without the epsilon passes: the defect is the epsilon
    assert _verdicts(checks.attention_exact(broken, Settings()))["attention = exact estimator"] == "pass"


def test_fla_based_findings_are_pinned():
    """Measured on fla-core 0.6.0 (CPU, Triton interpreter): TaylorFeatureMap is exactly 1 + t + t^2/2
    and parallel_based is causal and equals the exact normalised Taylor-2 attention to float32
    rounding (its 1e-6 epsilon is 1e-8 relative to denominators of ~L); it has no non-causal mode.
    (Skipped, not at collection: importing fla takes seconds.)"""
    why = FLAAdapter().missing()
    if why:
        pytest.skip("; ".join(why))
    result = audit(FLAAdapter())
    got = _verdicts(result.checks)
    assert not result.failed and not result.skipped
    assert got["kernel = closed form"] == "pass" and got["causal: no future leakage"] == "pass"
    assert got["attention = exact estimator (causal)"] == "pass" and "attention = exact estimator" not in got
    assert got["projection law"] == "n/a" and got["unbiased kernel"] == "n/a"


@pytest.mark.slow
@pytest.mark.skipif(PerformerAdapter().missing() != [], reason="performer-pytorch not installed")
def test_performer_findings_are_pinned():
    """Measured on performer-pytorch 1.1.4: its orthogonal blocks are plain QR (row 0, column 0 is
    always negative), its epsilon 1e-4 after the max-subtraction moves attention away from the exact
    estimator, and in causal mode its key stabiliser is the max over the whole sequence."""
    a = PerformerAdapter()
    s = Settings()
    proj = _verdicts(checks.projection(a, s))
    assert proj["entry signs symmetric"] == "fail" and proj["row norms ~ chi_d (KS)"] == "pass"
    assert _verdicts(checks.attention_exact(a, s))["attention = exact estimator"] == "fail"
    assert checks.causal_leakage(a, s).verdict == "fail"
    assert checks.finite_large_norms(a, s).verdict == "pass"
