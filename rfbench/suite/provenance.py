"""Provenance of a run for meta.json: rfbench and library versions, git, machine, times.

``build_meta`` fills a ``rfbench.results.meta.Meta`` from the suite, the devices and the
folder's previous meta.json (a resumed or sharded run keeps the first start time and appends
its own record to ``runs``).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from rfbench._version import __version__
from rfbench.results.meta import GitRecord, Machine, Meta, SuiteRecord
from rfbench.suite import measure as X
from rfbench.suite.spec_types import Suite


def git_info() -> dict:
    root = Path(__file__).resolve().parent.parent.parent

    def git(*args):
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    if rev is None:
        return {"revision": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": rev, "dirty": bool(status), "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import numpy
    import pandas
    import pyarrow

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def machine(devices: list[str]) -> dict:
    out = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "devices": [],
    }
    for d in devices:
        if d == "cuda":
            props = torch.cuda.get_device_properties(0)
            out["devices"].append(
                {
                    "device": "cuda",
                    "name": props.name,
                    "count": torch.cuda.device_count(),
                    "memory_bytes": props.total_memory,
                    "capability": f"{props.major}.{props.minor}",
                    "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                }
            )
        else:
            out["devices"].append({"device": "cpu", "name": out["cpu"]})
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def build_meta(suite: Suite, devices: list[str], previous: Meta | None) -> Meta:
    """meta.json of a run of ``suite`` on ``devices`` into a folder that held ``previous``."""
    from rfbench import metrics as M

    validated = suite.to_dict()
    meta = Meta(
        rfbench_version=__version__,
        suite=SuiteRecord(
            name=suite.name,
            path=None if suite.path is None else str(suite.path),
            toml=suite.text,
            parsed=suite.raw,
            validated=validated,
        ),
        git=GitRecord(**git_info()),
        versions=versions(),
        machine=Machine(**machine(devices)),
        timing={
            **validated["timing"],
            "cpu_timer": "time.perf_counter per call after warmup; median, p20, p80",
            "gpu": "triton.testing.do_bench(return_mode='all', L2 flushed) or CUDA events; median, p20, p80",
            "forward": "Estimator.attention(q, k, v, causal, scale) with a drawn and fitted estimator; "
            "draw_ms and fit_ms are measured apart",
            "timed_seeds": "all" if suite.timing.all_seeds else "seed_index 0 only",
        },
        peak_memory={"cpu": X.CPU_MEMORY_NOTE, "cuda": X.CUDA_MEMORY_NOTE},
        metrics={
            **validated["metrics"],
            "definitions": M.__doc__.split("Per entry")[0].strip(),
            "kernel_pairs": "rows sampled once per (data, seq_len), independent of seeds; "
            "attention-matrix row sums over all keys",
            "fit": "data-dependent estimators are fitted on the cell's whole q, k at the attention scale",
        },
        seeds={
            "count": suite.seeds.count,
            "base": suite.seeds.base,
            "rule": "seed_i = int.from_bytes(sha256(canonical_key + '|' + base + '|' + i)[:8]) mod 2**63",
        },
        start_time=now() if previous is None or previous.start_time is None else previous.start_time,
        end_time=None if previous is None else previous.end_time,
        runs=[] if previous is None else list(previous.runs),
        extra={} if previous is None else dict(previous.extra),
    )
    return meta


def run_record(*, resume: bool, shard, devices: list[str], total: int, todo: int, done: int, argv) -> dict:
    """This writer's entry of ``Meta.runs`` (closed by the runner when the sweep ends)."""
    return {
        "start_time": now(),
        "end_time": None,
        "command": list(argv),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "resume": bool(resume),
        "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
        "devices": devices,
        "cells_total": total,
        "cells_this_run": todo,
        "cells_already_done": done,
        "status": "running",
    }
