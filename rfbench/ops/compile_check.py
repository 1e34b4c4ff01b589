"""Compile the fused kernels for a GPU architecture on a machine without one, and report ptxas'
register and spill counts: ``python -m rfbench.ops.compile_check [--arch 90]``.

The Triton interpreter (which the CPU tests use) accepts code the GPU compiler rejects, and says
nothing about registers. This runs each op's host function at a small size with every kernel
launch *recorded* instead of run, then compiles each recorded launch (same constexprs and
dtypes) with Triton's compiler down to a cubin; ptxas ships with Triton. Needs
TRITON_INTERPRET unset (a separate process from the interpreter tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, args, kwargs))

        return launch


def _signature(fn, args, kwargs):
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    sig, constexprs, it = {}, {}, iter(args)
    for p in fn.params:
        if p.is_constexpr:
            constexprs[p.name] = kwargs[p.name]
            sig[p.name] = "constexpr"
            continue
        value = next(it)
        if isinstance(value, torch.Tensor):
            sig[p.name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    return sig, constexprs, options


def record_launches(
    dtype: torch.dtype = torch.bfloat16, L: int = 256, d: int = 64, m: int = 256,
    num_warps: int | None = None, num_stages: int | None = None,
) -> list:
    """(JITFunction, args, kwargs) of every launch the ops make for one bench-like shape.

    ``num_warps`` / ``num_stages``: None keeps each op's default.
    """
    from rfbench.ops import common
    from rfbench.ops.features import fused as feat
    from rfbench.ops.form import ExpForm
    from rfbench.ops.kernel_error import fused as kerr
    from rfbench.ops.rf_attention import fused as attn

    log: list = []
    kernels = [(feat, "_features_kernel"), (attn, "_kv_state_kernel"), (attn, "_scan_kernel"),
               (attn, "_output_kernel"), (kerr, "_kernel_error_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in kernels]
    common.FORCE_F32_PRECISION = "tf32x3"  # what an sm_80+ GPU picks (these are CPU tensors)
    try:
        for mod, name, fn in saved:
            setattr(mod, name, _Recorder(fn, log))
        q = torch.zeros(1, 2, L, d, dtype=dtype)
        form = ExpForm(torch.zeros(m, d), torch.zeros(m), -0.5)
        w = {"num_stages": num_stages} | ({} if num_warps is None else {"num_warps": num_warps})
        attn.fused_rf_attention(q, q, q, form, causal=False, **w)
        attn.fused_rf_attention(q, q, q, form, causal=True, **w)
        feat.fused_features(q, form, "shared", **w)
        kerr.fused_kernel_error(q.float(), q.float(), form, precision="tf32", **w)  # its GPU default
    finally:
        common.FORCE_F32_PRECISION = None
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    return log


def compile_all(
    arch: int = 90, dtype: torch.dtype = torch.bfloat16, ptxas_info: bool = True,
    num_warps: int | None = None, num_stages: int | None = None,
) -> list[dict]:
    """Compile every recorded launch for ``sm_<arch>``; one dict per launch (name, regs, spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows, seen = [], set()
    for fn, args, kwargs in record_launches(dtype, num_warps=num_warps, num_stages=num_stages):
        sig, constexprs, options = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(constexprs.items(), key=str)))
        if key in seen:
            continue
        seen.add(key)
        target = GPUTarget("cuda", arch, 32)
        compiled = triton.compile(ASTSource(fn, sig, constexprs), target=target, options=options)
        row = {
            "kernel": fn.__name__,
            "num_warps": options.get("num_warps"),
            "num_stages": options.get("num_stages"),
            "shared_bytes": compiled.metadata.shared,
            "constexprs": {k: str(v) for k, v in constexprs.items()},
        }
        if ptxas_info:
            row.update(_ptxas_info(compiled.asm["ptx"], arch))
        rows.append(row)
    return rows


def _ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None}


def main(argv=None) -> int:
    """Print one JSON line per compiled kernel specialisation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-warps", type=int, default=None, help="default: each op's own")
    parser.add_argument("--num-stages", type=int, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    rows = compile_all(args.arch, dtype, num_warps=args.num_warps, num_stages=args.num_stages)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
