"""Which "<feature>-<weights>" pairs rb.estimators() lists, checked against building them.

Independent of the listing's own definition (registry.pair_reasons): every pair of the two
registries is built by hand at a few sizes with default parameters, and rb.estimators() must list
exactly the pairs that build at one of them without UnsupportedError. Hand-written lists pin a few
pairs that must be refused and accepted, and stub components check that pairing reads declared
data (``FeatureMap.weights``, ``needs_gaussian_rows``, ``WeightMatrix.gaussian_marginal``), not names.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import rfbench as rb
from rfbench import registry
from rfbench.errors import UnsupportedError
from rfbench.features.base import FeatureMap
from rfbench.weights.base import WeightMatrix, normal

#: (d, m): a common size, an odd m (antithetic refuses it), m < d (moment matching refuses it),
#: and taylor2's one size at d = 2 (1 + d + d(d+1)/2 = 6).
SIZES = [(8, 16), (8, 7), (6, 4), (2, 6)]

MUST_REFUSE = [
    "poisrf-orf", "poisrf-antithetic", "poisrf-fastfoodl", "geomrf-sorf", "geomrf-qmc", "geomrf-simrf",
]
MUST_ACCEPT = [
    "relu-iid", "relu-orf", "posrf-antithetic", "hyprf-antithetic", "poisrf-iid", "geomrf-iid",
    "oprf-fastfoodl", "posrf-sgq", "darkl-orf", "gerf-qmc",
]


def _builds(name: str) -> bool:
    """Whether the pair builds at one of SIZES (UnsupportedError at all of them: False)."""
    for d, m in SIZES:
        try:
            est = rb.make_estimator(name, dim=d, num_features=m, seed=0, dtype=torch.float64)
        except UnsupportedError:
            continue
        assert est.name == name and tuple(est.draw_.W.shape)[-1] == d
        return True
    return False


@pytest.fixture(scope="module")
def built() -> dict[str, bool]:
    return {
        f"{fm}-{wm}": _builds(f"{fm}-{wm}")
        for fm in registry.feature_maps()
        for wm in registry.weight_matrices()
    }


def test_listing_is_exactly_the_pairs_that_build(built):
    listed = rb.estimators()
    assert len(set(listed)) == len(listed)
    assert set(listed) == {name for name, ok in built.items() if ok}, sorted(
        set(listed) ^ {name for name, ok in built.items() if ok}
    )
    assert set(rb.estimators(include_unsupported=True)) == set(built)


@pytest.mark.parametrize("name", MUST_REFUSE)
def test_refused_pairs_say_which_weights_they_take(name, built):
    fm, wm = name.split("-")
    assert not built[name] and name not in rb.estimators()
    with pytest.raises(UnsupportedError, match=wm) as info:
        rb.make_estimator(name, dim=8, num_features=16)
    assert "iid" in str(info.value)  # the discrete maps name the one they take


@pytest.mark.parametrize("name", MUST_ACCEPT)
def test_accepted_pairs(name, built):
    assert built[name] and name in rb.estimators()


# =========================================================================== declared data, not names
class _NotGaussian(WeightMatrix):
    name = "stubsign"
    gaussian_marginal = False
    unbiased = False
    description = reference = "stub"

    def _sample(self, m, d, generator):
        return normal((m, d), generator).sign()


class _Gaussian(_NotGaussian):
    name = "stubgauss"
    gaussian_marginal = True

    def _sample(self, m, d, generator):
        return normal((m, d), generator)


class _OnlyStubGauss(FeatureMap):
    name = "stubmap"
    weights = ("stubgauss",)
    description = reference = "stub"


class _AnyRows(FeatureMap):
    name = "stubany"
    needs_gaussian_rows = False
    description = reference = "stub"


def test_pairing_reads_declared_capabilities():
    assert _OnlyStubGauss().supports(_Gaussian()) == []
    assert _OnlyStubGauss().supports(registry.get_weight_matrix("iid"))  # not in its weights tuple
    assert _AnyRows().supports(_NotGaussian()) == []
    assert registry.get_feature_map("posrf").supports(_NotGaussian())  # needs Gaussian rows
    assert registry.get_feature_map("posrf").supports(_Gaussian()) == []


def test_no_component_is_paired_by_its_name():
    """No `<component>.name == "..."` test in the estimator side of rfbench (declared data only)."""
    root = pathlib.Path(rb.__file__).parent
    files = [root / "registry.py", root / "estimator.py", root / "theory.py"]
    files += sorted((root / "features").glob("*.py")) + sorted((root / "weights").glob("*.py"))
    files.remove(root / "features" / "target.py")  # TargetKernel.is_softmax names a kernel, not a component
    pattern = re.compile(r"\.name\s*(==|!=|in)\s*[\"'(\[]")
    lines = [(p.name, i, ln) for p in files for i, ln in enumerate(p.read_text().splitlines(), 1)]
    hits = [f"{f}:{i}" for f, i, ln in lines if pattern.search(ln)]
    assert not hits, hits


def test_learnable_is_declared_on_the_classes():
    learnable_w = [n for n in registry.weight_matrices() if registry.weight_matrix_class(n).learnable]
    learnable_f = [n for n in registry.feature_maps() if registry.feature_map_class(n).learnable]
    assert learnable_w == ["fastfoodl"] and learnable_f == ["darkl", "hedgehog"]
    for n in registry.weight_matrices():
        cls = registry.weight_matrix_class(n)
        assert isinstance(cls.independent_rows, bool) and not hasattr(cls, "coupled"), n
