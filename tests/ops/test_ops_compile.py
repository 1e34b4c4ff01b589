"""The fused kernels compile for an H100 (sm_90) on a machine without a GPU, without heavy spills.

The interpreter tests cannot catch code that only the GPU compiler rejects; this compiles every
kernel specialisation the ops launch at the benchmark's shape (bf16, d = 64, m = 256) down to a
cubin with Triton's bundled ptxas (rfbench/ops/compile_check.py), in a separate process
because the interpreter is switched on in this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

#: A few hundred bytes of spill are noise; kilobytes mean a tile no longer fits in registers.
MAX_SPILL_BYTES = 256


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_compile_for_sm90(dtype):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "rfbench.ops.compile_check", "--arch", "90", "--dtype", dtype],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("ptxas not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    names = {r["kernel"] for r in rows}
    assert names == {
        "_features_kernel", "_kv_state_kernel", "_scan_kernel", "_output_kernel", "_kernel_error_kernel"
    }
    if dtype == "bfloat16":  # the benchmark's dtype: registers must hold the tiles
        heavy = [r for r in rows if (r["spill_stores"] or 0) > MAX_SPILL_BYTES]
        assert not heavy, heavy
