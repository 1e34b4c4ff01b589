"""Issue 15: each bad input the audit found is one RFBenchError line naming the problem and the
fix (exit 2 from the CLI, no traceback), and nothing of the suite's size is built to validate it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rfbench._version import __version__
from rfbench.cli import main_entry
from rfbench.data import io
from rfbench.errors import DataError, SpecError
from rfbench.suite import spec_types as T
from rfbench.suite.spec import parse_suite, suite_from_dict

BASE = {
    "estimators": {"names": ["posrf-iid"]},
    "data": [{"kind": "isotropic", "dim": 8}],
    "sweep": {"seq_len": [16], "num_features": [4]},
}


def _with(section, key, value, index=None):
    doc = json.loads(json.dumps(BASE))
    table = doc[section][index] if index is not None else doc.setdefault(section, {})
    table[key] = value
    return doc


# --------------------------------------------------------------------------- 1, 9: bounds
@pytest.mark.parametrize("value", [10**9, 2**63, 1e9, 64.0])
@pytest.mark.parametrize("key", ["dim", "dim_v", "batch", "heads"])
def test_data_sizes_are_bounded(key, value):
    with pytest.raises(SpecError, match=rf"data\[0\]\.{key}: expected an integer in \[1, \d+\]"):
        suite_from_dict(_with("data", key, value, 0))


@pytest.mark.parametrize(
    "section, key, value, bound",
    [
        ("sweep", "seq_len", [2**63], r"\[1, 2\*\*22\]"),
        ("sweep", "num_features", [10**9], r"\[1, 2\*\*20\]"),
        ("seeds", "count", 10**8, r"\[1, 10000\]"),
        ("seeds", "count", 1e8, r"\[1, 10000\]"),
        ("timing", "threads", 10**9, r"\[0, 1024\]"),
        ("timing", "threads", 10**5, r"\[0, 1024\]"),
        ("seeds", "base", 2**64, r"\[0, 2\*\*63 - 1\]"),
        ("metrics", "tile", 2**40, r"\[1, 65536\]"),
    ],
)
def test_section_numbers_are_bounded(section, key, value, bound):
    with pytest.raises(SpecError, match=rf"{section}\.{key}(\[0\])?: expected an integer in {bound}"):
        suite_from_dict(_with(section, key, value))


def test_synthetic_and_fit_sizes_are_bounded():
    doc = _with("data", "params", {"clusters": 10**9}, 0)
    doc["data"][0]["kind"] = "clustered"
    with pytest.raises(SpecError, match=r"data\[0\]\.params\.clusters: expected an integer in \[1, 65536\]"):
        suite_from_dict(doc)
    doc = _with("fit", "n_blocks", 2**63)
    doc["estimators"]["names"] = ["darkl-iid"]
    with pytest.raises(SpecError, match=r"fit\.n_blocks: expected an integer in \[2, 65536\]"):
        suite_from_dict(doc)


def test_the_product_of_sizes_is_bounded():
    doc = _with("data", "heads", 65536, 0)
    doc["data"][0]["dim"] = 8192
    doc["sweep"]["seq_len"] = [2**20]
    with pytest.raises(SpecError, match=r"data\[0\]: batch x heads x seq_len x .* exceeds"):
        suite_from_dict(doc)
    doc = _with("seeds", "count", 10_000)
    doc["sweep"]["seq_len"] = list(range(1, 2001))
    with pytest.raises(SpecError, match="seeds.count: .* estimator runs exceeds"):
        suite_from_dict(doc)


def test_every_number_of_a_suite_declares_its_bound():
    for cls in (T.DataSpec, T.SeedSpec, T.MetricSpec, T.TimingSpec):
        for f in dataclasses.fields(cls):
            number = f.type in ("int", "float", "int | None") and f.name != "index"
            assert not number or isinstance(f.metadata.get("bound"), T.Bound), (cls.__name__, f.name)
    assert T.bound_of(T.SweepSpec, "seq_len").text() == "an integer in [1, 2**22]"


def test_validation_draws_nothing_of_the_suite_size(monkeypatch):
    from rfbench.data import synthetic

    seen = []
    real = synthetic.make
    monkeypatch.setattr(synthetic, "make", lambda *a, **kw: seen.append(kw["dim"]) or real(*a, **kw))
    for kind, params in (("anisotropic", {}), ("lowrank", {"rank": 300}), ("clustered", {})):
        doc = _with("data", "dim", 4000, 0)
        doc["data"][0].update(kind=kind, params=params)
        suite_from_dict(doc)
    assert max(seen) <= 2
    doc = _with("data", "dim", 4000, 0)
    doc["data"][0].update(kind="lowrank", params={"rank": 5000})
    with pytest.raises(SpecError, match="rank must be an integer in 1..4000"):
        suite_from_dict(doc)
    doc["data"][0].update(dim=1, kind="anisotropic", params={})
    with pytest.raises(SpecError, match="needs dim >= 2"):
        suite_from_dict(doc)


# --------------------------------------------------------------------------- 8, 10: suite text
def test_unknown_keys_are_shown_escaped(capsys, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('"evil\\u001b[2J\\nkey" = 1\n[estimators]\nnames=["posrf-iid"]\n'
                    '[[data]]\nkind="isotropic"\n[sweep]\nseq_len=[8]\nnum_features=[4]\n')
    assert main_entry(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1
    assert "'evil\\x1b[2J\\nkey': unknown key" in err


@pytest.mark.parametrize("name", [".", "..", "...", "a\tb"])
def test_dot_suite_names_are_refused(name):
    with pytest.raises(SpecError, match="suite.name: .* must be usable as a folder name"):
        suite_from_dict(_with("suite", "name", name))


def test_deep_nesting_is_one_line(capsys, tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert main_entry(["run", str(path), "--dry-run"]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    with pytest.raises(SpecError):
        parse_suite("a = " + "{b = " * 3000 + "1" + "}" * 3000)


# --------------------------------------------------------------------------- 10: CLI
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main_entry(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"rfbench {__version__}"


def test_list_into_a_closed_pipe_is_quiet():
    cmd = f"{sys.executable} -m rfbench.cli list estimators --all | head -1"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr and "Broken" not in done.stderr


def test_capture_checks_out_before_loading_the_model(monkeypatch, capsys, tmp_path):
    from rfbench.data import capture

    monkeypatch.setattr(capture, "capture", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    for out, why in (
        (tmp_path / "file" / "x.safetensors", "is a file, not a folder"),
        (tmp_path / "x.txt", "unsupported file type '.txt'"),
        (tmp_path, "unsupported file type"),
    ):
        code = main_entry(["capture", "--model", "m", "--text", "corpus", "--out", str(out)])
        assert code == 2 and why in capsys.readouterr().err


# --------------------------------------------------------------------------- 2: capture files
def _capture():
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(2, 3, 5, 4, generator=g)  # noqa: E731
    return io.Capture(q=x(), k=x(), v=x(), layers=[0, 4], heads=[0, 1, 2], scale=0.5)


@pytest.mark.parametrize(
    "key, text",
    [("layers", '["0", "4"]'), ("layers", "null"), ("layers", "[0, 1e400]"), ("layers", "[[0], [4]]"),
     ("layers", "[" * 5000 + "]" * 5000), ("heads", "null"), ("heads", '"null"'), ("heads", "[true, 1, 2]")],
)
def test_bad_index_metadata(tmp_path, key, text):
    from safetensors.torch import save_file

    cap = _capture()
    meta = {"format": io.FORMAT, "layers": "[0, 4]", "heads": "[0, 1, 2]", "scale": "0.5", key: text}
    save_file({n: getattr(cap, n) for n in "qkv"}, str(tmp_path / "x.safetensors"), metadata=meta)
    with pytest.raises(DataError, match=rf"'{key}' is not a JSON list of integers|{key}'? must be a list"):
        io.load_capture(tmp_path / "x.safetensors")


@pytest.mark.parametrize("how", ["float8", "sparse", "meta"])
def test_unusable_tensors(tmp_path, how):
    cap = _capture()
    obj = {"q": cap.q, "k": cap.k, "v": cap.v}
    if how == "float8":
        obj["q"] = obj["q"].to(torch.float8_e4m3fn)
    elif how == "sparse":
        obj["k"] = obj["k"].to_sparse()
    else:
        obj["v"] = torch.empty(cap.v.shape, device="meta")
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(DataError, match="dtype torch.float8|dense tensors"):
        io.load_capture(tmp_path / "x.pt")


def test_big_endian_npz_loads_the_same_values(tmp_path):
    cap = _capture()
    arrays = {n: getattr(cap, n).numpy().astype(">f4") for n in "qkv"}
    np.savez(tmp_path / "x.npz", **arrays, layers=np.asarray([0, 4], ">i8"), scale=np.asarray(0.5, ">f8"))
    got = io.load_capture(tmp_path / "x.npz")
    assert torch.equal(got.q, cap.q) and got.layers == [0, 4] and got.scale == 0.5


@pytest.mark.parametrize(
    "extra, match",
    [({0: 1, "layers": [0, 4]}, "keys must be strings"), ({"scale": 2**2000}, "scale must be a finite"),
     ({"layers": ["0", "4"]}, "layers must be a list of ints")],
)
def test_bad_pt_dicts(tmp_path, extra, match):
    cap = _capture()
    torch.save({"q": cap.q, "k": cap.k, "v": cap.v, **extra}, tmp_path / "x.pt")
    with pytest.raises(DataError, match=match):
        io.load_capture(tmp_path / "x.pt")


def test_huge_scale_in_the_api_capture():
    cap = _capture()
    cap.scale = 2**2000
    with pytest.raises(DataError, match="scale must be a finite positive float"):
        io.validate(cap)
