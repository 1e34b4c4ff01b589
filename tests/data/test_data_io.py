"""Capture files: round trips, the bundled capture, and safe, validated loading."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rfbench.data.io import (
    Capture,
    bundled_capture_path,
    load_bundled,
    load_capture,
    save_capture,
)
from rfbench.errors import DataError

SIDE_EFFECT: list[str] = []


def _record_side_effect(tag: str) -> str:
    SIDE_EFFECT.append(tag)
    return tag


class Booby:
    """Unpickling this object calls _record_side_effect: a loader that unpickles is caught."""

    def __reduce__(self):
        return (_record_side_effect, ("unpickled",))


def _capture(dtype=torch.float32, L=10, dv=6) -> Capture:
    g = torch.Generator().manual_seed(0)
    return Capture(
        q=torch.randn(2, 3, L, 4, generator=g).to(dtype),
        k=torch.randn(2, 3, L, 4, generator=g).to(dtype),
        v=torch.randn(2, 3, L, dv, generator=g).to(dtype),
        layers=[1, 4], heads=[0, 2, 5], scale=0.5, meta={"model": "toy", "tokens": str(L)},
    )


def _same(a: Capture, b: Capture) -> None:
    for name in ("q", "k", "v"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.layers == b.layers and a.heads == b.heads and a.scale == b.scale


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip(tmp_path, suffix, dtype):
    cap = _capture(dtype)
    path = save_capture(tmp_path / f"c{suffix}", cap)
    back = load_capture(path)
    _same(cap, back)
    assert back.q.dtype == dtype
    assert back.meta == cap.meta
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_bfloat16_round_trip_and_npz_refusal(tmp_path):
    cap = _capture(torch.bfloat16)
    _same(cap, load_capture(save_capture(tmp_path / "c.safetensors", cap)))
    with pytest.raises(DataError, match="bfloat16"):
        save_capture(tmp_path / "c.npz", cap)


def test_safetensors_header_is_readable_metadata(tmp_path):
    from safetensors import safe_open

    path = save_capture(tmp_path / "c.safetensors", _capture())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["layers"]) == [1, 4] and json.loads(meta["heads"]) == [0, 2, 5]
    assert float(meta["scale"]) == 0.5 and meta["model"] == "toy"


def test_plain_arrays_without_indices_get_defaults(tmp_path):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, 8, generator=g).numpy() for _ in range(3))
    np.savez(tmp_path / "plain.npz", q=q, k=k, v=v)
    cap = load_capture(tmp_path / "plain.npz")
    assert cap.q.shape == (1, 1, 7, 8) and cap.layers == [0] and cap.heads == [0]
    assert math.isclose(cap.scale, 8**-0.5)
    assert "default" in cap.meta["scale_source"]
    torch.save({"q": torch.randn(3, 5, 4), "k": torch.randn(3, 5, 4), "v": torch.randn(3, 5, 2)},
               tmp_path / "heads.pt")
    cap = load_capture(tmp_path / "heads.pt")
    assert cap.q.shape == (1, 3, 5, 4) and cap.v.shape == (1, 3, 5, 2) and cap.heads == [0, 1, 2]


# --------------------------------------------------------------------------- bundled capture
def test_bundled_capture_loads_with_the_base_install():
    path = bundled_capture_path()
    assert path.is_file() and path.stat().st_size < 4 * 2**20
    cap = load_bundled()
    assert cap.q.shape == cap.k.shape == cap.v.shape == (6, 6, 512, 32)
    assert cap.q.dtype == torch.float16
    assert cap.layers == list(range(6)) and cap.heads == list(range(6))
    assert math.isclose(cap.scale, 32**-0.5, rel_tol=1e-12)
    assert cap.meta["command"].startswith("rfbench capture --model all-minilm-l6-v2")
    assert cap.meta["tokens"] == "512" and len(cap.meta["text_sha256"]) == 64
    # The text it was made from sits beside it, and its digest matches.
    text = (path.parent / "tide-mill.txt").read_text(encoding="utf-8")
    import hashlib

    assert hashlib.sha256(text.encode() + b"\0").hexdigest() == cap.meta["text_sha256"]
    assert load_capture("bundled").meta == cap.meta


def test_select_by_model_indices():
    cap = _capture()
    sub = cap.select(layers=[4], heads=[5, 0], max_tokens=3)
    assert sub.q.shape == (1, 2, 3, 4) and sub.layers == [4] and sub.heads == [5, 0]
    assert torch.equal(sub.k[0, 0], cap.k[1, 2, :3])
    assert sub.meta["tokens"] == "3" and cap.meta["tokens"] == "10"
    assert cap.select(max_tokens=100).num_tokens == 10
    with pytest.raises(DataError, match=r"layer 0 is not in this capture; available layers: 1, 4"):
        cap.select(layers=[0])
    with pytest.raises(DataError, match=r"available heads: 0, 2, 5"):
        cap.select(heads=[1])
    with pytest.raises(DataError, match="max_tokens"):
        cap.select(max_tokens=0)


def test_select_reports_ranges():
    with pytest.raises(DataError, match=r"available heads: 0-5"):
        load_bundled().select(heads=[9])


# --------------------------------------------------------------------------- broken files
def test_truncated_safetensors(tmp_path):
    path = save_capture(tmp_path / "c.safetensors", _capture())
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_capture(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(DataError, match=r"cut\.safetensors"):
        load_capture(cut)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_truncated_npz_and_pt(tmp_path, suffix):
    path = save_capture(tmp_path / f"c{suffix}", _capture())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"c\{suffix}: not a readable"):
        load_capture(path)


def test_garbage_and_wrong_types(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a tensor file at all")
    with pytest.raises(DataError, match="junk.safetensors"):
        load_capture(junk)
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_capture(junk.rename(tmp_path / "junk.txt"))
    with pytest.raises(DataError, match="no such file"):
        load_capture(tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match="it is a folder"):
        load_capture(tmp_path)


def test_wrong_keys(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"query": torch.zeros(1, 1, 2, 2), "k": torch.zeros(1, 1, 2, 2), "v": torch.zeros(1, 1, 2, 2)},
              path)
    with pytest.raises(DataError, match=r"wrong\.safetensors: missing \['q'\] and unexpected \['query'\]"):
        load_capture(path)
    np.savez(tmp_path / "wrong.npz", q=np.zeros((2, 2)), k=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"wrong\.npz: missing \['v'\]"):
        load_capture(tmp_path / "wrong.npz")
    torch.save([torch.zeros(2)], tmp_path / "wrong.pt")
    with pytest.raises(DataError, match=r"wrong\.pt: must hold a dict"):
        load_capture(tmp_path / "wrong.pt")


def test_nan_int_and_shape_problems(tmp_path):
    ok = {n: torch.zeros(1, 2, 3, 4) for n in "qkv"}
    cases = {
        "nan": ({**ok, "k": torch.full((1, 2, 3, 4), math.nan)}, r"k contains 24 NaN/Inf"),
        "int": ({**ok, "q": torch.zeros(1, 2, 3, 4, dtype=torch.int32)}, r"q has dtype torch.int32"),
        "shape": ({**ok, "k": torch.zeros(1, 2, 3, 5)}, r"q and k must have the same shape"),
        "vlen": ({**ok, "v": torch.zeros(1, 2, 4, 4)}, r"v must match q in \[n_layers, n_heads, L\]"),
        "ndim": ({n: torch.zeros(2, 3, 4) for n in "qkv"}, r"q must have shape \[n_layers, n_heads, L, d\]"),
    }
    for name, (tensors, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(DataError, match=rf"{name}\.safetensors: {match}"):
            load_capture(path)
    np.savez(tmp_path / "int.npz", q=np.zeros((2, 2), dtype=np.int64), k=np.zeros((2, 2)), v=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"int\.npz: q has dtype int64"):
        load_capture(tmp_path / "int.npz")
    torch.save({**ok, "layers": [0, 0]}, tmp_path / "dup.pt")
    with pytest.raises(DataError, match=r"dup\.pt: layers must list 1 distinct"):
        load_capture(tmp_path / "dup.pt")
    torch.save({**ok, "scale": -1.0}, tmp_path / "neg.pt")
    with pytest.raises(DataError, match=r"neg\.pt: scale must be a finite positive"):
        load_capture(tmp_path / "neg.pt")


def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path):
    SIDE_EFFECT.clear()
    obj = np.empty(1, dtype=object)
    obj[0] = Booby()
    path = tmp_path / "evil.npz"
    np.savez(path, q=np.zeros((2, 2)), k=np.zeros((2, 2)), v=obj)
    with zipfile.ZipFile(path) as z:  # the payload really is a pickle in the archive
        assert b"_record_side_effect" in z.read("v.npy")
    with pytest.raises(DataError, match=r"evil\.npz: holds object arrays that need pickle"):
        load_capture(path)
    assert SIDE_EFFECT == []


def test_pt_with_arbitrary_objects_is_refused_without_unpickling(tmp_path):
    SIDE_EFFECT.clear()
    path = tmp_path / "evil.pt"
    torch.save({"q": torch.zeros(1, 1, 2, 2), "k": torch.zeros(1, 1, 2, 2), "v": torch.zeros(1, 1, 2, 2),
                "meta": Booby()}, path)
    with pytest.raises(DataError, match=r"evil\.pt: holds objects other than tensors"):
        load_capture(path)
    assert SIDE_EFFECT == []


def test_save_validates(tmp_path):
    cap = _capture()
    cap.meta["scale"] = "2"
    with pytest.raises(DataError, match="reserved"):
        save_capture(tmp_path / "c.safetensors", cap)
    bad = _capture()
    bad.q[0, 0, 0, 0] = math.inf
    with pytest.raises(DataError, match="capture to save: q contains 1 NaN/Inf"):
        save_capture(tmp_path / "c.safetensors", bad)
    with pytest.raises(DataError, match="unsupported file type"):
        save_capture(tmp_path / "c.h5", _capture())
    assert not (tmp_path / "c.safetensors").exists()


# --------------------------------------------------------------------------- token ids and text
@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_token_ids_and_text_round_trip(tmp_path, suffix):
    cap = _capture(L=10)
    cap.token_ids = torch.arange(100, 110, dtype=torch.int32)
    cap.text = "Ünïcode text\nwith two lines"
    back = load_capture(save_capture(tmp_path / f"c{suffix}", cap))
    _same(cap, back)
    assert back.token_ids.dtype == torch.int64 and back.token_ids.tolist() == list(range(100, 110))
    assert back.text == cap.text and "text" not in back.meta
    part = back.select(max_tokens=4)
    assert part.token_ids.tolist() == [100, 101, 102, 103] and part.text == cap.text


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_files_without_token_ids_or_text_still_load(tmp_path, suffix):
    back = load_capture(save_capture(tmp_path / f"c{suffix}", _capture()))
    assert back.token_ids is None and back.text is None
    bundled = load_bundled()  # written before these fields existed
    assert bundled.token_ids is None and bundled.text is None


@pytest.mark.parametrize("ids, needle", [
    (torch.arange(9), r"shape \[L\] = \[10\]"),
    (torch.ones(10), "integer tensor"),
    (-torch.ones(10, dtype=torch.long), "non-negative"),
])
def test_bad_token_ids_are_refused(tmp_path, ids, needle):
    cap = _capture(L=10)
    cap.token_ids = ids
    with pytest.raises(DataError, match=needle):
        save_capture(tmp_path / "c.safetensors", cap)
    # The same checks guard loading: a float token_ids tensor written by hand is refused.
    hand = {"q": cap.q, "k": cap.k, "v": cap.v, "token_ids": torch.ones(10)}
    save_file(hand, str(tmp_path / "h.safetensors"))
    with pytest.raises(DataError, match="token_ids must be an integer tensor"):
        load_capture(tmp_path / "h.safetensors")
