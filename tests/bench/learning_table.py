"""The table of suites/learning.toml (and Hedgehog), computed directly (not a pytest file): kernel learners
on the bundled MiniLM capture, fitted on the first part of the tokens and measured on the held-out tail.

    python tests/bench/learning_table.py --seeds 5 --out /tmp/learning.csv

For each layer (all 6 heads together): tokens [0, L_fit) fit, [L_fit, 512) are held out (the tail,
contiguous; 25% by default). Every estimator is built with one seed per seed index, fitted with
``rfbench.learning.fit_estimator`` on the fit part (which validates on blocks of it), and measured
on the held-out tokens only (queries and keys): the relative Frobenius error of its attention
output against float64 exact softmax attention at the capture's scale, and, for estimators of
another kernel (DARK whitened, darkl aligned), against exact attention under that kernel.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import pandas as pd
import torch
from scipy import stats

from rfbench import exact
from rfbench.data.io import load_bundled
from rfbench.learning import FitConfig, fit_estimator, split_tokens, target_attention
from rfbench.registry import make_estimator

# label -> (estimator name, its parameters, FitConfig overrides or None when nothing trains)
VARIANTS: dict[str, tuple[str, dict, dict | None]] = {
    "PosRF-iid": ("posrf-iid", {}, None),
    "PosRF-ORF": ("posrf-orf", {}, None),
    "OPRF-ORF": ("oprf-orf", {}, None),
    "OPRF-FastFood": ("oprf-fastfood", {}, None),
    "OPRF-FastFoodL": ("oprf-fastfoodl", {}, {}),
    "DARK whitened": ("dark-iid", {}, None),
    "DARK Sigma* proposal": ("darkis-iid", {}, None),
    "DARK learned (whiten init)": ("darkl-iid", {"init": "whiten"}, {}),
    "DARK learned (identity init)": ("darkl-iid", {"init": "identity"}, {}),
    "DARK learned IS (variance obj.)": (
        "darkl-iid", {"init": "proposal", "mode": "is"}, {"objective": "variance"}),
    "Hedgehog (crossentropy obj.)": ("hedgehog-iid", {}, {"objective": "crossentropy"}),
    "Hedgehog (attention obj.)": ("hedgehog-iid", {}, {"objective": "attention"}),
    "uniform (mean of v)": ("", {}, None),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def run(args) -> pd.DataFrame:
    cap = load_bundled().to(torch.float32)
    scale = float(cap.scale)
    L = cap.num_tokens
    fit_idx, held_idx = split_tokens(L, args.holdout, split="tail")
    base = FitConfig(objective=args.objective, steps=args.steps, lr=args.lr, patience=args.patience)
    rows = []
    labels = args.variants or list(VARIANTS)
    for layer in args.layers:
        q, k, v = cap.q[layer], cap.k[layer], cap.v[layer]  # [H, L, d]
        qf, kf, vf = (x.index_select(-2, fit_idx) for x in (q, k, v))
        qh, kh, vh = (x.index_select(-2, held_idx) for x in (q, k, v))
        ref = exact.attention(qh, kh, vh, scale=scale, dtype=torch.float64)
        for label in labels:
            name, params, over = VARIANTS[label]
            if not name:  # reference: every query gets the mean of the values (a constant kernel)
                out = vh.mean(dim=-2, keepdim=True).expand_as(vh)
                rows += [{"layer": layer, "label": label, "estimator": "", "m": m, "seed": seed,
                          "out_rel_err": rel_err(out, ref), "target_out_rel_err": math.nan}
                         for m in args.m for seed in range(args.seeds)]
                continue
            for m in args.m:
                fitted = None
                for seed in range(args.seeds):
                    cfg = base if over is None else FitConfig(**{**vars_of(base), **over})
                    est = make_estimator(name, cap.dim, m, seed=seed, **params)
                    if fitted is not None:
                        # darkl: training randomness comes from cfg.seed, not the estimator's seed, so
                        # the fit is the same for every seed (tests/learning/test_learning.py checks this);
                        # only the measured draw changes. Hedgehog's init is its seed's draw: fitted per seed.
                        est, res = copy.deepcopy(fitted[0]).redraw(seed), fitted[1]
                    else:
                        res = fit_estimator(est, qf, kf, vf, cfg, scale=scale, progress=False)
                        if res.trained and res.seed_independent:
                            fitted = (est, res)
                    with torch.no_grad():
                        out = est.attention(qh, kh, vh, scale=scale)
                        own = target_attention(est, qh, kh, vh, scale=scale)
                    rows.append({
                        "layer": layer, "label": label, "estimator": name, "m": m, "F": est.feature_dim,
                        "seed": seed,
                        "out_rel_err": rel_err(out, ref),
                        "target_out_rel_err": math.nan if own is None or est.target == "softmax"
                        else rel_err(out, own),
                        "target": est.target, "fit_ms": res.fit_ms, "best_step": res.best_step,
                        "stopped": res.stopped, "init_val": res.init_val_loss, "best_val": res.best_val_loss,
                    })
                r = rows[-1]
                print(f"layer {layer} {label:40s} m={m:4d} err {r['out_rel_err']:.4f} "
                      f"own {r['target_out_rel_err']:.4f} best_step {r['best_step']} "
                      f"val {r['init_val']:.4g}->{r['best_val']:.4g} fit {r['fit_ms']:.0f} ms",
                      file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def vars_of(cfg: FitConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def summarise(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean over layers per seed, then mean and 95% t-CI over seeds, per (label, m)."""
    per_seed = df.groupby(["label", "m", "seed"], sort=False)[column].mean().reset_index()
    out = []
    for (label, m), g in per_seed.groupby(["label", "m"], sort=False):
        x = g[column].to_numpy()
        n = len(x)
        half = stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        out.append({"label": label, "m": m, "mean": x.mean(), "ci_low": x.mean() - half,
                    "ci_high": x.mean() + half, "n_seeds": n})
    return pd.DataFrame(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=list(range(6)))
    p.add_argument("--m", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--holdout", type=float, default=0.25)
    p.add_argument("--objective", default="attention")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="CSV of the per-seed rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    df = run(args)
    if args.out:
        df.to_csv(args.out, index=False)
    pd.set_option("display.width", 200)
    for col in ("out_rel_err", "target_out_rel_err"):
        s = summarise(df.dropna(subset=[col]), col)
        if len(s):
            print(f"\n{col} (held-out, mean over layers; mean and 95% CI over seeds)")
            print(s.pivot(index="label", columns="m", values="mean").to_string(float_format="%.4f"))
    print(f"\nwall {time.time() - t0:.0f} s, torch threads {torch.get_num_threads()}", file=sys.stderr)


if __name__ == "__main__":
    main()
