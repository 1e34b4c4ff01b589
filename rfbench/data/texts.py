"""Texts for capture: reading files and folders, cutting token windows, digests.

``read_texts`` turns what the user gave (text, files, folders) into ``(name, text)`` pairs;
``windows`` cuts them into token-id windows of the model's length, with the character offset
where each text's last captured token ends (so a capture can keep the text its tokens came from);
``digest`` is the sha256 that names a capture's text (``text_sha256``; the cache key).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from rfbench.errors import DataError


def read_texts(texts) -> list[tuple[str, str]]:
    """``(name, text)`` pairs: a str is text, a Path a UTF-8 file or a folder of ``*.txt`` files."""
    items = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append((f"<text {i}>", item))
            continue
        path = Path(item)
        files = sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise DataError(f"{path}: folder holds no *.txt files")
        for f in files:
            try:
                out.append((str(f), f.read_text(encoding="utf-8")))
            except FileNotFoundError:
                raise DataError(f"{f}: no such text file") from None
            except UnicodeDecodeError as exc:
                raise DataError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            except OSError as exc:
                raise DataError(f"{f}: cannot read ({exc.strerror})") from None
    if not out or not any(t.strip() for _, t in out):
        raise DataError("no text to run the model on (the texts are empty)")
    return out


def windows(tokenizer, limit: int | None, texts: list[str], max_tokens: int, window: int | None
            ) -> tuple[list[torch.Tensor], list[int | None]]:
    """Token-id windows ``[1, L_w]`` (special tokens included), at most ``max_tokens`` in all,
    and for each text the character offset where its last captured token ends (None: unused).
    ``limit``: the model's maximum positions (None: unknown)."""
    if window is None:
        window = limit or 512
    elif isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise DataError(f"window must be an integer >= 2, got {window!r}")
    if limit and window > limit:
        raise DataError(f"window {window} exceeds the model's {limit} positions")
    out: list[torch.Tensor] = []
    ends: list[int | None] = [None] * len(texts)
    left = max_tokens
    for ti, text in enumerate(texts):
        if not text.strip() or left <= 0:
            continue
        # Fast tokenizers split a long text into windows and add each window's special tokens.
        try:
            enc = tokenizer(text, truncation=True, max_length=window, stride=0,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as exc:  # tokenizers raise assorted types for an impossible window
            raise DataError(
                f"the tokenizer cannot cut windows of {window} tokens: {_first_line(exc)}"
            ) from None
        if enc.get("overflowing_tokens"):
            raise DataError(
                "splitting a long text into windows needs a fast tokenizer (tokenizer.json in the "
                "model folder); this one is a slow, pure-Python tokenizer"
            )
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if not (ids and isinstance(ids[0], list)):
            ids, offsets = [ids], [offsets]
        for row, spans in zip(ids, offsets):
            row, spans = row[:left], spans[:left]
            out.append(torch.tensor([row], dtype=torch.long))
            ends[ti] = max([ends[ti] or 0, *(int(b) for _, b in spans)])
            left -= len(row)
            if left <= 0:
                break
    return out, ends


def starts(windows) -> list[int]:
    starts, at = [], 0
    for w in windows:
        starts.append(at)
        at += int(w.shape[-1])
    return starts


def digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def text_arguments(values: Sequence[str]) -> list[Path]:
    """``--text`` values as paths; ``corpus`` (when no such file exists) names the bundled corpus."""
    from rfbench.data.corpus import NAME, corpus_paths

    out: list[Path] = []
    for v in values:
        out.extend(corpus_paths() if v == NAME and not Path(v).exists() else [Path(v)])
    return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
