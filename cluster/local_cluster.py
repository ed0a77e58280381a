"""The one-node `ray up` cluster on this machine (``cluster/local.yaml``): its files, and stopping
exactly its processes. Used by ``cluster/check_local_cluster.sh``; a command per step:

    local_cluster.py render DIR SSH_PORT [PORT_BASE]   local.yaml, sshd_config, the head's HOME
    local_cluster.py ports [PORT_BASE]                 the ports it needs, one a line
    local_cluster.py stop DIR                          stop the Ray processes of DIR/ray only
    local_cluster.py stop-all DIR                      and then the rest of DIR: sshd, ssh clients
    local_cluster.py leftovers DIR                     processes of DIR still alive (exit 1 if any)
    local_cluster.py results STORAGE TRACKING_URI      the sweep's trials and MLflow runs landed

Why not ``ray stop``: it kills every Ray process on the machine (other people's clusters, a test
suite's Ray). A Ray started with ``--temp-dir DIR/ray`` names that folder in the command line of
its GCS, raylet, dashboard, monitor and log monitor; its workers and agents are the raylet's
children. So "this cluster's processes" is: those whose command line names ``DIR/ray/``, plus
their descendants.
"""
from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cluster" / "local.yaml"
PORT_BASE = 26300  # away from Ray's defaults (6379, 8265, 10001-19999, 52365) and the test suite's

# Offsets from the port base; worker ports take the last 40 (two CPUs need a handful).
_OFFSETS = {"GCS": 0, "DASHBOARD": 2, "AGENT_HTTP": 3, "AGENT_GRPC": 4,
            "RUNTIME_ENV": 5, "METRICS": 6, "NODE_MANAGER": 7, "OBJECT_MANAGER": 8,
            "WORKER_MIN": 20, "WORKER_MAX": 59}


def ports(base: int = PORT_BASE) -> dict[str, int]:
    """Every port the head's ``ray start`` binds, by placeholder name (``PORT_GCS`` ...)."""
    return {f"PORT_{name}": base + offset for name, offset in _OFFSETS.items()}


def render_yaml(cluster_dir: str, ssh_port: int, base: int = PORT_BASE,
                python: str = sys.executable) -> str:
    """``cluster/local.yaml`` with its ``@NAMES@`` filled in; the ray CLI is the one next to
    ``python`` (the same venv)."""
    values = {"CLUSTER_DIR": cluster_dir, "SSH_PORT": str(ssh_port), "REPO": str(REPO),
              "PYTHON": python, "RAY": str(Path(python).parent / "ray"),
              **{k: str(v) for k, v in ports(base).items()}}
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = [line for line in text.splitlines() if "@" in line and not line.lstrip().startswith("#")]
    if left:
        raise ValueError(f"{TEMPLATE}: placeholders without a value: {left}")
    return text


def render(cluster_dir: str, ssh_port: int, base: int = PORT_BASE,
           python: str = sys.executable) -> None:
    """Write into ``cluster_dir``: ``local.yaml``; ``ssh/sshd_config`` for the loopback sshd (keys
    made by the caller in ``ssh/``); the head's HOME ``home/`` with a ``.bashrc`` that puts the
    ``ray`` shim first on PATH and sets RAY_ADDRESS to this cluster."""
    root = Path(cluster_dir)
    (root / "ssh").mkdir(parents=True, exist_ok=True)
    (root / "home" / "bin").mkdir(parents=True, exist_ok=True)
    (root / "local.yaml").write_text(render_yaml(cluster_dir, ssh_port, base, python))
    # SetEnv HOME: every SSH session (Ray's commands, its rsync of ~/ray_bootstrap_config.yaml)
    # gets the cluster's home instead of /root, so nothing of the machine's root account changes.
    (root / "ssh" / "sshd_config").write_text(
        f"HostKey {root}/ssh/host_key\n"
        f"AuthorizedKeysFile {root}/ssh/authorized_keys\n"
        f"PidFile {root}/ssh/sshd.pid\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowTcpForwarding local\nX11Forwarding no\n"
        f"SetEnv HOME={root}/home\n")
    venv_bin = Path(python).parent
    # Silent: rsync runs through this shell and fails on any output. PYTHONPATH: the raylet and
    # so every trial worker import this checkout (the venv may hold another one, editable).
    (root / "home" / ".bashrc").write_text(
        f"export PATH={root}/home/bin:{venv_bin}:$PATH\n"
        f"export PYTHONPATH={REPO}\n"
        f"export RAY_ADDRESS=127.0.0.1:{ports(base)['PORT_GCS']}\n")
    # Not `exec nc`: the shell stays, its command line naming the folder, so that a proxy left by
    # an ssh ControlMaster is found as its child.
    proxy = root / "ssh" / "proxy"
    proxy.write_text(f'#!/bin/sh\nnc "$1" {ssh_port}\n')
    proxy.chmod(proxy.stat().st_mode | stat.S_IXUSR)
    shim = root / "home" / "bin" / "ray"
    shim.write_text(
        "#!/bin/sh\n"
        "# `ray` on the local cluster's head: `ray stop` (run by `ray down`) stops this cluster only.\n"
        f'if [ "$1" = stop ]; then exec {python} {REPO}/cluster/local_cluster.py stop {root}; fi\n'
        f'exec {venv_bin}/ray "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line) of every process, read from /proc (no
    psutil: the venv's comes inside Ray's package, and this runs before Ray does)."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")
            stat_line = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat_line[stat_line.rindex(")") + 2:].split()[:2]
        procs[int(entry.name)] = (int(ppid), state, cmdline.decode(errors="replace").strip())
    return procs


def _own_lineage(procs: dict[int, tuple[int, str, str]]) -> set[int]:
    """This process and its ancestors, which a stop must never hit."""
    lineage, pid = set(), os.getpid()
    while pid > 0 and pid not in lineage:
        lineage.add(pid)
        pid = procs.get(pid, (0,))[0]
    return lineage


def _with_descendants(roots: set[int], procs: dict[int, tuple[int, str, str]]) -> set[int]:
    found, grew = set(roots), True
    while grew:
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def cluster_processes(cluster_dir: str, pattern: str | None = None) -> dict[int, str]:
    """pid -> command line of the live processes whose command line contains ``pattern``
    (default: the cluster's Ray temp dir, ``cluster_dir/ray/`` or ``--temp-dir=cluster_dir/ray``)
    and all their descendants; never this process or its ancestors, never zombies."""
    ray_dir = str(Path(cluster_dir) / "ray")
    patterns = [pattern] if pattern else [ray_dir + "/", f"--temp-dir={ray_dir}"]
    procs = _processes()
    roots = {pid for pid, (_, _, cmd) in procs.items() if any(p in cmd for p in patterns)}
    pids = _with_descendants(roots, procs) - _own_lineage(procs)
    return {pid: procs[pid][2] for pid in sorted(pids) if procs[pid][1] != "Z"}


def _sshd(cluster_dir: str) -> dict[int, str]:
    """The loopback sshd of the cluster's pid file and its sessions (their command lines read
    ``sshd: root@notty``, so they are found through the listener)."""
    procs = _processes()
    try:
        listener = int((Path(cluster_dir) / "ssh" / "sshd.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    if listener not in procs or "sshd" not in procs[listener][2]:
        return {}  # gone, or a stale pid file whose pid is someone else's now
    pids = _with_descendants({listener}, procs) - _own_lineage(procs)
    return {pid: procs[pid][2] for pid in sorted(pids) if procs[pid][1] != "Z"}


def _terminate(pids: set[int], grace: float) -> dict[int, str]:
    """SIGTERM, then SIGKILL for what is still alive (and no zombie) after ``grace`` seconds;
    returns those that needed the SIGKILL (pid -> command line)."""
    def alive() -> dict[int, str]:
        procs = _processes()
        return {pid: procs[pid][2] for pid in pids if pid in procs and procs[pid][1] != "Z"}

    killed = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = alive()
        if sig == signal.SIGKILL:
            killed = targets
        for pid in targets:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    return killed


def stop(cluster_dir: str, grace: float = 10.0) -> int:
    """Stop this cluster's Ray processes (``ray stop`` for this cluster only); how many."""
    procs = cluster_processes(cluster_dir)
    # In ray stop's order: the raylet, then the rest (agents, workers, dashboard, monitors), the
    # GCS last; a GCS stopped before its raylet hangs on SIGTERM until SIGKILL.
    gcs = {pid for pid, cmd in procs.items() if "gcs_server" in cmd.split(" ")[0]}
    raylet = {pid for pid, cmd in procs.items() if cmd.split(" ")[0].endswith("/raylet")}
    for bucket in (raylet, set(procs) - raylet - gcs, gcs):
        for pid, cmd in _terminate(bucket, grace).items():
            print(f"SIGKILL after {grace:g} s: {pid} {cmd[:120]}", file=sys.stderr)
    return len(procs)


def stop_all(cluster_dir: str, grace: float = 5.0) -> int:
    """Stop the cluster's Ray, then every other process that names ``cluster_dir`` (Ray's ssh
    ControlMaster clients, their ``nc`` proxies) and the loopback sshd with its sessions."""
    count = stop(cluster_dir)
    pids = set(_others(cluster_dir))
    _terminate(pids, grace)
    try:
        Path(ssh_control_dir()).rmdir()
    except OSError:
        pass  # absent, or a socket of another process is left there
    return count + len(pids)


def ssh_control_dir(cluster_name: str = "vpns-local") -> str:
    """Where Ray keeps the cluster's ssh ControlMaster sockets (command_runner.SSHCommandRunner):
    /tmp/ray_ssh_<hash(user)>/<hash(cluster name)>. A master renames itself to
    ``ssh: <that folder>/<hash> [mux]``, so it is found by this folder, not by the cluster's."""
    import getpass
    import hashlib
    user, name = (hashlib.sha256(v.encode()).hexdigest()[:10] for v in (getpass.getuser(), cluster_name))
    return f"/tmp/ray_ssh_{user}/{name}"


def _others(cluster_dir: str) -> dict[int, str]:
    """The cluster's processes besides Ray: those naming its folder (ssh clients, the proxy
    scripts and their nc), its ssh ControlMasters, the loopback sshd and its sessions."""
    return {**cluster_processes(cluster_dir, pattern=cluster_dir.rstrip("/") + "/"),
            **cluster_processes(cluster_dir, pattern=f"ssh: {ssh_control_dir()}/"),
            **_sshd(cluster_dir)}


def leftovers(cluster_dir: str) -> list[str]:
    """``pid cmdline`` of every live process that names ``cluster_dir`` (Ray, ssh clients) and
    of the loopback sshd with its sessions."""
    found = {**cluster_processes(cluster_dir), **_others(cluster_dir)}
    return [f"{pid} {cmd[:200]}" for pid, cmd in sorted(found.items())]


def results(storage: str, tracking_uri: str) -> list[str]:
    """Check that the one sweep under ``storage`` landed: every trials.parquet row finished and
    TERMINATED, and its MLflow parent run has one child run per trial. Returns summary lines;
    raises AssertionError naming what is missing."""
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    sweeps = sorted(Path(storage).glob("*/trials.parquet"))
    assert len(sweeps) == 1, f"expected one sweep with trials.parquet under {storage}: {sweeps}"
    trials = pq.read_table(sweeps[0]).to_pylist()
    name = trials[0]["sweep"] if trials else sweeps[0].parent.name
    assert trials, f"{sweeps[0]} has no rows"
    unfinished = [t["trial_id"] for t in trials if not (t["finished"] and t["status"] == "TERMINATED")]
    assert not unfinished, f"trials not finished: {unfinished}"
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.sweep = '{name}'", max_results=1000)
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("role") != "trial"]
    assert len(children) == len(trials), f"{len(children)} MLflow trial runs for {len(trials)} trials"
    assert all(r.info.status == "FINISHED" for r in children), "an MLflow trial run did not finish"
    assert {t["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    return [f"results: {sweeps[0]}: {len(trials)} trials, all finished",
            f"results: MLflow {tracking_uri}: {len(parents)} parent run, {len(children)} child runs "
            f"(= trials), all FINISHED"]


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "render":
        render(args[0], int(args[1]), int(args[2]) if len(args) > 2 else PORT_BASE)
    elif command == "ports":
        print("\n".join(str(p) for p in ports(int(args[0]) if args else PORT_BASE).values()))
    elif command == "stop":
        print(f"stopped {stop(args[0])} Ray processes of {args[0]}/ray")
    elif command == "stop-all":
        print(f"stopped {stop_all(args[0])} processes of {args[0]}")
    elif command == "leftovers":
        lines = leftovers(args[0])
        print("\n".join(lines) if lines else f"no process of {args[0]} left")
        return 1 if lines else 0
    elif command == "results":
        try:
            print("\n".join(results(args[0], args[1])))
        except AssertionError as err:
            print(f"results: MISSING: {err}", file=sys.stderr)
            return 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
