"""Performer Lemma 2 (Choromanski et al., ICLR 2021, sec. 2.3, Lemma 2 and Fig. 2): the MSE ratio of
trigonometric to positive random features as a function of the angle and the norm.

    python -m rfbench.papers.lemma2 --out reports/papers/lemma2 [--draws 1000000]

For |x| = |y| = r at angle theta, Lemma 2 gives MSE_trig / MSE_pos =
(cosh|x-y|^2 - 1) / (e^|x+y|^2 - 1), independent of d and of m (rfbench.theory.mse of trigrf and
posrf). It goes to infinity as theta -> pi (the kernel exp(x . y) -> its minimum, where PosRF is
exact) and to 0 as theta -> 0. The Monte Carlo overlay is rfbench's own estimators (trigrf-iid,
posrf-iid; pointwise.mc_var1, 10^6 omegas per point), with 95% delta-method intervals.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from rfbench import theory
from rfbench.papers import pointwise as pw
from rfbench.papers.claims import Outcome, verdict

TITLE = "Performer Lemma 2: TrigRF / PosRF MSE ratio vs angle and norm"
SOURCE = "Choromanski et al., ICLR 2021, Lemma 2"
NORMS = (0.5, 1.0, 1.5)
ANGLES = tuple(math.pi * k / 12 for k in range(1, 12))  # pi/12 ... 11pi/12 (0 and pi are exact)


def grid(norms=NORMS, angles=ANGLES, d: int = 16, draws: int = 1_000_000,
         seed0: int = 0) -> dict[str, np.ndarray]:
    """Closed form and Monte Carlo at every (r, theta): arrays ``[len(norms) * len(angles)]``."""
    pts = [(r, t) for r in norms for t in angles]
    xy = [pw.pair(r, t, d) for r, t in pts]
    x, y = torch.stack([p[0] for p in xy]), torch.stack([p[1] for p in xy])
    # MSE at m iid features is Var1 / m for both maps: the ratio is that of the one-sample variances
    cf_t = theory.variance("trigrf", x, y).numpy()
    cf_p = theory.variance("posrf", x, y).numpy()
    mt, st = pw.mc_var1("trigrf-iid", x, y, draws, seed0=seed0)
    mp, sp = pw.mc_var1("posrf-iid", x, y, draws, seed0=seed0 + 1000)
    ratio, lo, hi = pw.ratio_ci(mt, st, mp, sp)
    return {"r": np.array([p[0] for p in pts]), "theta": np.array([p[1] for p in pts]),
            "kernel": np.exp((x * y).sum(-1).numpy()), "cf_trig": cf_t, "cf_pos": cf_p,
            "cf_ratio": cf_t / cf_p, "mc_trig": mt, "se_trig": st, "mc_pos": mp, "se_pos": sp,
            "mc_ratio": ratio, "mc_low": lo, "mc_high": hi}


def _slice(g, i) -> tuple:
    return (f"r={g['r'][i]:g}, theta={g['theta'][i] / math.pi:.3g} pi", float(g["mc_ratio"][i]),
            float(g["mc_low"][i]), float(g["mc_high"][i]))


def evaluate(g: dict[str, np.ndarray]) -> list[Outcome]:
    """The claim rows of a ``grid``."""
    out = []
    far = np.flatnonzero(g["theta"] >= 0.75 * math.pi - 1e-9)
    rows = [(*_slice(g, i), verdict(g["mc_low"][i], g["mc_high"][i], ">")) for i in far]
    worst = min(rows, key=lambda s: s[2])  # the smallest lower bound decides
    cross = ", ".join(f"r={r:g}: {_crossover(r) / math.pi:.3f} pi" for r in np.unique(g["r"]))
    out.append(Outcome("TrigRF's MSE above PosRF's where the kernel is smallest (x near -y)", SOURCE,
                       "MC MSE ratio trig / pos, worst point with theta >= 3pi/4", worst[1], worst[2],
                       worst[3], _all(rows), f"{_counts(rows)} of {len(rows)} points; worst at {worst[0]}; "
                       f"closed-form crossover (ratio = 1) at {cross}", tuple(rows)))
    # the ratio grows without bound as theta -> pi: compare the largest angle with pi/2, per norm
    rows = []
    for r in np.unique(g["r"]):
        idx = np.flatnonzero(g["r"] == r)
        a, b = idx[np.argmax(g["theta"][idx])], idx[np.argmin(np.abs(g["theta"][idx] - math.pi / 2))]
        num = pw.ratio_ci(g["mc_trig"][a], g["se_trig"][a], g["mc_pos"][a], g["se_pos"][a])
        den = pw.ratio_ci(g["mc_trig"][b], g["se_trig"][b], g["mc_pos"][b], g["se_pos"][b])
        value = num[0] / den[0]
        s = math.sqrt(sum((se / m) ** 2 for m, se in ((g["mc_trig"][a], g["se_trig"][a]),
                                                      (g["mc_pos"][a], g["se_pos"][a]),
                                                      (g["mc_trig"][b], g["se_trig"][b]),
                                                      (g["mc_pos"][b], g["se_pos"][b]))))
        lo, hi = value * math.exp(-pw.Z95 * s), value * math.exp(pw.Z95 * s)
        rows.append((f"r={r:g}: theta={g['theta'][a] / math.pi:.3g} pi over pi/2", float(value), lo, hi,
                     verdict(lo, hi, ">")))
    worst = min(rows, key=lambda s: s[2])
    out.append(Outcome("the ratio grows as theta -> pi (kernel -> its minimum)", SOURCE,
                       "MC ratio at theta = 11pi/12 over MC ratio at pi/2, worst norm", worst[1], worst[2],
                       worst[3], _all(rows), f"{_counts(rows)} of {len(rows)} norms", tuple(rows)))
    inside = (g["cf_ratio"] >= g["mc_low"]) & (g["cf_ratio"] <= g["mc_high"])
    for r in np.unique(g["r"]):
        idx = g["r"] == r
        n, k = int(idx.sum()), int(inside[idx].sum())
        need = _binom_floor(n, 0.95)
        s2 = 4 * r * r  # the largest |x + y|^2 of the norm (theta -> 0)
        out.append(Outcome(f"Lemma 2 closed forms match the estimators, r = {r:g}", SOURCE,
                           "share of angles whose MC 95% interval holds the closed-form ratio", k / n,
                           k / n, k / n, "holds" if k >= need else "fails",
                           f"{k} of {n} angles (95% coverage expects >= {need}); |x+y|^2 up to {s2:g}: "
                           "the relative spread of PosRF's squared error grows like e^(2|x+y|^2), so where "
                           "that is "
                           "large the sample MSE falls short of its mean and its interval is too narrow"))
    return out


def _crossover(r: float) -> float:
    """The angle where the closed-form ratio is 1 for |x| = |y| = r (bisection; it rises with theta)."""
    def f(t):
        return math.cosh(2 * r * r * (1 - math.cos(t))) - 1 - math.expm1(2 * r * r * (1 + math.cos(t)))
    lo, hi = 1e-6, math.pi - 1e-6
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _all(rows) -> str:
    vs = [s[4] for s in rows]
    return "holds" if all(v == "holds" for v in vs) else "fails" if "fails" in vs else "inconclusive"


def _counts(rows) -> str:
    vs = [s[4] for s in rows]
    return ", ".join(f"{v} {vs.count(v)}" for v in ("holds", "fails", "inconclusive") if vs.count(v))


def _binom_floor(n: int, p: float, tail: float = 0.025) -> int:
    """The largest k with P(Bin(n, p) < k) <= tail."""
    cdf, k = 0.0, 0
    while k <= n:
        pk = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf + pk > tail:
            return k
        cdf += pk
        k += 1
    return n


def table(g: dict[str, np.ndarray]) -> str:
    lines = ["| r | theta/pi | exp(x.y) | closed-form ratio | MC ratio [95% CI] |", "|---|---|---|---|---|"]
    for i in range(len(g["r"])):
        lines.append(f"| {g['r'][i]:g} | {g['theta'][i] / math.pi:.3f} | {g['kernel'][i]:.3g} | "
                     f"{g['cf_ratio'][i]:.4g} | {g['mc_ratio'][i]:.4g} [{g['mc_low'][i]:.4g}, "
                     f"{g['mc_high'][i]:.4g}] |")
    return "\n".join(lines) + "\n"


def plot(g: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fine = np.linspace(0.02, math.pi - 0.02, 300)
    for j, r in enumerate(np.unique(g["r"])):
        z2, s2 = 2 * r * r * (1 - np.cos(fine)), 2 * r * r * (1 + np.cos(fine))
        ax.plot(fine / math.pi, (np.cosh(z2) - 1) / np.expm1(s2), color=f"C{j}",
                label=f"closed form, r={r:g}")
        idx = g["r"] == r
        mid = g["mc_ratio"][idx]
        err = np.vstack([mid - g["mc_low"][idx], g["mc_high"][idx] - mid])
        ax.errorbar(g["theta"][idx] / math.pi, mid, yerr=err, fmt="o", ms=4, color=f"C{j}", capsize=2,
                    label=f"Monte Carlo (95% CI), r={r:g}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("angle theta between x and y (units of pi)")
    ax.set_ylabel("MSE(TrigRF) / MSE(PosRF)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rfbench.papers.lemma2", description=TITLE)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--draws", type=int, default=1_000_000,
                   help="Monte Carlo omegas per estimator and point (default 1,000,000)")
    p.add_argument("--dim", type=int, default=16, help="d (the closed form does not depend on it)")
    args = p.parse_args(argv)
    from rfbench.papers import write_claims

    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    g = grid(d=args.dim, draws=args.draws)
    outcomes = evaluate(g)
    setting = (f"|x| = |y| = r in {list(NORMS)}, theta = pi/12 ... 11pi/12, d = {args.dim}, "
               f"{args.draws:,} omegas per estimator and point (rfbench's trigrf-iid and posrf-iid, "
               "float64, independent seeds; per-omega estimates from est.features; the MSE ratio at m "
               "iid features equals the one-sample variance ratio), CPU.")
    fragment = write_claims(out, outcomes, [setting], TITLE, interval=pw.INTERVAL)
    tab = table(g)
    from rfbench.results.atomic import write_text

    write_text(out / "tables" / "grid.md", tab)
    plot(g, out / "figures" / "lemma2_ratio.png")
    page = pw.write_page(out, TITLE, fragment, [("figures/lemma2_ratio.png",
                         "MSE ratio TrigRF / PosRF vs angle: closed form (lines) and Monte Carlo (points)")],
                         tab, setting)
    print(f"wrote {page}")
    for o in outcomes:
        print(f"  {o.verdict:12s} {o.claim}: {o.value:.4g} [{o.low:.4g}, {o.high:.4g}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
