# ruff: noqa: B023  (each timed lambda runs inside the loop iteration that made it)
"""CPU attention benchmark (issue 16): rfbench's torch path against the libraries a user would pick.

    python -m tests.bench.cpu_attention --out reports/cpu_bench [--L 1024 4096 16384] [--threads 2]

B = 1, H = 8, d = 64, m = 256, float32, forward only, causal and not. Providers, timed side by side
in one process (each round times every provider once, in turn; medians over the rounds):

- ``rfbench``: ``Estimator.attention`` of posrf-orf (validation included, as a user calls it);
- ``rfbench_before``: the same path as it was before issue 16 (``tests/bench/legacy_attention.py``);
- ``plain_posrf``: PosRF in 20 lines of plain torch (non-causal), the same W;
- ``performer``: performer-pytorch's ``FastAttention`` (same m, its default softmax kernel with
  ORF, no redraw; causal is its non-CUDA fallback). Optional: skipped with a note when absent;
- ``sdpa``: exact ``scaled_dot_product_attention`` (up to L = 4096).

Correctness first: at every L, rfbench's output must match the plain PosRF (same W, non-causal)
and its own earlier path (both) to float32 rounding, or nothing is timed. Every provider's
relative error against exact attention is recorded where SDPA runs.

The matmul rate of the machine is measured in the same run, on the shape of the projections
(``[H, L, d] @ [d, F]``) and of a square 2048 sgemm; GFLOP/s of the RF providers count the
two projections, phi(K)^T [v, 1] and phi(Q) S (causal: plus the chunk-local scores).

Writes ``results.md`` (tables) and ``results.json`` (rows, machine, settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rfbench as rb
from rfbench.ops.rf_attention.naive import CHUNK as RF_CHUNK
from tests.bench.legacy_attention import legacy_attention

H, D, M = 8, 64, 256
CHUNK = RF_CHUNK  # the causal chunk rfbench's CPU path uses by default


def plain_posrf(q, k, v, W):
    """PosRF attention as a user writes it in plain torch (non-causal); W ``[m, d]``."""
    s = q.shape[-1] ** -0.25
    q, k = q * s, k * s
    lq = q @ W.T - (q * q).sum(-1, keepdim=True) / 2
    lk = k @ W.T - (k * k).sum(-1, keepdim=True) / 2
    Q = torch.exp(lq - lq.amax(-1, keepdim=True))  # per-query constant: cancels in its row
    K = torch.exp(lk - lk.amax((-2, -1), keepdim=True))  # one key constant: cancels
    kv = K.transpose(-1, -2) @ v
    return (Q @ kv) / (Q @ K.sum(-2).unsqueeze(-1))


def _performer(causal):
    try:
        from performer_pytorch import FastAttention
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return (
            None,
            f"performer-pytorch not available ({type(e).__name__}: {e}); pip install performer-pytorch",
        )
    torch.manual_seed(0)
    return FastAttention(dim_heads=D, nb_features=M, causal=causal).eval(), None


def rf_flops(L, causal, d=D, F=M, dv=D, chunk=CHUNK):
    """Multiply-adds x 2 of the RF forward: two projections, phi(K)^T [v,1], phi(Q) S; causal adds
    the chunk-local scores and their product with [v, 1] (about half of each chunk is masked)."""
    f = H * L * (2 * 2 * d * F + 2 * 2 * F * (dv + 1))
    if causal:
        f += H * L * (2 * chunk * F + 2 * chunk * (dv + 1))
    return f


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_rate(L, rounds=5):
    """GFLOP/s of sgemm on the projection's shape and on a square 2048 sgemm (medians)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(H, L, D, generator=g), torch.randn(D, M, generator=g)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    out = {}
    for name, fn, fl in [
        ("proj", lambda: x @ w, 2 * H * L * D * M),
        ("square2048", lambda: a @ b, 2 * 2048**3),
    ]:
        fn()
        out[name] = fl / statistics.median(_time(fn) for _ in range(rounds)) / 1e9
    return out


def run(Ls, threads, rounds, out_dir: Path | None):
    torch.set_num_threads(threads)
    est = rb.make_estimator("posrf-orf", dim=D, num_features=M, seed=0)
    W = est.draw_.W
    notes, rows = [], []
    for causal in (False, True):
        perf, why = _performer(causal)
        if why and why not in notes:
            notes.append(why)
        for L in Ls:
            g = torch.Generator().manual_seed(L)
            q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
            provs = {
                "rfbench": lambda: est.attention(q, k, v, causal),
                "rfbench_before": lambda: legacy_attention(est, q, k, v, causal),
            }
            if not causal:
                provs["plain_posrf"] = lambda: plain_posrf(q, k, v, W)
            if perf is not None:
                provs["performer"] = lambda: perf(q, k, v)
            if L <= 4096:
                provs["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with torch.no_grad():
                outs = {name: fn() for name, fn in provs.items()}  # also the warm-up call
                ref = outs["plain_posrf"] if not causal else outs["rfbench_before"]
                err = ((outs["rfbench"] - ref).norm() / ref.norm()).item()
                if err > 1e-5:
                    raise SystemExit(f"correctness gate failed at L={L} causal={causal}: rel err {err:.2e}")
                exact = outs.get("sdpa")
                times = {name: [] for name in provs}
                for _ in range(rounds):
                    for name, fn in provs.items():
                        times[name].append(_time(fn))
            rate = matmul_rate(L)
            for name, ts in times.items():
                med = statistics.median(ts)
                row = {
                    "provider": name,
                    "L": L,
                    "causal": causal,
                    "threads": threads,
                    "rounds": rounds,
                    "median_ms": med * 1e3,
                    "min_ms": min(ts) * 1e3,
                    "max_ms": max(ts) * 1e3,
                    "rel_err_vs_exact": None
                    if exact is None
                    else ((outs[name] - exact).norm() / exact.norm()).item(),
                    "sgemm_proj_gflops": rate["proj"],
                    "sgemm_square_gflops": rate["square2048"],
                }
                if name != "sdpa":
                    row["gflops"] = rf_flops(L, causal) / med / 1e9
                rows.append(row)
            print(
                f"L={L} causal={causal}: "
                + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items()),
                flush=True,
            )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
    }
    md = _markdown(rows, notes, machine)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.md").write_text(md)
        (out_dir / "results.json").write_text(
            json.dumps({"machine": machine, "notes": notes, "rows": rows}, indent=1)
        )
    print(md)
    return rows


def _markdown(rows, notes, machine):
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    lines = [
        f"# CPU attention, B=1 H={H} d={D} m={M} float32, {machine['threads']} threads, "
        f"torch {machine['torch']}",
        "",
        "Median ms over interleaved rounds (all providers timed in turn each round).",
        "",
        "| L | causal | "
        + " | ".join(provs)
        + " | rfbench vs performer | rfbench vs plain | rfbench GFLOP/s | sgemm GFLOP/s (proj / 2048^2) |",
        "|---" * (len(provs) + 6) + "|",
    ]
    key = {(r["L"], r["causal"], r["provider"]): r for r in rows}
    for causal in (False, True):
        for L in sorted({r["L"] for r in rows}):
            rr = {p: key.get((L, causal, p)) for p in provs}
            if not any(rr.values()):
                continue
            cell = lambda p: "-" if rr[p] is None else f"{rr[p]['median_ms']:.1f}"  # noqa: E731
            me = rr["rfbench"]
            ratio = lambda p: "-" if rr.get(p) is None else f"{rr[p]['median_ms'] / me['median_ms']:.2f}x"  # noqa: E731
            lines.append(
                f"| {L} | {causal} | "
                + " | ".join(cell(p) for p in provs)
                + f" | {ratio('performer')} | {ratio('plain_posrf')} | {me['gflops']:.0f}"
                + f" | {me['sgemm_proj_gflops']:.0f} / {me['sgemm_square_gflops']:.0f} |"
            )
    lines += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--L", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    run(a.L, a.threads, a.rounds, a.out)


if __name__ == "__main__":
    main()
