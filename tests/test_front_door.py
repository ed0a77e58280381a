"""The front door: a user's mistake gets one line on stderr naming the flag or field, exit status
2, within a few seconds, before Ray starts, and leaves nothing behind. Each case runs the sweep
script's ``main`` as a user would call it (tiny preset)."""
import multiprocessing
import sqlite3
import time
import types

import pytest
import torch

from sweeps import ablation_pad, prompt_effect, transfer
from sweeps.sweep import Sweep, _abandon
from sweeps.tracking import open_mlflow
from vpns_core import cli
from vpns_core.checkpoint import atomic_save

BOUND_S = 10.0  # seconds a refusal may take (network checks wait at most 3 s)


def _cases(tmp):
    (tmp / "afile").write_text("x")
    (tmp / "garbage.db").write_bytes(b"this is not sqlite" * 100)
    (tmp / "runs" / "old").mkdir(parents=True)
    (tmp / "runs" / "old" / "sweep.json").write_text('{"script": "ablation_pad", "args": {"pres')
    return [
        (["--num-samples", "0"], "--num-samples 0: must be at least 1"),
        (["--num-samples", "-3"], "--num-samples -3: must be at least 1"),
        (["--max-concurrent", "0"], "--max-concurrent 0: must be at least 1"),
        (["--grace-period", "0"], "--grace-period 0: must be at least 1"),
        (["--reduction-factor", "1"], "--reduction-factor 1: must be greater than 1"),
        (["--scheduler", "asha", "--grace-period", "5"], "--grace-period 5: the trials of phase 'trials' train 2 epochs"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial 0: must be greater than 0"),
        (["--cpus-per-trial", "512"], "--cpus-per-trial 512: this machine has"),
        (["--gpus-per-trial", "-1"], "--gpus-per-trial -1: must be 0 or more"),
        (["--gpus-per-trial", "1"], "--gpus-per-trial 1: this machine has 0 GPUs"),  # conftest hides GPUs
        (["--gpus-per-trial", "2"], "--gpus-per-trial 2: a trial runs on one GPU"),
        (["--seeds", "-1"], "--seeds -1: must be at least 0"),
        (["--max-failures", "-2"], "--max-failures -2: must be at least 0"),
        (["--metric", "test_acc"], "--metric test_acc: select on validation or training metrics"),
        (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers there"),
        (["--address", "nonsense"], "--address nonsense: expected HOST:PORT"),
        (["--tracking-uri", "http://127.0.0.1:1"], "--tracking-uri http://127.0.0.1:1: no MLflow server answers"),
        (["--tracking-uri", "foo://bar"], "--tracking-uri foo://bar: unsupported scheme 'foo'"),
        (["--tracking-uri", f"sqlite:///{tmp}/afile/m.db"], f"{tmp}/afile is a file, not a folder"),
        (["--tracking-uri", f"sqlite:///{tmp}/garbage.db"], "is not an SQLite database"),
        (["--tracking-uri", f"sqlite:///{tmp}"], "is a folder, not an SQLite file"),
        (["--storage-path", str(tmp / "afile")], "is a file, not a folder"),
        (["--storage-path", str(tmp / "afile" / "below")], "cannot be made"),
        (["--storage-path", str(tmp / "runs"), "--resume", "old"], "--resume: " + str(tmp / "runs" / "old" / "sweep.json") + " is unreadable"),
        (["--resume", "nosuch"], "--resume nosuch: "),
        (["--name", "../escape"], "a sweep name is one folder name"),
        (["--set", "pad_size=-4"], "--set pad_size: the sweep's axis 'pad' sets pad_size"),
        (["--set", "sparsity=1.5"], "sparsity: must be in [0, 1)"),
        (["--set", "method=hdyra"], "method: "),
        (["--set", "nosuchfield=1"], "--set nosuchfield=1: expected FIELD=VALUE"),
        (["--set", "dataset=cifar10", "--data-root", str(tmp / "nonexistent")], "dataset 'cifar10' is unavailable"),
        (["--set", f"mask_file={tmp / 'nomask.pt'}"], "mask_file: file not found"),
        (["--set", f"mask_file={tmp / 'afile'}"], "mask_file: cannot read"),  # the trial's own check
    ]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_bad_invocation_is_one_line_fast_and_leaves_nothing(sandbox, capsys):
    storage, db = sandbox / "storage", sandbox / "mlflow.db"
    slow, failures = [], []
    for extra, expected in _cases(sandbox):
        if not extra:
            continue
        before = sorted(p.name for p in sandbox.rglob("*"))
        argv = ["--preset", "tiny", "--storage-path", str(storage), "--tracking-uri", f"sqlite:///{db}",
                *extra]
        started = time.perf_counter()
        status = ablation_pad.main(argv)
        took = time.perf_counter() - started
        err = capsys.readouterr().err.strip()
        if status != 2 or err.count("\n") != 0 or expected not in err or "Traceback" in err:
            failures.append((extra, status, err))
        if took > BOUND_S:
            slow.append((extra, round(took, 1)))
        assert sorted(p.name for p in sandbox.rglob("*")) == before, extra  # nothing written
    assert not failures, failures
    assert not slow, slow
    assert not storage.exists() and not db.exists()
    assert not (sandbox / "nonexistent").exists()  # no folder made, nothing downloaded


def test_script_flags_are_checked_too(sandbox, capsys):
    argv = ["--preset", "tiny", "--storage-path", str(sandbox / "s"), "--tracking-uri",
            f"sqlite:///{sandbox / 'm.db'}"]
    assert prompt_effect.main([*argv, "--phases", "nosuch"]) == 2
    assert "--phases nosuch: unknown phase; choose from inert, protocol" in capsys.readouterr().err
    # transfer's target phase cannot run before its masks exist; its dry run still checks it
    assert transfer.main([*argv, "--set", "sparsity=2"]) == 2
    assert "sparsity: must be in [0, 1)" in capsys.readouterr().err
    assert not (sandbox / "s").exists()


def _open(args):
    db, name = args
    sweep = Sweep("ablation_pad", name, types.SimpleNamespace(
        tracking_uri=f"sqlite:///{db}", preset="tiny", search="grid", scheduler="fifo",
        num_samples=None, seeds=None, set=[], grace_period=1, reduction_factor=2.0, optuna_seed=0,
        cpus_per_trial=1.0, gpus_per_trial=0.0, max_failures=1), None, False)
    open_mlflow(sweep)
    return sweep.experiment_id, sweep.parent_run_id


def test_two_sweeps_start_at_once_on_a_new_tracking_database(tmp_path):
    db = tmp_path / "new.db"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_open, [(db, "a"), (db, "b")])
    assert results[0][0] == results[1][0]  # one experiment, created once
    assert results[0][1] != results[1][1]  # two parent runs
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from experiments where name='ablation_pad'").fetchone()[0] == 1


def test_a_failed_start_marks_the_parent_failed_and_frees_the_name(tmp_path):
    from mlflow.tracking import MlflowClient
    db = tmp_path / "m.db"
    experiment, parent = _open((db, "x"))
    folder = tmp_path / "storage" / "x"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text("{}")
    sweep = Sweep("ablation_pad", "x", types.SimpleNamespace(tracking_uri=f"sqlite:///{db}"), folder, False,
                  parent_run_id=parent)
    _abandon(sweep, ValueError("--gpus-per-trial 4: the cluster has 0 GPUs"), ran_trials=False)
    run = MlflowClient(f"sqlite:///{db}").get_run(parent)
    assert run.info.status == "FAILED" and "cluster has 0 GPUs" in run.data.tags["error"]
    assert not folder.exists()


def test_cli_refuses_bad_files_in_one_line(tmp_path, capsys):
    from conftest import TINY
    args = []
    for key, value in TINY.items():
        flag = key.replace("_", "-")
        args += ([f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool)
                 else [f"--{flag}", str(value)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert cli.main([*args, "--out", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
    wrong = tmp_path / "masks.pt"
    atomic_save({"masks": {"conv1": torch.ones(3, 3, 3, 3, dtype=torch.bool)}}, wrong)
    assert cli.main([*args, "--out", str(tmp_path / "o2"), "--mask-file", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mask_file:") and "\n" not in err
    other = tmp_path / "o3"
    assert cli.main([*args, "--out", str(other), "--max-steps-per-epoch", "1"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--out", str(other), "--sparsity", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different config" in err and "\n" not in err
