"""Norms and anisotropy of captured queries and keys: why estimators differ on real data.

    rfbench describe capture.safetensors [--by layer|head|pair]
    rfbench describe bundled
    rfbench describe smollm2 [--layers 0,5,15,29] [--max-tokens 2048]   (or a .gguf / model folder)

A model (an alias, a .gguf file or a model folder) is first captured on the bundled corpus through
the capture cache (``rfbench.data.cache``; made once, then reused), 2048 tokens by default.

Per layer and head (all over the tokens of the capture, q and k as the attention sees them,
before its scale ``s``):

- ``q_norm`` / ``k_norm``: mean row norm; ``q_norm_max`` / ``k_norm_max``: the largest;
- ``q_offset`` / ``k_offset``: norm of the mean vector over the mean row norm (0: centred);
- ``q_cond`` / ``k_cond``: condition number lambda_max / lambda_min of the covariance (inf when
  L < d or the covariance is singular);
- ``q_erank`` / ``k_erank``: effective rank exp(H(p)), p = eigenvalues / their sum (Roy & Vetterli
  2007, eq. 3): d for isotropic data, 1 when one direction holds everything;
- ``logit_abs`` / ``logit_max``: mean |q.k| s and max q.k s over all query-key pairs (the
  log-kernel the estimators must reproduce);
- ``sum_sq``: mean over pairs of |q + k|^2 s, the exponent that drives the PosRF variance
  exp(2 x.y)(exp(|x + y|^2) - 1) of x = q sqrt(s), y = k sqrt(s) (Performer, Lemma 2).

Spectrum (the second table), from the eigenvalues lambda of Lambda, the second moment about 0 of
the pooled queries and keys at the attention scale (x = q sqrt(s), y = k sqrt(s); s = d^-1/2
gives the d^-1/4 scaling), as DARK's fit estimates it (rfbench/features/dark.py):

- ``lam_max``, ``lam_cond`` (lambda_max / lambda_min) and ``lam_half`` (share of eigenvalues >= 1/2);
- ``attn_entropy``: mean over queries of the entropy (nats) of the model's attention row,
  causal when the capture says so; log of the number of keys seen means uniform attention;
- ``sigma_star``: DARK-IS's proposal Sigma* = (I + 2 Lambda)(I - 2 Lambda)^-1 exists (every
  lambda < 1/2); ``posrf_finite``: isotropic PosRF's data-averaged variance is finite (every
  lambda < 1/6);
- ``posrf_m2`` and ``opt_m2``: the data-averaged second moment E_{x,y,w}[P^2] of the one-sample
  estimator P of exp(x.y) for x, y ~ N(0, Lambda) i.i.d., under isotropic PosRF
  (prod [(1 + 2 lambda)(1 - 6 lambda)]^-1/2) and under the best Gaussian proposal
  (prod 1 / (1 - 2 lambda)); inf where it diverges. Derived in docs/theory.md §3.1 (derived
  here) and checked by Monte Carlo in tests/test_data_describe.py. Compare both with
  E[exp(2 x.y)] = prod (1 - 4 lambda^2)^-1/2, the squared target's average.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch

from rfbench.data.io import Capture, load_capture
from rfbench.errors import DataError

#: Tokens used for the pairwise (L x L) logit statistics; more would only cost time and memory.
PAIR_TOKENS = 2048

COLUMNS = (
    "q_norm", "q_norm_max", "k_norm", "k_norm_max", "q_offset", "k_offset",
    "q_cond", "k_cond", "q_erank", "k_erank", "logit_abs", "logit_max", "sum_sq",
)
SPECTRUM_COLUMNS = (
    "lam_max", "lam_half", "lam_cond", "attn_entropy", "sigma_star", "posrf_finite",
    "posrf_m2", "opt_m2",
)
#: Below these every eigenvalue must lie: Sigma* exists; isotropic PosRF's averaged variance is finite.
SIGMA_STAR_LIMIT = 0.5
POSRF_LIMIT = 1.0 / 6.0
#: Tokens used for the pairwise (L x L) attention entropy, as for the logit statistics.
DEFAULT_MODEL_TOKENS = 2048


# --------------------------------------------------------------------------- closed forms
def proposal_second_moment(lam: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """E_{x,y,w}[P^2] of the importance-weighted PosRF estimate P of exp(x.y), x, y ~ N(0, Lambda)
    i.i.d., proposal N(0, S) sharing Lambda's eigenvectors; ``lam``, ``s``: ``[..., d]`` eigenvalues.

    Per direction s (1 + 2 lambda)^-1/2 (2 s (1 - 2 lambda) - (1 + 2 lambda))^-1/2, product over
    directions; inf unless 2 s (1 - 2 lambda) > 1 + 2 lambda and s > 1/2 (docs/theory.md §3.1).
    """
    lam = torch.as_tensor(lam, dtype=torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64).expand_as(lam)
    gap = 2 * s * (1 - 2 * lam) - (1 + 2 * lam)
    # gap > 0 written as a bound on lambda, so that lambda = 1/6 at s = 1 is exactly the boundary.
    ok = (lam < (2 * s - 1) / (2 * (2 * s + 1))) & (s > 0.5)
    per = s / torch.sqrt((1 + 2 * lam) * gap.clamp_min(1e-300))
    # Sum logs: a product of 64 factors near 1 is fine, but ~1e300 ones are not.
    out = per.log().sum(dim=-1).exp()
    return torch.where(ok.all(dim=-1), out, torch.full_like(out, math.inf))


def posrf_second_moment(lam: torch.Tensor) -> torch.Tensor:
    """Isotropic PosRF (S = I): prod [(1 + 2 lambda)(1 - 6 lambda)]^-1/2; inf unless every lambda < 1/6."""
    return proposal_second_moment(lam, 1.0)


def optimal_second_moment(lam: torch.Tensor) -> torch.Tensor:
    """At the best proposal s* = (1 + 2 lambda)/(1 - 2 lambda): prod 1 / (1 - 2 lambda); inf unless
    every lambda < 1/2 (then no Gaussian proposal has a finite average)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    out = (-torch.log1p(-2 * lam.clamp(max=0.5 - 1e-16))).sum(dim=-1).exp()
    return torch.where((lam < 0.5).all(dim=-1), out, torch.full_like(out, math.inf))


def pooled_eigenvalues(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Ascending eigenvalues of the second moment about 0 of the pooled rows of q, k ``[L, d]``
    at the attention scale (x = q sqrt(scale)), in float64."""
    x = torch.cat([q, k], dim=0).to(torch.float64) * math.sqrt(scale)
    return torch.linalg.eigvalsh(x.T @ x / x.shape[0]).clamp_min(0.0)


def attention_entropy(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> float:
    """Mean over query rows of the entropy (nats) of softmax(q k^T scale) ``[L, L]``, masked causally."""
    logits = (q.to(torch.float64) @ k.to(torch.float64).T) * scale
    if causal:
        future = torch.ones_like(logits, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(future, -math.inf)
    logp = logits.log_softmax(dim=-1)
    # 0 log 0 = 0 for the masked keys (exp(-inf) * -inf would be nan).
    ent = -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(dim=-1)
    return float(ent.mean())


def covariance_stats(x: torch.Tensor) -> tuple[float, float]:
    """``(condition number, effective rank)`` of the covariance of rows ``x: [L, d]``."""
    x = x.to(torch.float64)
    xc = x - x.mean(dim=0)
    lam = torch.linalg.eigvalsh(xc.T @ xc / max(x.shape[0] - 1, 1)).clamp_min(0.0)
    top = float(lam[-1])
    if top <= 0.0:
        return math.inf, 0.0
    # Below ~1e-12 of the top eigenvalue, float64 rounding is all that is left: call it singular.
    small = float(lam[0])
    cond = math.inf if x.shape[0] < x.shape[1] or small <= 1e-12 * top else top / small
    p = lam / lam.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return cond, math.exp(entropy)


def describe(capture: Capture) -> pd.DataFrame:
    """One row per (layer, head): the columns of the module docstring, plus ``tokens`` and ``d``."""
    rows = []
    s = float(capture.scale)
    causal = capture.meta.get("causal") == "true"
    for li, layer in enumerate(capture.layers):
        for hi, head in enumerate(capture.heads):
            q = capture.q[li, hi].to(torch.float64)
            k = capture.k[li, hi].to(torch.float64)
            qn, kn = q.norm(dim=-1), k.norm(dim=-1)
            q_cond, q_erank = covariance_stats(q)
            k_cond, k_erank = covariance_stats(k)
            n = min(q.shape[0], PAIR_TOKENS)
            logits = (q[:n] @ k[:n].T) * s
            qbar, kbar = q.mean(dim=0), k.mean(dim=0)
            # mean_ij |q_i + k_j|^2 = mean|q|^2 + mean|k|^2 + 2 qbar.kbar, without forming L x L sums.
            sum_sq = (qn.pow(2).mean() + kn.pow(2).mean() + 2 * qbar @ kbar) * s
            lam = pooled_eigenvalues(q, k, s)
            top = float(lam[-1])
            rows.append({
                "layer": layer, "head": head, "tokens": q.shape[0], "d": q.shape[1],
                "q_norm": float(qn.mean()), "q_norm_max": float(qn.max()),
                "k_norm": float(kn.mean()), "k_norm_max": float(kn.max()),
                "q_offset": float(qbar.norm() / qn.mean()), "k_offset": float(kbar.norm() / kn.mean()),
                "q_cond": q_cond, "k_cond": k_cond, "q_erank": q_erank, "k_erank": k_erank,
                "logit_abs": float(logits.abs().mean()), "logit_max": float(logits.max()),
                "sum_sq": float(sum_sq),
                "lam_max": top,
                "lam_half": float((lam >= SIGMA_STAR_LIMIT).double().mean()),
                "lam_cond": top / float(lam[0]) if float(lam[0]) > 1e-12 * top else math.inf,
                "attn_entropy": attention_entropy(q[:n], k[:n], s, causal),
                "sigma_star": bool(top < SIGMA_STAR_LIMIT),
                "posrf_finite": bool(top < POSRF_LIMIT),
                "posrf_m2": float(posrf_second_moment(lam)),
                "opt_m2": float(optimal_second_moment(lam)),
            })
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Medians over heads (``by="layer"``) or over layers (``by="head"``); ``"pair"`` returns ``table``."""
    if by == "pair":
        return table
    if by not in ("layer", "head"):
        raise DataError(f"--by must be pair, layer or head, got {by!r}")
    numeric = [c for c in (*COLUMNS, *SPECTRUM_COLUMNS) if c in table.columns]
    flags = [c for c in ("sigma_star", "posrf_finite") if c in table.columns]
    out = table.groupby(by, sort=True)[["tokens", "d", *numeric]].median()
    for c in flags:  # medians of booleans mean nothing: the share of heads (or layers) where it holds
        out[c] = table.groupby(by, sort=True)[c].mean()
    return out.reset_index()


_FORMATS = {
    **{c: "{:.2f}".format for c in COLUMNS},
    "q_cond": "{:.3g}".format, "k_cond": "{:.3g}".format,
    "q_erank": "{:.1f}".format, "k_erank": "{:.1f}".format,
    "q_offset": "{:.3f}".format, "k_offset": "{:.3f}".format,
    "tokens": "{:.0f}".format, "d": "{:.0f}".format,
    "lam_max": "{:.3g}".format, "lam_half": "{:.2f}".format, "lam_cond": "{:.3g}".format,
    "attn_entropy": "{:.2f}".format, "posrf_m2": "{:.3g}".format, "opt_m2": "{:.3g}".format,
}


def format_table(table: pd.DataFrame, columns=None) -> str:
    """The table as text; ``columns`` (default all) after the layer/head/tokens/d keys."""
    if columns is not None:
        keys = [c for c in ("layer", "head", "tokens", "d") if c in table.columns]
        table = table[keys + [c for c in columns if c in table.columns]]
    formatters = {c: f for c, f in _FORMATS.items() if c in table.columns}
    for c in ("sigma_star", "posrf_finite"):
        if c in table.columns and table[c].dtype != bool:
            formatters[c] = "{:.2f}".format  # a share, after summarize
    return table.to_string(index=False, formatters=formatters)


def _is_model(name: str) -> bool:
    """A model to capture (alias, .gguf file, model folder) rather than a capture file."""
    from pathlib import Path

    from rfbench.data.capture import ALIASES

    p = Path(name)
    return name in ALIASES or p.suffix.lower() == ".gguf" or (p.is_dir() and (p / "config.json").is_file())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="capture file (.safetensors, .npz, .pt), 'bundled', or a model to "
                        "capture on the bundled corpus (cached): smollm2, FILE.gguf, a model folder")
    parser.add_argument("--by", choices=("pair", "layer", "head"), default="pair",
                        help="one row per layer/head pair (default), or medians per layer or per head")
    parser.add_argument("--layers", default="all", help="layers to describe: all, 0-5, 0,3")
    parser.add_argument("--heads", default="all", help="heads to describe: all, 0-5, 0,3")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="use only the first N tokens (a model: capture N, "
                             f"default {DEFAULT_MODEL_TOKENS})")
    parser.add_argument("--csv", default=None, metavar="OUT", help="also write the table as CSV")


def main(args: argparse.Namespace) -> int:
    from rfbench.data.capture import parse_indices

    layers, heads = parse_indices(args.layers, "layers"), parse_indices(args.heads, "heads")
    if _is_model(args.file):
        from rfbench.data.cache import cached_capture

        path = cached_capture(args.file, layers=layers, heads=heads,
                              max_tokens=args.max_tokens or DEFAULT_MODEL_TOKENS)
        cap = load_capture(path)
    else:
        cap = load_capture(args.file).select(layers=layers, heads=heads, max_tokens=args.max_tokens)
    table = summarize(describe(cap), args.by)
    n_l, n_h, n_t, d = cap.q.shape
    model = cap.meta.get("model", "unknown model")
    print(f"{args.file}: {model}; {n_l} layers x {n_h} heads x {n_t} tokens, d={d}, "
          f"scale={cap.scale:.6g}, stored as {str(cap.q.dtype).removeprefix('torch.')}")
    if args.by != "pair":
        print(f"(medians over {'heads' if args.by == 'layer' else 'layers'})")
    print(format_table(table, COLUMNS))
    print("norms before the scale; cond = covariance lambda_max/lambda_min; erank = exp(entropy of "
          f"eigenvalues), {d} if isotropic; logit = q.k*scale; sum_sq = mean |q+k|^2*scale")
    print()
    print(format_table(table, SPECTRUM_COLUMNS))
    causal = "causal" if cap.meta.get("causal") == "true" else "not causal"
    print("lam = eigenvalues of the pooled q, k second moment at the attention scale; lam_half = share "
          f">= 1/2; attn_entropy in nats ({causal}); sigma_star: every lam < 1/2 (DARK-IS's Sigma* "
          "exists); posrf_finite: every lam < 1/6; posrf_m2 / opt_m2 = data-averaged E[P^2] for "
          "isotropic PosRF / the best Gaussian proposal (docs/theory.md §3.1)")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0
