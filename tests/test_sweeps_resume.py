"""A sweep killed with SIGKILL (driver, Ray and trials at once) at several points finishes with
``--resume`` without re-running finished trials, losing epochs or duplicating MLflow runs, and a
resumed trial's curve equals an uninterrupted run of the same config. One sweep has one driver
(a second is refused; a killed one leaves no lock and no Ray process behind), and a sweep whose
Ray is lost or that is stopped with Ctrl-C saves what finished and closes its MLflow runs."""
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

from search_spaces import pad_size

ROOT = Path(__file__).resolve().parents[1]
#: trials of the tiny pad sweep at one seed: one per point of its space
_POINTS = len(pad_size.space("tiny")["pad"])


def _session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (a sweep started with ``start_new_session``: its
    driver, the driver's child running Ray in a process group of its own, Ray's processes)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after "(comm)": state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _wait_session_gone(sid: int, seconds: float) -> list[int]:
    """Wait up to ``seconds`` for session ``sid`` to end; the command lines still alive."""
    deadline = time.time() + seconds
    while _session_pids(sid) and time.time() < deadline:
        time.sleep(0.2)
    left = []
    for pid in _session_pids(sid):
        try:
            left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode())
        except OSError:
            pass
    return left


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the sweep (its Ray processes too), like losing the machine."""
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert not _wait_session_gone(proc.pid, 30), "processes of the killed sweep survived"


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


def _start_until(command: list[str], log: Path, tracking: str, done) -> subprocess.Popen:
    """Start the sweep (a session of its own) and return it, still running, once ``done(runs)``
    holds for its MLflow trial runs."""
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
            return proc
        time.sleep(0.1)


def _run_until(command: list[str], log: Path, tracking: str, done) -> None:
    """Start the sweep and SIGKILL it once ``done(runs)`` holds for its MLflow trial runs."""
    _kill_group(_start_until(command, log, tracking, done))


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
    assert len(trials) == _POINTS and all(t["finished"] for t in trials)
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
    # a config column is empty (None) for a trial whose point does not set that field: Config's default
    values = {k[len("config."):]: v for k, v in row.items() if k.startswith("config.") and v is not None}
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


def _tiny_sweep(tmp_path: Path) -> tuple[list[str], str]:
    """The command of the tiny pad sweep named "killed" (:data:`_POINTS` trials of 4 epochs) and
    its MLflow URI."""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    return [sys.executable, str(ROOT / "sweeps" / "ablation_pad.py"), "--preset", "tiny",
            "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", tracking,
            "--name", "killed", "--max-concurrent", "1", "--cpus-per-trial", "1",
            "--seeds", "1", "--set", "mask_epochs=2", "--set", "tune_epochs=2",
            "--set", "train_subset=384"], tracking


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_sweep_lock_names_its_holder_and_dies_with_it(tmp_path, capsys):
    from sweeps.lock import acquire
    from sweeps.preflight import UsageError
    from sweeps.sweep import run_sweep
    held = acquire(tmp_path / "s", "--resume s")
    with pytest.raises(UsageError, match=rf"--resume s: .* pid {os.getpid()} on host "):
        acquire(tmp_path / "s", "--resume s")
    # a second driver with the same --name, before its sweep.json exists: refused, nothing written
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    assert run_sweep("test_lock", lambda sweep: None, ["--storage-path", str(tmp_path), "--name", "s",
                                                       "--preset", "tiny", "--tracking-uri", tracking]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: --name s: the sweep in {tmp_path / 's'} is being run by pid {os.getpid()}" in err
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["driver.lock"]
    held.release()
    acquire(tmp_path / "s", "--resume s").release()
    # a holder killed with SIGKILL leaves its file (and JSON) but no lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from sweeps.lock import acquire; acquire(Path(sys.argv[1]), 'x'); "
                               "print('held', flush=True); time.sleep(600)", str(tmp_path / "s")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert json.loads((tmp_path / "s" / "driver.lock").read_text())["pid"] == holder.pid
    with pytest.raises(UsageError, match=f"pid {holder.pid}"):
        acquire(tmp_path / "s", "--resume s")
    holder.kill()
    holder.wait()
    acquire(tmp_path / "s", "--resume s").release()


@pytest.mark.slow
def test_two_resumes_at_once_one_refused_nothing_lost(tmp_path):
    command, tracking = _tiny_sweep(tmp_path)
    # SIGKILL to the driver alone (not its group): Ray's processes go with it, and the lock too
    proc = _start_until(command, tmp_path / "first.log", tracking,
                        lambda runs: any(_mid_epoch(r) for r in runs.values()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not _wait_session_gone(proc.pid, 5), "Ray processes outlived the killed driver"

    resumes = [subprocess.Popen([*command, "--resume", "killed"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in resumes]
    codes = sorted(p.returncode for p in resumes)
    assert codes == [0, 2], outs
    refused = next(err for p, (_, err) in zip(resumes, outs) if p.returncode == 2)
    winner = next(p for p in resumes if p.returncode == 0)
    assert refused.strip().count("\n") == 0, refused  # one line
    assert f"is being run by pid {winner.pid} on host " in refused, refused

    trials_dir = tmp_path / "sweeps" / "killed" / "trials"
    trials = pq.read_table(tmp_path / "sweeps" / "killed" / "trials.parquet").to_pylist()
    assert len(trials) == _POINTS and all(t["finished"] and t["status"] == "TERMINATED" for t in trials)
    epochs = pq.read_table(tmp_path / "sweeps" / "killed" / "epochs.parquet").to_pylist()
    runs = _runs(tracking, "killed")
    assert set(runs) == {t["trial_id"] for t in trials}  # one MLflow child run per trial
    client = MlflowClient(tracking)
    for t in trials:
        tid = t["trial_id"]
        assert sorted(e["epoch"] for e in epochs if e["trial_id"] == tid) == [1, 2, 3, 4]
        reported = [epoch for epoch, _ in _epoch_rows(trials_dir / f"trial_{tid}" / "result.json")]
        assert sorted(set(reported)) == [1, 2, 3, 4]
        assert runs[tid].info.status == "FINISHED" and "stopped" not in runs[tid].data.tags
        steps = [m.step for m in client.get_metric_history(runs[tid].info.run_id, "val_acc")]
        assert steps == [1, 2, 3, 4]  # every epoch logged once


def _raylet_pid(sid: int) -> int:
    (pid,) = [pid for pid in _session_pids(sid)
              if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet")]
    return pid


@pytest.mark.slow
def test_raylet_lost_saves_results_closes_runs_and_resumes(tmp_path):
    command, tracking = _tiny_sweep(tmp_path)
    log = tmp_path / "lost.log"
    proc = _start_until(command, log, tracking,
                        lambda runs: any(_mid_epoch(r) for r in runs.values()))
    os.kill(_raylet_pid(proc.pid), signal.SIGKILL)
    from sweeps.sweep import RAY_LOST
    assert proc.wait(timeout=120) == RAY_LOST, log.read_text()[-3000:]
    assert not _wait_session_gone(proc.pid, 10), "Ray processes outlived the driver"
    text = log.read_text()
    assert "Traceback" not in text.split("saving what finished")[-1]
    assert sum("Ray was lost under the sweep" in line and "saving what finished" in line
               for line in text.splitlines()) == 1
    last = _last_line(text)
    assert "Ray was lost" in last and "--resume killed" in last, last
    assert (tmp_path / "sweeps" / "killed" / "trials.parquet").is_file()
    client = MlflowClient(tracking)
    runs = _runs(client, "killed")
    assert runs and all(r.info.status in ("FINISHED", "KILLED") for r in runs.values())
    killed = [r for r in runs.values() if r.info.status == "KILLED"]
    assert killed and all("Ray was lost" in r.data.tags["stopped"] for r in killed)
    (parent,) = client.search_runs([killed[0].info.experiment_id],
                                   filter_string="tags.sweep = 'killed' and tags.role = 'parent'")
    assert parent.info.status == "KILLED" and "Ray was lost" in parent.data.tags["stopped"]

    resumed = subprocess.run([*command, "--resume", "killed"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pq.read_table(tmp_path / "sweeps" / "killed" / "trials.parquet").to_pylist()
    after = _runs(client, "killed")
    assert len(trials) == _POINTS and set(after) == {t["trial_id"] for t in trials}
    assert all(r.info.status == "FINISHED" and "stopped" not in r.data.tags for r in after.values())


@pytest.mark.slow
def test_ctrl_c_closes_child_runs_and_says_interrupted_last(tmp_path):
    command, tracking = _tiny_sweep(tmp_path)
    log = tmp_path / "int.log"
    proc = _start_until(command, log, tracking,
                        lambda runs: any(_mid_epoch(r) for r in runs.values()))
    os.kill(proc.pid, signal.SIGINT)
    from sweeps.sweep import INTERRUPTED
    assert proc.wait(timeout=120) == INTERRUPTED, log.read_text()[-3000:]
    assert not _wait_session_gone(proc.pid, 10), "Ray processes outlived the driver"
    text = log.read_text()
    last = _last_line(text)
    assert "interrupted (Ctrl-C)" in last and "--resume killed" in last, last
    summary = next(line for line in text.splitlines() if line.startswith("[killed] ") and " failed, " in line)
    assert "stopped early" in summary, summary
    client = MlflowClient(tracking)
    runs = _runs(client, "killed")
    assert runs and not any(r.info.status == "RUNNING" for r in runs.values())
    killed = [r for r in runs.values() if r.info.status == "KILLED"]
    assert killed and all(r.data.tags["stopped"] == "interrupted (Ctrl-C)" for r in killed)
    (parent,) = client.search_runs([killed[0].info.experiment_id],
                                   filter_string="tags.sweep = 'killed' and tags.role = 'parent'")
    assert parent.info.status == "KILLED"


def test_an_emptied_tuner_state_is_put_back_from_its_copy(tmp_path):
    """Tune rewrites tuner.pkl in place: a driver killed while it writes leaves it empty, and the
    resume would fail to unpickle it (seen in CI). The sweep keeps a whole copy and restores it."""
    from sweeps.sweep import TUNER_STATE, TUNER_STATE_COPY, keep_tuner_state, recover_tuner_state
    (tmp_path / TUNER_STATE).write_bytes(b"state")
    keep_tuner_state(tmp_path)
    assert (tmp_path / TUNER_STATE_COPY).read_bytes() == b"state"
    (tmp_path / TUNER_STATE).write_bytes(b"")  # killed mid-write
    keep_tuner_state(tmp_path)  # an empty file is never kept
    recover_tuner_state(tmp_path)
    assert (tmp_path / TUNER_STATE).read_bytes() == b"state"
    (tmp_path / TUNER_STATE).write_bytes(b"newer")
    recover_tuner_state(tmp_path)  # a whole file is left as it is
    assert (tmp_path / TUNER_STATE).read_bytes() == b"newer"
