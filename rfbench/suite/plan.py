"""The plan of a run: every cell of a suite, with its key, id, seeds, token split and skip reason.

A *cell* is one point of the product of a suite's axes: (estimator or baseline, data source,
seq_len, num_features, causal, dtype, device). Its id (the ``cell`` column) is a short sha256 of
its canonical key, and the seed of its seed index i is derived from the same key:

    seed_i = int(sha256(f"{canonical key}|{seeds.base}|{i}")[:8 bytes]) mod 2**63

so a cell's numbers do not depend on which other cells run, in which order, in which shard, or
whether the run was resumed. With a ``[fit]`` section the (fit, held-out) token split of each
L is computed here once (``Split``) and carried by the cells: the sizes of the results rows,
the skip reasons and the data of a cell all come from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

from rfbench.errors import SpecError
from rfbench.suite import baselines
from rfbench.suite.sources import Source
from rfbench.suite.spec_types import EstimatorSpec, Suite

_SEED_BYTES = 8


# --------------------------------------------------------------------------- keys and seeds
def canonical(obj) -> str:
    """Canonical JSON of a cell key: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_id(key: dict) -> str:
    return hashlib.sha256(canonical(key).encode()).hexdigest()[:16]


def derive_seed(key: dict, base: int, index: int) -> int:
    """The seed of seed index ``index`` of the cell with ``key`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{canonical(key)}|{base}|{index}".encode()).digest()
    return int.from_bytes(digest[:_SEED_BYTES], "big") % (2**63)


# --------------------------------------------------------------------------- token splits
@dataclass(frozen=True)
class Split:
    """The tokens of a cell of L tokens: all measured (no [fit]), or fitted on / held out."""

    fit_idx: torch.Tensor | None = None  # token indices fitted on ([fit] only)
    held_idx: torch.Tensor | None = None  # token indices measured ([fit] only)
    error: str = ""  # why L cannot be split (the cells are skipped with it)

    def sizes(self, L: int, with_fit: bool) -> dict:
        """``fit_len`` (tokens fitted on) and ``eval_len`` (tokens measured) of the results rows."""
        if not with_fit:
            return {"fit_len": 0, "eval_len": L}
        if self.error:
            return {"fit_len": 0, "eval_len": 0}
        return {"fit_len": self.fit_idx.numel(), "eval_len": self.held_idx.numel()}


def split_for(suite: Suite, L: int) -> Split:
    if suite.fit is None:
        return Split()
    try:
        fit_idx, held_idx = suite.fit.split(L)
    except SpecError as exc:
        return Split(error=str(exc))
    return Split(fit_idx, held_idx)


# --------------------------------------------------------------------------- cells
@dataclass
class Cell:
    cell: str
    key: dict
    kind: str  # "estimator" or "baseline"
    name: str
    source: Source
    seq_len: int
    num_features: int
    causal: bool
    dtype: str
    device: str
    split: Split
    seeds: tuple[int, ...]  # one per seed index (baselines: (0,))
    estimator: EstimatorSpec | None = None
    skip: str = ""  # reason this cell cannot run here (known before running it)

    @property
    def context_key(self) -> tuple:
        return (self.source.label, self.seq_len, self.causal, self.dtype, self.device)

    def label(self) -> str:
        m = f" m={self.num_features}" if self.kind == "estimator" else ""
        c = " causal" if self.causal else ""
        return f"{self.name}{m} {self.source.label} L={self.seq_len}{c} {self.dtype} {self.device}"


def resolve_devices(suite: Suite, device: str | None) -> list[str]:
    """The devices the sweep runs on: ``device`` (the CLI's) overrides the suite's axis."""
    if device is not None:
        if device not in ("cpu", "cuda", "auto"):
            raise SpecError(f"--device must be cpu, cuda or auto, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise SpecError(
                "--device cuda was given but CUDA is not available here; use --device cpu or auto"
            )
        wanted = [device]
    else:
        wanted = list(suite.sweep.device)
    out = []
    for d in wanted:
        d = ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d
        if d not in out:
            out.append(d)
    return out


def plan(suite: Suite, sources: list[Source], devices: list[str]) -> list[Cell]:
    """Every cell of the suite, in canonical order (data and reference reuse stay local)."""
    cells: list[Cell] = []
    sweep = suite.sweep
    splits: dict[int, Split] = {}
    for device in devices:
        for dtype in sweep.values("dtype", device):
            for src in sources:
                for L in sweep.values("seq_len", device):
                    split = splits.setdefault(L, split_for(suite, L))
                    for causal in sweep.values("causal", device):
                        skip = ""
                        if device == "cuda" and not torch.cuda.is_available():
                            skip = "CUDA is not available on this machine"
                        elif src.max_tokens is not None and L > src.max_tokens:
                            skip = f"seq_len {L} exceeds the {src.max_tokens} tokens of {src.label}"
                        elif split.error:
                            skip = f"[fit] holdout = {suite.fit.holdout}: {split.error}"
                        base = {
                            "data": src.key,
                            "seq_len": L,
                            "causal": causal,
                            "dtype": dtype,
                            "device": device,
                        }
                        if suite.fit is not None:  # a held-out measurement is another cell
                            base["holdout"] = _holdout_key(suite.fit)
                        common = dict(
                            source=src, seq_len=L, causal=causal, dtype=dtype, device=device, split=split
                        )
                        for b in suite.baselines:
                            key = {"kind": "baseline", "estimator": b, "num_features": 0, **base}
                            reasons = "; ".join(baselines.get(b).supports(dtype, device))
                            cells.append(
                                Cell(
                                    cell_id(key),
                                    key,
                                    "baseline",
                                    b,
                                    num_features=0,
                                    seeds=(0,),
                                    skip=skip or reasons,
                                    **common,
                                )
                            )
                        for m in sweep.values("num_features", device):
                            for est in suite.estimators:
                                key = {"kind": "estimator", "estimator": est.key(), "num_features": m, **base}
                                est_skip = skip
                                if suite.fit is not None and learnable(est):
                                    # training settings are part of what a learner's cell measures;
                                    # the others are fitted the plain way, whatever they say
                                    config = suite.fit.config_for(est.name)
                                    key["fit"] = dataclasses.asdict(config)
                                    est_skip = skip or _validation_skip(split, config, L)
                                seeds = tuple(
                                    derive_seed(key, suite.seeds.base, i) for i in range(suite.seeds.count)
                                )
                                cells.append(
                                    Cell(
                                        cell_id(key),
                                        key,
                                        "estimator",
                                        est.name,
                                        num_features=m,
                                        seeds=seeds,
                                        estimator=est,
                                        skip=est_skip,
                                        **common,
                                    )
                                )
    return cells


def select_shard(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Cells i, i+n, i+2n, ... (1-based) of the canonical order for ``shard = (i, n)``."""
    if shard is None:
        return cells
    return [c for i, c in enumerate(cells) if i % shard[1] == shard[0] - 1]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise SpecError(f"--shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise SpecError(f"--shard I/N needs 1 <= I <= N, got {text!r}")
    return i, n


def _holdout_key(fit) -> dict:
    key = {"share": fit.holdout, "split": fit.holdout_split}
    if fit.holdout_split == "blocks":
        key["n_blocks"] = fit.config.n_blocks
    return key


def learnable(spec: EstimatorSpec) -> bool:
    """Whether the estimator has parts that [fit] trains (darkl, fastfoodl)."""
    from rfbench import registry

    return bool(
        registry.feature_map_class(spec.feature_map).learnable
        or registry.weight_matrix_class(spec.weight_matrix).learnable
    )


def _validation_skip(split: Split, config, L: int) -> str:
    """Why a learner cannot split its fit part into training and validation tokens ("" if it can)."""
    from rfbench.learning import split_tokens

    if split.error:
        return ""  # the cell is skipped for its holdout already
    try:
        split_tokens(split.fit_idx.numel(), config.val_fraction, split=config.split, n_blocks=config.n_blocks)
    except SpecError as exc:
        return f"[fit] the fit part of L={L} cannot be split for validation: {exc}"
    return ""
