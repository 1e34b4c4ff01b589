"""A one-node Slurm cluster on this machine, for tests: munged, slurmctld and slurmd started
directly (no systemd), every file under one scratch folder, stopped by their pids.

    with one_node_slurm(tmp_path) as env:      # env: os.environ plus SLURM_CONF
        subprocess.run(["sbatch", ...], env=env)

``Unavailable`` says why a cluster cannot start here (packages absent, not root, a daemon that
exits); tests skip with its message. Needs Debian's slurm-wlm (22.05) and munge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

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
        _stop(pid_files[::-1])


def _run(root: Path, cmd: list[str], what: str, env: dict | None = None) -> None:
    """Run a daemon's start command (it forks and returns); output to a file, not a pipe, which
    the forked daemon could hold open."""
    out = root / f"{what}.out"
    with open(out, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=60)
    if r.returncode != 0:
        raise Unavailable(f"{what} failed (exit {r.returncode}): {_tail(out, 3)}")
