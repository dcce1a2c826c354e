"""A real cluster launch, end to end: ``ray up cluster/local.yaml``, ``ray submit
cluster/local.yaml sweeps/eg_vs_gd.py --smoke-test`` and ``ray down``, as the README tells
users, over a real OpenSSH server on 127.0.0.1.

The "machine" is a throwaway user account made for the test (its own home, key, venv and
Ray temp folder), so the head's ``ray stop`` cannot touch anything else running here and
nothing of the test outlives it. What the test changes in the copy of cluster/local.yaml
is only what names the machine: head_ip, ssh_user and key, and a ProxyCommand to the
server's port (Ray's SSH runner has no port option, and port 22 may belong to a real
server). file_mounts, setup (a venv, ``pip install -e ~/qsweep``, the data check) and the
Ray start commands run as written. Needs root (useradd, sshd) and Debian's
openssh-server and rsync; `.ci/run` installs them. About 4 minutes, most of it the head's
``pip install``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
USER = "qsweep-e2e"
OPTIMIZERS = {"gd", "gd_sign", "eg", "egpm", "adam_gd", "adam_eg", "madam", "lns_madam"}


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root: it adds a throwaway user and starts an SSH server"
    for tool, package in ((SSHD, "openssh-server"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client"), ("rsync", "rsync"),
                          ("useradd", "passwd"), (RAY, "ray (pip)")):
        if not shutil.which(tool):
            return f"{tool} not found: install {package}"
    for port in (6379, 8265):  # the head's Ray ports in cluster/local.yaml
        if _listening(port):
            return f"port {port} is in use here (a Ray cluster running?)"
    return None


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


pytestmark = [pytest.mark.ray, pytest.mark.cluster,
              pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]

PROXY = """\
import os, socket, sys, threading
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def upstream():
    while data := os.read(0, 65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := conn.recv(65536):
    os.write(1, data)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def _user_pids() -> list[int]:
    try:
        uid = pwd.getpwnam(USER).pw_uid
    except KeyError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except (OSError, IndexError):
            pass
    return pids


def _wait_no_user_processes(seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while (pids := _user_pids()) and time.time() < deadline:
        time.sleep(1)
    return pids


def _remove_user() -> None:
    """Kills what the user still runs and deletes the account (its home is ours)."""
    for pid in _user_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_no_user_processes(10)
    subprocess.run(["userdel", USER], capture_output=True)


class Machine:
    """A throwaway account on this host with an SSH server for it on 127.0.0.1."""

    def __init__(self, base: Path, data: Path) -> None:
        self.base = base
        self.home = base / "home"  # short: Ray's socket paths live under it
        self.key = base / "key"
        self.port = _free_port()
        _remove_user()  # left by a run that was killed
        _run(["useradd", "--home-dir", str(self.home), "--create-home",
              "--shell", "/bin/bash", USER])
        _run(["usermod", "-p", "*", USER])  # no password, not locked: key login only
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")])
        ssh = self.home / ".ssh"
        ssh.mkdir(mode=0o700)
        (ssh / "authorized_keys").write_text((base / "key.pub").read_text())
        shutil.copytree(data / "MNIST", self.home / "data" / "MNIST")
        # What the machine's owner sets up once: where the datasets are (the YAML's setup
        # keeps a QSWEEP_DATA it finds), and a Ray temp folder of this account's own.
        with open(self.home / ".bashrc", "a") as rc:
            rc.write("export QSWEEP_DATA=$HOME/data\nexport RAY_TMPDIR=$HOME/t\n")
        (self.home / "t").mkdir()
        _run(["chown", "-R", f"{USER}:", str(self.home)])
        (self.home / ".ssh" / "authorized_keys").chmod(0o600)
        (base / "proxy.py").write_text(PROXY)
        self.sshd = self._start_sshd()

    def _start_sshd(self) -> subprocess.Popen:
        config = self.base / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}",
            f"HostKey {self.base / 'host_key'}", f"PidFile {self.base / 'sshd.pid'}",
            "AuthorizedKeysFile .ssh/authorized_keys", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", f"AllowUsers {USER}",
            "Subsystem sftp internal-sftp", ""]))
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation folder
        proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.base / "sshd.log")])
        deadline = time.time() + 20
        while not _listening(self.port):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError("sshd did not listen: " +
                                     (self.base / "sshd.log").read_text())
            time.sleep(0.2)
        return proc

    def cluster_yaml(self, name: str) -> Path:
        """cluster/local.yaml pointed at this machine: nothing else changed."""
        config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
        config["cluster_name"] = name
        config["provider"]["head_ip"] = "127.0.0.1"
        config["provider"]["worker_ips"] = []
        config["auth"] = {"ssh_user": USER, "ssh_private_key": str(self.key),
                          "ssh_proxy_command": f"{sys.executable} {self.base / 'proxy.py'} "
                                               f"{self.port}"}
        path = self.base / "cluster.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def stop_server(self) -> None:
        self.sshd.terminate()
        self.sshd.wait(timeout=30)


def _ray(*args: str, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "QSWEEP_"))}
    out = subprocess.run([RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"ray {args[0]}: " + out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def test_ray_up_submit_down_on_a_local_cluster(tiny_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    base = Path(tempfile.mkdtemp(prefix="qe2e-"))  # short: Ray's socket paths
    base.chmod(0o755)
    name = f"qsweep-e2e-{os.getpid()}"
    machine: Machine | None = None
    launched = False
    try:
        machine = Machine(base, tiny_root)
        config = machine.cluster_yaml(name)
        launched = True
        up = _ray("up", "-y", "--no-config-cache", str(config), timeout=1800)
        assert "Successfully installed" in up and "qsweep" in up  # setup ran pip install
        sessions = list((machine.home / "t" / "ray").glob("session_2*"))
        assert len(sessions) == 1, sessions  # `ray start --head` on the head

        out = _ray("submit", str(config), "sweeps/eg_vs_gd.py", "--smoke-test", timeout=1200)
        assert "=== eg_vs_gd: test_acc over seeds per cell ===" in out, out[-3000:]
        # The driver joined the head's cluster: no embedded Ray of its own.
        assert list((machine.home / "t" / "ray").glob("session_2*")) == sessions

        _ray("down", "-y", str(config), timeout=300)
        launched = False
        # ray down stopped Ray on the head; the SSH master connection ends after its
        # ControlPersist (10 s): then nothing of the account runs.
        left = _wait_no_user_processes(60)
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]

        client = MlflowClient(f"sqlite:///{machine.home / 'mlflow.db'}")
        runs = client.search_runs(
            [client.get_experiment_by_name("eg_vs_gd").experiment_id], max_results=1000)
        # KILLED: search trials halving stopped at their rung (the smoke test's 2 points
        # per cell: 1 goes on), and they say so.
        assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
        assert all("stopped_early" in r.data.tags for r in runs if r.info.status == "KILLED")
        study = [r for r in runs if r.data.tags.get("kind") == "study"]
        assert len(study) == 1
        seeds = [r for r in runs
                 if r.data.tags.get("phase") == "final" and "trial_id" in r.data.tags]
        assert {r.data.tags["optimizer"] for r in seeds} == OPTIMIZERS
        assert len(seeds) == 2 * len(OPTIMIZERS)  # the smoke test's 2 seeds per cell
        assert all(0 <= r.data.metrics["test_acc"] <= 1 for r in seeds)
        artifacts = {a.path for a in client.list_artifacts(study[0].info.run_id)}
        assert {"comparison.md", "comparison.table.csv"} <= artifacts
    finally:
        if launched:
            subprocess.run([RAY, "down", "-y", str(config)], cwd=ROOT, capture_output=True,
                           timeout=300)
        if machine is not None:
            machine.stop_server()
        _remove_user()  # also when Machine() failed after useradd
        # The launcher's record of the cluster, in the Ray temp folder of the `ray`
        # commands above (run without RAY_* variables).
        for suffix in ("lock", "state"):
            Path(os.environ.get("TMPDIR", "/tmp"), "ray", f"cluster-{name}.{suffix}").unlink(
                missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)
    assert not _user_pids()
