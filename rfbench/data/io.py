"""Saving and loading captured queries, keys and values, safely.

A capture file holds three tensors, each ``[n_layers, n_heads, L, d]`` (v may have its own last
dim ``dv``), plus the model's layer and head indices they came from, the attention's own scale
(1/sqrt(d) for BERT, Llama, GPT-2) and free-form string metadata.

Formats (chosen by the file's suffix):

- ``.safetensors`` (preferred, what ``save_capture`` writes): tensors ``q``, ``k``, ``v`` and
  optionally ``token_ids``; the header's string metadata holds ``format``, ``layers`` and
  ``heads`` (JSON lists), ``scale``, optionally ``text``, and every ``meta`` entry under its own
  name.
- ``.npz``: arrays ``q``, ``k``, ``v`` and optionally ``layers``, ``heads``, ``token_ids``
  (integer arrays), ``scale`` (a 0-d float array), ``text`` and ``meta`` (0-d unicode arrays, the
  latter holding a JSON object). Read with ``allow_pickle=False``.
- ``.pt``: a dict with the same keys (tensors, lists, a float, a str and a dict of strings), read
  with ``torch.load(weights_only=True)``.

``token_ids`` (``[L]`` integers: the token of each position) and ``text`` (the text they were cut
from) are optional: files written before they existed, such as the bundled one, load with both
set to None.

``.npz`` and ``.pt`` files may also hold ``[L, d]`` (one layer, one head) or ``[H, L, d]`` (one
layer) arrays. Nothing is ever unpickled: a file that needs pickle to load raises DataError.
Every load validates dtype, finiteness, shapes and keys, and names the file in its error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle  # only for its error type: nothing here unpickles
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rfbench.errors import DataError
from rfbench.results.atomic import atomic_write

FORMAT = "rfbench-capture/1"
TENSOR_KEYS = ("q", "k", "v")
#: Header keys of a safetensors capture that are not free-form metadata.
RESERVED_META = ("format", "layers", "heads", "scale", "text")
OPTIONAL_KEYS = ("layers", "heads", "scale", "meta", "token_ids", "text")
#: Optional tensors of a safetensors capture besides q, k, v.
OPTIONAL_TENSORS = ("token_ids",)
SUFFIXES = (".safetensors", ".npz", ".pt")
#: Tensor dtypes a capture may hold (float8 and others have no finiteness check or matmul on CPU).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BUNDLED_NAME = "minilm-l6.safetensors"


@dataclasses.dataclass
class Capture:
    """Queries, keys and values of some layers and heads of one model on one token stream.

    Attributes:
        q, k: ``[n_layers, n_heads, L, d]`` as the attention sees them (after the head split and
            any rotary embedding, before the scale).
        v: ``[n_layers, n_heads, L, dv]``.
        layers: the model's layer index of each entry of axis 0.
        heads: the model's (query) head index of each entry of axis 1.
        scale: the attention's own logit scale (softmax(q k^T * scale)).
        meta: strings: model, token count, text digest, dtype, command, ...
        token_ids: ``[L]`` int64, the token id at each position (None when not recorded).
        text: the text the tokens were cut from (None when not recorded).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layers: list[int]
    heads: list[int]
    scale: float
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    token_ids: torch.Tensor | None = None
    text: str | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.q.shape[-2])

    @property
    def dim(self) -> int:
        return int(self.q.shape[-1])

    def select(
        self,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        max_tokens: int | None = None,
    ) -> Capture:
        """The sub-capture of the given model layer/head indices and the first ``max_tokens`` tokens."""
        li = _positions("layer", layers, self.layers)
        hi = _positions("head", heads, self.heads)
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
                raise DataError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        n = self.num_tokens if max_tokens is None else min(max_tokens, self.num_tokens)

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x[li][:, hi][:, :, :n].contiguous()

        meta = dict(self.meta)
        if n != self.num_tokens:
            meta["tokens"] = str(n)
        return Capture(
            q=pick(self.q), k=pick(self.k), v=pick(self.v),
            layers=[self.layers[i] for i in li], heads=[self.heads[i] for i in hi],
            scale=self.scale, meta=meta,
            token_ids=None if self.token_ids is None else self.token_ids[:n].clone(),
            text=self.text,
        )

    def to(self, dtype: torch.dtype) -> Capture:
        """The same capture with its tensors cast to ``dtype``."""
        return dataclasses.replace(self, q=self.q.to(dtype), k=self.k.to(dtype), v=self.v.to(dtype))


def _positions(what: str, wanted: Sequence[int] | None, available: list[int]) -> list[int]:
    if wanted is None:
        return list(range(len(available)))
    if isinstance(wanted, int):
        wanted = [wanted]
    out = []
    for w in wanted:
        if isinstance(w, bool) or not isinstance(w, int) or w not in available:
            raise DataError(
                f"{what} {w!r} is not in this capture; available {what}s: {format_ranges(available)}"
            )
        out.append(available.index(w))
    if not out:
        raise DataError(f"no {what}s selected; available {what}s: {format_ranges(available)}")
    return out


def format_ranges(values, sep: str = ", ") -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (for messages and data labels)."""
    values = list(values)
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return sep.join(parts) or "none"


def _index_list(source, what: str, value) -> list[int]:
    """``value`` as a list of model indices (ints in [0, 2**31)); DataError naming ``what`` otherwise."""
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in value
    )
    if not ok:
        shown = ascii(value)
        raise DataError(
            f"{source}: {what} must be a list of non-negative integers (the model's indices), got "
            f"{shown if len(shown) <= 80 else shown[:77] + '...'}; rewrite the file with save_capture"
        )
    return list(value)


# --------------------------------------------------------------------------- validation
def validate(capture: Capture, source: str = "capture") -> Capture:
    """Check dtypes, finiteness and shapes; raise DataError naming ``source`` and the problem."""
    for name in TENSOR_KEYS:
        x = getattr(capture, name)
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{source}: {name} must be a tensor, got {type(x).__name__}")
        if x.dtype not in DTYPES:
            raise DataError(
                f"{source}: {name} has dtype {x.dtype}; a capture holds "
                f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES)} values (cast it)"
            )
        if x.layout != torch.strided or x.device.type == "meta":
            raise DataError(
                f"{source}: {name} is a {x.layout} tensor on device {x.device.type}; a capture holds "
                "dense tensors with their values (use .to_dense() / save real data)"
            )
        if x.ndim != 4:
            raise DataError(
                f"{source}: {name} must have shape [n_layers, n_heads, L, d], got {tuple(x.shape)}"
            )
        if x.shape[-2] == 0 or x.shape[-1] == 0 or x.shape[0] == 0 or x.shape[1] == 0:
            raise DataError(f"{source}: {name} is empty, shape {tuple(x.shape)}")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"{source}: {name} contains {bad} NaN/Inf value(s)")
    q, k, v = capture.q, capture.k, capture.v
    if q.shape != k.shape:
        raise DataError(
            f"{source}: q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise DataError(
            f"{source}: v must match q in [n_layers, n_heads, L], "
            f"got v {tuple(v.shape)} and q {tuple(q.shape)}"
        )
    for what, idx, size in (("layers", capture.layers, q.shape[0]), ("heads", capture.heads, q.shape[1])):
        idx = _index_list(source, what, idx)
        if len(idx) != size or len(set(idx)) != len(idx) or any(i < 0 for i in idx):
            raise DataError(
                f"{source}: {what} must list {size} distinct non-negative indices "
                f"(one per entry of that axis), got {list(idx)}"
            )
    scale = capture.scale
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool) and abs(scale) < 1e300
    if not (number and math.isfinite(scale) and scale > 0):
        raise DataError(f"{source}: scale must be a finite positive float, got {capture.scale!r}")
    for key, value in capture.meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise DataError(f"{source}: meta must map strings to strings, got {key!r}: {value!r}")
    ids = capture.token_ids
    if ids is not None:
        integer = isinstance(ids, torch.Tensor) and not (
            ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool
        ) and ids.layout == torch.strided and ids.device.type != "meta"
        if not integer:
            raise DataError(
                f"{source}: token_ids must be an integer tensor, got {getattr(ids, 'dtype', ids)!r}")
        if tuple(ids.shape) != (q.shape[-2],):
            raise DataError(
                f"{source}: token_ids must have shape [L] = [{q.shape[-2]}], got {tuple(ids.shape)}"
            )
        if ids.numel() and int(ids.min()) < 0:
            raise DataError(f"{source}: token_ids must be non-negative")
    if capture.text is not None and not isinstance(capture.text, str):
        raise DataError(f"{source}: text must be a string, got {type(capture.text).__name__}")
    return capture


# --------------------------------------------------------------------------- saving
def save_capture(path: str | os.PathLike, capture: Capture) -> Path:
    """Write ``capture`` to ``path`` (.safetensors, .npz or .pt), atomically; return the path."""
    from safetensors.torch import save_file

    path = check_output_path(path)
    validate(capture, "capture to save")
    suffix = path.suffix.lower()
    clash = sorted(set(capture.meta) & set(RESERVED_META))
    if clash:
        raise DataError(f"meta keys {clash} are reserved ({', '.join(RESERVED_META)}); rename them")
    tensors = {name: getattr(capture, name).detach().cpu().contiguous() for name in TENSOR_KEYS}
    if capture.token_ids is not None:
        tensors["token_ids"] = capture.token_ids.detach().cpu().to(torch.int64).contiguous()
    extra = {} if capture.text is None else {"text": capture.text}

    def write(tmp: str) -> None:
        if suffix == ".safetensors":
            header = {
                "format": FORMAT,
                "layers": json.dumps([int(i) for i in capture.layers]),
                "heads": json.dumps([int(i) for i in capture.heads]),
                "scale": repr(float(capture.scale)),
                **extra,
                **capture.meta,
            }
            save_file(tensors, tmp, metadata=header)
        elif suffix == ".npz":
            if any(t.dtype == torch.bfloat16 for t in tensors.values()):
                raise DataError(f"{path}: numpy has no bfloat16; save as .safetensors or cast to float16/32")
            text = {} if capture.text is None else {"text": np.asarray(capture.text)}
            with open(tmp, "wb") as f:
                np.savez(
                    f, **{n: t.numpy() for n, t in tensors.items()}, **text,
                    layers=np.asarray(capture.layers, dtype=np.int64),
                    heads=np.asarray(capture.heads, dtype=np.int64),
                    scale=np.asarray(float(capture.scale)),
                    meta=np.asarray(json.dumps(capture.meta)),
                )
        else:
            torch.save(
                {**tensors, **extra, "layers": list(capture.layers), "heads": list(capture.heads),
                 "scale": float(capture.scale), "meta": dict(capture.meta)},
                tmp,
            )

    # Written beside the target, then renamed: a killed save never leaves a half-written capture.
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise DataError(f"{path}: cannot write the capture ({_short(exc)}); choose another --out") from None
    return path


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if a capture can be written there (a known suffix, not a folder, no file
    in the way of its folder); DataError saying what to change otherwise. Cheap: run it before
    any work whose result would go there."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a file name such as {path / 'capture.safetensors'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{path}: {parent} is a file, not a folder; choose another --out")
            break
    return path


# --------------------------------------------------------------------------- loading
def load_capture(path: str | os.PathLike) -> Capture:
    """Read and validate a capture (.safetensors, .npz or .pt); "bundled" names the bundled one.

    Raises DataError naming the file and the problem when it is missing, broken, truncated,
    would need pickle, or holds the wrong keys, dtypes, shapes or non-finite values.
    """
    if str(path) == "bundled":
        path = bundled_capture_path()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        raw = _read_safetensors(path)
    elif suffix == ".npz":
        raw = _read_npz(path)
    elif suffix == ".pt":
        raw = _read_pt(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return validate(_assemble(raw, path), str(path))


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            names = list(f.keys())
            _check_keys(path, names, allowed=TENSOR_KEYS + OPTIONAL_TENSORS)
            tensors = {n: f.get_tensor(n) for n in names}
    except DataError:
        raise
    except Exception as exc:  # safetensors raises its own error types for broken headers/buffers
        raise DataError(f"{path}: not a readable safetensors file ({_short(exc)})") from None
    raw: dict = dict(tensors)
    if header.get("format", FORMAT) != FORMAT:
        raise DataError(f"{path}: unknown capture format {header['format']!r}; expected {FORMAT!r}")
    for key in ("layers", "heads"):
        if key in header:
            try:
                raw[key] = _index_list(path, f"metadata {key!r}", json.loads(header[key]))
            except (json.JSONDecodeError, RecursionError):
                raise DataError(
                    f"{path}: metadata {key!r} is not a JSON list of integers: {_clip(header[key])}"
                ) from None
    if "scale" in header:
        try:
            raw["scale"] = float(header["scale"])
        except ValueError:
            raise DataError(f"{path}: metadata 'scale' is not a number: {_clip(header['scale'])}") from None
    if "text" in header:
        raw["text"] = header["text"]
    raw["meta"] = {k: v for k, v in header.items() if k not in RESERVED_META}
    return raw


def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_keys(path, z.files, allowed=TENSOR_KEYS + OPTIONAL_KEYS)
            arrays = {name: z[name] for name in z.files}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{path}: holds object arrays that need pickle to load, which rfbench never does; "
                "save plain numeric arrays"
            ) from None
        raise DataError(f"{path}: not a readable .npz file ({_short(exc)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_short(exc)})") from None
    raw: dict = {}
    for name, a in arrays.items():
        if name in TENSOR_KEYS:
            if a.dtype.kind not in "f" or a.dtype.itemsize not in (2, 4, 8):
                raise DataError(
                    f"{path}: {name} has dtype {a.dtype}; a capture holds float16, float32 or float64 values"
                )
            # native byte order: torch reads no big-endian arrays (the values are unchanged)
            raw[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")))
        elif name in ("layers", "heads"):
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise DataError(f"{path}: {name} must be a 1-d integer array, got {a.dtype} {a.shape}")
            raw[name] = [int(i) for i in a]
        elif name == "token_ids":
            if a.dtype.kind not in "iu":
                raise DataError(f"{path}: token_ids must be an integer array, got {a.dtype}")
            raw[name] = torch.from_numpy(a.astype(np.int64))
        elif name == "text":
            if a.dtype.kind != "U" or a.size != 1:
                raise DataError(f"{path}: text must be one string, got {a.dtype} {a.shape}")
            raw[name] = str(a.reshape(()))
        elif name == "scale":
            if a.size != 1 or a.dtype.kind != "f" or a.dtype.itemsize > 8:
                raise DataError(f"{path}: scale must be one float32 or float64, got {a.dtype} {a.shape}")
            raw[name] = float(a.reshape(()))
        else:  # meta
            if a.dtype.kind != "U" or a.size != 1:
                raise DataError(
                    f"{path}: meta must be one string holding a JSON object, got {a.dtype} {a.shape}"
                )
            raw[name] = _json_meta(path, str(a.reshape(())))
    return raw


def _read_pt(path: Path) -> dict:
    try:
        # weights_only: a restricted unpickler that builds only tensors and plain containers and
        # refuses any other class, so no code in the file can run.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = _short(exc)
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            raise DataError(
                f"{path}: holds objects other than tensors and plain containers, which rfbench will not "
                "unpickle; save a dict of tensors (q, k, v), lists of ints, a float and a dict of strings"
            ) from None
        raise DataError(f"{path}: not a readable .pt file ({text})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: must hold a dict with keys q, k, v; got {type(obj).__name__}")
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise DataError(
            f"{path}: keys must be strings (q, k, v, ...), got {_clip(odd)}; save a dict keyed by name"
        )
    _check_keys(path, list(obj), allowed=TENSOR_KEYS + OPTIONAL_KEYS)
    raw: dict = {}
    for name, value in obj.items():
        if name in TENSOR_KEYS:
            if not isinstance(value, torch.Tensor):
                raise DataError(f"{path}: {name} must be a tensor, got {type(value).__name__}")
            raw[name] = value
        elif name in ("layers", "heads"):
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in value
            ):
                raise DataError(f"{path}: {name} must be a list of ints, got {_clip(value)}")
            raw[name] = [int(i) for i in value]
        elif name == "scale":
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) >= 1e300:
                raise DataError(f"{path}: scale must be a finite positive float, got {_clip(value)}")
            raw[name] = float(value)
        elif name == "token_ids":
            if not isinstance(value, torch.Tensor):
                raise DataError(f"{path}: token_ids must be a tensor, got {type(value).__name__}")
            raw[name] = value
        elif name == "text":
            if not isinstance(value, str):
                raise DataError(f"{path}: text must be a str, got {type(value).__name__}")
            raw[name] = value
        else:
            if not isinstance(value, dict) or not all(
                isinstance(a, str) and isinstance(b, str) for a, b in value.items()
            ):
                raise DataError(f"{path}: meta must be a dict of strings to strings")
            raw[name] = dict(value)
    return raw


def _check_keys(path: Path, names, allowed: tuple[str, ...]) -> None:
    missing = [n for n in TENSOR_KEYS if n not in names]
    unknown = sorted(set(names) - set(allowed))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unexpected {unknown}")
        raise DataError(
            f"{path}: {' and '.join(parts)}; a capture holds tensors q, k, v "
            f"[n_layers, n_heads, L, d]" + (f" and optionally {', '.join(OPTIONAL_KEYS)}"
                                            if len(allowed) > len(TENSOR_KEYS) else "")
        )


def _clip(value) -> str:
    """``value`` for a message: escaped (no control characters) and at most 80 characters."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_meta(path: Path, text: str) -> dict[str, str]:
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise DataError(f"{path}: meta is not valid JSON") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: meta must be a JSON object of strings")
    return meta


def _assemble(raw: dict, path: Path) -> Capture:
    """Bring [L, d] / [H, L, d] arrays to [n_layers, n_heads, L, d]; fill default indices and scale."""
    tensors = {}
    for name in TENSOR_KEYS:
        x = raw[name]
        if x.ndim in (2, 3) and path.suffix.lower() != ".safetensors":
            x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
        tensors[name] = x
    q = tensors["q"]
    meta = {str(k): v for k, v in raw.get("meta", {}).items()}
    if q.ndim == 4:
        layers = _index_list(path, "layers", raw.get("layers", list(range(q.shape[0]))))
        heads = _index_list(path, "heads", raw.get("heads", list(range(q.shape[1]))))
    else:
        layers, heads = [], []  # validate() reports the shape
    if "scale" in raw:
        scale = raw["scale"]
    else:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.ndim >= 1 and q.shape[-1] > 0 else float("nan")
        meta.setdefault("scale_source", "default 1/sqrt(d): the file gave no scale")
    ids = raw.get("token_ids")
    if ids is not None and not ids.is_floating_point() and ids.dtype != torch.bool:
        ids = ids.to(torch.int64)
    return Capture(q=tensors["q"], k=tensors["k"], v=tensors["v"], layers=list(layers),
                   heads=list(heads), scale=float(scale), meta=meta, token_ids=ids, text=raw.get("text"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


# --------------------------------------------------------------------------- bundled sample
def bundled_capture_path() -> Path:
    """Path of the capture shipped with rfbench (MiniLM-L6 on a CC0 text; see samples/README.md)."""
    return Path(__file__).resolve().parent / "samples" / BUNDLED_NAME


def load_bundled() -> Capture:
    """The bundled MiniLM-L6 capture (float16 tensors; cast with ``.to(torch.float32)``)."""
    path = bundled_capture_path()
    if not path.is_file():
        raise DataError(f"the bundled capture is missing at {path}; reinstall rfbench")
    return load_capture(path)
