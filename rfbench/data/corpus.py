"""The bundled text corpus: original prose dedicated to the public domain (CC0 1.0).

Two files in ``rfbench/data/samples`` (see its README.md and LICENSE): ``tide-mill.txt`` (560
words) and ``field-notes.txt`` (3,351 words, twelve short sections: narrative, explanation, a
recipe, dialogue). Together they are 4,575 tokens for the SmolLM2 tokenizer, enough for one
2,048- or 4,096-token window, and need no network.

    rfbench capture --model smollm2 --text corpus --out x.safetensors   (``corpus`` names it)
"""

from __future__ import annotations

from pathlib import Path

from rfbench.errors import DataError

#: The corpus files, in the order they are read.
FILES = ("field-notes.txt", "tide-mill.txt")
NAME = "corpus"


def corpus_paths() -> list[Path]:
    folder = Path(__file__).resolve().parent / "samples"
    paths = [folder / name for name in FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"the bundled corpus is missing {missing} in {folder}; reinstall rfbench")
    return paths


def corpus_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in corpus_paths()]
