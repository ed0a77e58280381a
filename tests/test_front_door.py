"""The front door: a user's mistake gets one line on stderr naming the flag or field, exit status
2, within a few seconds, before Ray starts, and leaves nothing behind. Each case runs the sweep
script's ``main`` as a user would call it (tiny preset)."""
import json
import os
import multiprocessing
import sqlite3
import time
import types
from pathlib import Path

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
        (["--set", "pad_size=-4"], "--set pad_size: this sweep varies pad_size (axis 'pad') in its points"),
        (["--set", "prompt=pad"], "--set prompt: this sweep varies prompt (axis 'pad') in its points"),
        (["--set", "seed=3"], "--set seed: the seeds of a sweep are given with --seeds"),
        (["--seeds", "1", "1"], "--seeds 1 1: seed 1 is given twice"),
        (["--seeds", "7", "9", "7"], "--seeds 7 9 7: seed 7 is given twice"),
        (["--set", "batch_size=100000"], "batch_size: larger than the 128 training images (train_subset)"),
        (["--set", "batch_size=100", "--set", "train_subset=64"], "batch_size: larger than the 64 training images"),
        (["--set", "label_mapping_samples=100000"], "label_mapping_samples: more than the 128 training images"),
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


@pytest.mark.parametrize("script, extra, expected", [
    ("sparsity_curves", ["--set", "sparsity=0.5"], "--set sparsity: this sweep varies sparsity over 0.8"),  # a list axis
    ("sparsity_curves", ["--set", "method=omp"], "--set method: this sweep varies method over vpns, hydra, omp"),
    ("learning_rates", ["--set", "tune_lr=0.01"], "--set tune_lr: this sweep varies tune_lr by sampling it"),  # a Tune domain
    ("ablation_pad", ["--set", "prompt=none"], "--set prompt: this sweep varies prompt (axis 'pad')"),  # named points
])
def test_a_set_of_a_field_the_sweep_varies_is_refused_whatever_its_axis(script, extra, expected, sandbox, capsys):
    import importlib

    import ray
    module = importlib.import_module(f"sweeps.{script}")
    argv = ["--preset", "tiny", "--storage-path", str(sandbox / "s"), "--tracking-uri",
            f"sqlite:///{sandbox / 'm.db'}", *extra]
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {expected}") and "\n" not in err, err
    assert not (sandbox / "s").exists() and not (sandbox / "m.db").exists()
    assert not ray.is_initialized()


def test_a_set_of_a_learning_rate_optuna_would_search_still_fixes_it(sandbox):
    """The learning rates Optuna adds to a space that does not vary them may be fixed by --set
    (README: a space of listed points only, with both rates fixed, is drawn without replacement)."""
    from sweeps.flags import build_parser
    from sweeps.sweep import _preflight
    args = build_parser("ablation_pad", None, "grid", "fifo", 8).parse_args(
        ["--preset", "tiny", "--storage-path", str(sandbox / "s"), "--tracking-uri", f"sqlite:///{sandbox / 'm.db'}",
         "--search", "optuna", "--set", "mask_lr=0.05", "--set", "tune_lr=0.05"])
    args.own_flags = []
    name, resuming = _preflight("ablation_pad", args, ablation_pad.plan, 8)
    assert name.startswith("ablation_pad-tiny-") and not resuming
    assert not (sandbox / "s").exists()


def test_cli_refuses_paths_and_sizes_in_its_own_words(tmp_path, capsys):
    from conftest import TINY
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if not isinstance(v, bool)] + ["--no-pretrained"]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "masks.pt").write_bytes(b"PK\x03\x04")
    (tmp_path / "empty").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    cases = [
        (["--out", str(tmp_path / "afile")], f"--out {tmp_path / 'afile'}: is a file, not a folder"),
        (["--out", str(tmp_path / "afile" / "below")], f"is a file, not a folder ({tmp_path / 'afile'} is a file)"),
        (["--mask-file", str(tmp_path / "trial")], f"mask_file: {tmp_path / 'trial'} is a folder, not a file; "
                                                   f"did you mean {tmp_path / 'trial' / 'masks.pt'}?"),
        (["--mask-file", str(tmp_path / "empty")], "is a folder, not a file; give the masks.pt of a trial"),
        (["--source-checkpoint", str(tmp_path / "notes.txt")],
         f"source_checkpoint: cannot read {tmp_path / 'notes.txt'}: not a torch checkpoint"),
        (["--source-checkpoint", str(tmp_path / "evil.pt")], "source_checkpoint: cannot read"),
        (["--batch-size", "100000"], "batch_size: larger than the 128 training images (train_subset)"),
        (["--label-mapping-samples", "100000"], "label_mapping_samples: more than the 128 training images"),
        (["--label-mapping=129"], "label_mapping_samples: more than the 128 training images"),  # an abbreviation
    ]
    for extra, expected in cases:
        assert cli.main([*args, "--out", str(tmp_path / "o"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, (extra, err)
        assert "weights_only=False" not in err and "Traceback" not in err
    assert "holds pickled Python objects" in (cli.main([*args, "--source-checkpoint", str(tmp_path / "evil.pt")]),
                                               capsys.readouterr().err)[1]
    assert not (tmp_path / "o").exists()


def test_the_label_mapping_default_means_at_most_and_an_explicit_excess_is_refused():
    from conftest import tiny
    from vpns_core.config import check_label_mapping_samples
    from vpns_core.errors import ConfigError
    assert tiny(train_subset=64, label_mapping_samples=1000).label_mapping_samples == 1000  # default: all 64
    check_label_mapping_samples(64, 64)
    check_label_mapping_samples(None, 64)
    check_label_mapping_samples(10**6, None)  # the whole dataset: its size is known only once loaded
    with pytest.raises(ConfigError, match="^label_mapping_samples: more than the 64 training images"):
        check_label_mapping_samples(65, 64)


USER = """
import json, runpy, sys, time
sys.argv = {argv!r}
started = time.perf_counter()
try:
    runpy.run_{kind}({target!r}, run_name="__main__")
    status = 0
except SystemExit as stop:
    status = stop.code
print(json.dumps({{"status": status, "s": time.perf_counter() - started,
                  "loaded": [m for m in ("torch", "ray", "mlflow") if m in sys.modules]}}))
"""


def test_refusals_answer_before_ray_and_torch_are_imported(tmp_path):
    """Each refusal as a user meets it, in a fresh interpreter, answers before torch, Ray or
    MLflow is imported (seconds of imports on 2 cores: a refusal took 7-16 s under load)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    sweep = ["--preset", "tiny", "--storage-path", str(tmp_path / "s"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    trial = ["--model", "tiny_resnet", "--no-pretrained", "--train-subset", "128", "--out", str(tmp_path / "o")]
    cases = [("path", "sweeps/ablation_pad.py", [*sweep, "--seeds", "1", "1"]),
             ("path", "sweeps/ablation_pad.py", [*sweep, "--set", "batch_size=100000"]),
             ("path", "sweeps/ablation_pad.py", [*sweep, "--set", "label_mapping_samples=100000"]),
             ("path", "sweeps/ablation_pad.py", [*sweep, "--set", "pad_size=3"]),
             ("path", "sweeps/sparsity_curves.py", [*sweep, "--set", "sparsity=0.5"]),
             ("module", "vpns_core", [*trial, "--out", str(tmp_path / "notes.txt")]),
             ("module", "vpns_core", [*trial, "--mask-file", str(tmp_path)]),
             ("module", "vpns_core", [*trial, "--source-checkpoint", str(tmp_path / "notes.txt")]),
             ("module", "vpns_core", [*trial, "--batch-size", "100000"]),
             ("module", "vpns_core", [*trial, "--label-mapping-samples", "100000"])]
    env = {**os.environ, "PYTHONPATH": str(root)}
    seen = []
    for kind, target, argv in cases:
        code = USER.format(argv=[target, *argv], kind=kind, target=str(root / target) if kind == "path" else target)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - started
        report = json.loads(done.stdout.strip().splitlines()[-1])
        seen.append((target, argv[-1], report["loaded"], round(took, 2)))
        assert report["status"] == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, (argv, done.stderr)
        assert report["loaded"] == [], (argv, report["loaded"])
        assert took < BOUND_S, (argv, took)
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()
    print(seen)
