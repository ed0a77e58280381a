"""A sweep killed with SIGKILL (driver, Ray and trials at once) at several points finishes with
``--resume`` without re-running finished trials, losing epochs or duplicating MLflow runs, and a
resumed trial's curve equals an uninterrupted run of the same config."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    return pids


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep's whole process group (its Ray processes too), like losing the machine."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while _group_pids(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _group_pids(proc.pid), "processes of the killed sweep survived"


def _runs(tracking: str | MlflowClient, sweep: str) -> dict:
    client = MlflowClient(tracking) if isinstance(tracking, str) else tracking
    experiment = client.get_experiment_by_name("ablation_pad")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.sweep = '{sweep}' and tags.role = 'trial'")
    return {run.data.tags["trial_id"]: run for run in runs}


def _epoch_rows(path: Path) -> list[tuple]:
    """(epoch, time stamp) of every epoch a trial reported; a re-run would add rows. (A trial
    whose end Tune had not saved yet reports its end again from its final checkpoint.)"""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["epoch"], r["timestamp"]) for r in rows if not r.get("final")]


def _run_until(command: list[str], log: Path, tracking: str, done) -> None:
    """Start the sweep and SIGKILL it once ``done(runs)`` holds for its MLflow trial runs."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        deadline = time.time() + 300
        client = None
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the kill point was not reached in time"
            # read MLflow only once the sweep has set up its database (no concurrent migrations)
            if client is None and "grid search" in log.read_text():
                client = MlflowClient(tracking)
            if client is not None and done(_runs(client, "killed")):
                break
            time.sleep(0.1)
        _kill_group(proc)


def _mid_epoch(run) -> bool:
    return run.info.status == "RUNNING" and run.data.metrics.get("epoch", 0) >= 1


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, str(ROOT / "sweeps" / "ablation_pad.py"), "--preset", "tiny",
               "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", tracking,
               "--name", "killed", "--max-concurrent", "1", "--cpus-per-trial", "1",
               "--seeds", "1", "--set", "mask_epochs=2", "--set", "tune_epochs=2",
               "--set", "train_subset=384"]
    trials_dir = tmp_path / "sweeps" / "killed" / "trials"

    # kill 1: inside the first trial, nothing finished yet
    _run_until(command, tmp_path / "first.log", tracking,
               lambda runs: any(_mid_epoch(r) for r in runs.values()))
    early = _runs(tracking, "killed")
    assert len(early) == 1 and all(r.info.status == "RUNNING" for r in early.values())

    # kill 2 (resumed): one trial finished, the next one inside its epochs
    _run_until([*command, "--resume", "killed"], tmp_path / "second.log", tracking,
               lambda runs: any(r.info.status == "FINISHED" for r in runs.values())
               and any(_mid_epoch(r) for r in runs.values()))
    before = _runs(tracking, "killed")
    assert all(before[tid].info.run_id == run.info.run_id for tid, run in early.items())  # reused
    finished = {tid: run for tid, run in before.items() if run.info.status == "FINISHED"}
    interrupted = {tid: run for tid, run in before.items() if run.info.status == "RUNNING"}
    results = {tid: _epoch_rows(trials_dir / f"trial_{tid}" / "result.json") for tid in finished}
    assert finished and interrupted

    resumed = subprocess.run([*command, "--resume", "killed"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    after = _runs(tracking, "killed")
    trials = pq.read_table(tmp_path / "sweeps" / "killed" / "trials.parquet").to_pylist()
    assert len(trials) == 2 and all(t["finished"] for t in trials)
    assert set(after) == {t["trial_id"] for t in trials}  # one run per trial, no duplicates
    assert all(run.info.status == "FINISHED" for run in after.values())  # none left dangling
    for tid, run in finished.items():  # not re-run: same run, same end, no new epochs
        assert after[tid].info.run_id == run.info.run_id
        assert after[tid].info.end_time == run.info.end_time
        assert _epoch_rows(trials_dir / f"trial_{tid}" / "result.json") == results[tid]
    client = MlflowClient(tracking)
    for tid in {*early, *interrupted}:  # continued in the same run, each epoch logged once
        run = before[tid]
        assert after[tid].info.run_id == run.info.run_id and after[tid].info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == [1, 2, 3, 4]
    parent = client.search_runs([after[next(iter(after))].info.experiment_id],
                                filter_string="tags.sweep = 'killed' and tags.role = 'parent'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"

    # a trial killed twice mid-way has the curve of an uninterrupted run (exact resume)
    from vpns_core.config import Config
    from vpns_core.train import run_trial
    (tid,) = early
    row = next(t for t in trials if t["trial_id"] == tid)
    values = {k[len("config."):]: v for k, v in row.items() if k.startswith("config.")}
    values["tags"] = json.loads(values["tags"])
    reference = []
    run_trial(Config.from_dict(values), tmp_path / "uninterrupted", reporter=reference.append)
    epochs = sorted((e for e in pq.read_table(tmp_path / "sweeps" / "killed" / "epochs.parquet").to_pylist()
                     if e["trial_id"] == tid), key=lambda e: e["epoch"])
    assert [e["epoch"] for e in epochs] == [m["epoch"] for m in reference]
    for got, want in zip(epochs, reference):
        for key in ("train_loss", "val_acc", "test_acc_prompt", "test_acc_noprompt", "sparsity"):
            if key not in want:  # the test set is read where a result needs it, in both runs
                assert got.get(key) is None, (got["epoch"], key)
                continue
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["epoch"], key)
