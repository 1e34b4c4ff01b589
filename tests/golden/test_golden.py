"""Golden fixed-seed outputs: a refactor must not change a number (see make_golden.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.golden.make_golden import PATH, outputs


@pytest.fixture(scope="module")
def now():
    return outputs()


def test_golden_outputs_match(now):
    golden = load_file(str(PATH))
    assert set(now) == set(golden), sorted(set(now) ^ set(golden))
    bad = []
    for key, ref in golden.items():
        got = now[key]
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-9, atol=1e-12, equal_nan=True):
            err = (got - ref).abs().max().item() if got.shape == ref.shape else "shape"
            bad.append(f"{key}: max abs diff {err}")
    assert not bad, "\n".join(bad)


def test_golden_file_is_not_trivial():
    golden = load_file(str(PATH))
    assert len(golden) >= 40
    assert all(torch.isfinite(t).any() for t in golden.values())
