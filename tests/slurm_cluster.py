"""A one-node SLURM cluster for the tests, started as the current user in a temporary folder.

`munged`, `slurmctld` and `slurmd` from Debian's `munge` and `slurm-wlm` packages run in the
foreground of the session fixture `slurm_cluster`, on a `slurm.conf` written for this host
(its CPUs and memory as `slurmd -C` reports them), with free ports and no system files or
services. Missing packages fail the test, not skip it: `.ci/run` installs them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "sbatch", "squeue", "scontrol", "scancel")
START_TIMEOUT_S = 60
# Debian installs the daemons in /usr/sbin, which a user's PATH may leave out.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

SLURM_CONF = """\
ClusterName=mnistexp
SlurmctldHost={node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
# Containers have no cgroups to give: processes are tracked through /proc, tasks not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd: finished jobs are asked of slurmctld, which keeps them for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
# A job this node can never run is refused by sbatch instead of pending for ever.
EnforcePartLimits=ALL
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """The running cluster: its `slurm.conf` (exported as `SLURM_CONF`) and node name."""

    folder: Path
    conf: Path
    node: str

    def run(self, tool: str, *args: str) -> str:
        """A client command's stdout (`scontrol`, `sinfo`, ...), raising when it fails."""
        env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH}
        proc = subprocess.run(
            [tool, *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        if proc.returncode:
            raise AssertionError(f"{tool} {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (`JobState`, `ArrayJobId`, ...): finished jobs too."""
        fields = self.run("scontrol", "show", "job", "--oneliner", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def logs(self) -> str:
        """The end of each daemon's log, for a failure message."""
        parts = []
        for name in DAEMONS:
            log = self.folder / f"{name}.out"
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"--- {name}:\n{text[-2000:]}")
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_packages() -> None:
    missing = [tool for tool in DAEMONS + CLIENTS if not shutil.which(tool, path=SEARCH_PATH)]
    if missing:
        pytest.fail(
            f"SLURM is not installed (no {', '.join(missing)}): "
            "apt-get install slurm-wlm munge (.ci/run does it)"
        )


def _node_line() -> tuple[str, str]:
    """This host as slurm.conf declares a node (`NodeName=... CPUs=... RealMemory=...`)."""
    out = subprocess.run(
        ["slurmd", "-C"], env={**os.environ, "PATH": SEARCH_PATH},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = out.splitlines()[0]
    return line, line.split()[0].removeprefix("NodeName=")


def _wait(
    what: str, ready: Callable[[], bool], procs: list[subprocess.Popen], cluster: SlurmCluster
) -> None:
    """Poll `ready()` until true; fail with the daemons' logs if one exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        ended = [p.args[0] for p in procs if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            why = f"{', '.join(ended)} exited" if ended else f"not within {START_TIMEOUT_S} s"
            pytest.fail(f"SLURM test cluster: {what}: {why}\n{cluster.logs()}")
        time.sleep(0.2)


def _node_idle(cluster: SlurmCluster) -> bool:
    try:
        return cluster.run("sinfo", "--noheader", "--Node", "--format=%T").strip() == "idle"
    except (AssertionError, subprocess.TimeoutExpired):  # slurmctld not listening yet
        return False


def _stop(procs: list[subprocess.Popen], cluster: SlurmCluster) -> None:
    """Cancel what still runs, then end the daemons, last started first."""
    # Job steps outlive slurmd, so jobs a failed test left are cancelled while it lives.
    if len(procs) == len(DAEMONS) and all(p.poll() is None for p in procs):
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            cluster.run("scancel", "--user", pwd.getpwuid(os.getuid()).pw_name)
            deadline = time.monotonic() + 15
            while cluster.run("squeue", "--noheader").strip() and time.monotonic() < deadline:
                time.sleep(0.5)
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-node cluster, idle and ready for `sbatch`; `SLURM_CONF` names it meanwhile."""
    _require_packages()
    # Under /tmp: a munge socket path must fit in 108 bytes. munged wants its socket's
    # folder searchable by everyone (0755), and its key readable by its owner alone.
    folder = Path(tempfile.mkdtemp(prefix="mnist-exp-slurm-", dir="/tmp"))
    folder.chmod(0o755)
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node_line, node = _node_line()
    cluster = SlurmCluster(folder, folder / "slurm.conf", node)
    munge_socket = folder / "munge.socket"
    cluster.conf.write_text(
        SLURM_CONF.format(
            node=node,
            node_line=node_line,
            user=pwd.getpwuid(os.getuid()).pw_name,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            munge_socket=munge_socket,
            folder=folder,
        )
    )
    commands = {
        "munged": ["--foreground", f"--socket={munge_socket}", f"--key-file={key}",
                   f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed",
                   f"--log-file={folder}/munged.log"],
        "slurmctld": ["-D"],
        "slurmd": ["-D", "-N", node],
    }  # fmt: skip
    env = {**os.environ, "SLURM_CONF": str(cluster.conf), "PATH": SEARCH_PATH}
    procs: list[subprocess.Popen] = []
    with pytest.MonkeyPatch.context() as patch:
        try:
            for name in DAEMONS:
                with open(folder / f"{name}.out", "wb") as out:
                    procs.append(
                        subprocess.Popen(
                            [shutil.which(name, path=SEARCH_PATH) or name, *commands[name]],
                            cwd=folder,
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )  # fmt: skip
                    )
                if name == "munged":
                    _wait("munged's socket", munge_socket.exists, procs, cluster)
            _wait(f"node {node} idle", lambda: _node_idle(cluster), procs, cluster)
            # Jobs inherit the submitting environment, so their srun finds the cluster too.
            patch.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
        finally:
            _stop(procs, cluster)
            shutil.rmtree(folder, ignore_errors=True)
