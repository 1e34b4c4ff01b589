"""Data sources of a suite, resolved once per run: each serves ``(q, k, v, scale)`` for any L.

A synthetic source draws its tokens (``rfbench.data.synthetic.make``, seeded by the source's own
seed: the data stay fixed across the estimator seeds), scaled like attention (1/sqrt(d)); a
capture (bundled or a file) is loaded once and serves its first L tokens at the model's scale.
A ``per_layer`` capture is one source per layer. ``Source.key`` is what the cell keys hold.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rfbench.errors import DataError, SpecError
from rfbench.suite.spec_types import DataSpec, Suite


@dataclass
class Source:
    """A data source ready to serve ``(q, k, v, scale)`` for any seq_len it can serve."""

    spec: DataSpec
    label: str
    key: dict
    dim: int
    batch: int
    heads: int
    max_tokens: int | None = None  # captures: tokens available
    capture: object = None

    def load(self, seq_len: int, dtype: torch.dtype, device: torch.device):
        if self.capture is None:
            from rfbench.data import synthetic

            s = self.spec
            q, k, v = synthetic.make(
                s.kind,
                batch=s.batch,
                heads=s.heads,
                seq_len=seq_len,
                dim=s.dim,
                dim_v=s.dim_v,
                seed=s.seed,
                dtype=dtype,
                **s.params,
            )
            scale = 1.0 / math.sqrt(s.dim)
        else:
            c = self.capture
            q, k, v = (x[..., :seq_len, :].to(dtype) for x in (c.q, c.k, c.v))
            scale = float(c.scale)
        return q.to(device), k.to(device), v.to(device), scale


def _synthetic_label(spec: DataSpec) -> str:
    from rfbench.data import synthetic

    defaults = synthetic.parameters(spec.kind)
    changed = {k: v for k, v in spec.params.items() if defaults.get(k) != v}
    if not changed:
        return spec.kind
    inner = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
    return f"{spec.kind}({inner})"


def _format_ranges(values) -> str:
    from rfbench.data.io import format_ranges

    return format_ranges(values, sep=",")


def _model_stem(params: dict) -> str:
    return Path(str(params.get("model", "model"))).stem


def prepare_sources(suite: Suite) -> list[Source]:
    """Resolve the suite's data sources (loading captures once); per_layer ones expand per layer."""
    out: list[Source] = []
    for spec in suite.data:
        where = f"{suite.source}: data[{spec.index}]"
        if spec.source == "synthetic":
            key = {
                "source": "synthetic",
                "kind": spec.kind,
                "params": spec.params,
                "dim": spec.dim,
                "dim_v": spec.dim_v,
                "batch": spec.batch,
                "heads": spec.heads,
                "seed": spec.seed,
            }
            out.append(
                Source(spec, spec.label or _synthetic_label(spec), key, spec.dim, spec.batch, spec.heads)
            )
            continue
        from rfbench.data import io

        try:
            if spec.source == "capture":  # made once and cached (rfbench.data.cache); never recomputed
                from rfbench.data import cache

                cap = cache.capture_source(spec.params, layers=spec.layers, heads=spec.head_indices)
            elif spec.source == "bundled":
                cap = io.load_bundled()
            else:
                cap = io.load_capture(spec.path)
            cap = cap.select(layers=spec.layers, heads=spec.head_indices)
        except DataError as exc:
            raise SpecError(f"{where}: {exc}") from None
        name = {"bundled": "bundled", "capture": f"capture:{_model_stem(spec.params)}"}.get(
            spec.source, f"file:{Path(spec.path or '').stem}"
        )
        groups = [[layer] for layer in cap.layers] if spec.per_layer else [list(cap.layers)]
        for layers in groups:
            sub = cap.select(layers=layers) if spec.per_layer else cap
            if spec.label is None:
                label = f"{name}:L{_format_ranges(layers)}"
                if spec.head_indices is not None:
                    label += f":H{_format_ranges(sub.heads)}"
            else:
                label = f"{spec.label}:L{_format_ranges(layers)}" if spec.per_layer else spec.label
            key = {
                "source": spec.source,
                "path": spec.path if spec.source == "file" else spec.source,
                "layers": list(sub.layers),
                "heads": list(sub.heads),
                "model": cap.meta.get("model", ""),
            }
            if spec.source == "capture":  # the model file's and the text's identity, for resume
                key["capture"] = json.loads(cap.meta["cache_key"])
            out.append(
                Source(
                    spec,
                    label,
                    key,
                    sub.dim,
                    len(sub.layers),
                    len(sub.heads),
                    max_tokens=sub.num_tokens,
                    capture=sub,
                )
            )
    labels = [s.label for s in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SpecError(f"{suite.source}: data: two sources share the label {dup[0]!r}; give them labels")
    return out
