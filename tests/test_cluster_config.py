"""The `ray up` configurations: both pass Ray's own config schema; cluster.yaml's placeholders are
listed where a user reads them; the local cluster stops only its own processes; and (slow) the
whole local `ray up` → sweep → `ray down` round trip of cluster/check_local_cluster.sh."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
# cluster/ is scripts, not a package of the project: loaded from its file.
_spec = importlib.util.spec_from_file_location("local_cluster", REPO / "cluster" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cluster)
AWS_YAML = REPO / "cluster" / "cluster.yaml"
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 8076, 52365, 8080}


def _all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def test_aws_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load(AWS_YAML.read_text())
    validate_config(prepare_config(config))  # what `ray up` checks, short of asking AWS


def test_aws_cluster_yaml_placeholders_are_listed_in_both_readmes():
    """Every value marked ``# placeholder`` (and every ``xxxx`` dummy) in cluster.yaml is named
    in cluster/README.md and docs/scaling-out.md, so a user knows what to fill in."""
    text = AWS_YAML.read_text()
    marked = re.findall(r"^\s*-?\s*(\w+):.*#\s*placeholder", text, flags=re.M)
    dummies = re.findall(r"[\w.-]*x{6,}[\w.-]*", json.dumps(yaml.safe_load(text)))  # not in comments
    assert {"region", "availability_zone", "ImageId"} <= set(marked)
    assert any(d.startswith("fs-") for d in dummies)  # the EFS / NFS server
    scaling = REPO.joinpath("docs", "scaling-out.md").read_text()
    for readme in (REPO.joinpath("cluster", "README.md").read_text(), scaling):
        for name in {*marked, *dummies}:
            assert name in readme, f"cluster.yaml's placeholder {name} is not in the README"


def test_local_yaml_renders_to_a_valid_isolated_config(tmp_path):
    """local.yaml, rendered, passes the schema; its Ray has its own temp dir and ports (none of
    Ray's defaults) and no command runs a bare `ray stop`."""
    config = yaml.safe_load(local_cluster.render_yaml(str(tmp_path), ssh_port=26310))
    validate_config(prepare_config(config))
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert config["auth"]["ssh_private_key"] == f"{tmp_path}/ssh/user_key"
    assert config["auth"]["ssh_proxy_command"] == f"{tmp_path}/ssh/proxy %h"  # the schema has no ssh port
    commands = _all_commands(config)
    assert not any(re.search(r"(^|[;&|]\s*|/)ray stop", cmd) for cmd in commands)
    start = next(cmd for cmd in commands if " start --head" in cmd)
    assert f"--temp-dir={tmp_path}/ray" in start
    ports = local_cluster.ports()
    for name, port in ports.items():
        assert f"={port}" in start, name
    assert len(set(ports.values())) == len(ports) and not set(ports.values()) & RAY_DEFAULT_PORTS


def test_rendered_head_home_routes_ray_stop_to_this_cluster(tmp_path):
    """On the head, `ray` is the shim: `ray stop` (what `ray down` runs) stops this cluster's
    processes only; RAY_ADDRESS makes `--address auto` find this cluster."""
    local_cluster.render(str(tmp_path), ssh_port=26310)
    bashrc = (tmp_path / "home" / ".bashrc").read_text()
    assert f"export PATH={tmp_path}/home/bin:" in bashrc
    assert f"RAY_ADDRESS=127.0.0.1:{local_cluster.ports()['PORT_GCS']}" in bashrc
    assert f"SetEnv HOME={tmp_path}/home" in (tmp_path / "ssh" / "sshd_config").read_text()
    assert (tmp_path / "ssh" / "proxy").read_text().endswith('nc "$1" 26310\n')
    out = subprocess.run([str(tmp_path / "home" / "bin" / "ray"), "stop"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == f"stopped 0 Ray processes of {tmp_path}/ray"


def test_stop_hits_the_clusters_processes_and_their_children_only(tmp_path):
    """A process naming DIR/ray/ and its child are stopped; a process of another Ray temp dir
    (another cluster, the test suite's /tmp/ray) and the caller survive."""
    cluster = tmp_path / "c"
    ours = subprocess.Popen(["bash", "-c", "sleep 60 & wait", f"{cluster}/ray/session_x/raylet"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              f"{tmp_path}/other/ray/session_x"])
    try:
        deadline = time.monotonic() + 10
        while len(local_cluster.cluster_processes(str(cluster))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = local_cluster.cluster_processes(str(cluster))
        assert ours.pid in found and len(found) == 2  # bash and its sleep
        assert local_cluster.stop(str(cluster), grace=5) == 2
        assert ours.wait(timeout=10) is not None
        assert other.poll() is None
        assert local_cluster.cluster_processes(str(cluster)) == {}
    finally:
        local_cluster.stop(str(cluster), grace=1)
        for proc in (ours, other):
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("sshd", path="/usr/sbin")
                                             or shutil.which("apt-get")),
                    reason="needs root and openssh-server (or apt-get to install it)")
def test_local_ray_up_runs_a_sweep_and_leaves_nothing_behind():
    """cluster/check_local_cluster.sh end to end (about a minute on 2 CPUs): `ray up`, the tiny
    pad ablation with --address auto on the cluster, its trials and MLflow runs, `ray down`, no
    process left."""
    cluster_dir = tempfile.mkdtemp(prefix="vpns-lc-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "VPNS_PYTHON": sys.executable, "VPNS_LOCAL_CLUSTER_DIR": cluster_dir}
    try:
        run = subprocess.run(["bash", str(REPO / "cluster" / "check_local_cluster.sh")], env=env,
                             capture_output=True, text=True, timeout=600)
        out = run.stdout
        assert run.returncode == 0, out + run.stderr
        assert re.search(r"^cluster up: [\d.]+ s$", out, flags=re.M)
        assert re.search(r"^sweep: [\d.]+ s; \[ablation_pad-tiny-\S+\] 3 trials, 0 failed", out, flags=re.M)
        assert re.search(r"^results: \S+trials.parquet: 3 trials, all finished$", out, flags=re.M)
        assert "1 parent run, 3 child runs (= trials), all FINISHED" in out
        assert f"after down: no process of {cluster_dir} left" in out
        assert re.search(r"^timing: cluster up [\d.]+ s, sweep [\d.]+ s, down [\d.]+ s$", out, flags=re.M)
        assert out.rstrip().endswith("check_local_cluster: OK")
        assert local_cluster.leftovers(cluster_dir) == []
    finally:
        local_cluster.stop_all(cluster_dir)
        shutil.rmtree(cluster_dir, ignore_errors=True)
