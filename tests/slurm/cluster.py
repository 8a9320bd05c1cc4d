"""A one-node SLURM cluster for tests and for trying the SLURM profile by hand (root, Debian/Ubuntu).

    python tests/slurm/cluster.py install       # apt-get slurm-wlm and munge when slurmctld is missing
    python tests/slurm/cluster.py start         # munged, slurmctld, slurmd; waits until the node is idle
    python tests/slurm/cluster.py run --timeout 1200 -- snakemake --profile workflow/profiles/slurm ...
    python tests/slurm/cluster.py stop          # stops the daemons by the PIDs they wrote

The node declares every CPU and most of the memory of this machine, and `--gpus N` fake GPUs (a generic
resource backed by /dev/null) so rules that request a GPU schedule. There is no accounting daemon:
run Snakemake with `--slurm-status-command squeue` (the plugin's default, `sacct`, waits forever without
slurmdbd). The configuration must live at /etc/slurm/slurm.conf: the job-step plugin drops SLURM_CONF
before its inner srun. A configuration we did not write is never overwritten.

`run` bounds a command with a timeout: on expiry it sends SIGINT (Snakemake then cancels the jobs it
submitted), waits, kills, and `scancel`s whatever is still queued, so a hung test leaves no jobs behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
GRES = Path("/etc/slurm/gres.conf")
MARK = "# written by gram's tests/slurm/cluster.py"
STATE = Path(os.environ.get("GRAM_SLURM_STATE", "/tmp/gram-slurm"))
MUNGE_PID = Path("/run/munge/munged.pid")


def _node() -> str:
    return socket.gethostname().split(".")[0]


def _mem_mb() -> int:
    """Memory offered to jobs: the machine's, less 2 GB for the system (at least 1 GB)."""
    kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
              if line.startswith("MemTotal:"))
    return max(1024, kb // 1024 - 2048)


def slurm_conf(state: Path, cpus: int, mem_mb: int, gpus: int) -> str:
    node = _node()
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return f"""{MARK}
ClusterName=gramtest
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
EnforcePartLimits=ALL
MinJobAge=3600
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName={node} CPUs={cpus} RealMemory={mem_mb}{gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _alive(pidfile: Path) -> int | None:
    """The PID in `pidfile` when that process is running."""
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _fake_gpus(state: Path, n: int) -> list[Path]:
    """n character devices standing in for GPUs (copies of /dev/null: slurmd only checks they exist)."""
    devs = []
    for i in range(n):
        dev = state / f"gpu{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        devs.append(dev)
    return devs


def _need_root() -> None:
    if os.geteuid() != 0:
        sys.exit("tests/slurm/cluster.py: the test cluster runs its daemons as root; run it as root")


def install() -> None:
    """apt-get slurm-wlm and munge unless slurmctld is already installed."""
    if shutil.which("slurmctld"):
        return
    _need_root()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env).returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def start(state: Path = STATE, gpus: int = 1, timeout: float = 60.0) -> None:
    """Write the configuration, start munged, slurmctld and slurmd, wait until the node is idle."""
    _need_root()
    for tool in ("munged", "slurmctld", "slurmd", "sinfo"):
        if not shutil.which(tool):
            sys.exit(f"tests/slurm/cluster.py: {tool} not found; run `python tests/slurm/cluster.py install`")
    if CONF.exists() and MARK not in CONF.read_text():
        sys.exit(f"{CONF} exists and was not written by this harness; refusing to overwrite a real cluster's config")
    for d in (state / "ctld", state / "d"):
        d.mkdir(parents=True, exist_ok=True)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(slurm_conf(state, os.cpu_count() or 1, _mem_mb(), gpus))
    GRES.write_text(f"{MARK}\nAutoDetect=off\n" + "".join(f"Name=gpu File={dev}\n" for dev in _fake_gpus(state, gpus)))
    if _alive(MUNGE_PID) is None:
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    if _alive(state / "slurmctld.pid") is None:
        subprocess.run(["slurmctld"], check=True)
    if _alive(state / "slurmd.pid") is None:
        subprocess.run(["slurmd"], check=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
        if out and all(s == "idle" for s in out):
            return
        time.sleep(0.5)
    sys.exit(f"tests/slurm/cluster.py: the node is not idle after {timeout:.0f} s (sinfo: {out}); "
             f"see {state}/slurmctld.log and {state}/slurmd.log")


def stop(state: Path = STATE) -> None:
    """Stop slurmd, slurmctld and munged by the PIDs they wrote; remove the configuration we wrote."""
    subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
    for pidfile in (state / "slurmd.pid", state / "slurmctld.pid", MUNGE_PID):
        pid = _alive(pidfile)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if _alive(pidfile) is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    for f in (CONF, GRES):
        if f.exists() and MARK in f.read_text():
            f.unlink()


def launch(cmd: list[str], cwd: str | Path | None = None, stdout=None) -> subprocess.Popen:
    """Start `cmd` in its own process group (so an interrupt reaches it and its children only)."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=stdout, stderr=None if stdout is None else subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for a `launch`ed command; past `timeout` seconds interrupt it (SIGINT cancels Snakemake's
    jobs), then kill it; in any case cancel whatever is still queued. Its exit status (124 on timeout)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"tests/slurm/cluster.py: {proc.args[0]} ran past {timeout:.0f} s; interrupting it", file=sys.stderr)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C would: the command and its children
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124
    finally:
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)


def run(cmd: list[str], timeout: float, cwd: str | None = None) -> int:
    """Run `cmd` bounded by `timeout` (see `finish`). Returns the command's exit status (124 on timeout)."""
    return finish(launch(cmd, cwd), timeout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["install", "start", "stop", "run"])
    p.add_argument("--state", type=Path, default=STATE, help="spool, state, logs and PID files (default %(default)s)")
    p.add_argument("--gpus", type=int, default=1, help="fake GPUs the node declares (default %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="run: seconds before the command is interrupted")
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:len(argv) - len(cmd) - (1 if cmd or "--" in argv else 0)])
    if args.action == "install":
        install()
    elif args.action == "start":
        start(args.state, args.gpus)
    elif args.action == "stop":
        stop(args.state)
    else:
        if not cmd:
            p.error("run needs a command after --")
        sys.exit(run(cmd, args.timeout))


if __name__ == "__main__":
    main()
