"""Seeded synthetic queries, keys and values ``[B, H, L, d]``.

    qkv = make("anisotropic", heads=4, seq_len=1024, dim=64, cond=100.0, seed=0)
    qkv.q.shape   # [1, 4, 1024, 64]

Scale convention: q and k are generated as the attention sees them, *before* its 1/sqrt(d)
scale. By default their rows have root-mean-square norm sqrt(d) (entries of unit variance, as
N(0, I) data has); ``q_norm`` / ``k_norm`` set another RMS norm sqrt(E|x|^2). The runner applies
the 1/sqrt(d) scale (an estimator sees q * d**-0.25), so the default logits q.k / sqrt(d) have
unit variance. Values v are N(0, 1) entries ``[B, H, L, dim_v or dim]`` except for "matched".

Attention entropy: the default norms give nearly uniform attention (unit-variance logits). The
bundled MiniLM-L6 capture's 36 heads have a mean attention entropy of 4.32 nats at L = 512
(median 4.63, range 0.21-5.82; log L = 6.24) and 3.66 at L = 256, against 5.74 / 5.06 for
isotropic data at the default norm. ``attention_entropy`` measures it; RMS norms of
1.434 sqrt(d) (isotropic) and 1.165 sqrt(d) (anisotropic, cond 100) match 4.32 at L = 512,
d = 64 (the quick suite's synthetic sources use them).

Determinism: every draw is made on the CPU in float64 from ``torch.Generator``s seeded from
``seed`` (one stream each for the structure -- rotations, centres, subspaces -- and for q, k
and v), then cast to ``dtype``. The same seed gives the same numbers on every device, and the
structure (a head's covariance, its cluster centres) does not depend on ``batch`` or ``seq_len``.
The structure is drawn per head and shared across the batch.

Kinds and their parameters (``parameters(kind)`` gives the defaults):

- ``isotropic``: N(0, s^2 I) with s = norm / sqrt(d). ``sphere=True`` puts every row exactly
  on the sphere of radius norm (uniform directions).
- ``anisotropic``: N(0, R diag(lambda) R^T) with a random rotation R per head (``rotate``) and a
  covariance spectrum of condition number ``cond`` (lambda_max / lambda_min, exact for the
  population covariance), ``spectrum`` "geometric" (log-spaced) or "linear"; trace = norm^2.
  ``shared``: q and k share R (else each draws its own).
- ``clustered``: a mixture of ``clusters`` equally likely Gaussians per head. A fraction
  ``spread`` of E|x|^2 is in the centres (|centre| = norm sqrt(spread), random directions), the
  rest in isotropic noise. ``shared``: q and k use the same centre directions.
- ``heavytailed``: multivariate Student-t with ``df`` > 2 degrees of freedom,
  x = z sqrt((df - 2) / chi2_df), z ~ N(0, s^2 I), so E|x|^2 = norm^2 and norms have a heavy tail.
- ``lowrank``: a random ``rank``-dimensional subspace per head plus isotropic noise holding a
  fraction ``noise`` of E|x|^2. ``shared``: q and k share the subspace.
- ``matched``: Gaussian with the mean and covariance, per layer/head, of the q, k and v of a
  capture file (``source``: a path, or "bundled" for the MiniLM-L6 capture shipped with
  rfbench); ``capture_layers`` / ``capture_heads`` select the model's layers and heads (default
  all). Generated head h copies the statistics of the h-th selected (layer, head) pair, in
  layer-major order, cycling when ``heads`` exceeds the number of pairs. ``dim`` (and
  ``dim_v``) must equal the capture's. ``rescale``: when the model's own scale differs from
  1/sqrt(d), q and k are multiplied by sqrt(scale * sqrt(d)) so that the runner's 1/sqrt(d)
  gives the model's logits. Each of q, k, v is drawn on its own (no q-k correlation per token).
"""

from __future__ import annotations

import hashlib
import math
import os
from functools import lru_cache
from typing import Any, NamedTuple

import torch

from rfbench.errors import DataError

KINDS: tuple[str, ...] = ("isotropic", "anisotropic", "clustered", "heavytailed", "lowrank", "matched")

_NORMS = {"q_norm": None, "k_norm": None}
_PARAMETERS: dict[str, dict[str, Any]] = {
    "isotropic": {**_NORMS, "sphere": False},
    "anisotropic": {**_NORMS, "cond": 100.0, "spectrum": "geometric", "rotate": True, "shared": True},
    "clustered": {**_NORMS, "clusters": 8, "spread": 0.8, "shared": True},
    "heavytailed": {**_NORMS, "df": 3.0},
    "lowrank": {**_NORMS, "rank": 4, "noise": 0.1, "shared": True},
    "matched": {"source": "bundled", "capture_layers": None, "capture_heads": None, "rescale": True},
}
SPECTRA = ("geometric", "linear")


class QKV(NamedTuple):
    """Queries and keys ``[B, H, L, d]`` and values ``[B, H, L, dv]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def parameters(kind: str) -> dict[str, Any]:
    """The kind's own parameters and their defaults (None: derived from dim, see the docstring)."""
    _check_kind(kind)
    return dict(_PARAMETERS[kind])


def make(
    kind: str,
    *,
    batch: int = 1,
    heads: int = 1,
    seq_len: int,
    dim: int,
    dim_v: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **params,
) -> QKV:
    """Generate q, k ``[batch, heads, seq_len, dim]`` and v ``[batch, heads, seq_len, dim_v or dim]``.

    See the module docstring for each kind and its parameters. Raises DataError on an unknown
    kind or parameter (listing the allowed ones) and on impossible values.
    """
    _check_kind(kind)
    unknown = sorted(set(params) - set(_PARAMETERS[kind]))
    if unknown:
        allowed = ", ".join(_PARAMETERS[kind]) or "none"
        raise DataError(f"synthetic kind {kind!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
    for name, value in (("batch", batch), ("heads", heads), ("seq_len", seq_len), ("dim", dim)):
        _check_int(name, value, low=1)
    if dim_v is not None:
        _check_int("dim_v", dim_v, low=1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DataError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    p = {**_PARAMETERS[kind], **params}
    shape = (batch, heads, seq_len, dim)
    if kind == "matched":
        q, k, v = _matched(shape, dim_v, seed, p)
    else:
        q, k = _GENERATORS[kind](shape, seed, p, _norms(dim, p))
        v = _randn((batch, heads, seq_len, dim_v or dim), _stream(seed, "v"))
    return QKV(q.to(dtype), k.to(dtype), v.to(dtype))


def attention_entropy(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                      causal: bool = False) -> torch.Tensor:
    """Mean over queries of the entropy (nats) of softmax(q k^T * scale) rows, per head.

    q ``[..., L, d]``, k ``[..., Lk, d]`` -> ``[...]``. ``scale`` defaults to 1/sqrt(d); computed
    in float64 (0 log 0 = 0). Uniform attention over L keys gives log L; one-hot attention, 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.to(torch.float64) @ k.to(torch.float64).transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask, -math.inf)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1).mean(-1)


# --------------------------------------------------------------------------- helpers
def _check_kind(kind: str) -> None:
    if kind not in _PARAMETERS:
        raise DataError(f"unknown synthetic data kind {kind!r}; known: {', '.join(KINDS)}")


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise DataError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _check_float(name: str, value, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        lo = "(" if open_low else "["
        raise DataError(f"{name} must be a number in {lo}{low}, {high}], got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise DataError(f"{name} must be true or false, got {value!r}")
    return value


def _norms(dim: int, p: dict) -> tuple[float, float]:
    """RMS row norms of q and k; default sqrt(dim) (unit-variance entries)."""
    out = []
    for name in ("q_norm", "k_norm"):
        value = p[name]
        out.append(math.sqrt(dim) if value is None else _check_float(name, value, 0.0, open_low=True))
    return out[0], out[1]


def _stream(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one named stream: streams are independent and order-free."""
    digest = hashlib.sha256(f"rfbench.synthetic:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _randn(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rotations(heads: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrices ``[heads, d, d]`` (QR with the sign of diag(R) fixed)."""
    a = _randn((heads, dim, dim), gen)
    qm, r = torch.linalg.qr(a)
    # Without the sign fix QR's output is not Haar-distributed (Mezzadri 2007, eq. 5.1).
    return qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _directions(heads: int, n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``[heads, n, d]`` uniform unit vectors."""
    x = _randn((heads, n, dim), gen)
    return x / x.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------- kinds
def _isotropic(shape, seed, p, norms):
    sphere = _check_bool("sphere", p["sphere"])
    out = []
    for name, norm in zip(("q", "k"), norms):
        x = _randn(shape, _stream(seed, name))
        if sphere:
            x = x / x.norm(dim=-1, keepdim=True) * norm
        else:
            x = x * (norm / math.sqrt(shape[-1]))
        out.append(x)
    return out


def spectrum(dim: int, cond: float, kind: str = "geometric") -> torch.Tensor:
    """Covariance eigenvalues ``[d]``, largest first, lambda_max / lambda_min = cond, mean 1."""
    if kind == "geometric":
        lam = cond ** (-torch.arange(dim, dtype=torch.float64) / max(dim - 1, 1))
    else:
        lam = torch.linspace(1.0, 1.0 / cond, dim, dtype=torch.float64)
    return lam / lam.mean()


def _anisotropic(shape, seed, p, norms):
    _, heads, _, dim = shape
    cond = _check_float("cond", p["cond"], 1.0)
    if dim == 1 and cond != 1.0:
        raise DataError(f"cond={cond} needs dim >= 2 (one dimension has one eigenvalue)")
    if p["spectrum"] not in SPECTRA:
        raise DataError(f"spectrum must be one of {', '.join(SPECTRA)}, got {p['spectrum']!r}")
    rotate, shared = _check_bool("rotate", p["rotate"]), _check_bool("shared", p["shared"])
    std = spectrum(dim, cond, p["spectrum"]).sqrt()  # mean eigenvalue 1: E|x|^2 = d before the norm
    gen = _stream(seed, "structure")
    eye = torch.eye(dim, dtype=torch.float64).expand(heads, dim, dim)
    rot_q = _rotations(heads, dim, gen) if rotate else eye
    rot_k = rot_q if shared or not rotate else _rotations(heads, dim, gen)
    out = []
    for name, norm, rot in (("q", norms[0], rot_q), ("k", norms[1], rot_k)):
        z = _randn(shape, _stream(seed, name)) * std * (norm / math.sqrt(dim))
        out.append(z @ rot.transpose(-1, -2).unsqueeze(0))  # x = R z, row-wise
    return out


def _clustered(shape, seed, p, norms):
    batch, heads, seq_len, dim = shape
    n = _check_int("clusters", p["clusters"], low=1)
    spread = _check_float("spread", p["spread"], 0.0, 1.0)
    shared = _check_bool("shared", p["shared"])
    gen = _stream(seed, "structure")
    dirs_q = _directions(heads, n, dim, gen)
    dirs_k = dirs_q if shared else _directions(heads, n, dim, gen)
    out = []
    for name, norm, dirs in (("q", norms[0], dirs_q), ("k", norms[1], dirs_k)):
        g = _stream(seed, name)
        noise = _randn(shape, g) * (norm * math.sqrt((1.0 - spread) / dim))
        label = torch.randint(n, (batch, heads, seq_len), generator=g)
        centres = dirs.unsqueeze(0).expand(batch, -1, -1, -1) * (norm * math.sqrt(spread))
        out.append(torch.gather(centres, 2, label.unsqueeze(-1).expand(-1, -1, -1, dim)) + noise)
    return out


def _heavytailed(shape, seed, p, norms):
    df = _check_float("df", p["df"], 2.0, open_low=True)
    out = []
    for name, norm in zip(("q", "k"), norms):
        g = _stream(seed, name)
        z = _randn(shape, g) * (norm / math.sqrt(shape[-1]))
        chi2 = 2.0 * _gamma(df / 2.0, shape[:-1], g)
        # E[1/chi2_df] = 1/(df - 2), so the factor (df - 2)/chi2 keeps E|x|^2 = norm^2.
        out.append(z * torch.sqrt((df - 2.0) / chi2).unsqueeze(-1))
    return out


def _gamma(a: float, shape, gen: torch.Generator) -> torch.Tensor:
    """Gamma(a, 1) samples for a >= 1 (Marsaglia & Tsang 2000, ACM TOMS 26(3)), from ``gen``.

    torch's own gamma sampler takes no generator; this rejection sampler accepts > 95% of
    proposals, so a few vectorised rounds finish it.
    """
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(shape, dtype=torch.float64).reshape(-1)
    todo = torch.arange(out.numel())
    while todo.numel():
        x = _randn((todo.numel(),), gen)
        u = torch.rand(todo.numel(), generator=gen, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    return out.reshape(shape)


def _lowrank(shape, seed, p, norms):
    batch, heads, seq_len, dim = shape
    rank = _check_int("rank", p["rank"], low=1, high=dim)
    noise = _check_float("noise", p["noise"], 0.0, 1.0)
    shared = _check_bool("shared", p["shared"])
    gen = _stream(seed, "structure")
    basis_q = _rotations(heads, dim, gen)[..., :rank]  # [H, d, r] orthonormal columns
    basis_k = basis_q if shared else _rotations(heads, dim, gen)[..., :rank]
    out = []
    for name, norm, basis in (("q", norms[0], basis_q), ("k", norms[1], basis_k)):
        g = _stream(seed, name)
        coef = _randn((batch, heads, seq_len, rank), g) * (norm * math.sqrt((1.0 - noise) / rank))
        eps = _randn(shape, g) * (norm * math.sqrt(noise / dim))
        out.append(coef @ basis.transpose(-1, -2).unsqueeze(0) + eps)
    return out


_GENERATORS = {
    "isotropic": _isotropic,
    "anisotropic": _anisotropic,
    "clustered": _clustered,
    "heavytailed": _heavytailed,
    "lowrank": _lowrank,
}


# --------------------------------------------------------------------------- matched
def _matched(shape, dim_v, seed, p):
    batch, heads, seq_len, dim = shape
    rescale = _check_bool("rescale", p["rescale"])
    source = p["source"]
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"source must be a capture file path or 'bundled', got {source!r}")
    stats, scale, pairs = _capture_stats(str(source), _index_list("capture_layers", p["capture_layers"]),
                                         _index_list("capture_heads", p["capture_heads"]))
    d_cap, dv_cap = stats["q"][0].shape[-1], stats["v"][0].shape[-1]
    if dim != d_cap:
        raise DataError(f"matched data from {source} has d={d_cap}; set dim={d_cap} (got dim={dim})")
    if dim_v is not None and dim_v != dv_cap:
        raise DataError(f"matched data from {source} has dv={dv_cap}; set dim_v={dv_cap} or leave it unset")
    pick = [i % len(pairs) for i in range(heads)]
    # Make the model's logits q.k * scale come out of the runner's 1/sqrt(d): x -> x * sqrt(scale sqrt(d)).
    factor = math.sqrt(scale * math.sqrt(dim)) if rescale else 1.0
    out = []
    for name in ("q", "k", "v"):
        mean, root = stats[name]  # [P, d], [P, d, d]
        z = _randn((batch, heads, seq_len, root.shape[-1]), _stream(seed, name))
        x = z @ root[pick].transpose(-1, -2).unsqueeze(0) + mean[pick][None, :, None, :]
        out.append(x * factor if name != "v" else x)
    return out


def _index_list(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and all(type(i) is int for i in value):
        return tuple(value)
    raise DataError(f"{name} must be an integer or a list of integers (the model's indices), got {value!r}")


def _capture_stats(source: str, layers, heads):
    from rfbench.data.io import bundled_capture_path

    path = bundled_capture_path() if source == "bundled" else os.path.abspath(source)
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        raise DataError(f"matched data: capture file {path} not found") from None
    return _capture_stats_cached(str(path), mtime, layers, heads)


@lru_cache(maxsize=8)
def _capture_stats_cached(path: str, mtime: float, layers, heads):
    """Per selected (layer, head): mean ``[P, d]`` and a covariance square root ``[P, d, d]``."""
    from rfbench.data.io import load_capture

    cap = load_capture(path).select(layers=list(layers) if layers else None,
                                    heads=list(heads) if heads else None)
    pairs = [(layer, head) for layer in cap.layers for head in cap.heads]
    stats = {}
    for name in ("q", "k", "v"):
        x = getattr(cap, name).to(torch.float64).flatten(0, 1)  # [P, L, d]
        mean = x.mean(dim=-2)
        xc = x - mean.unsqueeze(-2)
        cov = xc.transpose(-1, -2) @ xc / max(x.shape[-2] - 1, 1)
        lam, vec = torch.linalg.eigh(cov)
        # Rounding can leave tiny negative eigenvalues on a PSD matrix; they carry no variance.
        stats[name] = (mean, vec * lam.clamp_min(0.0).sqrt().unsqueeze(-2))
    return stats, float(cap.scale), pairs
