"""Captures made once and kept: keyed by the model's bytes, the text's digest and the settings.

    path = cached_capture("smollm2", "corpus", layers=[0, 5, 15, 29], max_tokens=2048)
    cap = load_capture(path)

A capture is computed only when no file with its key exists; a file that exists is never
recomputed (delete it to force a new capture). The key is the sha256 of a JSON object holding

- ``model``: sha256 of the GGUF file's bytes, or of every file of a model folder (name and bytes),
  so a renamed or moved copy of the same model hits and an updated one misses;
- ``text``: sha256 of the texts (the capture's own ``text_sha256``);
- the settings that change the numbers: layers, heads, max_tokens, window, dtype, model_dtype,
  and the capture format. The device is not part of it: a capture made on CPU serves a CUDA run.

Files go to ``cache_dir``, else ``$RFBENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/rfbench/captures``
(``~/.cache/rfbench/captures``), named ``<model>-<key[:16]>.safetensors``, and are written with
``save_capture``'s atomic rename, so a killed capture leaves no partial file. Two processes that
miss at once both compute and the second rename wins; the files are identical.

A suite names such a capture with a ``[[data]]`` table of ``source = "capture"``; the keys it
takes are ``SUITE_KEYS`` and ``capture_source`` turns them into a Capture.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from rfbench.data import capture as _capture
from rfbench.data import gguf
from rfbench.data import texts as texts_mod
from rfbench.data.corpus import NAME as CORPUS
from rfbench.data.corpus import corpus_paths
from rfbench.data.io import FORMAT, Capture, load_capture, save_capture
from rfbench.errors import DataError

#: Keys of a suite's ``source = "capture"`` table read here (layers, heads, per_layer and label
#: are the spec's own, shared with ``source = "file"``).
SUITE_KEYS = ("model", "text", "max_tokens", "window", "dtype", "model_dtype")
_MODEL_IDS: dict[tuple, str] = {}


def default_cache_dir() -> Path:
    if os.environ.get("RFBENCH_CACHE_DIR"):
        return Path(os.environ["RFBENCH_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rfbench" / "captures"


def model_identity(model: str | os.PathLike) -> str:
    """sha256 of the model's bytes (a GGUF file, or every file of a model folder by relative name)."""
    path = _capture.resolve_model(model)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo in _MODEL_IDS:  # hashing 100 MB once per process is enough
        return _MODEL_IDS[memo]
    if path.is_file():
        digest = gguf.file_identity(path)
    else:
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            h.update(gguf.file_identity(f).encode())
        digest = h.hexdigest()
    _MODEL_IDS[memo] = digest
    return digest


def resolve_texts(text: str | os.PathLike | Sequence[str | os.PathLike],
                  base: Path | None = None) -> list[Path]:
    """``"corpus"`` -> the bundled corpus; paths (relative to ``base``) -> files or folders."""
    items = [text] if isinstance(text, (str, os.PathLike)) else list(text)
    if not items:
        raise DataError("text: give 'corpus' or at least one text file")
    out: list[Path] = []
    for item in items:
        if str(item) == CORPUS:
            out.extend(corpus_paths())
            continue
        p = Path(item).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        if not p.exists():
            raise DataError(f"text: no such file or folder: {p}")
        out.append(p)
    return out


def cache_key(model, texts: list[Path], *, layers, heads, max_tokens: int, window: int | None,
              dtype: torch.dtype, model_dtype: torch.dtype) -> dict:
    """The JSON-able object whose sha256 names the cached file."""
    sources = texts_mod.read_texts(texts)
    return {
        "format": FORMAT,
        "model": model_identity(model),
        "text": texts_mod.digest([t for _, t in sources]),
        "layers": None if layers is None else sorted(int(i) for i in layers),
        "heads": None if heads is None else sorted(int(i) for i in heads),
        "max_tokens": int(max_tokens),
        "window": None if window is None else int(window),
        "dtype": str(dtype).removeprefix("torch."),
        "model_dtype": str(model_dtype).removeprefix("torch."),
    }


def cached_capture(
    model: str | os.PathLike,
    text: str | os.PathLike | Sequence[str | os.PathLike] = CORPUS,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_tokens: int = _capture.DEFAULT_MAX_TOKENS,
    window: int | None = None,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    base: Path | None = None,
    progress: bool | None = None,
) -> Path:
    """The path of the capture with these settings, capturing it first if it is not cached."""
    texts = resolve_texts(text, base)
    key = cache_key(model, texts, layers=layers, heads=heads, max_tokens=max_tokens, window=window,
                    dtype=dtype, model_dtype=model_dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    stem = Path(str(model)).stem.replace(" ", "_") or "model"
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{stem}-{digest[:16]}.safetensors"
    if path.is_file():
        return path
    cap = _capture.capture(model, texts, layers=layers, heads=heads, max_tokens=max_tokens,
                           window=window, dtype=dtype, model_dtype=model_dtype, device=device,
                           progress=progress)
    cap.meta["cache_key"] = json.dumps(key, sort_keys=True)
    return save_capture(path, cap)


def capture_source(params: dict, *, layers=None, heads=None, base: Path | None = None,
                   cache_dir=None, device="cpu") -> Capture:
    """A suite's ``source = "capture"`` table (``SUITE_KEYS``) as a loaded Capture, cached.

    ``params``: ``model`` (*required*: alias, .gguf file or model folder), ``text`` ("corpus"
    by default, or a path or list of paths relative to ``base``, the suite's folder),
    ``max_tokens`` (default 2048), ``window`` (default: the model's positions), ``dtype`` and
    ``model_dtype`` ("float32" by default). Raises DataError naming the key on a bad value.
    """
    settings = check_source(params)
    model = settings["model"]
    if model not in _capture.ALIASES and not Path(model).expanduser().is_absolute() and base is not None:
        model = str(base / model)  # a model file or folder named relative to the suite
    path = cached_capture(model, settings["text"], layers=layers, heads=heads,
                          max_tokens=settings["max_tokens"], window=settings["window"],
                          dtype=_capture.DTYPES[settings["dtype"]],
                          model_dtype=_capture.DTYPES[settings["model_dtype"]],
                          device=device, cache_dir=cache_dir, base=base, progress=False)
    return load_capture(path)


def resolve_source(params: dict, base: Path | None) -> dict:
    """``check_source``, then model and text paths made absolute against ``base`` (the suite's
    folder), aliases and "corpus" kept: what a suite spec stores, JSON-able."""
    out = check_source(params)
    model = out["model"]
    if model not in _capture.ALIASES and not Path(model).expanduser().is_absolute() and base is not None:
        out["model"] = str(base / model)
    texts = [out["text"]] if isinstance(out["text"], str) else out["text"]
    out["text"] = [str(p) for p in resolve_texts(texts, base)] if texts != [CORPUS] else CORPUS
    return out


def check_source(params: dict) -> dict:
    """Validate a ``source = "capture"`` table's own keys; returns them with defaults filled."""
    unknown = sorted(set(params) - set(SUITE_KEYS))
    if unknown:
        raise DataError(f"unknown key(s) {unknown} for source = 'capture'; allowed: {', '.join(SUITE_KEYS)}")
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise DataError("model: required for source = 'capture' (an alias such as 'smollm2', a .gguf file "
                        "or a model folder)")
    text = params.get("text", CORPUS)
    paths = isinstance(text, list) and text and all(isinstance(t, str) for t in text)
    if not (isinstance(text, str) or paths):
        raise DataError(f"text: 'corpus', a path or a list of paths, got {text!r}")
    out = {"model": model, "text": text}
    for name, default, low in (("max_tokens", _capture.DEFAULT_MAX_TOKENS, 1), ("window", None, 2)):
        value = params.get(name, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise DataError(f"{name}: an integer >= {low}, got {value!r}")
        out[name] = value
    for name in ("dtype", "model_dtype"):
        value = params.get(name, "float32")
        if value not in _capture.DTYPES:
            raise DataError(f"{name}: one of {', '.join(_capture.DTYPES)}, got {value!r}")
        out[name] = value
    return out
