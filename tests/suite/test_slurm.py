"""``rfbench run --executor slurm`` on a real (one-node) Slurm cluster started for the test.

The quick suite runs as a job array through submitit; every column but the wall-clock ones must
equal an inline run's. The daemons (munged, slurmctld, slurmd) are started directly and stopped by
their pids; where they cannot start here (packages absent, not root, a container that forbids
them), the test is skipped and says why. Bounded: each step has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas.testing as pdt
import pytest

from rfbench import results as R
from rfbench.results import store
from rfbench.suite import runner

pytestmark = pytest.mark.slurm
pytest.importorskip("submitit")

RUN_TIMEOUT_S = 480  # the quick suite as 4 array tasks takes about a minute on a 2-core machine


# --------------------------------------------------------------------------- a one-node cluster
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")
NEEDED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun")
START_S = 45.0  # a daemon or the node that is not up by then will not come up


class Unavailable(RuntimeError):
    """The cluster cannot start on this machine (the message says why)."""


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path) or shutil.which(f"{name}-wlm", path=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, sock: Path) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=rfbenchci
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MaxArraySize=20001
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=localhost CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"


def _wait(check, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise Unavailable(f"{what} did not come up within {START_S:.0f} s; log: {_tail(log)}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pid_files: list[Path]) -> None:
    """SIGTERM each daemon by its pid file, then SIGKILL what is still there after 10 s."""
    pids = [p for p in (_pid(f) for f in pid_files) if p]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def one_node_slurm(root: Path):
    """Start munged, slurmctld and slurmd under ``root``; yield the clients' environment."""
    missing = [name for name in NEEDED if _which(name) is None]
    if missing:
        raise Unavailable(
            f"{', '.join(missing)} not found (apt-get install -y slurm-wlm munge, as in .ci/run)"
        )
    if os.geteuid() != 0:
        raise Unavailable("the test cluster's daemons run as root; this test runs as another user")
    root = Path(root)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    pid_files = [root / "munge" / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, sock))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env["PATH"] = os.pathsep.join([os.path.dirname(_which("sbatch")), env.get("PATH", "")])
    try:
        _run(root, [_which("mungekey"), "--create", f"--keyfile={key}"], "mungekey")
        os.chmod(key, 0o400)
        _run(
            root,
            [
                _which("munged"),
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={pid_files[0]}",
                f"--log-file={root / 'munge' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
            "munged",
        )
        _wait(sock.exists, "munged", root / "munge" / "munged.log")
        _run(root, [_which("slurmctld"), "-f", str(conf)], "slurmctld", env)
        _run(root, [_which("slurmd"), "-f", str(conf), "-N", "localhost"], "slurmd", env)

        def idle() -> bool:
            r = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20
            )
            return r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated")

        _wait(idle, "the node (sinfo: idle)", root / "slurmd.log")
        yield env
    finally:
        if conf.exists() and _pid(pid_files[1]):
            _cancel_all(env)
        _stop(pid_files[::-1])


def _cancel_all(env: dict) -> None:
    """Cancel every job left (stopping slurmd alone would leave their processes running)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=20)
            if q.returncode != 0 or not q.stdout.strip():
                return
            time.sleep(1)


def _run(root: Path, cmd: list[str], what: str, env: dict | None = None) -> None:
    """Run a daemon's start command (it forks and returns); output to a file, not a pipe, which
    the forked daemon could hold open."""
    out = root / f"{what}.out"
    with open(out, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=60)
    if r.returncode != 0:
        raise Unavailable(f"{what} failed (exit {r.returncode}): {_tail(out, 3)}")


# --------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def cluster():
    # a short folder of its own: the munge socket's path must fit a unix socket name (108 bytes)
    root = Path(tempfile.mkdtemp(prefix="rfbench-slurm-", dir="/tmp"))
    try:
        with one_node_slurm(root) as env:
            _smoke(env, root)
            yield env
    except Unavailable as exc:
        print(f"slurm test skipped: {exc}")
        pytest.skip(f"no one-node Slurm here: {exc}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _smoke(env: dict, root: Path) -> None:
    """One trivial batch job: a cluster that cannot run even this is an environment problem."""
    try:
        r = subprocess.run(
            ["sbatch", "--wait", "--time=1", "-o", str(root / "smoke.out"), "--wrap", "true"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        _cancel_all(env)
        raise Unavailable("a trivial sbatch job did not finish within 90 s") from None
    if r.returncode != 0:
        raise Unavailable(f"a trivial sbatch job failed: {(r.stderr or r.stdout).strip()[-300:]}")


def _rfbench(env: dict, *args, timeout: float):
    return subprocess.run(
        [sys.executable, "-m", "rfbench.cli", *map(str, args)],
        env={**env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _stable(df):
    return df.drop(columns=list(R.TIMED_COLUMNS)).sort_values(["cell", "seed_index"]).reset_index(drop=True)


def test_quick_suite_as_a_job_array_matches_inline(cluster, tmp_path):
    out = tmp_path / "slurm"
    t0 = time.perf_counter()
    try:
        r = _rfbench(
            cluster,
            "run",
            "quick",
            "--out",
            out,
            "--device",
            "cpu",
            "--executor",
            "slurm",
            "--cells-per-task",
            23,
            "--cpus",
            1,
            "--mem-gb",
            0.25,
            "--time-min",
            10,
            "--quiet",
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        _cancel_all(cluster)
        logs = sorted((out / "logs").glob("*/*_log.err"))
        tail = logs[-1].read_text(errors="replace")[-1500:] if logs else "(no task log)"
        pytest.fail(f"the slurm run did not end within {RUN_TIMEOUT_S} s; last task log:\n{tail}")
    wall = time.perf_counter() - t0
    print(f"slurm run of the quick suite: {wall:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "logs" / "submission.json").read_text())
    n_cells = len(record["cells"])
    assert record["executor"] == "slurm"
    assert n_cells == 90 and record["tasks"] == 4  # ceil(90 / 23) tasks
    assert sorted(j["shard"] for j in record["jobs"]) == list(range(1, 5))
    assert all(j["attempts"] == 1 for j in record["jobs"]), r.stderr[-3000:]  # no task failed
    assert len({j["job_id"].split("_")[0] for j in record["jobs"]}) == 1  # one job array

    inline = runner.run_suite("quick", tmp_path / "inline", device="cpu", progress=False)
    a, b = store.load_results(inline), store.load_results(out)
    assert b["cell"].nunique() == n_cells and not b.duplicated(["cell", "seed_index"]).any()
    pdt.assert_frame_equal(_stable(b), _stable(a))
    sa = store.load_summary(inline).drop(columns=[c for c in store.load_summary(inline) if _timed(c)])
    sb = store.load_summary(out)[sa.columns]
    pdt.assert_frame_equal(
        sb.sort_values("cell").reset_index(drop=True), sa.sort_values("cell").reset_index(drop=True)
    )

    s = _rfbench(cluster, "status", out, timeout=120)
    assert s.returncode == 0, s.stderr
    assert f"{n_cells} cells: {n_cells} done, 0 failed, 0 pending" in s.stdout
    assert "no task queued or running" in s.stdout


def _timed(column: str) -> bool:
    return any(column == t or column.startswith(f"{t}_") for t in R.TIMED_COLUMNS)
