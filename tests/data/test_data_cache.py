"""The capture cache: computed once per (model bytes, text, settings), never recomputed when present."""

from __future__ import annotations

import json

import pytest
import torch

from rfbench.data import cache
from rfbench.data import capture as capture_mod
from rfbench.data.io import Capture, load_capture
from rfbench.errors import DataError


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A stand-in model file and a capture() that counts its calls (no model is run)."""
    calls = []

    def fake_capture(model, texts, *, layers=None, heads=None, max_tokens=2048, **kw):
        calls.append((str(model), [str(t) for t in texts], layers, max_tokens))
        g = torch.Generator().manual_seed(len(calls))
        n_l = len(layers) if layers else 2
        q, k, v = (torch.randn(n_l, 3, 8, 4, generator=g) for _ in range(3))
        return Capture(q=q, k=k, v=v, layers=list(layers or range(n_l)), heads=[0, 1, 2], scale=0.5,
                       meta={"model": str(model)}, token_ids=torch.arange(8), text="abc")

    monkeypatch.setattr(capture_mod, "capture", fake_capture)
    cache._MODEL_IDS.clear()
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF model bytes")
    text = tmp_path / "t.txt"
    text.write_text("some text", encoding="utf-8")
    return model, text, calls, tmp_path / "cache"


def test_second_call_hits_the_cache(fake):
    model, text, calls, where = fake
    p1 = cache.cached_capture(model, text, layers=[0, 5], max_tokens=8, cache_dir=where)
    p2 = cache.cached_capture(model, text, layers=[5, 0], max_tokens=8, cache_dir=where)
    assert p1 == p2 and len(calls) == 1 and p1.name.startswith("m-")
    cap = load_capture(p1)
    key = json.loads(cap.meta["cache_key"])
    assert key["layers"] == [0, 5] and key["max_tokens"] == 8 and len(key["model"]) == 64
    assert torch.equal(cap.token_ids, torch.arange(8)) and cap.text == "abc"
    assert [p.name for p in where.iterdir()] == [p1.name]  # no temporary file left behind


@pytest.mark.parametrize("change", ["text", "layers", "max_tokens", "dtype", "model_bytes"])
def test_any_change_of_key_misses(fake, change):
    model, text, calls, where = fake
    p1 = cache.cached_capture(model, text, layers=[0], max_tokens=8, cache_dir=where)
    kw = {"layers": [0], "max_tokens": 8, "cache_dir": where}
    if change == "text":
        text.write_text("other text", encoding="utf-8")
    elif change == "layers":
        kw["layers"] = [1]
    elif change == "max_tokens":
        kw["max_tokens"] = 16
    elif change == "dtype":
        kw["dtype"] = torch.float16
    else:
        model.write_bytes(b"GGUF other model bytes")
    p2 = cache.cached_capture(model, text, **kw)
    assert p1 != p2 and len(calls) == 2


def test_a_copied_model_hits(fake):
    model, text, calls, where = fake
    p1 = cache.cached_capture(model, text, max_tokens=8, cache_dir=where)
    copy = model.with_name("m.gguf").parent / "sub"
    copy.mkdir()
    (copy / "m.gguf").write_bytes(model.read_bytes())
    assert cache.cached_capture(copy / "m.gguf", text, max_tokens=8, cache_dir=where) == p1
    assert len(calls) == 1


def test_capture_source_reads_suite_keys_relative_to_the_suite(fake):
    model, text, calls, where = fake
    params = {"model": model.name, "text": [text.name], "max_tokens": 8}
    cap = cache.capture_source(params, layers=[0, 1], base=model.parent, cache_dir=where)
    assert cap.layers == [0, 1] and calls[0][0] == str(model)
    cache.capture_source(params, layers=[0, 1], base=model.parent, cache_dir=where)
    assert len(calls) == 1


def test_corpus_is_the_default_text(fake):
    from rfbench.data.corpus import corpus_paths

    model, _, calls, where = fake
    cache.capture_source({"model": str(model), "max_tokens": 8}, cache_dir=where)
    assert calls[0][1] == [str(p) for p in corpus_paths()]


@pytest.mark.parametrize("params, needle", [
    ({}, "model: required"),
    ({"model": "smollm2", "txt": "corpus"}, "unknown key"),
    ({"model": "smollm2", "max_tokens": 0}, "max_tokens"),
    ({"model": "smollm2", "window": 1.5}, "window"),
    ({"model": "smollm2", "dtype": "int8"}, "dtype"),
    ({"model": "smollm2", "text": []}, "text"),
])
def test_check_source_names_the_bad_key(params, needle):
    with pytest.raises(DataError, match=needle):
        cache.check_source(params)


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RFBENCH_CACHE_DIR", str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RFBENCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.default_cache_dir() == tmp_path / "x" / "rfbench" / "captures"


def test_resolve_source_makes_paths_absolute(fake):
    model, text, calls, where = fake
    out = cache.resolve_source({"model": model.name, "text": text.name}, model.parent)
    assert out == {"model": str(model), "text": [str(text)], "max_tokens": 2048, "window": None,
                   "dtype": "float32", "model_dtype": "float32"}
    assert cache.resolve_source({"model": "smollm2"}, model.parent)["model"] == "smollm2"
    assert cache.resolve_source({"model": "smollm2"}, model.parent)["text"] == "corpus"
    with pytest.raises(DataError, match="no such file"):
        cache.resolve_source({"model": "smollm2", "text": "absent.txt"}, model.parent)


def test_the_llm_suite_capture_table_is_valid():
    """suites/llm.toml's [[data]] table: its capture keys pass the data side's validation."""
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(__file__).resolve().parents[2] / "suites" / "llm.toml"
    (table,) = tomllib.loads(path.read_text(encoding="utf-8"))["data"]
    assert table["source"] == "capture" and table["per_layer"] is True
    own = {k: v for k, v in table.items() if k in cache.SUITE_KEYS}
    assert set(table) - set(own) <= {"source", "layers", "heads", "per_layer", "label"}
    settings = cache.resolve_source(own, path.parent)
    assert settings["model"] == "smollm2" and settings["text"] == "corpus"
    assert settings["max_tokens"] >= 2048
