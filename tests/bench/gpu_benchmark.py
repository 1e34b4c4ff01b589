"""GPU benchmark of random-feature attention: rfbench's Triton kernels against the usual baselines.

    python -m tests.bench.gpu_benchmark --out reports/gpu_bench            # the full sweep
    python -m tests.bench.gpu_benchmark --out /tmp/gb --lengths 1024,4096 --tune
    python -m tests.bench.gpu_benchmark --out /tmp/gb --dry-run            # no GPU: fake timings

Providers (B = 1, H = 8, d = 64, m = 256 by default; forward only):
  rfbench-triton  rfbench.ops.rf_attention on the fused Triton kernels (posrf-orf features)
  torch-posrf     the same PosRF in plain torch, in the input dtype (rfbench's torch path)
  sdpa            torch.nn.functional.scaled_dot_product_attention (FlashAttention for bf16)
  performer       performer-pytorch's FastAttention (pip install performer-pytorch)
  fla             fla's chunk_linear_attn fed torch PosRF features (pip install flash-linear-attention)
  kernel-error    rfbench.ops.kernel_error on the Triton kernel (float32; its own table rows)
Baselines that are not installed are skipped with a note; an OOM is recorded and the sweep goes on.

Method (as fla's benchmarks/ops/run.py and ECOSYSTEM.md B1-B4): every rfbench provider passes a
correctness gate against its torch reference before any timing ("no speed number on a red
gate"); each case is called once (compilation, autotuning) before timing; time is
``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (L2 flushed between calls); peak
memory is measured in a separate call: synchronise, empty the cache, reset peak stats, record
``memory_allocated``, run once, synchronise, take ``max_memory_allocated`` minus the start
(output included; ``extra_over_out`` is (peak - output) / output).

Writes to --out: results.csv (one tidy row per case), results.md (tables), goals.md (the issue's
goals against what was measured), plot.png, meta.json (GPU, versions, command line).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PROVIDERS = ["rfbench-triton", "torch-posrf", "sdpa", "performer", "fla", "kernel-error"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
#: The issue's goals at L = 65536 (B = 1, H = 8, d = 64, m = 256, forward).
GOAL_L = 65536


@dataclass
class Row:
    provider: str
    op: str  # "attention" or "kernel_error"
    seq_len: int
    causal: bool
    dtype: str
    heads: int
    dim: int
    num_features: int
    status: str = "ok"  # ok, oom, error, skipped
    message: str = ""
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    peak_mib: float = math.nan
    out_mib: float = math.nan
    extra_over_out: float = math.nan
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- providers
def _posrf_params(args, device):
    import rfbench as rb

    est = rb.make_estimator("posrf-orf", dim=args.dim, num_features=args.features, seed=0)
    return est.form({}, args.dim**-0.5).to(device=device)


def _torch_features(x, form, causal_keys: bool | None):
    """Plain torch PosRF features in x's dtype; query (None) or key (shared / prefix) stabiliser."""
    from rfbench.ops.features.naive import log_features, stabiliser_constant

    log_phi = log_features(x, form)
    kind = "row" if causal_keys is None else "prefix" if causal_keys else "shared"
    return torch.exp(log_phi - stabiliser_constant(log_phi, kind))


def make_provider(name: str, args, device, dtype, causal: bool, config: dict):
    """``fn(q, k, v)`` for one provider, or raise ImportError / NotImplementedError (skipped)."""
    from rfbench import ops

    reason = not_applicable(name, dtype, causal)
    if reason:
        raise NotImplementedError(reason)
    if name in ("rfbench-triton", "torch-posrf", "fla"):
        form = _posrf_params(args, device)
    if name == "rfbench-triton":
        return lambda q, k, v: ops.rf_attention(q, k, v, form, causal, backend="triton", **config)
    if name == "torch-posrf":
        return lambda q, k, v: ops.torch_rf_attention(q, k, v, form, causal, dtype=q.dtype).to(q.dtype)
    if name == "sdpa":
        import torch.nn.functional as F

        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "performer":
        from performer_pytorch import FastAttention  # pip install performer-pytorch

        attn = FastAttention(dim_heads=args.dim, nb_features=args.features, causal=causal).to(device, dtype)
        return lambda q, k, v: attn(q, k, v)
    if name == "fla":
        if torch.device(device).type != "cuda":  # fla-core imports on a CPU, its chunk kernels do not run
            raise NotImplementedError("fla's chunk_linear_attn needs a GPU (Triton's interpreter finds no "
                                      "driver for its autotuned kernels)")
        from fla.ops.linear_attn import chunk_linear_attn  # pip install flash-linear-attention

        def run(q, k, v):
            # fla takes [B, T, H, K]; its normalize=True divides by the running key sum itself.
            pq, pk = _torch_features(q, form, None), _torch_features(k, form, causal)
            o, _ = chunk_linear_attn(*(t.transpose(1, 2) for t in (pq, pk, v)), scale=1.0, normalize=True)
            return o.transpose(1, 2)

        return run
    if name == "kernel-error":
        scale = args.dim**-0.25
        form1 = _estimator(args).form({}).to(device=device)
        return lambda q, k, v: ops.kernel_error(q * scale, k * scale, form1, backend="triton").sse
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")


def not_applicable(provider: str, dtype: torch.dtype, causal: bool) -> str:
    """Why a provider has no row for this case ('' when it has one)."""
    if provider == "fla" and not causal:
        return "fla's chunk_linear_attn is causal only"
    if provider == "kernel-error" and (dtype != torch.float32 or causal):
        return "kernel error is measured once per length, in float32"
    return ""


def _estimator(args):
    import rfbench as rb

    return rb.make_estimator("posrf-orf", dim=args.dim, num_features=args.features, seed=0)


def correctness_gate(args, device, dtype, causal) -> str:
    """'' when rfbench's kernels match their torch references at a short length, else the failure."""
    from rfbench import ops
    from rfbench.ops.testing import ATTENTION_TOL, rel_rms

    form = _posrf_params(args, device)
    L = 1000 if device.type == "cuda" else 40
    q, k, v = _inputs(args, L, device, dtype)
    out = ops.rf_attention(q, k, v, form, causal, backend="triton")
    err = rel_rms(ops.torch_rf_attention(q, k, v, form, causal), out.float())
    if not err <= ATTENTION_TOL[dtype]:
        return f"correctness gate failed: relative RMS error {err:.2e} > {ATTENTION_TOL[dtype]:.0e}"
    return ""


def _inputs(args, L, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.heads, L, args.dim)
    return [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3)]


# ----------------------------------------------------------------------------- measuring
def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return type(exc).__name__ == "OutOfResources"  # triton.runtime.errors.OutOfResources


class CudaMeter:
    def time(self, fn) -> tuple[float, float, float]:
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))

    def peak_bytes(self, fn) -> float:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


class CpuMeter:
    """Wall-clock medians on the CPU (a smoke run of the script; no memory figure)."""

    def time(self, fn, repeats: int = 3) -> tuple[float, float, float]:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return statistics.median(ts), ts[0], ts[-1]

    def peak_bytes(self, fn) -> float:
        return math.nan


class FakeMeter:
    """--dry-run: deterministic made-up numbers, nothing runs (tests the script's plumbing)."""

    def time(self, fn) -> tuple[float, float, float]:
        t = fn()
        return t, 0.9 * t, 1.1 * t

    def peak_bytes(self, fn) -> float:
        return fn() * 2**20


def run_case(provider, args, L, causal, dtype_name, meter, config, gate) -> Row:
    dtype = DTYPES[dtype_name]
    op = "kernel_error" if provider == "kernel-error" else "attention"
    row = Row(provider, op, L, causal, dtype_name, args.heads, args.dim, args.features, config=dict(config))
    if args.dry_run:
        reason = not_applicable(provider, dtype, causal)
        if reason:
            row.status, row.message = "skipped", reason
            return row
        scale = {"rfbench-triton": 0.2, "torch-posrf": 1.0, "sdpa": 3.0}.get(provider, 2.0)
        t = scale * (L / 65536) * (L / 4096 if provider == "sdpa" else 1.0) + 0.01
        row.median_ms, row.p20_ms, row.p80_ms = meter.time(lambda: t)
        row.out_mib = args.heads * L * args.dim * 2 / 2**20
        factor = 1.1 if provider == "rfbench-triton" else 20.0
        row.peak_mib = meter.peak_bytes(lambda: row.out_mib * factor) / 2**20
        row.extra_over_out = (row.peak_mib - row.out_mib) / row.out_mib
        return row
    device = torch.device(args.device)
    try:
        if gate and provider in ("rfbench-triton",):
            raise RuntimeError(gate)
        fn = make_provider(provider, args, device, dtype, causal, config)
        q, k, v = _inputs(args, L, device, dtype)
        out = fn(q, k, v)  # compile / autotune / allocate once before timing
        row.out_mib = out.numel() * out.element_size() / 2**20
        del out
        row.median_ms, row.p20_ms, row.p80_ms = meter.time(lambda: fn(q, k, v))
        peak = meter.peak_bytes(lambda: fn(q, k, v))
        row.peak_mib = peak / 2**20
        if row.out_mib > 0 and math.isfinite(row.peak_mib):
            row.extra_over_out = (row.peak_mib - row.out_mib) / row.out_mib
    except (ImportError, NotImplementedError) as exc:
        row.status, row.message = "skipped", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure and goes on
        row.status = "oom" if _is_oom(exc) else "error"
        row.message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def tune(args, meter) -> dict[bool, dict]:
    """Fastest (block_t, block_f, num_warps, num_stages) of the Triton attention at tune_len, per causal."""
    configs = [
        {"block_t": bt, "block_f": bf, "num_warps": nw, "num_stages": ns}
        for bt in (32, 64) for bf in (32, 64) for nw in (4, 8) for ns in (1, 2, 3)
    ]
    best: dict[bool, dict] = {}
    rows = []
    for causal in (False, True):
        for cfg in configs:
            row = run_case("rfbench-triton", args, args.tune_len, causal, "bf16", meter, cfg, "")
            rows.append(row)
            print(f"tune causal={causal} {cfg}: {row.status} {row.median_ms:.3f} ms", file=sys.stderr)
        ok = [r for r in rows if r.causal == causal and r.status == "ok"]
        best[causal] = min(ok, key=lambda r: r.median_ms).config if ok else {}
    write_csv(rows, Path(args.out) / "tune.csv")
    return best


# ----------------------------------------------------------------------------- outputs
def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(asdict(rows[0]).keys()) if rows else [f for f in Row.__dataclass_fields__]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["config"] = json.dumps(d["config"], sort_keys=True)
            w.writerow(d)


def _cell(r: Row) -> str:
    if r.status != "ok":
        return r.status
    mem = f" / {r.peak_mib:.0f} MiB" if math.isfinite(r.peak_mib) else ""
    return f"{r.median_ms:.3f} ms{mem}"


def markdown_tables(rows: list[Row]) -> str:
    """One table per (op, causal, dtype): a row per length, a column per provider (median ms / peak MiB)."""
    out = []
    groups = sorted({(r.op, r.causal, r.dtype) for r in rows})
    for op, causal, dtype in groups:
        sel = [r for r in rows if (r.op, r.causal, r.dtype) == (op, causal, dtype)]
        providers = [p for p in PROVIDERS if any(r.provider == p for r in sel)]
        lengths = sorted({r.seq_len for r in sel})
        out.append(f"### {op}, {'causal' if causal else 'non-causal'}, {dtype}\n")
        out.append("| L | " + " | ".join(providers) + " |")
        out.append("|---|" + "---|" * len(providers))
        for L in lengths:
            cells = []
            for p in providers:
                match = [r for r in sel if r.provider == p and r.seq_len == L]
                cells.append(_cell(match[0]) if match else "")
            out.append(f"| {L} | " + " | ".join(cells) + " |")
        notes = sorted({f"{r.provider}: {r.message}" for r in sel if r.message})
        if notes:
            out.append("\n" + "\n".join(f"- {n}" for n in notes))
        out.append("")
    return "\n".join(out)


def goals(rows: list[Row], dry_run: bool) -> str:
    """The issue's goals at L = 65536 against what was measured."""

    def find(provider, op, causal, dtype):
        for r in rows:
            if (r.provider, r.op, r.seq_len, r.causal, r.dtype) == (provider, op, GOAL_L, causal, dtype):
                return r
        return None

    checks = [
        ("non-causal bf16 time <= 0.5 ms", find("rfbench-triton", "attention", False, "bf16"),
         lambda r: r.median_ms <= 0.5, lambda r: f"{r.median_ms:.3f} ms"),
        ("non-causal bf16 extra memory <= 1.5x output", find("rfbench-triton", "attention", False, "bf16"),
         lambda r: r.extra_over_out <= 1.5, lambda r: f"{r.extra_over_out:.2f}x ({r.peak_mib:.0f} MiB peak)"),
        ("causal bf16 time <= 2 ms", find("rfbench-triton", "attention", True, "bf16"),
         lambda r: r.median_ms <= 2.0, lambda r: f"{r.median_ms:.3f} ms"),
        ("kernel error < 100 ms", find("kernel-error", "kernel_error", False, "fp32"),
         lambda r: r.median_ms < 100, lambda r: f"{r.median_ms:.1f} ms"),
        ("kernel error < 1 GiB", find("kernel-error", "kernel_error", False, "fp32"),
         lambda r: r.peak_mib < 1024, lambda r: f"{r.peak_mib:.0f} MiB"),
    ]
    lines = [f"# Goals at L = {GOAL_L} (B = 1, H = 8, d = 64, m = 256, forward)\n"]
    if dry_run:
        lines.append("**DRY RUN: the numbers below are made up; nothing was measured.**\n")
    lines += ["| goal | measured | verdict |", "|---|---|---|"]
    for name, row, ok, show in checks:
        if row is None:
            lines.append(f"| {name} | not run | - |")
        elif row.status != "ok":
            lines.append(f"| {name} | {row.status}: {row.message} | FAIL |")
        else:
            lines.append(f"| {name} | {show(row)} | {'pass' if ok(row) else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def write_plot(rows: list[Row], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.causal, r.dtype) for r in rows if r.op == "attention"})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (causal, dtype) in zip(axes[0], panels):
        for p in PROVIDERS:
            key = (p, "attention", causal, dtype)
            sel = [r for r in rows if (r.provider, r.op, r.causal, r.dtype) == key]
            sel = sorted((r for r in sel if r.status == "ok"), key=lambda r: r.seq_len)
            if sel:
                x = [r.seq_len for r in sel]
                ax.plot(x, [r.median_ms for r in sel], marker="o", label=p)
                ax.fill_between(x, [r.p20_ms for r in sel], [r.p80_ms for r in sel], alpha=0.2)
        ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward time (ms, median)",
               title=f"{'causal' if causal else 'non-causal'}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info(args) -> dict:
    info = {
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "dry_run": args.dry_run,
        "device": args.device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if not args.dry_run and args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.gpu_benchmark", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated L values")
    p.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated, from {sorted(DTYPES)}")
    p.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {PROVIDERS}")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--features", type=int, default=256, help="m, random features")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run: no memory figures)")
    p.add_argument("--tune", action="store_true", help="pick the Triton kernels' block sizes and warps first")
    p.add_argument("--tune-len", type=int, default=16384)
    p.add_argument("--dry-run", action="store_true", help="fake timings; checks the plumbing without a GPU")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    args.providers = [x for x in args.providers.split(",") if x]
    bad = [x for x in args.dtypes if x not in DTYPES] + [x for x in args.providers if x not in PROVIDERS]
    if bad:
        p.error(f"unknown dtype/provider {bad}; dtypes {sorted(DTYPES)}, providers {PROVIDERS}")
    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device visible: run on a GPU, or use --dry-run / --device cpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meter = FakeMeter() if args.dry_run else (CudaMeter() if args.device.startswith("cuda") else CpuMeter())
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    best = tune(args, meter) if args.tune and not args.dry_run else {}
    gates = {}
    if "rfbench-triton" in args.providers and not args.dry_run:
        for dt in args.dtypes:
            for causal in causals:
                gates[(dt, causal)] = correctness_gate(args, torch.device(args.device), DTYPES[dt], causal)
    rows = []
    for dt in args.dtypes:
        for causal in causals:
            for L in args.lengths:
                for provider in args.providers:
                    cfg = best.get(causal, {}) if provider == "rfbench-triton" else {}
                    row = run_case(provider, args, L, causal, dt, meter, cfg, gates.get((dt, causal), ""))
                    if not_applicable(provider, DTYPES[dt], causal):
                        continue  # e.g. fla (causal only), kernel error (once per length)
                    rows.append(row)
                    print(f"{provider:15s} L={L:6d} causal={causal!s:5s} {dt}: {_cell(row)}", file=sys.stderr)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown_tables(rows))
    (out / "goals.md").write_text(goals(rows, args.dry_run))
    info = machine_info(args)
    (out / "meta.json").write_text(json.dumps(info, indent=2))
    where = "DRY RUN: made-up numbers" if args.dry_run else info.get("gpu", args.device)
    write_plot(rows, out / "plot.png", f"{where}; H={args.heads}, d={args.dim}, m={args.features}")
    print((out / "goals.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
