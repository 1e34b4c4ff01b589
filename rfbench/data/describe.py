"""Norms and anisotropy of captured queries and keys: why estimators differ on real data.

    rfbench describe capture.safetensors [--by layer|head|pair]
    rfbench describe bundled

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
            rows.append({
                "layer": layer, "head": head, "tokens": q.shape[0], "d": q.shape[1],
                "q_norm": float(qn.mean()), "q_norm_max": float(qn.max()),
                "k_norm": float(kn.mean()), "k_norm_max": float(kn.max()),
                "q_offset": float(qbar.norm() / qn.mean()), "k_offset": float(kbar.norm() / kn.mean()),
                "q_cond": q_cond, "k_cond": k_cond, "q_erank": q_erank, "k_erank": k_erank,
                "logit_abs": float(logits.abs().mean()), "logit_max": float(logits.max()),
                "sum_sq": float(sum_sq),
            })
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Medians over heads (``by="layer"``) or over layers (``by="head"``); ``"pair"`` returns ``table``."""
    if by == "pair":
        return table
    if by not in ("layer", "head"):
        raise DataError(f"--by must be pair, layer or head, got {by!r}")
    return table.groupby(by, sort=True)[["tokens", "d", *COLUMNS]].median().reset_index()


_FORMATS = {
    **{c: "{:.2f}".format for c in COLUMNS},
    "q_cond": "{:.3g}".format, "k_cond": "{:.3g}".format,
    "q_erank": "{:.1f}".format, "k_erank": "{:.1f}".format,
    "q_offset": "{:.3f}".format, "k_offset": "{:.3f}".format,
    "tokens": "{:.0f}".format, "d": "{:.0f}".format,
}


def format_table(table: pd.DataFrame) -> str:
    formatters = {c: f for c, f in _FORMATS.items() if c in table.columns}
    return table.to_string(index=False, formatters=formatters)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="capture file (.safetensors, .npz, .pt), or 'bundled'")
    parser.add_argument("--by", choices=("pair", "layer", "head"), default="pair",
                        help="one row per layer/head pair (default), or medians per layer or per head")
    parser.add_argument("--layers", default="all", help="layers to describe: all, 0-5, 0,3")
    parser.add_argument("--heads", default="all", help="heads to describe: all, 0-5, 0,3")
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    parser.add_argument("--csv", default=None, metavar="OUT", help="also write the table as CSV")


def main(args: argparse.Namespace) -> int:
    from rfbench.data.capture import parse_indices

    cap = load_capture(args.file).select(
        layers=parse_indices(args.layers, "layers"), heads=parse_indices(args.heads, "heads"),
        max_tokens=args.max_tokens,
    )
    table = summarize(describe(cap), args.by)
    n_l, n_h, n_t, d = cap.q.shape
    model = cap.meta.get("model", "unknown model")
    print(f"{args.file}: {model}; {n_l} layers x {n_h} heads x {n_t} tokens, d={d}, "
          f"scale={cap.scale:.6g}, stored as {str(cap.q.dtype).removeprefix('torch.')}")
    if args.by != "pair":
        print(f"(medians over {'heads' if args.by == 'layer' else 'layers'})")
    print(format_table(table))
    print("norms before the scale; cond = covariance lambda_max/lambda_min; erank = exp(entropy of "
          f"eigenvalues), {d} if isotropic; logit = q.k*scale; sum_sq = mean |q+k|^2*scale")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0
