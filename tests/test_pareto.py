"""Pruning to a budget: objectives, budgets and Pareto ranks (no Ray), the cost record, the
multi-objective searcher's constraints, and one tiny Pareto sweep end to end (Parquet, MLflow
tags, the figure, the report and ``python -m vpns_core.pick``)."""
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from vpns_core import pick as pick_cli
from vpns_core.costs import cost_record, flops, nonzero_parameters, trial_costs
from vpns_core.pareto import (Budget, closest, non_dominated_ranks, parse_budget, parse_objectives,
                              pareto_ranks)

ROOT = Path(__file__).resolve().parents[1]


# --- objectives, budgets, ranks (no Ray) ----------------------------------------------------------


def test_non_dominated_sort_ranks_fronts_in_order():
    # (accuracy max, latency min)
    points = [(0.9, 100), (0.8, 50), (0.7, 20), (0.85, 120), (0.6, 60), (0.8, 50), (0.5, 200)]
    assert non_dominated_ranks(points, [True, False]) == [1, 1, 1, 2, 2, 1, 3]
    # minimising both: (1, 5) and (5, 1) are the front, (3, 3) too; (4, 4) is dominated by (3, 3)
    assert non_dominated_ranks([(1, 5), (5, 1), (3, 3), (4, 4)], [False, False]) == [1, 1, 1, 2]
    assert non_dominated_ranks([], [True]) == []


def test_constrained_ranks_put_the_trials_that_fit_first():
    rows = [{"selected_val_acc": 0.9, "latency_ms": 100},   # over the budget, most accurate
            {"selected_val_acc": 0.8, "latency_ms": 50},
            {"selected_val_acc": 0.7, "latency_ms": 30},
            {"selected_val_acc": 0.6, "latency_ms": 40},    # dominated by the 0.7 one
            {"selected_val_acc": None, "latency_ms": 10}]   # failed: no rank
    budget = parse_budget("latency_ms=60")
    assert pareto_ranks(rows, ("latency_ms",), budget) == [3, 1, 1, 2, None]
    assert pareto_ranks(rows, ("latency_ms",)) == [1, 1, 1, 2, None]   # no budget: all fit
    assert [budget.fits(r) for r in rows] == [False, True, True, True, True]
    assert budget.violations(rows[0]) == {"latency_ms": pytest.approx(40 / 60)}
    assert closest(rows[:1] + rows[4:], parse_budget("latency_ms=5")) == 0  # the only one with an accuracy


def test_budget_and_objective_parsing_name_the_mistake():
    assert parse_budget(["latency_ms=40", "params_m=1.5"]) == parse_budget("latency_ms=40,params_m=1.5")
    assert parse_budget("latency_ms=40,params_m=1.5").limits == (("latency_ms", 40.0), ("params_m", 1.5))
    assert parse_budget("flops_g=0.05").text == "flops_g<=0.05" and not parse_budget([])
    for bad, words in (("latency=40", "unknown cost 'latency'; choose from latency_ms, latency_cpu_ms, params_m, flops_g"),
                       ("latency_ms", "expected COST=NUMBER"), ("latency_ms=fast", "must be a number"),
                       ("latency_ms=-1", "positive"), ("latency_ms=1,latency_ms=2", "capped twice")):
        with pytest.raises(ValueError, match=words):
            parse_budget(bad)
    assert parse_objectives("latency_ms,params_m") == ("latency_ms", "params_m")
    assert parse_objectives(["val_acc", "flops_g"]) == ("flops_g",)  # the accuracy is implied
    for bad, words in (("latncy_ms", "unknown cost 'latncy_ms'"), ("", "one or two costs"),
                       ("latency_ms,params_m,flops_g", "at most 2"), ("params_m,params_m", "twice")):
        with pytest.raises(ValueError, match=words):
            parse_objectives(bad)


# --- the cost record ------------------------------------------------------------------------------


def test_cost_record_counts_nonzeros_and_the_flops_a_sparse_kernel_would_skip():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    mask = torch.ones(4, 3, 3, 3, dtype=torch.bool)
    mask[:2] = False  # half the conv's weights (54 of 108) pruned
    dense_flops, sparse_flops = flops(net, 8, {"0": mask})
    conv = 2 * 4 * 27 * 64  # 2 · C_out · C_in·k² · H·W
    assert dense_flops * 1e9 == pytest.approx(conv + 2 * 256 * 10)
    assert (dense_flops - sparse_flops) * 1e9 == pytest.approx(2 * 54 * 64)
    assert nonzero_parameters(net, {"0": mask}) == 108 + 2570 - 54
    record = cost_record(net, 8, masks={"0": mask}, batch=4, repeats=3)
    assert record["params_m"] == pytest.approx((108 + 2570 - 54) / 1e6)
    assert record["latency_ms_min"] <= record["latency_ms"] <= record["latency_ms_max"]
    assert record["latency_batch"] == 4 and record["latency_repeats"] == 3
    assert record["latency_threads"] == torch.get_num_threads() and record["latency_device"].startswith("cpu")
    assert 0 <= record["latency_ms_spread"] <= record["latency_ms_max"] - record["latency_ms_min"]
    assert set(cost_record(net, 8, repeats=0)) == {"params_m", "flops_g", "flops_nonzero_g"}  # no timing
    assert set(cost_record(net, 8, repeats=0, count_flops=False)) == {"params_m"}  # no FLOP count either
    threads = torch.get_num_threads()
    try:  # at one thread the pass's CPU time is recorded too: never more than its wall time
        torch.set_num_threads(1)
        one = cost_record(net, 8, batch=64, repeats=3)
    finally:
        torch.set_num_threads(threads)
    assert 0 < one["latency_cpu_ms"] <= one["latency_ms"] * 1.05 and one["latency_threads"] == 1


# --- the searcher: constraints reach Optuna ---------------------------------------------------------


def test_search_space_and_constraints_reach_the_optuna_study():
    from search_spaces import pareto
    from sweeps.multiobjective import ConstrainedOptunaSearch, sampler
    from vpns_core.config import Config
    space = pareto.space("tiny")
    base = pareto.base("tiny")
    for corner in space.corners():  # every method at both ends of its range is a valid config
        Config.from_dict({**base, **corner})
    search = ConstrainedOptunaSearch(space, ("latency_ms",), parse_budget("latency_ms=10"),
                                     sampler=sampler(seed=0, num_samples=8))
    assert search.metric is None  # not announced to Tune: the objectives come with the final report
    configs = {tid: search.suggest(tid) for tid in ("a", "b", "c")}
    for config in configs.values():
        Config.from_dict({**base, **config})
        assert set(config) <= {"method", "sparsity", "pad_size", "pattern"}
        low, high = getattr(space, f"{space.kind(config['method'])}_sparsity")
        assert low <= config["sparsity"] <= high or (config.get("pattern") == "2:4" and config["sparsity"] == 0.5)
    search.on_trial_complete("a", {"selected_val_acc": 0.5, "latency_ms": 20.0})   # 100% over
    search.on_trial_complete("b", {"selected_val_acc": 0.4, "latency_ms": 5.0})    # fits
    search.on_trial_complete("c", {"selected_val_acc": 0.6})                       # no cost: failed
    trials = search._ot_study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
    assert trials[0].constraints == {"latency_ms": pytest.approx(1.0)}
    assert trials[1].constraints == {"latency_ms": pytest.approx(-0.5)}
    assert [t.number for t in search._ot_study.best_trials] == [1]  # the infeasible one is not "best"


def test_the_budget_space_offers_a_2_4_pattern_beside_unstructured_and_channel_pruning():
    from search_spaces import pareto
    from vpns_core.config import Config
    space = pareto.space("tiny")
    assert pareto.base("tiny")["cost_record"] and space.patterns == ("unstructured", "2:4")
    nm = [c for c in space.corners() if c.get("pattern") == "2:4"]
    assert sorted({c["method"] for c in nm}) == ["hydra", "vpns"] and all(c["sparsity"] == 0.5 for c in nm)
    assert not any("pattern" in c for c in space.corners() if space.kind(c["method"]) == "channel")
    # define-by-run: a 2:4 draw asks for no sparsity (the pattern fixes 0.5), an unstructured one does
    fixed = optuna.trial.FixedTrial({"method": "hydra", "pattern": "2:4"})
    space.define(fixed)
    assert space.config(fixed.params) == {"method": "hydra", "sparsity": 0.5, "pattern": "2:4"}
    assert Config.from_dict({**pareto.base("tiny"), **space.config(fixed.params)}).nm == (2, 4)
    with pytest.raises(ValueError):  # unstructured: the sparsity is asked for
        space.define(optuna.trial.FixedTrial({"method": "hydra", "pattern": "unstructured"}))


@pytest.fixture(scope="module")
def nm_trial(tmp_path_factory):
    """One tiny budget-sweep trial with a 2:4 pattern (HYDRA, the Pareto space's tiny base: cost
    record on)."""
    from search_spaces import pareto
    from vpns_core.config import Config
    from vpns_core.train import Trial
    folder = tmp_path_factory.mktemp("nm")
    cfg = Config.from_dict({**pareto.base("tiny"), "method": "hydra", "pattern": "2:4", "sparsity": 0.5,
                            "max_steps_per_epoch": 1, "num_threads": 1})
    trial = Trial(cfg, folder)
    return trial, trial.run(), folder


def test_a_2_4_candidate_trains_exact_2_4_masks_and_records_its_cost(nm_trial):
    trial, result, folder = nm_trial
    masks = trial.net.current_masks()
    for mask in masks.values():  # exactly 2 of every 4 weights along the inputs
        grouped = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
        assert (grouped.reshape(-1, 4).sum(1) == 2).all()
    final = result.final
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == sum(m.numel() for m in masks.values()) // 2
    export = torch.load(folder / "model_export.pt", weights_only=True)
    from vpns_core.models import plain_model
    dense_total = sum(p.numel() for p in plain_model(export).parameters())
    assert final["params_m"] * 1e6 == pytest.approx(dense_total - pruned) and final["params_m"] > 0
    assert 0 < final["flops_nonzero_g"] < final["flops_g"] and final["latency_ms"] > 0
    assert final["latency_repeats"] == 2 and final["latency_batch"] == 8
    assert "keeps dense weights with zeros" in final["semi_structured_note"]  # a CPU
    # the same export without the switch: nothing measured
    assert trial_costs(export, trial.cfg.replace(cost_record=False), device="cpu") == {}


def test_retiming_gives_each_candidate_one_latency_and_its_spread(nm_trial, tmp_path):
    from sweeps.multiobjective import RETIME_REPEATS, retime, table
    from sweeps.results import Phase
    _, result, folder = nm_trial
    final = dict(result.final)
    records = [{"trial_id": "a", "final": final, "checkpoint": str(folder), "status": "TERMINATED",
                "config": {"method": "hydra", "pattern": "2:4", "sparsity": 0.5, "pad_size": 4}},
               {"trial_id": "b", "final": None, "checkpoint": None, "status": "ERROR", "config": {}}]
    phase = Phase("search", {}, records, complete=True)
    store = tmp_path / "latency_retimed.json"
    assert retime([phase], store) == 1
    assert final["latency_ms_in_trial"] == result.final["latency_ms"] and final["latency_retimed"]
    assert final["latency_repeats"] == RETIME_REPEATS and final["latency_batch"] == 8
    assert final["latency_ms_min"] <= final["latency_ms"] <= final["latency_ms_max"]
    assert 0 <= final["latency_ms_spread"] <= final["latency_ms_max"] - final["latency_ms_min"]
    assert records[1]["final"] is None
    # a resumed sweep reuses the stored latency: the same ranks as before
    again = dict(result.final)
    phase.records[0]["final"] = again
    assert retime([phase], store) == 0 and again["latency_ms"] == final["latency_ms"]
    phase.derived = {"a": {"pareto_rank": 1, "feasible": True, "pareto_reference": False},
                     "b": {"pareto_rank": None, "feasible": None, "pareto_reference": False}}
    rows = table(phase, ("latency_ms",), Budget())
    assert rows[0]["pattern"] == "2:4" and rows[0]["latency_ms"] == final["latency_ms"]
    assert rows[0]["latency_ms_spread"] == final["latency_ms_spread"]
    assert rows[1]["latency_ms"] is None


# --- one tiny Pareto sweep end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_session, mlflow_store):
    """A Pareto sweep on the tiny task with ResNet-18 (so that the export loads with torchvision
    alone): 4 search trials + the dense reference, minimising latency and size, within a size
    budget (parameter counts are exact, so which trials fit does not depend on the machine)."""
    from sweeps import pareto
    root = tmp_path_factory.mktemp("pareto")
    tracking = mlflow_store(root)
    argv = ["--preset", "tiny", "--storage-path", str(root / "sweeps"), "--tracking-uri", tracking,
            "--name", "front", "--num-samples", "4", "--max-concurrent", "2",
            "--objectives", "latency_ms,params_m", "--budget", "params_m=5", "--optuna-seed", "2",
            "--set", "model=resnet18", "--set", "max_steps_per_epoch=2", "--set", "latency_batch=16"]
    assert pareto.main(argv) == 0
    folder = root / "sweeps" / "front"
    return root, folder, tracking, argv, pq.read_table(folder / "trials.parquet").to_pylist()


@pytest.mark.slow  # the budget sweep (module fixture, about a minute)
def test_the_sweep_records_objectives_ranks_and_feasibility(swept):
    root, folder, tracking, _, rows = swept
    search = [r for r in rows if r["phase"] == "search"]
    (dense,) = [r for r in rows if r["phase"] == "dense"]
    assert len(search) == 4 and all(r["finished"] and r["status"] == "TERMINATED" for r in rows)
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("pareto").experiment_id],
                              "tags.role = 'trial' and tags.sweep = 'front'")
    assert sorted(r.info.run_id for r in runs) == sorted(r["mlflow_run_id"] for r in rows)  # one run each
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in rows:  # re-timed after training, one candidate at a time: a median and its spread each
        assert r["latency_ms"] > 0 and r["params_m"] > 0 and r["flops_g"] > 0 and r["latency_batch"] == 16
        assert r["latency_retimed"] and r["latency_ms_in_trial"] > 0 and r["latency_repeats"] == 10
        assert 0 <= r["latency_ms_spread"] <= r["latency_ms_max"] - r["latency_ms_min"]
        assert 0 < r["latency_cpu_ms"] <= 1.05 * r["latency_ms"] and r["latency_threads"] == 1
        assert r["pareto_objectives"] == "selected_val_acc:max,latency_ms:min,params_m:min"
        assert r["feasible"] == (r["params_m"] <= 5)
    assert dense["pareto_reference"] and dense["pareto_rank"] is None and not dense["feasible"]  # 11.7 M
    expected = pareto_ranks(search, ("latency_ms", "params_m"), parse_budget("params_m=5"))
    assert [r["pareto_rank"] for r in search] == expected and 1 in expected
    assert any(r["feasible"] for r in search) and not all(r["feasible"] for r in search)
    assert all(r["pareto_rank"] > max(x["pareto_rank"] for x in search if x["feasible"])
               for r in search if not r["feasible"])  # those over the budget rank after those within
    weight = [r for r in search if r["config.method"] in ("vpns", "hydra")]
    channel = [r for r in search if r["config.method"] not in ("vpns", "hydra")]
    assert weight and channel  # optuna seed 2 draws both kinds
    for r in weight:  # dense kernels: the dense model's FLOPs; the size counts nonzeros
        assert r["flops_g"] == pytest.approx(dense["flops_g"]) and r["flops_nonzero_g"] < r["flops_g"]
        assert r["params_m"] < dense["params_m"]
    for r in channel:
        assert r["flops_g"] < dense["flops_g"] and r["params_m"] == pytest.approx(r["pruned_params"] / 1e6)
    # MLflow: the objectives as metrics, the rank and feasibility as tags, the device of the latency
    for r in rows:
        run = client.get_run(r["mlflow_run_id"])
        for key in ("selected_val_acc", "latency_ms", "params_m", "flops_g"):
            assert run.data.metrics[key] == pytest.approx(r[key])
        assert run.data.tags.get("pareto_rank") == (str(r["pareto_rank"]) if r["pareto_rank"] else None)
        assert run.data.tags["feasible"] == str(r["feasible"])
        assert run.data.tags["latency_device"] == r["latency_device"]
    parent = client.search_runs([client.get_experiment_by_name("pareto").experiment_id],
                                "tags.role = 'parent' and tags.sweep = 'front'")[0]
    assert parent.data.tags["pareto_budget"] == "params_m<=5"
    # the table marks which trials fit, and shows test accuracy for the front only
    table = (folder / "pareto_table.csv").read_text().splitlines()
    assert table[0].split(",")[:4] == ["phase", "trial", "method", "pattern"] and "fits_budget" in table[0]
    assert "latency_ms_spread" in table[0]
    assert sum(",NO" in line for line in table) == sum(not r["feasible"] for r in rows)


@pytest.mark.slow  # the budget sweep (module fixture, about a minute)
def test_the_figure_and_report_show_the_front(swept):
    root, folder, tracking, _, rows = swept
    assert (folder / "figures" / "pareto.png").stat().st_size > 10_000
    numbers = (folder / "figures" / "pareto.csv").read_text()
    assert numbers.count("reference") == 1 and numbers.count("search") == 4
    report = (folder / "report.html").read_text()
    assert 'id="pareto"' in report and "Budget params_m&lt;=5" in report
    from analysis import FIGURES
    from analysis.runs import read_mlflow
    figure = FIGURES["pareto"].build(read_mlflow("pareto", "front", tracking))  # from MLflow alone
    front = figure.table[(figure.table["role"] == "search") & (figure.table["rank"] == 1)]
    others = figure.table[(figure.table["role"] == "search") & (figure.table["rank"] != 1)]
    assert len(front) and front["test_acc_pct"].notna().all() and others["test_acc_pct"].isna().all()


@pytest.mark.slow  # the budget sweep (module fixture, about a minute)
def test_pick_hands_back_the_most_accurate_model_that_fits(swept, tmp_path, capsys):
    root, folder, tracking, _, rows = swept
    out = tmp_path / "chosen" / "model.pt"
    fitting = [r for r in rows if r["params_m"] <= 5]
    best = max(fitting, key=lambda r: (r["selected_val_acc"], r["selected_epoch"], [-ord(c) for c in r["trial_id"]]))
    cap = 5 * max(r["latency_ms"] for r in rows)  # generous: the machine may be busy now
    code = pick_cli.main(["--sweep", "front", "--storage-path", str(root / "sweeps"), "--out", str(out),
                          "--budget", f"params_m=5,latency_ms={cap}", "--repeats", "3"])
    text = capsys.readouterr().out
    assert code == 0 and f"trial {best['trial_id']}" in text and "test accuracy" in text
    assert f": fits the budget latency_ms<={cap:g}" in text
    # the copy loads with torch and torchvision alone (vpns blocked), with the recorded size
    code = (f"import sys; sys.modules['vpns_core'] = None; sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
            "import torch\nfrom load_pruned import load_pruned\n"
            f"m = load_pruned({str(out)!r})\n"
            "print(sum(p.numel() for p in m.parameters()), sum(int((p != 0).sum()) for p in m.parameters()),\n"
            "      tuple(m(torch.zeros(2, 3, 32, 32)).shape))\n")
    done = subprocess.run([sys.executable, "-I", "-c", code], check=True, capture_output=True, text=True)
    numel, nonzero, shape = done.stdout.split(" ", 2)
    assert shape.strip() == "(2, 1000)"
    if best["config.method"] in ("vpns", "hydra"):  # the dense shape; the size counts nonzeros
        assert int(numel) == pytest.approx(dense_params(rows) * 1e6)
        assert int(nonzero) == pytest.approx(best["params_m"] * 1e6, rel=1e-3)
    else:  # the smaller network itself
        assert int(numel) == round(best["params_m"] * 1e6)
    # its program beside it: loads with torch alone (vpns blocked) and gives target-class logits
    program, export = out.with_name("model_program.pt2"), torch.load(out, weights_only=True)
    assert program.is_file() and f"copied its program to {program}" in text
    size = export["input_size"]
    code = ("import sys; sys.modules['vpns_core'] = None\nimport torch\n"
            f"m = torch.export.load({str(program)!r}).module()\n"
            f"print(tuple(m(torch.rand(3, 3, {size}, {size})).shape))\n")
    done = subprocess.run([sys.executable, "-I", "-c", code], check=True, capture_output=True, text=True)
    assert done.stdout.strip() == f"(3, {export['num_classes']})"
    # nothing fits: says so, names the closest trial (the smallest), copies nothing
    smallest = min(rows, key=lambda r: r["params_m"])
    assert pick_cli.main(["--sweep", "front", "--storage-path", str(root / "sweeps"),
                          "--budget", "params_m=0.001", "--out", str(tmp_path / "none.pt")]) == 1
    text = capsys.readouterr().out
    assert "Nothing fits params_m<=0.001" in text and f"trial {smallest['trial_id']}" in text
    assert not (tmp_path / "none.pt").exists()


def dense_params(rows):
    return next(r["params_m"] for r in rows if r["phase"] == "dense")


@pytest.mark.slow  # the budget sweep (module fixture, about a minute)
def test_resume_tags_the_ranks_again(swept):
    root, folder, tracking, argv, rows = swept
    from sweeps import pareto
    client = MlflowClient(tracking)
    run_id = rows[0]["mlflow_run_id"]
    client.delete_tag(run_id, "feasible")
    assert pareto.main(["--storage-path", str(root / "sweeps"), "--resume", "front"]) == 0
    assert client.get_run(run_id).data.tags["feasible"] == str(rows[0]["feasible"])
    again = pq.read_table(folder / "trials.parquet").to_pylist()
    assert {r["trial_id"]: r["pareto_rank"] for r in again} == {r["trial_id"]: r["pareto_rank"] for r in rows}


@pytest.mark.parametrize("flag, words", [
    (["--objectives", "latncy_ms"], "--objectives latncy_ms: unknown cost 'latncy_ms'; choose one or two of latency_ms, latency_cpu_ms, params_m, flops_g"),
    (["--objectives", "latency_cpu_ms", "--cpus-per-trial", "2"], "latency_cpu_ms: a pass's CPU time is its latency only at one CPU thread"),
    (["--budget", "latency_ms=fast"], "--budget latency_ms=fast: 'latency_ms=fast': the cap must be a number"),
    (["--scheduler", "asha"], "--scheduler asha: ASHA stops trials on one metric"),
    (["--set", "sparsity=0.5"], "--set sparsity: the Pareto search sets sparsity itself"),
    (["--set", "method=hydra"], "--set method: the Pareto search sets method itself"),
    (["--set", "pattern=2:4"], "--set pattern: the Pareto search sets pattern itself"),
    (["--set", "cost_record=False"], "--set cost_record=false: the Pareto search ranks trials by their cost record"),
])
def test_usage_errors_name_the_flag_before_anything_runs(flag, words, tmp_path, capsys):
    from sweeps import pareto
    assert pareto.main(["--preset", "tiny", "--storage-path", str(tmp_path), *flag]) == 2
    assert words in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
