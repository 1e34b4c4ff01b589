"""``rfbench run``: run a suite's cells and write its results folder (orchestration only).

    run_suite("suites/quick.toml", out="reports/quick")

The parts: ``spec`` reads the suite, ``sources`` resolves its data, ``plan`` lists its cells
(keys, seeds and token splits, computed once), ``folder`` checks the out folder and what
``--resume`` skips, ``cells`` runs one cell (``measure`` times it), ``provenance`` fills
this run's record (``runs/<run id>.json``), ``rfbench.results`` claims each cell before it
runs (``claims``), stores every finished cell at once, atomically, and consolidates
results.parquet and summary.parquet, and ``terminal`` prints the summary.

Every cell's failure is recorded (``skipped`` with its reasons, ``oom``, ``error`` with the
message) and the sweep goes on. ``--resume`` skips cells already written with status ok,
skipped or oom, and re-runs cells that ended in ``error``. ``--shard I/N`` runs cells I, I+N,
I+2N, ... (1-based) of the suite's canonical order. Any number of runs, shards and array tasks
may share one results folder (``run_suite`` says how).

Exit status of ``rfbench run``: 0 when every cell is ok, skipped or oom; 1 when a cell ended in
``error``; 2 for a bad suite or option (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from rfbench.errors import DataError, EstimatorError, RFBenchError, SpecError, UnsupportedError
from rfbench.results import store
from rfbench.results.claims import Claims
from rfbench.results.meta import Meta, new_run_id, write_run
from rfbench.results.store import load_summary
from rfbench.results.summary import worst_status
from rfbench.suite import cells as C
from rfbench.suite import executors, folder, provenance
from rfbench.suite.executor_spec import EXECUTORS, ExecutorSpec, with_overrides
from rfbench.suite.plan import Cell, learnable, parse_shard, plan, resolve_devices, select_shard
from rfbench.suite.sources import Source, prepare_sources
from rfbench.suite.spec import load_suite, suite_from_dict
from rfbench.suite.spec_types import Suite
from rfbench.suite.terminal import format_summary


def _as_suite(spec_or_path) -> Suite:
    if isinstance(spec_or_path, Suite):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        return suite_from_dict(spec_or_path)
    return load_suite(spec_or_path)


def _check_fit(suite: Suite, sources: list[Source]) -> None:
    """Refuse, before any cell runs, a [fit] config that cannot train one of the suite's learners."""
    from rfbench.learning import check_config
    from rfbench.registry import make_estimator

    if suite.fit is None or not sources:
        return
    overridden = dict(suite.fit.overrides)
    m = next(iter(suite.sweep.num_features.values()))[0]
    for spec in suite.estimators:
        if not learnable(spec):
            continue
        try:
            est = make_estimator(
                spec.name,
                sources[0].dim,
                m,
                0,
                feature_params=spec.feature_params,
                weight_params=spec.weight_params,
                **spec.params,
            )
        except UnsupportedError:
            continue  # its cells are skipped with the reason
        try:
            check_config(est, suite.fit.config_for(spec.name))
        except EstimatorError as exc:
            where = f'fit.estimators."{spec.name}"' if spec.name in overridden else "fit"
            raise SpecError(f"{suite.source}: {where}: {exc}") from None


def run_suite(
    spec_or_path, out=None, *, device=None, resume=False, shard=None, progress=None, cells=None
) -> Path:
    """Run a suite (a Suite, a parsed dict, a TOML path or a ready suite's name); return the results folder.

    out: the folder (default ``reports/<suite name>`` under the current directory).
    device: "cpu", "cuda" or "auto" to override the suite's device axis.
    resume: skip cells already finished in ``out`` (status ok, skipped or oom); re-run the others.
    shard: ``(i, n)`` or "i/n": run only cells i, i+n, ... (1-based) of the canonical order.
    progress: show a progress bar (default: when stderr is a terminal).
    cells: run only these cell ids (of the shard, if one is given): how an executor hands a task
        its cells. An id the suite does not plan is a SpecError.

    Any number of calls, in any processes and on any hosts, may write one folder at once: each
    claims a cell before computing it (``rfbench.results.claims``), skips cells another writer
    has finished, waits for those another live writer holds (taking them over if it dies), writes
    its own run record (``runs/<run id>.json``, listing the cells it computed) and consolidates
    under the folder lock. A call killed loses at most its cell in flight. Folder I/O failures
    (a full disk, a read-only folder) raise DataError with one line; a resume with nothing left
    to do succeeds on a read-only folder too.
    """
    suite = _as_suite(spec_or_path)
    out = Path(out) if out is not None else Path("reports") / suite.name
    shard = parse_shard(shard) if isinstance(shard, str) or shard is None else tuple(shard)
    if shard is not None and not (1 <= shard[0] <= shard[1]):
        raise SpecError(f"shard must be (i, n) with 1 <= i <= n, got {shard}")
    devices = resolve_devices(suite, device)
    sources = prepare_sources(suite)
    _check_fit(suite, sources)
    planned = plan(suite, sources, devices)
    mine = select_shard(planned, shard)
    if cells is not None:
        wanted = set(cells)
        unknown = wanted - {c.cell for c in mine}
        if unknown:
            raise SpecError(f"cells {', '.join(sorted(unknown)[:3])} are not cells of this suite (or shard)")
        mine = [c for c in mine if c.cell in wanted]
    with _folder_io(out):
        state = folder.open_folder(out, suite, planned, mine, resume)
    todo = [c for c in mine if c.cell not in state.done]
    run = provenance.run_record(
        resume=resume,
        shard=shard,
        devices=devices,
        total=len(planned),
        todo=len(todo),
        done=len(mine) - len(todo),
        argv=sys.argv,
    )
    run.update(run_id=new_run_id(), start_unix=time.time())
    meta = provenance.build_meta(suite, devices, None)
    meta.runs = [run]
    meta.command = list(sys.argv)
    if not todo and resume:
        print(
            f"rfbench run: nothing left to do in {out}: its {len(mine)} cell(s) are finished", file=sys.stderr
        )
        run.update(end_time=provenance.now(), status="finished", cells_computed=[], cells_done_by_others=0)
        meta.end_time = run["end_time"]
        with contextlib.suppress(OSError, RFBenchError):  # a read-only folder is read as it is
            write_run(out, meta)
            store.repair_tables(out)
        return out
    if resume and len(todo) < len(mine) and progress is not False:
        print(f"rfbench run: resuming {out}: {len(mine) - len(todo)} of {len(mine)} cell(s) finished "
              f"and kept, {len(todo)} to run", file=sys.stderr)
    threads_before = torch.get_num_threads()
    if suite.timing.threads:
        torch.set_num_threads(suite.timing.threads)
    # the record states the threads the cells run with (timing.threads), not the process default
    meta.machine.torch_threads = torch.get_num_threads()
    try:
        with _folder_io(out):
            folder.repair(out)
            write_run(out, meta)
        show = sys.stderr.isatty() if progress is None else bool(progress)
        _sweep(suite, out, todo, [c.cell for c in planned], meta, state, show)
    finally:
        torch.set_num_threads(threads_before)
    return out


@contextlib.contextmanager
def _folder_io(out: Path):
    """Turn a failed read or write of the results folder into one line (DataError)."""
    try:
        yield
    except OSError as exc:
        raise DataError(_io_message(out, exc)) from None


def _io_message(out: Path, exc: OSError) -> str:
    what = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space, then run again with --resume"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "the folder is not writable: choose another --out, or make it writable"
    else:
        fix = "check the folder, then run again with --resume"
    return f"cannot write the results folder {out}: {what}; {fix}"


#: Seconds between looks at cells other writers hold (doubling up to the second figure).
_FIRST_PAUSE_S, _MAX_PAUSE_S = 0.05, 2.0


def _sweep(
    suite: Suite, out: Path, todo: list[Cell], order: list[str], meta: Meta, state, show: bool
) -> None:
    """Claim and run each cell of ``todo``, writing each as it finishes; consolidate and close
    this run's record whatever happens. Returns when every cell of ``todo`` is finished, here or
    by another writer (whose claim, should it die, expires: ``rfbench.results.claims``)."""
    run = meta.runs[0]
    counts: dict[str, int] = {}
    computed: list[str] = []
    by_others = 0  # cells another writer finished meanwhile
    ctx_holder: dict = {}
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="cell", file=sys.stderr, dynamic_ncols=True, desc=suite.name)
    status, failure = "interrupted", None
    try:
        with Claims(out, run["run_id"]) as claims:
            pending, pause = list(todo), _FIRST_PAUSE_S
            while pending:  # a cell another live writer holds is waited for (or taken over if it dies)
                held = []
                for cell in pending:
                    if bar is not None:
                        bar.set_postfix_str(cell.label()[:60], refresh=False)
                    if _written_meanwhile(out, cell, state):
                        by_others += 1
                    elif not claims.claim(cell.cell):
                        held.append(cell)
                        continue
                    elif _written_meanwhile(out, cell, state):  # finished just before the claim
                        claims.release(cell.cell)
                        by_others += 1
                    else:
                        try:
                            worst = _run_one(suite, out, cell, run["run_id"], ctx_holder)
                        finally:
                            claims.release(cell.cell)
                        computed.append(cell.cell)
                        counts[worst] = counts.get(worst, 0) + 1
                    if bar is not None:
                        bar.update(1)
                pause = _FIRST_PAUSE_S if len(held) < len(pending) else min(2 * pause, _MAX_PAUSE_S)
                pending = held
                if pending:
                    time.sleep(pause)
        status = "finished"
    except OSError as exc:
        status, failure = "failed", _io_message(out, exc)
        raise DataError(failure) from None
    finally:
        if bar is not None:
            bar.close()
        ctx_holder.clear()
        run.update(
            end_time=provenance.now(),
            status=status,
            status_counts=counts,
            cells_computed=computed,
            cells_done_by_others=by_others,
        )
        if failure:
            run["message"] = failure
        meta.end_time = run["end_time"]
        _close(out, order, meta, failing=status != "finished")


def _close(out: Path, order: list[str], meta: Meta, failing: bool) -> None:
    """Write the run record and consolidate; when the run is failing already, only try."""
    try:
        with _folder_io(out):
            write_run(out, meta)
            store.consolidate(out, order)
    except DataError:
        if not failing:
            raise


def _written_meanwhile(out: Path, cell: Cell, state) -> bool:
    """Whether another writer wrote ``cell`` after this run looked at the folder."""
    path = store.cell_path(out, cell.cell)
    try:
        info = store.cell_info(path)
    except (DataError, FileNotFoundError):
        return False
    return info.meta.get("run_id") != state.seen.get(cell.cell) or folder.is_done(info, cell)


def _run_one(suite: Suite, out: Path, cell: Cell, run_id: str, ctx_holder: dict) -> str:
    """Compute one claimed cell and write it; return its worst status."""
    t0 = time.perf_counter()
    rows, stats = C.run_cell(cell, ctx_holder, suite)
    curves = stats.pop("fit_curves", None)
    if curves:  # before the cell file: a cell written is a cell complete
        store.write_fit_curves(out, cell.cell, _curve_frame(cell, curves))
    worst = worst_status(r["status"] for r in rows)
    stats = {
        **stats,
        "status": worst,
        "key": cell.key,
        "data": cell.source.label,
        "run_id": run_id,
        "wall_s": time.perf_counter() - t0,
    }
    store.write_cell(out, cell.cell, rows, stats)
    return worst


def _curve_frame(cell: Cell, curves: list) -> pd.DataFrame:
    df = pd.concat(curves, ignore_index=True)
    first = {
        "cell": cell.cell,
        "estimator": cell.name,
        "data": cell.source.label,
        "num_features": cell.num_features,
    }
    for i, (col, value) in enumerate(first.items()):
        df.insert(i, col, value)
    order = [*first, "seed", "seed_index", "step", "train_loss", "val_loss"]
    return df[order]


# --------------------------------------------------------------------------- CLI
#: the executor flags of ``rfbench run``: flag -> (ExecutorSpec field, type, help)
_EXECUTOR_FLAGS = {
    "--tasks": ("tasks", int, "array tasks to group the cells into"),
    "--cells-per-task": ("cells_per_task", int, "cells per array task (instead of --tasks)"),
    "--retries": ("retries", int, "times a failed or preempted task is run again (default 2)"),
    "--partition": ("partition", str, "slurm partition"),
    "--account": ("account", str, "slurm account"),
    "--time-min": ("time_min", int, "minutes per task (slurm --time; local: its time limit)"),
    "--cpus": ("cpus", int, "CPUs per task"),
    "--mem-gb": ("mem_gb", float, "memory per task in GB"),
    "--gpus": ("gpus", int, "GPUs per task"),
    "--array-parallelism": ("array_parallelism", int, "at most this many tasks at once"),
    "--max-array-size": ("max_array_size", int, "the cluster's largest job array (default 1000)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="a suite TOML file, or the name of a ready suite (e.g. quick)")
    parser.add_argument("--out", help="results folder (default: reports/<suite name>)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the suite's device axis")
    parser.add_argument("--resume", action="store_true", help="skip cells already finished in --out")
    parser.add_argument("--shard", metavar="I/N", help="run only shard I of N (1-based)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the suite and list its cells; run nothing"
    )
    g = parser.add_argument_group("executor (default: the suite's [executor] section, else inline)")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="inline: this process; local: worker processes; slurm: a job array",
    )
    g.add_argument("--no-wait", action="store_true", help="submit and return (watch with rfbench status DIR)")
    for flag, (_, kind, help_text) in _EXECUTOR_FLAGS.items():
        g.add_argument(flag, type=kind, help=help_text)
    g.add_argument(
        "--sbatch", action="append", metavar="FLAG", help="a further sbatch flag, e.g. --sbatch=--qos=high"
    )


def _executor(suite: Suite, args: argparse.Namespace) -> ExecutorSpec:
    given = {
        field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in _EXECUTOR_FLAGS.items()
    }
    given["name"] = args.executor
    if args.sbatch:
        given["sbatch"] = tuple(suite.executor.sbatch) + tuple(args.sbatch)
    spec = with_overrides(suite.executor, given)
    if spec.name != "inline" and args.shard:
        raise SpecError(
            f"--shard is for inline runs; --executor {spec.name} shards the suite itself (--tasks)"
        )
    return spec


def main(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    spec = _executor(suite, args)
    if args.dry_run:
        devices = resolve_devices(suite, args.device)
        cells = plan(suite, prepare_sources(suite), devices)
        for c in select_shard(cells, parse_shard(args.shard)):
            print(f"{c.cell}  {c.label()}" + (f"  [skip: {c.skip}]" if c.skip else ""))
        print(f"{len(cells)} cells", file=sys.stderr)
        if spec.name != "inline":
            print(f"{spec.name}: {executors.tasks_note(spec, len(cells))}", file=sys.stderr)
        return 0
    if spec.name == "inline":
        out = run_suite(
            suite,
            args.out,
            device=args.device,
            resume=args.resume,
            shard=args.shard,
            progress=False if args.quiet else None,
        )
        return _finish(out, args.quiet)
    return _submit(suite, spec, args)


def _submit(suite: Suite, spec: ExecutorSpec, args: argparse.Namespace) -> int:
    """``--executor local|slurm``: plan here, submit the array tasks, wait for them (or not)."""
    out = Path(args.out) if args.out is not None else Path("reports") / suite.name
    devices = executors.planned_devices(suite, args.device, spec)
    sources = prepare_sources(suite)
    _check_fit(suite, sources)
    cells = plan(suite, sources, devices)
    folder.open_folder(out, suite, cells, cells, args.resume)  # refuse a wrong folder before submitting
    finished = set(store.finished_cells(out, folder.KEPT_ON_RESUME)) if args.resume else set()
    if not args.quiet:
        print(f"rfbench run: {spec.name}: {executors.tasks_note(spec, len(cells))}", file=sys.stderr)
    # the tasks get the planned device, so their cells are the cells counted here
    task_device = args.device or (devices[0] if len(devices) == 1 else None)
    outcome = executors.submit(
        suite,
        out.resolve(),
        cells,
        spec,
        run=run_suite,
        device=task_device,
        finished=finished,
        wait=not args.no_wait,
        show=False if args.quiet else None,
    )
    if not outcome.waited:
        print(f"submitted {spec.name} job(s) {', '.join(outcome.job_ids) or '(none: nothing left to run)'}")
        print(f"logs: {out}/logs/   watch: rfbench status {out}   then: rfbench report {out}")
        return 0
    store.consolidate(out, [c.cell for c in cells])
    code = _finish(out, args.quiet)
    for shard, error in sorted(outcome.failed.items()):
        print(f"rfbench run: task {shard} failed after {spec.retries} retries: {error}", file=sys.stderr)
    if outcome.failed:
        print(
            f"rfbench run: {len(outcome.failed)} task(s) failed; `rfbench run ... --resume` runs what is "
            f"missing (rfbench status {out})",
            file=sys.stderr,
        )
        return 1
    return code


def _finish(out: Path, quiet: bool) -> int:
    summary = load_summary(out)
    if not quiet:
        print(format_summary(summary))
        print(f"\nresults: {out}")
    n_error = int((summary["status"] == "error").sum())
    if n_error:
        print(
            f"rfbench run: {n_error} cell(s) ended in error; see the message column of {out}/results.parquet",
            file=sys.stderr,
        )
        return 1
    return 0
