"""What a suite's ``[fit]`` section says: fit settings, hold-out and validation splits.

Light on purpose: a suite parser imports this module, which pulls in neither the trainer
(``rfbench.learning.training``, autograd, pandas) nor the estimator. Splits are plain index
ranges (``split_ranges``), computed once per cell by a plan; ``split_tokens`` gives them as
index tensors.

Splits are contiguous blocks of tokens, never random single tokens: neighbouring tokens of a
text are strongly correlated (shared context, near-identical keys), so a random token split
would put near-copies of validation tokens in the training set. ``"blocks"`` cuts the sequence
into ``n_blocks`` equal contiguous blocks and validates on evenly spaced ones (positions spread
over the sequence); ``"tail"`` validates on the last block (one boundary, contiguous, causal-safe).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from rfbench.errors import SpecError

OBJECTIVES = ("attention", "kernel", "variance", "crossentropy")
SPLITS = ("blocks", "tail")
HOLDOUT_KEYS = ("holdout", "holdout_split")


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How to fit a kernel learner. Validated on construction (SpecError naming the field).

    objective: "attention" | "kernel" | "variance" | "crossentropy" (see ``rfbench.learning.objectives``).
    steps: optimiser steps (Adam), > 0.
    lr: Adam learning rate, > 0.
    batch_tokens: training tokens per step (queries and keys); all of them when fewer.
    val_fraction: share of the tokens given that validates, in (0, 1).
    split: "blocks" (evenly spaced contiguous blocks) or "tail" (the last block).
    n_blocks: number of contiguous blocks for split="blocks" (>= 2).
    eval_every: steps between validation evaluations (>= 1).
    patience: evaluations without improvement before stopping; 0 never stops early.
    min_delta: relative improvement of the validation loss that counts (>= 0).
    val_draws: fixed draws averaged for each validation loss (>= 1; used when redrawing).
    redraw: redraw the random vectors every step; None picks per estimator (True for a learned
        distribution such as darkl, False for fastfoodl, which learns its draw).
    seed: seed of the training randomness (batch order, redraws). Fixed (0) by default, so a
        learned distribution (darkl's M) is the same for every estimator seed of a cell: the seeds
        then measure the spread over random features alone, as for every other estimator, and
        share one target kernel. None uses the estimator's seed (fastfoodl's initial draw always
        comes from the estimator's seed).
    """

    objective: str = "attention"
    steps: int = 200
    lr: float = 0.01
    batch_tokens: int = 256
    val_fraction: float = 0.2
    split: str = "blocks"
    n_blocks: int = 8
    eval_every: int = 10
    patience: int = 5
    min_delta: float = 0.0
    val_draws: int = 4
    redraw: bool | None = None
    seed: int | None = 0

    def __post_init__(self):
        def bad(key: str, message: str):
            err = SpecError(f"fit {key} {message}")
            err.key, err.detail = key, message  # from_dict names the key path with them
            raise err

        if self.objective not in OBJECTIVES:
            bad("objective", f"must be one of {', '.join(map(repr, OBJECTIVES))}, got {self.objective!r}")
        if self.split not in SPLITS:
            bad("split", f"must be one of {', '.join(map(repr, SPLITS))}, got {self.split!r}")
        for name, low in (
            ("steps", 1),
            ("batch_tokens", 2),
            ("n_blocks", 2),
            ("eval_every", 1),
            ("patience", 0),
            ("val_draws", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                bad(name, f"must be an integer >= {low}, got {value!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
                bad(name, f"must be a number in ({lo}, {hi}), got {value!r}")
        if (
            isinstance(self.min_delta, bool)
            or not isinstance(self.min_delta, (int, float))
            or not (0 <= self.min_delta < 1)
        ):
            bad("min_delta", f"must be a number in [0, 1), got {self.min_delta!r}")
        if self.redraw is not None and not isinstance(self.redraw, bool):
            bad("redraw", f"must be true, false or absent (per estimator), got {self.redraw!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"must be an integer or absent (the estimator's), got {self.seed!r}")
        if self.split == "blocks" and max(1, round(self.n_blocks * self.val_fraction)) >= self.n_blocks:
            bad(
                "val_fraction",
                f"= {self.val_fraction} leaves no training block of n_blocks = {self.n_blocks}; "
                "lower it or raise n_blocks",
            )
        # One spelling of each number: `lr = 1` and `lr = 1.0` are the same config (and cell key).
        for name in ("lr", "val_fraction", "min_delta"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_dict(cls, table: dict[str, Any], where: str = "fit") -> FitConfig:
        """Build from a suite's ``[fit]`` table; unknown keys raise SpecError listing the known ones."""
        if not isinstance(table, dict):
            raise SpecError(f"{where} must be a table, got {type(table).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; known: {', '.join(known)}")
        try:
            return cls(**table)
        except SpecError as exc:
            if hasattr(exc, "key"):
                raise SpecError(f"{where}.{exc.key}: {exc.detail}") from None
            raise SpecError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- splits
Ranges = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    """A split of ``L`` tokens into two parts, each a tuple of half-open ``(start, stop)`` ranges.

    ``first``: the part kept for training (or fitting); ``second``: the part that validates (or
    is held out for measurement). Plain integers, so a plan can compute it once per cell and
    keep it; ``indices()`` gives the sorted index tensors.
    """

    L: int
    first: Ranges
    second: Ranges

    @property
    def n_first(self) -> int:
        return sum(b - a for a, b in self.first)

    @property
    def n_second(self) -> int:
        return sum(b - a for a, b in self.second)

    def indices(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first_idx, second_idx)``: sorted int64 index tensors (on ``device``)."""

        def idx(ranges: Ranges):
            parts = [torch.arange(a, b, device=device) for a, b in ranges]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

        return idx(self.first), idx(self.second)


def _ranges(flags: list[bool], value: bool) -> Ranges:
    """Maximal runs of positions whose flag is ``value``."""
    out, start = [], None
    for i, f in enumerate([*flags, not value]):
        if f == value and start is None:
            start = i
        elif f != value and start is not None:
            out.append((start, i))
            start = None
    return tuple(out)


def split_ranges(L: int, val_fraction: float, *, split: str = "blocks", n_blocks: int = 8) -> TokenSplit:
    """The contiguous-block split of ``L`` tokens: ``first`` trains, ``second`` validates.

    "tail": the last round(L * val_fraction) tokens validate. "blocks": ``n_blocks`` contiguous
    blocks of (nearly) equal size (token i is in block i * n_blocks // L), of which
    round(n_blocks * val_fraction) (at least 1), evenly spaced, validate. Raises SpecError when
    either part would be empty.
    """
    if split not in SPLITS:
        raise SpecError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    if not 0 < val_fraction < 1:
        raise SpecError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if split == "tail":
        n_val = round(L * val_fraction)
        is_val = [i >= L - n_val for i in range(L)]
    else:
        if L < n_blocks:
            raise SpecError(
                f"cannot cut {L} tokens into n_blocks={n_blocks} contiguous blocks; give more tokens "
                "or fewer blocks"
            )
        n_vb = max(1, round(n_blocks * val_fraction))
        if n_vb >= n_blocks:
            raise SpecError(f"val_fraction={val_fraction} leaves no training block of {n_blocks}")
        # evenly spaced validation blocks, centred: e.g. 8 blocks, 2 val -> blocks 2 and 6
        val_blocks = {int((i + 0.5) * n_blocks / n_vb) for i in range(n_vb)}
        is_val = [i * n_blocks // L in val_blocks for i in range(L)]
    n_val = sum(is_val)
    if n_val == 0 or n_val == L:
        raise SpecError(
            f"the {split!r} split of {L} tokens with val_fraction={val_fraction} leaves "
            f"{'no validation' if n_val == 0 else 'no training'} tokens; give more tokens or change "
            "val_fraction"
        )
    return TokenSplit(L, _ranges(is_val, False), _ranges(is_val, True))


def split_tokens(
    L: int, val_fraction: float, *, split: str = "blocks", n_blocks: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx)``: the sorted index tensors of ``split_ranges`` (same arguments)."""
    return split_ranges(L, val_fraction, split=split, n_blocks=n_blocks).indices()


# --------------------------------------------------------------------------- the [fit] section
@dataclasses.dataclass(frozen=True)
class FitSpec:
    """A suite's ``[fit]`` section: which tokens are held out for measurement, and how to fit.

        [fit]
        holdout = 0.25            # share of each cell's tokens kept for measurement, in (0, 1)
        holdout_split = "tail"    # "tail" (the last tokens: contiguous, causal-safe) | "blocks"
        objective = "attention"   # and any other FitConfig key (steps, lr, batch_tokens, ...)
        [fit.estimators."darkl-iid"]   # per-estimator overrides of FitConfig keys
        objective = "variance"

    The runner fits every estimator of a cell (``fit_estimator``) on the first part and measures
    everything (the estimators and the baselines) on the held-out part only. A "blocks" holdout
    cuts the tokens into the section's ``n_blocks`` blocks (the same key as the validation split
    inside the fit part); its held-out blocks are measured together as one sequence.
    """

    holdout: float = 0.25
    holdout_split: str = "tail"
    config: FitConfig = FitConfig()
    overrides: tuple[tuple[str, FitConfig], ...] = ()

    def config_for(self, estimator: str) -> FitConfig:
        """The FitConfig of ``estimator`` (its override, else the section's)."""
        return dict(self.overrides).get(estimator, self.config)

    def holdout_ranges(self, L: int) -> TokenSplit:
        """The cell's split: ``first`` is fitted on, ``second`` held out; SpecError if one is empty."""
        return split_ranges(L, self.holdout, split=self.holdout_split, n_blocks=self.config.n_blocks)

    def validation_ranges(self, n_fit: int, estimator: str) -> TokenSplit:
        """``estimator``'s train / validation split of a fit part of ``n_fit`` tokens (as
        ``fit_estimator`` makes it: pass it there as ``split=``); SpecError if one is empty."""
        c = self.config_for(estimator)
        return split_ranges(n_fit, c.val_fraction, split=c.split, n_blocks=c.n_blocks)

    def split(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fit_idx, held_idx)`` token index tensors of a cell of ``L`` tokens."""
        return self.holdout_ranges(L).indices()


def parse_fit_section(table, *, where: str = "fit", estimators=None) -> FitSpec:
    """Validate a suite's ``[fit]`` table into a FitSpec; SpecError naming ``where.key`` otherwise.

    ``estimators``: the suite's estimator names, to check the names of per-estimator overrides.
    """
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table, got {type(table).__name__}")
    fields = [f.name for f in dataclasses.fields(FitConfig)]
    allowed = [*HOLDOUT_KEYS, *fields, "estimators"]
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    holdout = table.get("holdout", 0.25)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise SpecError(
            f"{where}.holdout: expected a number in (0, 1) (share of tokens held out), got {holdout!r}"
        )
    split = table.get("holdout_split", "tail")
    if split not in SPLITS:
        raise SpecError(f"{where}.holdout_split: expected one of {', '.join(SPLITS)}, got {split!r}")
    base_keys = {key: value for key, value in table.items() if key in fields}
    base = FitConfig.from_dict(base_keys, where)
    per = table.get("estimators", {})
    if not isinstance(per, dict):
        raise SpecError(f"{where}.estimators: expected a table of tables keyed by estimator name")
    overrides = []
    for name, sub in per.items():
        p = f"{where}.estimators.{name}"
        if estimators is not None and name not in estimators:
            raise SpecError(f"{p}: not an estimator of this suite; its estimators: {', '.join(estimators)}")
        if not isinstance(sub, dict):
            raise SpecError(f"{p}: expected a table of FitConfig keys, got {sub!r}")
        FitConfig.from_dict(sub, p)  # unknown keys named with their own path
        overrides.append((name, FitConfig(**{**base_keys, **sub})))
    return FitSpec(float(holdout), split, base, tuple(overrides))
