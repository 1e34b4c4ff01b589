"""Suite files: validation errors name the file, the key path and what is allowed; ready suites load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rfbench import cli
from rfbench.errors import SpecError
from rfbench.suite.spec import load_suite, parse_suite
from rfbench.suite_paths import SUITES_DIR

GOOD = """
[suite]
name = "t"
[estimators]
names = ["posrf-iid"]
[[data]]
kind = "isotropic"
dim = 8
[sweep]
seq_len = [16]
num_features = [4]
"""


def _write(tmp_path, text, name="x.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path, text) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_suite(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # every message names the file first
    return message


def _replace(old, new):
    assert old in GOOD
    return GOOD.replace(old, new)


def test_good_suite_and_defaults(tmp_path):
    suite = load_suite(_write(tmp_path, GOOD))
    assert suite.name == "t" and [e.name for e in suite.estimators] == ["posrf-iid"]
    assert suite.baselines == ("exact", "sdpa") and suite.seeds.count == 5
    assert suite.sweep.values("seq_len", "cpu") == (16,) and suite.sweep.values("causal", "cuda") == (False,)
    assert suite.data[0].params == {"q_norm": None, "k_norm": None, "sphere": False}  # defaults filled in
    assert suite.text.strip() == GOOD.strip() and suite.raw["sweep"]["seq_len"] == [16]


def test_unknown_key_lists_the_allowed_ones(tmp_path):
    msg = _error(tmp_path, _replace("seq_len = [16]", "seq_lens = [16]"))
    assert "sweep.seq_lens: unknown key (did you mean 'seq_len'?)" in msg
    assert "allowed: seq_len, num_features, causal, dtype, device" in msg
    msg = _error(tmp_path, GOOD + "\n[extra]\nx = 1\n")
    assert "extra: unknown key" in msg and "allowed: suite, estimators, data" in msg


def test_wrong_type_names_the_item(tmp_path):
    msg = _error(tmp_path, _replace("seq_len = [16]", 'seq_len = [16, "abc"]'))
    assert "x.toml: sweep.seq_len[1]: expected an integer in [1, 2**22], got 'abc'" in msg
    msg = _error(tmp_path, _replace("[sweep]", '[sweep]\ncausal = "yes"'))
    assert "sweep.causal[0]: expected true or false, got 'yes'" in msg


def test_unknown_estimator_with_suggestion(tmp_path):
    msg = _error(tmp_path, _replace('names = ["posrf-iid"]', 'names = ["posrf-iid", "posrf-orff"]'))
    assert "estimators.names[1]:" in msg and "Did you mean 'orf'?" in msg
    msg = _error(
        tmp_path,
        _replace('names = ["posrf-iid"]', 'feature_maps = ["posrf", "posrff"]\nweight_matrices = ["iid"]'),
    )
    assert "estimators.feature_maps[1]: unknown feature map 'posrff' (did you mean 'posrf'?)" in msg
    msg = _error(tmp_path, _replace('names = ["posrf-iid"]', 'feature_maps = ["posrf"]'))
    assert "estimators.weight_matrices: required with a grid" in msg


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "num_features = [4]",
            "num_features = [0]",
            "sweep.num_features[0]: expected an integer in [1, 2**20], got 0",
        ),
        ("[sweep]", '[sweep]\ndtype = ["float8"]', "sweep.dtype[0]: 'float8' is not allowed"),
        ("[sweep]", '[sweep]\ndevice = ["tpu"]', "allowed: cpu, cuda, auto"),
        ("dim = 8", "dim = -3", "data[0].dim: expected an integer in [1, 8192], got -3"),
        (
            'kind = "isotropic"',
            'kind = "isotropik"',
            "data[0].kind: 'isotropik' is not allowed (did you mean 'isotropic'?)",
        ),
        ('kind = "isotropic"', 'kind = "isotropic"\nparams = { sphere = 3 }', "data[0].params: "),
        (
            'kind = "isotropic"',
            'kind = "isotropic"\nparams = { cond = 3.0 }',
            "data[0].params.cond: unknown parameter",
        ),
        ("[sweep]", "[seeds]\ncount = 0\n[sweep]", "seeds.count: expected an integer in [1, 10000], got 0"),
        ("[sweep]", "[metrics]\ntile = 0\n[sweep]", "metrics.tile: expected an integer in [1, 65536], got 0"),
        ("[sweep]", '[timing]\ngpu_timer = "wall"\n[sweep]', "timing.gpu_timer: 'wall' is not allowed"),
        ('name = "t"', 'name = "a b"', "suite.name: 'a b' must be usable as a folder name"),
    ],
)
def test_impossible_values(tmp_path, old, new, expected):
    assert expected in _error(tmp_path, _replace(old, new))


def test_structure_errors(tmp_path):
    assert "data: required" in _error(tmp_path, GOOD.replace('[[data]]\nkind = "isotropic"\ndim = 8\n', ""))
    assert "sweep.num_features: required" in _error(tmp_path, _replace("num_features = [4]", ""))
    assert "not valid TOML" in _error(tmp_path, GOOD + "\n[sweep\n")
    msg = _error(tmp_path, GOOD + '\n[[data]]\nsource = "file"\npath = "missing.safetensors"\n')
    assert "data[1].path: no such file" in msg
    msg = _error(
        tmp_path, _replace('names = ["posrf-iid"]', 'names = ["posrf-iid"]\nparams = { gerf = { B = 1 } }')
    )
    assert "estimators.params.gerf.B: unknown parameter" in msg and "allowed: " in msg
    msg = _error(
        tmp_path,
        GOOD
        + '[[data]]\nkind = "isotropic"\ndim = 4\nlabel = "x"\n[[data]]\nkind = "isotropic"\nlabel = "x"\n',
    )
    assert "data[2].label: 'x' is already used by data[1]" in msg


def test_several_problems_are_reported_together(tmp_path):
    msg = _error(
        tmp_path,
        _replace("seq_len = [16]", "seq_len = [0]").replace("num_features = [4]", "num_features = 'm'"),
    )
    assert "sweep.seq_len[0]" in msg and "sweep.num_features[0]" in msg and "\n" not in msg


def test_grid_exclude_and_per_device_axes(tmp_path):
    text = _replace(
        'names = ["posrf-iid"]',
        'feature_maps = ["posrf", "trigrf"]\nweight_matrices = ["iid", "orf"]\n'
        'exclude = ["trigrf-*", "posrf-orf"]',
    ).replace("seq_len = [16]", "seq_len = { cpu = [16, 32], cuda = [64] }")
    suite = load_suite(_write(tmp_path, text))
    assert [e.name for e in suite.estimators] == ["posrf-iid"]
    assert suite.sweep.values("seq_len", "cpu") == (16, 32) and suite.sweep.values("seq_len", "cuda") == (64,)
    suite = parse_suite(_replace("seq_len = [16]", "seq_len = { cuda = [64] }"))
    with pytest.raises(SpecError, match="sweep.seq_len gives values for cuda but not for device 'cpu'"):
        suite.sweep.values("seq_len", "cpu")


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, _replace("num_features = [4]", "num_features = [-1]"))
    assert cli.main_entry(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rfbench run: error: ") and "sweep.num_features[0]" in err
    assert not (tmp_path / "out").exists()
    assert cli.main_entry(["run", "no-such-suite"]) == 2
    assert "suite 'no-such-suite' not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["quick", "spectraformer", "scaling", "real", "darkformer", "learning", "llm", "families"]
)
def test_ready_suites_validate(name):
    suite = load_suite(SUITES_DIR / f"{name}.toml")
    assert suite.name == name and suite.estimators and suite.data


def test_capture_source_is_validated_and_resolved(tmp_path):
    """source = "capture": the data layer's keys only, the model required, paths against the suite."""
    (tmp_path / "model.gguf").write_bytes(b"not read at parse time")
    base = (
        '[suite]\nname = "c"\n[estimators]\nnames = ["posrf-iid"]\n'
        "[sweep]\nseq_len = [8]\nnum_features = [4]\n"
    )
    ok = base + '[[data]]\nsource = "capture"\nmodel = "model.gguf"\nlayers = [0]\n'
    (tmp_path / "ok.toml").write_text(ok)
    spec = load_suite(tmp_path / "ok.toml").data[0]
    assert spec.source == "capture" and spec.layers == (0,)
    assert spec.params["model"] == str(tmp_path / "model.gguf") and spec.params["text"] == "corpus"
    for extra, match in (('model = "model.gguf"\npath = "x"\n', "path"), ('layers = [0]\n', "model")):
        (tmp_path / "bad.toml").write_text(base + '[[data]]\nsource = "capture"\n' + extra)
        with pytest.raises(SpecError, match=match):
            load_suite(tmp_path / "bad.toml")


@pytest.mark.parametrize("suite", ["quick", "learning", "llm"])
def test_reading_a_suite_imports_neither_the_trainer_nor_the_report(suite):
    """Parsing is cheap: no report layer, no plotting, no trainer (a [fit] section needs only the
    learning configuration), no results store."""
    code = (
        "import sys; from rfbench.suite.spec import load_suite; "
        f"load_suite({suite!r}); "
        "heavy = ('rfbench.report', 'rfbench.learning.training', 'rfbench.results.store', 'matplotlib'); "
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    if suite == "quick":  # no [fit] section: nothing of the learning package at all
        code = code.replace("'rfbench.learning.training'", "'rfbench.learning'")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"
