"""Property tests of issue 15: mutated suite files, mutated capture files and edge-case tensors
given to the public API raise only ``RFBenchError`` subclasses; the CLI prints no traceback.

Example counts are bounded (``max_examples``, no deadline) so the file stays quick. With
``RFBENCH_PROPERTY_STATS=FILE`` every property records the inputs it tried and the distinct
crash signatures it met, without failing, and writes them to FILE as JSON (for the figures of
the hardening note: run it once on the old code and once on the new).
"""

from __future__ import annotations

import atexit
import contextlib
import io as _io
import json
import math
import os
import signal
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rfbench as rb  # noqa: E402
from rfbench.cli import main_entry  # noqa: E402
from rfbench.data import io  # noqa: E402
from rfbench.errors import RFBenchError  # noqa: E402
from rfbench.suite.plan import plan, resolve_devices  # noqa: E402
from rfbench.suite.sources import prepare_sources  # noqa: E402
from rfbench.suite.spec import parse_suite, suite_from_dict  # noqa: E402

STATS_FILE = os.environ.get("RFBENCH_PROPERTY_STATS")
STATS: dict[str, dict] = defaultdict(lambda: {"tried": 0, "crashed": 0, "crashes": set()})
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _write_stats():
    if STATS_FILE:
        out = {k: {**v, "crashes": sorted(v["crashes"])} for k, v in STATS.items()}
        Path(STATS_FILE).write_text(json.dumps(out, indent=1))


atexit.register(_write_stats)


def _alarm(signum, frame):
    raise TimeoutError("one input ran past 20 s")


def _probe(name: str, fn) -> None:
    """Run ``fn``; an exception other than an RFBenchError is a crash (recorded, and a failure
    unless only statistics are collected: then an input running past 20 s counts as one, and the
    figures are rewritten after each input, so a run killed midway still leaves them)."""
    STATS[name]["tried"] += 1
    if STATS_FILE:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except RFBenchError:
        return
    except Exception as exc:  # noqa: BLE001 -- what this test looks for
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_frame.f_code.co_name}"
        STATS[name]["crashed"] += 1
        STATS[name]["crashes"].add(f"{type(exc).__name__} at {where}")
        if not STATS_FILE:
            raise
    finally:
        if STATS_FILE:
            signal.alarm(0)
            _write_stats()


# --------------------------------------------------------------------------- suite files
BASE = {
    "suite": {"name": "prop", "description": "x"},
    "estimators": {"names": ["posrf-iid", "darkis-iid"], "baselines": ["exact"]},
    "data": [{"source": "synthetic", "kind": "lowrank", "dim": 8, "params": {"rank": 2}}],
    "sweep": {"seq_len": [16], "num_features": [4], "causal": [False], "dtype": ["float32"]},
    "seeds": {"count": 2, "base": 0},
    "metrics": {"kernel_max_tokens": 16, "tile": 8},
    "timing": {"enabled": False, "threads": 1},
}
PLACES = [
    ("suite", "name"), ("estimators", "names"), ("estimators", "baselines"),
    ("estimators", "params"), ("data", 0, "dim"), ("data", 0, "dim_v"), ("data", 0, "batch"),
    ("data", 0, "heads"), ("data", 0, "seed"), ("data", 0, "kind"), ("data", 0, "params"),
    ("data", 0, "source"), ("data", 0, "layers"), ("sweep", "seq_len"), ("sweep", "num_features"),
    ("sweep", "causal"), ("sweep", "dtype"), ("sweep", "device"), ("seeds", "count"),
    ("seeds", "base"), ("metrics", "tile"), ("metrics", "kernel_max_tokens"), ("timing", "threads"),
    ("timing", "repeats"), ("timing", "max_seconds"), ("fit",), ("fit", "n_blocks"), ("fit", "steps"),
    ("fit", "seed"), ("fit", "holdout"), ("data", 0, "params", "clusters"), ("data", 0, "params", "rank"),
    ("data", 0, "params", "cond"), ("data", 0, "params", "q_norm"), ("suite", "\x1b[2Jkey\n"),
]
NASTY_INTS = [0, -1, 1, 2, 3, 2**31, 2**53 + 1, 2**63, 2**64, 2**70, 10**9, 10**5, -(2**63) - 1]
scalar = st.one_of(
    st.sampled_from(NASTY_INTS),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e9, 1e400, -0.0, 0.5, 1e-300]),
    st.text(max_size=8),
    st.sampled_from(["", ".", "..", "all", "null", "*", "posrf-*", "\n", "\x1b[31m", "a/b"]),
    st.booleans(),
)
nested = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
# numbers first and most often: the sizes are where a suite can ask for too much
value = st.one_of(st.sampled_from(NASTY_INTS), st.sampled_from([1e9, 1e400, 2.0, 0.5]),
                  st.lists(st.sampled_from(NASTY_INTS), min_size=1, max_size=2), nested)


def _mutate(doc: dict, place: tuple, new) -> dict:
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in place[:-1]:
        if isinstance(target, list):
            target = target[key]
        else:
            target = target.setdefault(key, {})
            if not isinstance(target, (dict, list)):
                return doc
    if isinstance(target, dict):
        target[place[-1]] = new
    return doc


def _validate_and_plan(doc: dict) -> None:
    suite = suite_from_dict(doc)
    plan(suite, prepare_sources(suite), resolve_devices(suite, "cpu"))


@settings(max_examples=200, **SETTINGS)
@given(place=st.sampled_from(PLACES), new=value)
def test_mutated_suite_raises_only_rfbench_errors(place, new):
    _probe("suite values", lambda: _validate_and_plan(_mutate(BASE, place, new)))


@settings(max_examples=200, **SETTINGS)
@given(places=st.lists(st.tuples(st.sampled_from(PLACES), value), min_size=2, max_size=5))
def test_several_mutations_raise_only_rfbench_errors(places):
    def go():
        doc = BASE
        for place, new in places:
            doc = _mutate(doc, place, new)
        _validate_and_plan(doc)

    _probe("suite values (several)", go)


BASE_TOML = """[suite]
name = "prop"
[estimators]
names = ["posrf-iid"]
baselines = ["exact"]
[[data]]
kind = "clustered"
dim = 8
params = { clusters = 3 }
[sweep]
seq_len = [16]
num_features = [4]
[seeds]
count = 2
[timing]
enabled = false
threads = 1
"""


@settings(max_examples=150, **SETTINGS)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(BASE_TOML)), st.integers(0, 8), st.text(max_size=6)), min_size=1,
        max_size=4,
    ),
    nest=st.sampled_from([0, 0, 0, 50, 5000, 100_000]),
)
def test_cli_dry_run_on_mutated_text_prints_no_traceback(tmp_path_factory, edits, nest):
    text = BASE_TOML
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut:]
    if nest:
        text += "\nx = " + "[" * nest + "]" * nest + "\n"
    path = tmp_path_factory.mktemp("t") / "s.toml"
    path.write_text(text, encoding="utf-8")

    def go():
        err, out = _io.StringIO(), _io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main_entry(["run", str(path), "--dry-run", "--device", "cpu"])
        assert code in (0, 2), code
        assert "Traceback" not in err.getvalue()
        assert all(c.isprintable() for c in err.getvalue().strip())  # one line, nothing raw

    _probe("CLI dry run (text edits)", go)


def test_parse_suite_deep_nesting_is_a_spec_error():
    with pytest.raises(RFBenchError, match="nested too deeply"):
        parse_suite("x = " + "[" * 100_000 + "]" * 100_000)


# --------------------------------------------------------------------------- capture files
def _capture(L=6, d=4):
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(2, 3, L, d, generator=g)  # noqa: E731
    return io.Capture(q=x(), k=x(), v=x(), layers=[0, 4], heads=[0, 1, 2], scale=0.5)


META_VALUES = st.one_of(
    st.sampled_from(['"abc"', "null", "1e400", "[[0], [1]]", "[0, 1e400]", '["0", "1"]', "[true, 1]",
                     "[-1, 2]", "[0, 0]", "[" * 3000 + "]" * 3000, "{}", "[0, 4]", "[0, 1, 2]",
                     "[2.5, 1]", "[" + ",".join(["1"] * 3) + "]"]),
    st.text(max_size=10),
)
TENSOR_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16, torch.float64,
                 torch.int32, torch.bool, torch.complex64]


@settings(max_examples=120, **SETTINGS)
@given(
    key=st.sampled_from(["layers", "heads", "scale", "format", "text"]), text=META_VALUES,
    dtype=st.sampled_from([None, *TENSOR_DTYPES]),
)
def test_safetensors_metadata_and_dtypes(tmp_path_factory, key, text, dtype):
    from safetensors.torch import save_file

    cap = _capture()
    tensors = {n: getattr(cap, n) for n in "qkv"}
    if dtype is not None:
        tensors["q"] = tensors["q"].to(dtype)
    meta = {"format": io.FORMAT, "layers": "[0, 4]", "heads": "[0, 1, 2]", "scale": "0.5", key: text}
    path = tmp_path_factory.mktemp("c") / "x.safetensors"
    save_file(tensors, str(path), metadata=meta)
    _probe("capture .safetensors metadata", lambda: io.load_capture(path).select(layers=[0]))


@settings(max_examples=120, **SETTINGS)
@given(
    order=st.sampled_from(["<", ">", "="]),
    fdtype=st.sampled_from(["f2", "f4", "f8", "i4", "c8", "U3", "f16" if hasattr(np, "float128") else "f8"]),
    layers=st.one_of(st.just([0, 4]), st.lists(st.integers(-3, 2**62), max_size=3)),
    scale=st.sampled_from([0.5, -1.0, 1e308, float("nan"), 0.0]),
    drop=st.sampled_from([None, "q", "layers", "meta"]),
)
def test_npz_byte_order_dtypes_and_fields(tmp_path_factory, order, fdtype, layers, scale, drop):
    cap = _capture()
    arrays = {n: getattr(cap, n).numpy().astype(order + fdtype) for n in "qkv"}
    arrays.update(layers=np.asarray(layers, dtype=">i8"), heads=np.asarray([0, 1, 2]),
                  scale=np.asarray(scale), meta=np.asarray('{"a": "b"}'))
    arrays.pop(drop, None)
    path = tmp_path_factory.mktemp("c") / "x.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.savez(path, **arrays)
    _probe("capture .npz fields", lambda: io.load_capture(path))


PT_VALUES = st.one_of(
    value, st.sampled_from([2**2000, -(2**2000), float("nan"), None, torch.tensor([0, 4]),
                            torch.tensor(1e30), torch.zeros(0)]),
)


@settings(max_examples=150, **SETTINGS)
@given(
    key=st.sampled_from(["layers", "heads", "scale", "meta", "text", "token_ids", 0, 1.5, ("q",), None]),
    new=PT_VALUES,
    layout=st.sampled_from(["dense", "sparse", "meta", "float8", "noncontig"]),
)
def test_pt_dicts(tmp_path_factory, key, new, layout):
    cap = _capture()
    obj = {n: getattr(cap, n) for n in "qkv"}
    obj.update(layers=[0, 4], heads=[0, 1, 2], scale=0.5)
    if layout == "sparse":
        obj["k"] = obj["k"].to_sparse()
    elif layout == "meta":
        obj["v"] = torch.empty(obj["v"].shape, device="meta")
    elif layout == "float8":
        obj["q"] = obj["q"].to(torch.float8_e4m3fn)
    elif layout == "noncontig":
        obj["q"] = obj["q"].transpose(-1, -2).contiguous().transpose(-1, -2)
    obj[key] = new
    path = tmp_path_factory.mktemp("c") / "x.pt"
    try:
        torch.save(obj, path)
    except Exception:  # noqa: BLE001 -- torch cannot write it: nothing to load
        return
    _probe("capture .pt dicts", lambda: io.load_capture(path))


@settings(max_examples=120, **SETTINGS)
@given(
    suffix=st.sampled_from(io.SUFFIXES), at=st.floats(0, 1), cut=st.integers(0, 64),
    junk=st.binary(max_size=16),
)
def test_corrupted_capture_bytes(tmp_path_factory, suffix, at, cut, junk):
    folder = tmp_path_factory.mktemp("c")
    path = io.save_capture(folder / f"x{suffix}", _capture())
    data = path.read_bytes()
    i = int(at * len(data))
    path.write_bytes(data[:i] + junk + data[i + cut:])
    _probe("capture bytes", lambda: io.load_capture(path))


# --------------------------------------------------------------------------- the API
NAMES = ["posrf-iid", "posrf-orf", "trigrf-iid", "hyprf-orf", "oprf-orf", "darkis-iid", "gerf-iid",
         "relu-iid", "saderf-qmc", "dark-iid"]
ENTRIES = st.sampled_from([0.0, 1.0, -1.0, 1e-40, 1e4, 1e30, -1e30, float("nan"), float("inf")])


@settings(max_examples=200, **SETTINGS)
@given(
    name=st.sampled_from(NAMES + ["posrf", "x-y", "POSRF-IID", ""]),
    dim=st.sampled_from([1, 2, 3, 4, 0, -1, 2**40, 2.0]),
    m=st.sampled_from([1, 3, 8, 0, 2**40]),
    seed=st.sampled_from([0, -1, 2**63, 2**64, 2**70, -(2**64), 1.5]),
    shape=st.sampled_from([(1, 5), (2, 1, 5), (5,), (1, 0), (0, 5), (2, 3, 5)]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                           torch.bool, torch.complex64]),
    fill=st.one_of(st.none(), ENTRIES),
    scale=st.sampled_from([None, 0.5, -1.0, 0.0, float("nan"), float("inf"), 2**2000, 1e300]),
    call=st.sampled_from(["attention", "kernel", "features", "fit", "causal"]),
)
def test_api_edge_cases(name, dim, m, seed, shape, dtype, fill, scale, call):
    def go():
        est = rb.make_estimator(name, dim=dim, num_features=m, seed=seed)
        d = dim if isinstance(dim, int) and 0 < dim < 64 else 4
        g = torch.Generator().manual_seed(1)
        q = torch.randn(*shape, d, generator=g)
        if fill is not None:
            q.view(-1)[: max(1, q.numel() // 2)] = fill
        q = q.to(dtype)
        k, v = q.flip(-2) if q.ndim > 1 else q, q
        if call == "attention":
            est.attention(q, k, v, scale=scale)
        elif call == "causal":
            est.attention(q, k, v, causal=True, scale=scale, chunk=2)
        elif call == "kernel":
            est.kernel(q, k)
        elif call == "features":
            est.features(q)
        else:
            est.fit(q, k, scale=0.5 if scale is None else scale)

    _probe("API edge cases", go)


def test_api_issue_inputs_are_estimator_errors():
    q = torch.randn(1, 8, 4)
    with pytest.raises(RFBenchError, match="seed"):
        rb.make_estimator("posrf-iid", dim=4, num_features=8, seed=2**70)
    est = rb.make_estimator("darkis-iid", dim=4, num_features=8)
    for scale in (-1, math.nan, math.inf):
        with pytest.raises(RFBenchError, match="scale"):
            est.attention(q, q, q, scale=scale)
        with pytest.raises(RFBenchError, match="scale"):
            est.fit(q, q, scale=scale)
