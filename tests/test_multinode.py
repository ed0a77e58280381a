"""Several Ray nodes on this machine, as on a cluster: an in-process head that runs no trials and
worker nodes of one CPU each (``ray.cluster_utils.Cluster``; its shutdown stops only its own
processes). Trials spread over the nodes and record where they ran; a node lost in the middle of
a trial costs that trial one retry from its last checkpoint on another node, and nothing else;
GPUs a node declares (fake ones here) are placed as on a GPU cluster, and a trial given a GPU
without CUDA is refused at its start, or falls back to the CPU with the reason recorded.

One cluster for the module; its nodes are added and lost by the tests in file order."""
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from mlflow.tracking import MlflowClient
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from sweeps import ablation_pad
from sweeps.sweep import LOCAL_RAY_SYSTEM_CONFIG
from sweeps.placement import place
from vpns_core.errors import ConfigError

# A node's death is noticed after health_check_period_ms x failure_threshold (15 s by default).
FAST_FAILURE = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster():
    # A private Ray temp folder: Cluster writes the address file ray_current_cluster under it and
    # deletes it at shutdown, which in /tmp/ray would redirect others' `ray.init()` / `--address
    # auto`. Short, since Ray's socket paths must stay under 108 characters.
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="vpns-ray-", dir="/tmp")
    nodes = Cluster(initialize_head=True,
                    head_node_args={"num_cpus": 0,
                                    "_system_config": {**FAST_FAILURE, **LOCAL_RAY_SYSTEM_CONFIG}})
    for _ in range(2):
        nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    if saved is None:
        del os.environ["RAY_TMPDIR"]
    else:
        os.environ["RAY_TMPDIR"] = saved


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, mlflow_store):
    """One MLflow database for the module."""
    return mlflow_store(tmp_path_factory.mktemp('mlflow'))


def flags(tmp_path, tracking, address, *extra):
    return ["--preset", "tiny", "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri",
            tracking, "--address", address, *extra]


def sweep_of(tmp_path, tracking):
    (folder,) = (tmp_path / "sweeps").iterdir()
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("ablation_pad").experiment_id],
                              filter_string=f"tags.sweep = '{folder.name}' and tags.role = 'trial'")
    return folder, trials, {run.data.tags["trial_id"]: run for run in runs}


def results_of(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line Tune is still writing
            pass
    return rows


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie waits only to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def kill_node_mid_trial(cluster, storage: Path, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the raylet of the node running the first trial that reported epoch 1 of its 4."""
    while not stop.is_set():
        for path in storage.glob("*/trials/*/result.json"):
            rows = [r for r in results_of(path) if not r.get("final") and r.get("epoch", 0) >= 1]
            if rows:
                node = next(n for n in cluster.worker_nodes if n.node_id == rows[-1]["node_id"])
                os.kill(raylet_pid(node), signal.SIGKILL)
                killed.update(trial=path.parent.name.removeprefix("trial_"), node=node.node_id,
                              epoch=rows[-1]["epoch"], pid=rows[-1]["pid"])
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_trials_spread_over_nodes_and_a_lost_node_costs_one_retry(cluster, tmp_path, tracking):
    """Two 4-epoch trials on two 1-CPU nodes; one node's raylet is killed once its trial reported
    epoch 1: the trial resumes from that checkpoint on the other node and finishes; the other
    trial is not re-run; one MLflow run per trial."""
    workers = {n.node_id for n in cluster.worker_nodes}
    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=kill_node_mid_trial, daemon=True,
                              args=(cluster, tmp_path / "sweeps", killed, stop))
    killer.start()
    try:
        rc = ablation_pad.main(flags(tmp_path, tracking, cluster.address, "--seeds", "1", "--max-concurrent", "2",
                                     "--cpus-per-trial", "1", "--max-failures", "1", "--set", "mask_epochs=2",
                                     "--set", "tune_epochs=2", "--set", "train_subset=384"))
    finally:
        stop.set()
        killer.join()
    assert killed, "no trial reached epoch 1 while running"
    assert rc == 0
    folder, trials, runs = sweep_of(tmp_path, tracking)
    print(f"\nnode loss: killed {killed['node']} during trial {killed['trial']} after its epoch "
          f"{killed['epoch']}; " + "; ".join(f"{t['trial_id']}: nodes {t['nodes']}, failures "
                                             f"{t['num_failures']}" for t in trials))
    # the tiny pad sweep's three points (pad 4, the frozen pad, no prompt) at one seed
    assert len(trials) == 3 and all(t["finished"] and t["status"] == "TERMINATED" for t in trials)
    by_id = {t["trial_id"]: t for t in trials}
    lost, others = by_id.pop(killed["trial"]), list(by_id.values())
    # both nodes ran trials, the head none; each trial says where it ran
    assert {n for t in trials for n in t["nodes"].split(",")} == workers
    assert all(t["hostname"] == socket.gethostname() for t in trials)
    # the lost trial: retried once, from its checkpoint, on the surviving node, where it finished
    (survivor,) = workers - {killed["node"]}
    assert lost["nodes"] == f"{killed['node']},{survivor}" and lost["node_id"] == survivor
    assert lost["num_failures"] == 1 and all(o["num_failures"] == 0 for o in others)
    assert all(o["nodes"] == o["node_id"] == survivor for o in others)
    for trial in trials:  # every epoch once: the lost one resumed after its last checkpoint
        rows = results_of(folder / "trials" / f"trial_{trial['trial_id']}" / "result.json")
        epochs = [r["epoch"] for r in rows if not r.get("final")]
        assert sorted(set(epochs)) == [1, 2, 3, 4] and sum(bool(r.get("final")) for r in rows) == 1
        if trial is not lost:
            assert epochs == [1, 2, 3, 4]  # not re-run
    lost_epochs = [r for r in results_of(folder / "trials" / f"trial_{lost['trial_id']}" / "result.json")
                   if not r.get("final")]
    assert {r["node_id"] for r in lost_epochs if r["epoch"] <= killed["epoch"]} == {killed["node"]}
    assert lost_epochs[-1]["node_id"] == survivor
    # MLflow: one run per trial, where it finished and every node it ran on, each epoch once
    assert set(runs) == {t["trial_id"] for t in trials}
    client = MlflowClient(tracking)
    for trial in trials:
        run = runs[trial["trial_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["node_id"] == trial["node_id"] and run.data.tags["nodes"] == trial["nodes"]
        assert run.data.tags["hostname"] == socket.gethostname()
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4]
    assert runs[lost["trial_id"]].data.tags["failures"] == "1"
    # Ray leaves the worker of a killed raylet running (here until the cluster ends); it has
    # its own scratch folder, so it could not touch the retry's files. Ended here, by its pid.
    if running(killed["pid"]):
        os.kill(killed["pid"], signal.SIGKILL)


def test_preflight_counts_the_clusters_gpus(cluster, tmp_path, tracking, capsys):
    # connected to a cluster without GPUs yet: refused against its resources, not this machine's
    rc = ablation_pad.main(flags(tmp_path, tracking, cluster.address, "--gpus-per-trial", "0.5"))
    assert rc == 2
    assert "--gpus-per-trial 0.5: the cluster at" in capsys.readouterr().err


def test_place_refuses_or_falls_back_when_ray_gave_a_gpu_without_cuda():
    assert place("cuda", [], cuda=True) == ("cuda", "")
    assert place("auto", [0], cuda=True) == ("cuda", "")
    assert place("auto", [], cuda=False) == ("cpu", "")
    assert place("cpu", [1], cuda=False) == ("cpu", "")  # asked for explicitly
    device, why = place("auto", [1], cuda=False, node_id="n1")
    assert device == "cpu" and "Ray assigned GPU 1" in why and "node n1" in why
    with pytest.raises(ConfigError, match="^device: Ray assigned GPU 0 .* CUDA is not available"):
        place("cuda", [0], cuda=False)


@pytest.mark.slow
def test_fake_gpus_are_placed_half_a_gpu_per_trial(cluster, tmp_path, tracking, monkeypatch):
    """A node declaring 2 GPUs and --gpus-per-trial 0.5: three trials at once (up to four fit), each on its own
    half of GPU 0 or 1 (Ray's ids, and CUDA_VISIBLE_DEVICES set to them); without CUDA they fall
    back to the CPU (--set device=auto) with the reason in their results and MLflow tags."""
    # Ray checks a node's GPU count against CUDA_VISIBLE_DEVICES (conftest hides every GPU)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    rc = ablation_pad.main(flags(tmp_path, tracking, cluster.address, "--seeds", "1", "--max-concurrent", "4",
                                 "--cpus-per-trial", "0.25", "--gpus-per-trial", "0.5",
                                 "--set", "device=auto", "--set", "train_subset=256",
                                 "--set", "mask_epochs=2", "--set", "tune_epochs=2"))  # overlap margin
    assert rc == 0
    _, trials, runs = sweep_of(tmp_path, tracking)
    print("\nGPU placement: " + "; ".join(f"{t['trial_id']} GPU {t['gpu_ids']} {t['started_at'][11:23]}"
                                           f"-{t['ended_at'][11:23]}" for t in trials))
    assert len(trials) == 3 and all(t["finished"] for t in trials)  # three points, one seed
    assert {t["node_id"] for t in trials} == {gpu_node.node_id}
    ids = [t["gpu_ids"] for t in trials]
    assert set(ids) <= {"0", "1"} and all(ids.count(i) <= 2 for i in ids)
    starts = [datetime.fromisoformat(t["started_at"]) for t in trials]
    ends = [datetime.fromisoformat(t["ended_at"]) for t in trials]
    assert max(starts) < min(ends), "the three trials did not all run at once"
    for trial in trials:
        assert trial["device"] == "cpu"
        assert f"Ray assigned GPU {trial['gpu_ids']}" in trial["device_fallback"]
        assert f"CUDA_VISIBLE_DEVICES={trial['gpu_ids']}" in trial["device_fallback"]
        tags = runs[trial["trial_id"]].data.tags
        assert tags["gpu_ids"] == trial["gpu_ids"] and tags["device"] == "cpu"
        assert tags["device_fallback"] == trial["device_fallback"]


@pytest.mark.slow
def test_a_trial_given_a_gpu_without_cuda_is_refused_at_its_start(cluster, tmp_path, tracking):
    """--gpus-per-trial means CUDA (the sweep sets device=cuda): refused before any data is read,
    the reason in the trial's error and its MLflow run."""
    rc = ablation_pad.main(flags(tmp_path, tracking, cluster.address, "--seeds", "1", "--cpus-per-trial", "0.25", "--gpus-per-trial", "0.5",
                                 "--max-failures", "0"))
    assert rc == 1
    _, trials, runs = sweep_of(tmp_path, tracking)
    assert trials and all(t["status"] == "ERROR" and t["epochs_done"] is None for t in trials)
    for trial in trials:
        assert "device: Ray assigned GPU" in trial["error"] and "--set device=auto" in trial["error"]
        assert "CUDA is not available" in runs[trial["trial_id"]].data.tags["error"]
