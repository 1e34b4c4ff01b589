"""Names -> constructors for feature maps and weight matrices, and the estimator factory.

The tables are explicit and lazy ("module:Class"), so importing rfbench stays cheap. A new
feature map or weight matrix is one new file and one line here.
"""

from __future__ import annotations

import difflib
import importlib

import torch

from rfbench.errors import EstimatorError

FEATURE_MAPS: dict[str, str] = {
    "trigrf": "rfbench.features.trigonometric:TrigRF",
    "posrf": "rfbench.features.positive:PosRF",
    "hyprf": "rfbench.features.positive:HypRF",
    "gerf": "rfbench.features.gerf:GERF",
    "gerftrig": "rfbench.features.gerf:GERFTrig",
    "oprf": "rfbench.features.gerf:OPRF",
    "saderf": "rfbench.features.derf:SADERF",
    "sderf": "rfbench.features.derf:SDERF",
    "poisrf": "rfbench.features.discrete:PoisRF",
    "geomrf": "rfbench.features.discrete:GeomRF",
    "dark": "rfbench.features.dark:DARK",
    "darkis": "rfbench.features.dark:DARKIS",
    "darkl": "rfbench.features.dark_learned:DARKLearned",
    "relu": "rfbench.features.relu:ReLU",
    "maclaurin": "rfbench.features.maclaurin:RandomMaclaurin",
    "taylor2": "rfbench.features.taylor:Taylor2",
    "hybrid": "rfbench.features.hybrid:AngularHybrid",
    "lara": "rfbench.features.lara:LARA",
    "hedgehog": "rfbench.features.hedgehog:Hedgehog",
}

WEIGHT_MATRICES: dict[str, str] = {
    "iid": "rfbench.weights.iid:IID",
    "orf": "rfbench.weights.orthogonal:ORF",
    "orffixed": "rfbench.weights.orthogonal:ORFFixed",
    "scrf": "rfbench.weights.circulant:SCRF",
    "sorf": "rfbench.weights.hadamard:SORF",
    "rom": "rfbench.weights.hadamard:ROM",
    "romhybrid": "rfbench.weights.hadamard:ROMHybrid",
    "fastfood": "rfbench.weights.hadamard:FastFood",
    "qmc": "rfbench.weights.qmc:SobolQMC",
    "halton": "rfbench.weights.qmc:HaltonQMC",
    "mm": "rfbench.weights.moment:MomentMatching",
    "sgq": "rfbench.weights.quadrature:SparseGridQuadrature",
    "gq": "rfbench.weights.quadrature:GridQuadrature",
    "simrf": "rfbench.weights.simplex:SimRF",
    "simrfplus": "rfbench.weights.simplex:SimRFPlus",
    "fastfoodl": "rfbench.weights.learned:FastFoodL",
    "antithetic": "rfbench.weights.antithetic:Antithetic",
}


def feature_maps() -> list[str]:
    """Names of every feature map."""
    return list(FEATURE_MAPS)


def weight_matrices() -> list[str]:
    """Names of every weight matrix."""
    return list(WEIGHT_MATRICES)


def _unknown(kind: str, name: str, known: list[str]) -> EstimatorError:
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return EstimatorError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}")


def _load(table: dict[str, str], kind: str, name: str):
    if name not in table:
        raise _unknown(kind, name, list(table))
    module, cls = table[name].split(":")
    return getattr(importlib.import_module(module), cls)


def feature_map_class(name: str):
    return _load(FEATURE_MAPS, "feature map", name)


def weight_matrix_class(name: str):
    return _load(WEIGHT_MATRICES, "weight matrix", name)


def get_feature_map(name: str, **params):
    return feature_map_class(name)(**params)


def get_weight_matrix(name: str, **params):
    return weight_matrix_class(name)(**params)


def parse(name: str) -> tuple[str, str]:
    """Split ``"<feature>-<weights>"`` into its two names, checking both exist."""
    if not isinstance(name, str) or name.count("-") != 1:
        raise EstimatorError(
            f"an estimator name is '<feature>-<weights>', e.g. 'posrf-orf'; got {name!r}. "
            "See `rfbench list estimators`."
        )
    fm, wm = name.lower().split("-")
    if fm not in FEATURE_MAPS:
        raise _unknown("feature map", fm, feature_maps())
    if wm not in WEIGHT_MATRICES:
        raise _unknown("weight matrix", wm, weight_matrices())
    return fm, wm


def pair_reasons(feature: str, weights: str) -> list[str]:
    """Why ``feature`` cannot be paired with ``weights`` at default parameters (empty: it can).

    The rule reads declared data only (``FeatureMap.supports``): the map's ``weights`` tuple (the
    only samplers it takes, e.g. ``("iid",)`` for maps that draw their own omegas) and its
    ``needs_gaussian_rows`` against the sampler's ``gaussian_marginal``. Sizes (m, d) are the
    sampler's own ``supports(m, d)``, checked when an estimator is built.
    """
    return get_feature_map(feature).supports(get_weight_matrix(weights))


def estimators(include_unsupported: bool = False) -> list[str]:
    """Every valid ``"<feature>-<weights>"`` pair (all pairs with ``include_unsupported``)."""
    out = []
    for fm in FEATURE_MAPS:
        for wm in WEIGHT_MATRICES:
            if include_unsupported or not pair_reasons(fm, wm):
                out.append(f"{fm}-{wm}")
    return out


def make_estimator(
    name: str,
    dim: int,
    num_features: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    feature_params: dict | None = None,
    weight_params: dict | None = None,
    **params,
):
    """Build an Estimator from ``"<feature>-<weights>"``.

    Extra keyword ``params`` go to whichever component declares them (e.g. ``A=-0.1`` to GERF);
    use ``feature_params`` / ``weight_params`` to be explicit.
    """
    from rfbench.estimator import Estimator

    fm_name, wm_name = parse(name)
    fm_cls, wm_cls = feature_map_class(fm_name), weight_matrix_class(wm_name)
    fparams, wparams = dict(feature_params or {}), dict(weight_params or {})
    for key, value in params.items():
        in_f, in_w = key in fm_cls.defaults, key in wm_cls.defaults
        if in_f and in_w:
            raise EstimatorError(
                f"parameter {key!r} exists on both {fm_name} and {wm_name}; pass it in "
                "feature_params= or weight_params="
            )
        if not (in_f or in_w):
            allowed = sorted(set(fm_cls.defaults) | set(wm_cls.defaults))
            raise EstimatorError(
                f"{name} has no parameter {key!r}; allowed: {', '.join(allowed) or 'none'}"
            )
        (fparams if in_f else wparams)[key] = value
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EstimatorError(f"bad device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EstimatorError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
    return Estimator(
        fm_cls(**fparams), wm_cls(**wparams),
        dim=dim, num_features=num_features, seed=seed, device=device, dtype=dtype,
    )
