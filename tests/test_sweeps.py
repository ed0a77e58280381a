"""Sweeps end to end on the tiny preset: one Ray session for the module, tiny trials (seconds)."""
import importlib
import pickle
import pkgutil
import re
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

import sweeps
from search_spaces import base as presets
from sweeps.schedulers import ShuffledGridSampler
from sweeps.sweep import run_sweep

SCRIPTS = sorted(info.name for info in pkgutil.iter_modules(sweeps.__path__)  # a script has a plan
                 if hasattr(importlib.import_module(f"sweeps.{info.name}"), "plan")
                 and info.name != "pareto")  # run end to end, with these checks, in test_pareto.py


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, mlflow_store):
    """One MLflow database for the module."""
    return mlflow_store(tmp_path_factory.mktemp('mlflow'))


def flags(tmp_path, tracking, *extra):
    # One trial at a time: a phase's trials then run one after another in one reused Tune actor
    # (each new trial process costs seconds of CPU in imports). Trials side by side in one sweep
    # are tested in test_pareto.py, test_tracking_server.py and test_multinode.py.
    return ["--preset", "tiny", "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri",
            tracking, "--max-concurrent", "1", *extra]


def sweep_dir(tmp_path):
    (folder,) = (tmp_path / "sweeps").iterdir()
    return folder


def trial_runs(tracking, sweep):
    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.sweep = '{sweep}' and tags.role = 'trial'")
    return {run.data.tags["trial_id"]: run for run in runs}


def check_run_contents(tracking, runs):
    """The MLflow runs of the tiny pad sweep, run with ``--log-model``, hold the trial's tags,
    params, per-epoch metrics and artifacts (the model among them)."""
    client = MlflowClient(tracking)
    assert {r.data.params["prompt"] != "none" for r in runs.values()} == {True, False}  # both kinds
    for run in runs.values():
        tags, params = run.data.tags, run.data.params
        assert {"method", "prompt", "dataset", "model", "preset", "mlflow.source.git.commit",
                "mlflow.parentRunId"} <= set(tags)
        assert params["model"] == "tiny_resnet" and params["sparsity"] == "0.8"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [1, 2]
        assert "selected_test_acc" in run.data.metrics
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"layer_stats.json", "layer_stats.csv", "model"} <= names
        assert ("prompt.png" in names) == (params["prompt"] != "none")


#: the one sweep the fast tier runs end to end (the main command's script); the others are slow
FAST_SCRIPT = "ablation_pad"


@pytest.mark.parametrize("script", [s if s == FAST_SCRIPT else pytest.param(s, marks=pytest.mark.slow)
                                    for s in SCRIPTS])
def test_every_sweep_script_runs_on_the_tiny_preset(script, tmp_path, tracking, ray_session):
    module = importlib.import_module(f"sweeps.{script}")
    logs_models = script == "ablation_pad"  # its runs are also checked in full
    assert module.main(flags(tmp_path, tracking, "--num-samples", "1",
                             *(["--log-model"] if logs_models else []))) == 0
    folder = sweep_dir(tmp_path)
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    epochs = pq.read_table(folder / "epochs.parquet").to_pylist()
    assert trials and all(t["status"] == "TERMINATED" for t in trials)
    assert all(t["finished"] or t["early_stopped"] for t in trials)
    assert {e["trial_id"] for e in epochs} == {t["trial_id"] for t in trials}
    runs = trial_runs(tracking, folder.name)
    assert set(runs) == {t["trial_id"] for t in trials}  # one MLflow run per trial
    assert {t["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs.values()}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert (folder / f"{script}_table.csv").is_file()
    if logs_models:
        check_run_contents(tracking, runs)
        # the pads and both controls (frozen pad, no prompt with matched updates) take the same updates
        assert {str(t["axis.pad"]) for t in trials} == {"4", "frozen", "none"}
        assert len({t["last.grad_steps"] for t in trials}) == 1


def test_sparsity_curves_full_grid_plans_every_pruning_method_at_every_level():
    from types import SimpleNamespace

    from search_spaces import method, sparsity
    from sweeps import sparsity_curves
    for preset in ("tiny", "default", "paper"):
        phases = {}
        fake = SimpleNamespace(preset=preset, args=SimpleNamespace(full=True),
                               run_phase=lambda name, base, space: phases.setdefault(name, (base, space)))
        sparsity_curves.plan(fake)
        base, space = phases["pruned"]
        assert space["method"] == method.pruning_methods() and len(space["method"]) >= 12
        assert space["sparsity"] == sparsity.levels(preset)
        assert phases["dense"][1] == {"method": ["dense"]}


def test_result_table_has_no_std_for_one_trial_and_best_record_breaks_ties_like_the_analysis():
    import math

    from sweeps.results import Phase, best_record, result_table

    def record(trial_id, pad, seed, val, epoch, test):
        return {"trial_id": trial_id, "status": "TERMINATED", "tune_config": {"pad": pad, "seed": seed},
                "final": {"selected_val_acc": val, "selected_epoch": epoch, "selected_test_acc": test}}
    records = [record("b", 4, 7, 0.5, 2, 0.60), record("a", 4, 9, 0.5, 2, 0.70),
               record("c", 8, 7, 0.5, 3, 0.40)]
    rows = result_table(Phase("trials", {"pad": [4, 8], "seed": [7, 9]}, records, complete=True))
    assert rows[0]["selected_test_acc"] == pytest.approx(0.65)
    assert rows[0]["selected_test_acc_std"] == pytest.approx(math.sqrt(0.005))
    assert rows[1]["selected_test_acc"] == 0.40 and math.isnan(rows[1]["selected_test_acc_std"])
    # equal validation accuracy: the later selected epoch, then the smaller trial id
    assert best_record(Phase("trials", {}, records, complete=True))["trial_id"] == "c"
    assert best_record(Phase("trials", {}, records[:2], complete=True))["trial_id"] == "a"


def test_the_printed_table_says_1_seed_never_nan(capsys):
    import types

    from sweeps.results import Phase, print_results, result_table

    def record(trial_id, pad, seed, test):
        return {"trial_id": trial_id, "status": "TERMINATED", "tune_config": {"pad": pad, "seed": seed},
                "labels": {}, "final": {"selected_val_acc": 0.5, "selected_epoch": 2, "selected_test_acc": test}}
    phase = Phase("trials", {"pad": [4, 8], "seed": [7, 9]},
                  [record("a", 4, 7, 0.60), record("b", 4, 9, 0.70), record("c", 8, 7, 0.40)], complete=True)
    for search, unit in (("grid", "1 seed"), ("optuna", "1 trial")):
        sweep = types.SimpleNamespace(script="ablation_pad", preset="tiny", phases=[phase],
                                      args=types.SimpleNamespace(search=search))
        print_results(sweep, result_table(phase))
        out = capsys.readouterr().out
        assert f"0.400 ({unit})" in out and "0.650 ± 0.071" in out and "nan" not in out


@pytest.mark.slow  # a Ray Tune sweep end to end (tens of seconds on 2 cores)
def test_optuna_and_asha_stop_trials_early(tmp_path, tracking, ray_session):
    from sweeps import learning_rates
    # The tiny trials stay near chance, where 32 validation images tie; the training loss doesn't.
    # (a --set of either rate is refused: this sweep's own axes; tests/test_front_door.py)
    rc = learning_rates.main(flags(tmp_path, tracking, "--num-samples", "8", "--set", "mask_epochs=2",
                                   "--set", "tune_epochs=2", "--metric", "train_loss", "--mode", "min"))
    assert rc == 0
    trials = pq.read_table(sweep_dir(tmp_path) / "trials.parquet").to_pylist()
    assert len(trials) == 8
    assert len({t["config.mask_lr"] for t in trials}) == 8  # sampled by Optuna
    assert len({t["config.tune_lr"] for t in trials}) == 8
    stopped = [t for t in trials if t["early_stopped"]]
    assert stopped, "ASHA stopped no trial"
    assert all(t["epochs_done"] < 4 for t in stopped)
    assert all(t["epochs_done"] == 4 for t in trials if t["finished"])
    runs = trial_runs(tracking, sweep_dir(tmp_path).name)
    assert {runs[t["trial_id"]].data.tags["early_stopped"] for t in stopped} == {"true"}
    scratch = Path(tempfile.gettempdir()) / "vpns-trials"
    assert not [t for t in trials if (scratch / t["trial_id"]).exists()]  # stopped ones cleaned up


@pytest.mark.slow  # a Ray Tune sweep end to end (tens of seconds on 2 cores)
def test_optuna_on_listed_points_only_samples_each_point_once(tmp_path, tracking, ray_session, capsys):
    from sweeps import ablation_pad
    tiny = presets.base("tiny")
    rc = ablation_pad.main(flags(tmp_path, tracking, "--search", "optuna", "--scheduler", "fifo",
                                 "--num-samples", "5", "--set", f"mask_lr={tiny['mask_lr']}",
                                 "--set", f"tune_lr={tiny['tune_lr']}"))
    assert rc == 0
    out = capsys.readouterr().out
    # a local store (SQLite): the link of the sweep's saved view, and the command that serves it
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "(trials by accuracy: " in line)
    first, second = lines[start:start + 2]
    name = sweep_dir(tmp_path).name
    assert f"fifo scheduler, preset tiny; trials on cpu; results in {sweep_dir(tmp_path)}; " in first  # no GPU here
    assert re.search(r"\(trials by accuracy: http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?"
                     rf"viewStateShareKey=trials-{re.escape(name)}&workflowType=machine_learning\)$", first)
    assert re.fullmatch(rf"\[{re.escape(name)}\] MLflow UI for this store: "
                        r"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \S*mlflow ui --backend-store-uri "
                        rf"{re.escape(tracking)} --host 127\.0\.0\.1 --port 5000", second)
    assert "--num-samples 5 > the 3 points of the space: running 3" in out
    trials = pq.read_table(sweep_dir(tmp_path) / "trials.parquet").to_pylist()
    assert sorted(str(t["axis.pad"]) for t in trials) == ["4", "frozen", "none"]  # each point once
    sampler = ShuffledGridSampler({"pad": ["none", 4, 8, 12]}, seed=3)
    assert pickle.loads(pickle.dumps(sampler))._all_grids == sampler._all_grids  # Tune saves it


@pytest.mark.slow  # a Ray Tune sweep end to end (tens of seconds on 2 cores)
def test_a_failing_trial_is_retried_marked_failed_and_the_sweep_finishes(tmp_path, tracking, ray_session):
    # a readable mask file (so the preflight passes it) that fits no layer: fails in the trial
    import torch
    broken = tmp_path / "foreign_mask.pt"
    torch.save({"masks": {"not.a.layer": torch.ones(3, dtype=torch.bool)}}, broken)

    def plan(sweep):
        sweep.run_phase("trials", presets.base("tiny"),
                        {"case": {"ok": {}, "broken": {"mask_file": str(broken)}}})

    rc = run_sweep("test_failures", plan,
                   flags(tmp_path, tracking, "--max-failures", "1"), search="grid", scheduler="fifo")
    assert rc == 1  # some trial failed; table and export are written all the same
    folder = sweep_dir(tmp_path)
    trials = {t["axis.case"]: t for t in pq.read_table(folder / "trials.parquet").to_pylist()}
    assert trials["ok"]["finished"] and trials["ok"]["status"] == "TERMINATED"
    assert trials["broken"]["status"] == "ERROR" and "mask_file" in trials["broken"]["error"]
    assert trials["broken"]["num_failures"] == 2  # the first attempt and one retry
    runs = trial_runs(tracking, folder.name)
    assert len(runs) == 2  # the retry reused its run
    failed = runs[trials["broken"]["trial_id"]]
    assert failed.info.status == "FAILED" and "mask_file" in failed.data.tags["error"]
    assert (folder / "test_failures_table.csv").read_text().count("\n") == 3


@pytest.mark.slow  # a Ray Tune sweep end to end (tens of seconds on 2 cores)
def test_a_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path, tracking, ray_session):
    def plan(sweep):
        sweep.run_phase("trials", presets.base("tiny"),
                        {"case": {"ok": {}, "nan": {"method": "dense", "tune_lr": 1e30, "momentum": 0.0}}})

    rc = run_sweep("test_nan", plan, flags(tmp_path, tracking, "--max-failures", "0"),
                   search="grid", scheduler="fifo")
    assert rc == 1  # a failed trial; the sweep ran to its end (export, table)
    folder = sweep_dir(tmp_path)
    trials = {t["axis.case"]: t for t in pq.read_table(folder / "trials.parquet").to_pylist()}
    assert trials["ok"]["finished"] and trials["ok"]["status"] == "TERMINATED"
    assert trials["nan"]["status"] == "ERROR" and "NonFiniteLossError" in trials["nan"]["error"]
    runs = trial_runs(tracking, folder.name)
    failed, ok = runs[trials["nan"]["trial_id"]], runs[trials["ok"]["trial_id"]]
    assert failed.info.status == "FAILED" and "loss became" in failed.data.tags["error"]
    assert ok.info.status == "FINISHED"
    assert (folder / "test_nan_table.csv").is_file()
