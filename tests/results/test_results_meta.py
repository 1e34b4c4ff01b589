"""rfbench.results.meta: meta.json typed, round-tripped, and old flat layouts still read."""

from __future__ import annotations

import json

import pytest

from rfbench import results as R
from rfbench.errors import DataError
from rfbench.results.meta import GitRecord, Machine, Meta, SuiteRecord, read_meta, write_meta


def test_round_trip(tmp_path):
    meta = Meta(
        rfbench_version="0.1.0",
        suite=SuiteRecord(name="quick", toml="[suite]\n", parsed={"suite": {"name": "quick"}}),
        git=GitRecord("abc1234", True, "main"),
        versions={"torch": "2.13"},
        machine=Machine(host="h", cpu="EPYC", cpu_count=2, devices=[{"device": "cpu", "name": "EPYC"}]),
        peak_memory={"cpu": "CPU: RSS growth"},
        runs=[{"status": "finished"}],
        extra={"future_key": 1},
    )
    write_meta(tmp_path, meta)
    back = R.load_meta(tmp_path)
    assert back == meta
    assert back.git.describe() == "abc1234 (dirty)" and back.device_text() == "EPYC"
    assert json.loads((tmp_path / "meta.json").read_text())["future_key"] == 1  # kept on rewrite


def test_old_flat_layout_still_loads(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({
        "suite": {"name": "old", "toml": "x"}, "rfbench_version": "0.0.9",
        "git_revision": "deadbee", "dirty": False, "host": "box", "cpu": "Old CPU", "device": "cpu",
        "torch_version": "2.0", "started": "2024-01-01T00:00:00", "command": "rfbench run old.toml",
        "peak_memory": "RSS growth",
    }))
    meta = read_meta(tmp_path / "meta.json")
    assert meta.suite.name == "old" and meta.git.revision == "deadbee" and meta.machine.host == "box"
    assert meta.machine.cpu == "Old CPU" and meta.device_text() == "cpu" and meta.versions["torch"] == "2.0"
    assert meta.start_time == "2024-01-01T00:00:00" and meta.command == ["rfbench", "run", "old.toml"]
    assert meta.peak_memory_note(["cpu"]) == "RSS growth"


@pytest.mark.parametrize("text", ["[1, 2]", "{not json"])
def test_broken_meta_is_a_data_error(tmp_path, text):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(DataError):
        read_meta(tmp_path)
