"""The audit's checks: each a test with a stated tolerance and power, run through an Adapter.

Every check returns a ``Check(check, figure, verdict)`` row; ``verdict`` is ``pass``, ``fail`` or
``n/a`` (with the reason in ``figure``). Statistical checks state their tolerance in standard
errors (Z_TOL = 4: two-sided normal tail 6e-5 per statistic) and report the power they have,
at the run's own standard error, to catch the defect they exist for. Deterministic checks (causal
leakage, attention against its exact estimator, finiteness) have no Monte Carlo noise: the
reference is built from the same projection, so their tolerance is float rounding, stated in
units of the compute dtype's unit roundoff u.

Defaults (``Settings``): d = 16, m = 128, 600 seeds, pairs of norms 0.5, 1.0 and 1.5 at cosines
0.9, 0 and -0.9. Power of the bias test (``unbiased``): its pooled statistic is the inverse-variance
weighted mean relative error r_s over the 9 pairs, per seed; a uniform 2% bias moves E[r_s] by
0.02, so with SE = sd(r_s) / sqrt(S) the power is Phi(0.02/SE - Z) + Phi(-0.02/SE - Z). At the
defaults on posrf-orf SE is about 0.06% (0.02/SE ~ 30), power > 0.999; the figure prints the
run's own value, and the check fails as "underpowered" below 0.8 rather than passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy import stats

from rfbench.audit.adapters import Adapter

F64 = torch.float64
Z_TOL = 4.0
#: Per-pair z tolerance: Bonferroni over 9 pairs at the same 6e-5 family-wise level.
Z_PAIR = 4.5
#: p-value below which a distribution test fails.
ALPHA = 1e-4
#: Float-rounding tolerance of the deterministic checks, in units of u (relative to max |output|).
ROUNDING_UNITS = 256


@dataclass(frozen=True)
class Check:
    check: str
    figure: str
    verdict: str  # "pass", "fail" or "n/a"


@dataclass(frozen=True)
class Settings:
    seeds: int = 600
    norms: tuple[float, ...] = (0.5, 1.0, 1.5)
    #: The variance test's pairs: small norms, where the squared error's own variance (an 8th
    #: moment of exp features) is finite enough for its SE to be estimated from the seeds.
    variance_norms: tuple[float, ...] = (0.25, 0.5)
    cosines: tuple[float, ...] = (0.9, 0.0, -0.9)
    projection_draws: int = 200
    seq_len: int = 64
    big_norm: float = 6.0  # |q| ~ 6 sqrt(d): logits q.k / sqrt(d) ~ 1e2, past float32 exp's range


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def pairs(d: int, settings: Settings, seed: int = 0, norms=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed pairs ``[P, d]`` float64: |x| = |y| = r for each norm r, at each cosine."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for r in settings.norms if norms is None else norms:
        for c in settings.cosines:
            u = torch.randn(d, generator=g, dtype=F64)
            u = u / u.norm()
            w = torch.randn(d, generator=g, dtype=F64)
            w = w - (w @ u) * u
            w = w / w.norm()
            xs.append(r * u)
            ys.append(r * (c * u + math.sqrt(1 - c * c) * w))
    return torch.stack(xs), torch.stack(ys)


def _power(effect: float, se: float, z: float = Z_TOL) -> float:
    """P(|effect/se + N(0,1)| > z): the chance a true ``effect`` is flagged."""
    if se <= 0:
        return 1.0
    d = effect / se
    return float(stats.norm.cdf(d - z) + stats.norm.cdf(-d - z))


def _estimates(adapter: Adapter, x, y, seeds: int) -> torch.Tensor | None:
    out = []
    for s in range(seeds):
        k = adapter.kernel(x, y, s)
        if k is None:
            return None
        out.append(k.to(F64))
    return torch.stack(out)  # [S, P]


# --------------------------------------------------------------------------- 1. unbiased
def unbiased(adapter: Adapter, settings: Settings, K: torch.Tensor | None = None) -> Check:
    """z-test of E[kernel] = exp(x . y): pooled relative bias (power in the module docstring) and each
    pair's own z (tolerance Z_PAIR)."""
    if adapter.deterministic:
        return Check("unbiased kernel", "deterministic map, biased for exp(q.k) by design: checked "
                     "against its closed form instead", "n/a")
    x, y = pairs(adapter.dim, settings)
    K = _estimates(adapter, x, y, settings.seeds) if K is None else K
    if K is None:
        return Check("unbiased kernel", "no kernel estimate reachable", "n/a")
    exact = torch.exp((x * y).sum(-1))
    rel = K / exact - 1  # [S, P]
    S = rel.shape[0]
    w = 1 / rel.var(0).clamp(min=1e-300)
    r = (rel * w).sum(-1) / w.sum()  # per seed: pooled relative error
    se = float(r.std() / math.sqrt(S))
    z = float(r.mean()) / se
    z_pair = (rel.mean(0) / (rel.std(0) / math.sqrt(S))).abs()
    power = _power(0.02, se)
    worst = int(z_pair.argmax())
    r_w, c_w = divmod(worst, len(settings.cosines))
    fig = (f"rel. bias {100 * float(r.mean()):+.3f}% ± {100 * se:.3f}% (z = {z:+.1f}); worst pair "
           f"|x|={settings.norms[r_w]}, cos={settings.cosines[c_w]}: "
           f"z = {float(z_pair[worst]):.1f}; power(2%) = {power:.3f}; {S} seeds")
    if power < 0.8:
        return Check("unbiased kernel", fig + " (underpowered)", "fail")
    ok = abs(z) <= Z_TOL and float(z_pair.max()) <= Z_PAIR
    return Check("unbiased kernel", fig, "pass" if ok else "fail")


def closed_form(adapter: Adapter, settings: Settings) -> Check:
    """A deterministic map's kernel against its closed form (e.g. 1 + t + t^2/2 for Taylor-2) at the
    audit's pairs and at twice their norms, on two seeds (a deterministic map must not depend on
    one): max relative error within ROUNDING_UNITS u of the compute dtype."""
    x, y = pairs(adapter.dim, settings)
    x, y = torch.cat([x, 2 * x]), torch.cat([y, 2 * y])
    want = adapter.closed_form(x, y)
    if want is None:
        return Check("kernel = closed form", "no closed form", "n/a")
    err = max(float(((adapter.kernel(x, y, s).to(F64) - want) / want).abs().max()) for s in (0, 1))
    tol = ROUNDING_UNITS * unit_roundoff(adapter.dtype)
    return Check("kernel = closed form", f"max rel. error {err:.2g} over {len(want)} pairs, 2 seeds "
                 f"(tol {tol:.1g})", "pass" if err <= tol else "fail")


# --------------------------------------------------------------------------- 2. variance
def variance(adapter: Adapter, settings: Settings) -> Check:
    """Per pair, mean squared error over seeds vs the closed form (an unbiased estimator's MSE is its
    variance): z = (mean sq - Var) / SE(sq), tolerance Z_PAIR. Power: to flag a 25% variance error
    at the best-resolved pair, Phi(0.25 Var/SE - Z_PAIR), printed."""
    x, y = pairs(adapter.dim, settings, seed=1, norms=settings.variance_norms)
    want = None if adapter.deterministic else adapter.variance(x, y)
    if adapter.deterministic:
        return Check("MC variance = closed form", "deterministic map: no Monte Carlo variance", "n/a")
    if want is None:
        return Check("MC variance = closed form", "no closed form for this projection (coupled rows "
                     "or family without one)", "n/a")
    K = _estimates(adapter, x, y, settings.seeds)
    exact = torch.exp((x * y).sum(-1))
    sq = (K - exact) ** 2
    S = sq.shape[0]
    se = sq.std(0) / math.sqrt(S)
    z = (sq.mean(0) - want) / se
    ratio = sq.mean(0) / want
    power = max(_power(0.25 * float(v), float(s), Z_PAIR) for v, s in zip(want, se))
    fig = (f"var ratio {float(ratio.min()):.3f}..{float(ratio.max()):.3f}; "
           f"max |z| = {float(z.abs().max()):.1f}; power(25%) = {power:.3f}")
    return Check("MC variance = closed form", fig, "pass" if float(z.abs().max()) <= Z_PAIR else "fail")


# --------------------------------------------------------------------------- 3. projection
def projection(adapter: Adapter, settings: Settings) -> list[Check]:
    """Rows' law: norms chi_d (KS, n = draws x m rows; detects a sup-CDF gap of
    sqrt(ln(2/ALPHA) / 2n) ~ 0.014 at the defaults), signs symmetric at every (row, column)
    position (binomial z, Bonferroni over m d positions at ALPHA), Haar invariance (two-sample KS
    of row directions on e_1 against a fixed random direction, each row position of an orthogonal
    block pooled; invariance under rotation means equal laws), and for orthogonal laws exact
    orthogonality within each block of d rows (float rounding)."""
    if adapter.projection_law is None or adapter.projection(0) is None:
        return [Check("projection law", "no random projection reachable", "n/a")]
    d, m = adapter.dim, adapter.num_features
    W = torch.stack([adapter.projection(s) for s in range(settings.projection_draws)])  # [D, m, d]
    out = []
    norms = W.norm(dim=-1).flatten().numpy()
    ks = stats.kstest(norms, stats.chi(d).cdf)
    out.append(Check("row norms ~ chi_d (KS)", f"D = {ks.statistic:.4f}, p = {ks.pvalue:.2g} "
                     f"(n = {norms.size})", "pass" if ks.pvalue >= ALPHA else "fail"))
    D = W.shape[0]
    frac = (W > 0).to(F64).mean(0)  # [m, d]
    z = (frac - 0.5) / math.sqrt(0.25 / D)
    z_crit = float(stats.norm.isf(ALPHA / (2 * m * d)))
    i, j = divmod(int(z.abs().argmax()), d)
    out.append(Check("entry signs symmetric", f"max |z| = {float(z.abs().max()):.1f} at row {i}, col {j} "
                     f"(P(+) = {float(frac[i, j]):.3f}; tol {z_crit:.1f})",
                     "pass" if float(z.abs().max()) <= z_crit else "fail"))
    u = W / W.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(12345)
    e = torch.randn(d, generator=g, dtype=F64)
    e = e / e.norm()
    half = D // 2
    worst = (1.0, 0)
    for pos in range(min(d, m)):  # row position inside an orthogonal block
        rows = u[:, pos::d, :]
        a = rows[:half, :, 0].flatten().numpy()
        b = (rows[half:] @ e).flatten().numpy()
        p = stats.ks_2samp(a, b).pvalue
        worst = min(worst, (p, pos))
    p_crit = ALPHA / min(d, m)
    out.append(Check("Haar invariance (2-sample KS)", f"min p = {worst[0]:.2g} at block row {worst[1]} "
                     f"(tol {p_crit:.1g})", "pass" if worst[0] >= p_crit else "fail"))
    if adapter.projection_law == "orthogonal":
        G = torch.stack([u[:, b * d:(b + 1) * d] @ u[:, b * d:(b + 1) * d].transpose(-1, -2)
                         for b in range(m // d)])
        off = (G - torch.eye(d, dtype=F64)).abs().max()
        tol = ROUNDING_UNITS * unit_roundoff(adapter.dtype) * d
        out.append(Check("blocks orthogonal", f"max |u_i . u_j| = {float(off):.2g} (tol {tol:.1g})",
                         "pass" if float(off) <= tol else "fail"))
    return out


# --------------------------------------------------------------------------- 4. causal leakage
def _qkv(d: int, L: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(1, 2, L, d, generator=g, dtype=F64) for _ in range(3)]


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


def causal_leakage(adapter: Adapter, settings: Settings) -> Check:
    """Perturb keys and values after t0 = L/2 (keys 3x larger plus noise, so any stabiliser shared
    with the future moves); outputs t <= t0 must agree to ROUNDING_UNITS u of max |output|."""
    if not adapter.causal:
        return Check("causal: no future leakage", "no causal mode", "n/a")
    d, L = adapter.dim, settings.seq_len
    q, k, v = _qkv(d, L, seed=1)
    t0 = L // 2
    k2, v2 = k.clone(), v.clone()
    g = torch.Generator().manual_seed(2)
    later = k2[..., t0 + 1:, :].shape
    k2[..., t0 + 1:, :] = 3 * k[..., t0 + 1:, :] + torch.randn(later, generator=g, dtype=F64)
    v2[..., t0 + 1:, :] = 10 * torch.randn(later, generator=g, dtype=F64)
    cast = adapter.dtype
    a = adapter.attention(q.to(cast), k.to(cast), v.to(cast), 0, True)[..., : t0 + 1, :]
    b = adapter.attention(q.to(cast), k2.to(cast), v2.to(cast), 0, True)[..., : t0 + 1, :]
    diff = _rel_diff(b, a)
    tol = ROUNDING_UNITS * unit_roundoff(cast)
    return Check("causal: no future leakage", f"max |Δ out[t<={t0}]| / max|out| = {diff:.2g} (tol {tol:.1g})",
                 "pass" if diff <= tol else "fail")


# --------------------------------------------------------------------------- 5. attention vs exact estimator
def posrf_reference(q, k, v, W: torch.Tensor, causal: bool) -> torch.Tensor:
    """The exact normalised FAVOR+ estimator from projection W ``[m, d]``, in float64 and without any
    stabiliser: phi(x) = exp(W x s - |x s|^2 / 2), s = d^-1/4, out = A v / A 1, A = phi(q) phi(k)^T."""
    d = q.shape[-1]
    s = d**-0.25

    def phi(x):
        xs = x.double() * s
        return torch.exp(xs @ W.T - 0.5 * (xs * xs).sum(-1, keepdim=True))

    A = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        A = A.tril()
    return (A @ v.double()) / A.sum(-1, keepdim=True)


def attention_exact(adapter: Adapter, settings: Settings) -> list[Check]:
    """Attention output against ``posrf_reference`` built from the same projection, non-causal and
    causal: relative max error within ROUNDING_UNITS u (catches additive epsilons and stabilisers
    that do not cancel, e.g. a per-key max)."""
    W = None if adapter.deterministic else adapter.projection(0)
    if W is None and not adapter.deterministic:
        return [Check("attention = exact estimator", "no projection reachable", "n/a")]
    d, L = adapter.dim, settings.seq_len
    q, k, v = _qkv(d, L, seed=3)
    cast = adapter.dtype
    tol = ROUNDING_UNITS * unit_roundoff(cast)
    out = []
    for causal in modes(adapter):
        got = adapter.attention(q.to(cast), k.to(cast), v.to(cast), 0, causal)
        qc, kc, vc = q.to(cast), k.to(cast), v.to(cast)
        ref = (adapter.reference_attention(qc, kc, vc, causal) if adapter.deterministic
               else posrf_reference(qc, kc, vc, W, causal))
        err = _rel_diff(got, ref)
        name = "attention = exact estimator" + (" (causal)" if causal else "")
        out.append(Check(name, f"max rel. error {err:.2g} (tol {tol:.1g})", "pass" if err <= tol else "fail"))
    return out


# --------------------------------------------------------------------------- 6. finite at large norms
def finite_large_norms(adapter: Adapter, settings: Settings) -> Check:
    """Inputs of norm ~ big_norm sqrt(d) (softmax logits ~ 1e2) where exact attention is finite: every
    output must be finite (non-causal and causal)."""
    import rfbench as rb

    d, L = adapter.dim, settings.seq_len
    q, k, v = _qkv(d, L, seed=4, scale=settings.big_norm)
    assert bool(torch.isfinite(rb.exact.attention(q, k, v)).all())
    cast = adapter.dtype
    bad = 0
    total = 0
    for causal in modes(adapter):
        got = adapter.attention(q.to(cast), k.to(cast), v.to(cast), 0, causal)
        bad += int((~torch.isfinite(got)).sum())
        total += got.numel()
    logit = float(((q @ k.transpose(-1, -2)) / math.sqrt(d)).abs().max())
    return Check("finite at large norms", f"{bad}/{total} non-finite outputs (max |logit| {logit:.0f})",
                 "pass" if bad == 0 else "fail")


def modes(adapter: Adapter) -> tuple[bool, ...]:
    """The causal flags an implementation has: (False, True), (False,) or (True,)."""
    return tuple(c for c, has in ((False, adapter.noncausal), (True, adapter.causal)) if has)


# --------------------------------------------------------------------------- all of them
def run_checks(adapter: Adapter, settings: Settings | None = None) -> list[Check]:
    """Every check on one adapter, in table order."""
    settings = settings or Settings()
    x, y = pairs(adapter.dim, settings)
    K = None if adapter.deterministic else _estimates(adapter, x, y, settings.seeds)
    return [
        *([closed_form(adapter, settings)] if adapter.deterministic else []),
        unbiased(adapter, settings, K),
        variance(adapter, settings),
        *projection(adapter, settings),
        causal_leakage(adapter, settings),
        *attention_exact(adapter, settings),
        finite_large_norms(adapter, settings),
    ]
