"""Figures from small synthetic tables of runs with known values: the plotted numbers (read back
from each figure's CSV), seed counts of failed / stopped / missing trials, captions, files."""
import itertools
import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import analysis
from analysis import __main__ as cli
from analysis.plotting import best_notes, save
from analysis.runs import Runs, aggregate, complete_config, read_parquet

_ids = itertools.count()
ERROR = "Traceback (most recent call last):\n  ...\nValueError: mask_file: file not found"


def trial(seed, p=None, n=None, mp=None, mn=None, *, state="ok", script="ablation_pad",
          phase="trials", axes=None, extra=None, **config):
    """One row shaped like trials.parquet. Accuracies are fractions; ``state`` is ok / failed /
    stopped / missing (never ended)."""
    row = {"sweep": "syn-sweep", "script": script, "preset": "tiny", "phase": phase,
           "trial_id": f"t{next(_ids):04d}", "status": {"failed": "ERROR", "missing": "RUNNING"}.get(state, "TERMINATED"),
           "finished": state == "ok", "early_stopped": state == "stopped",
           "error": ERROR if state == "failed" else None, "num_failures": 2 if state == "failed" else 0,
           "mlflow_run_id": None, "epochs_done": 4 if state == "ok" else 1, "wall_time_s": 10.0,
           "config.seed": seed}
    row.update({f"config.{k}": v for k, v in config.items()})
    row.update({f"axis.{k}": str(v) for k, v in (axes or {}).items()})
    if state == "ok":
        row.update({"selected_val_acc": p, "selected_test_acc_prompt": p, "selected_test_acc_noprompt": n,
                    "selected_test_acc": p})  # the paper schedule's headline: with the prompt
        if mp is not None:
            row.update({"mask_stage_test_acc_prompt": mp, "mask_stage_test_acc_noprompt": mn})
    row.update(extra or {})
    return row


def runs_of(rows):
    return Runs(complete_config(pd.DataFrame(rows)))


def by(table, **point):
    """The CSV row at ``point`` (column -> value)."""
    mask = pd.Series(True, index=table.index)
    for column, value in point.items():
        mask &= table[column.replace("__", ".")] == value
    (index,) = table.index[mask]
    return table.loc[index]


def close(value, expected):
    return math.isclose(float(value), expected, abs_tol=1e-6)


# --- one synthetic sweep per figure: rows, then checks on the CSV read back ------------------------


def pad_rows():
    rows = []
    for seed, p in zip((7, 9, 17), (0.60, 0.62, 0.64)):  # no prompt: 62 ± 2
        rows.append(trial(seed, p, p, 0.30, 0.30, prompt="none", pad_size=0, axes={"pad": "none"}))
    rows.append(trial(7, 0.70, 0.50, 0.40, 0.20, pad_size=8, axes={"pad": 8}))  # 71 ± 1.414
    rows.append(trial(9, 0.72, 0.52, 0.44, 0.22, pad_size=8, axes={"pad": 8}))
    rows.append(trial(17, state="failed", pad_size=8, axes={"pad": 8}))
    rows.append(trial(7, 0.80, 0.40, 0.50, 0.10, pad_size=16, axes={"pad": 16}))
    rows.append(trial(9, state="stopped", pad_size=16, axes={"pad": 16}))  # seed 17: missing
    return rows


def check_pad(table, figure):
    assert list(table["pad_px"]) == ["no prompt, as many updates", "8", "16"]  # the control first
    none, eight, sixteen = (by(table, pad_px=v) for v in ("no prompt, as many updates", "8", "16"))
    assert close(none["test_prompt_pct_mean"], 62) and close(none["test_prompt_pct_std"], 2)
    assert close(eight["test_prompt_pct_mean"], 71) and close(eight["test_prompt_pct_std"], math.sqrt(2))
    assert close(eight["test_noprompt_pct_mean"], 51) and close(eight["mask_prompt_pct_mean"], 42)
    assert (eight["ok"], eight["failed"], eight["stopped"], eight["missing"]) == (2, 1, 0, 0)
    assert (sixteen["ok"], sixteen["failed"], sixteen["stopped"], sixteen["missing"]) == (1, 0, 1, 1)
    assert close(sixteen["test_prompt_pct_mean"], 80) and math.isnan(sixteen["test_prompt_pct_std"])
    text = " ".join(figure.caption)
    assert "3 seeds (7, 9, 17)" in text and "preset tiny" in text and "Fashion-MNIST" in text
    assert "pad width 16: 1/3 seeds finished (1 stopped early, 1 missing)" in text
    assert "pad width 8: 2/3 seeds finished (1 failed)" in text
    # no prompt (the paper schedule: as many updates) is a control; two paired seeds test nothing
    assert ("Headline accuracy against the controls: pad width 8 − no prompt, as many updates: "
            "+10.0 points (2 seeds paired; at least 3 needed): not tested; pad width 16 − no "
            "prompt, as many updates: +20.0 points (1 seed paired; at least 3 needed): not tested.") in text
    assert "seed noise" not in text and "nan" not in text
    assert "two steps" not in text  # the paper schedule: one step per iteration in every arm


def input_rows():
    return [trial(seed, p, p - 0.1, input_size=size)
            for size, values in ((32, (0.5, 0.6)), (48, (0.7, 0.9)))
            for seed, p in zip((7, 9), values)]


def check_input(table, figure):
    assert close(by(table, config__input_size=32)["test_prompt_pct_mean"], 55)
    assert close(by(table, config__input_size=48)["test_noprompt_pct_mean"], 70)
    assert close(by(table, config__input_size=48)["test_prompt_pct_std"], math.sqrt(200))
    assert "mask_prompt_pct_mean" in table and by(table, config__input_size=32)["mask_prompt_pct_n"] == 0


def prompt_rows():
    return [trial(seed, p, 0.3, 0.2, 0.1, prompt=kind, extra={"prompt_tunable": 1344})
            for kind, values in (("pad", (0.8, 0.82, 0.84)), ("fix", (0.6, 0.62, 0.61)),
                                 ("random", (0.5, 0.52, 0.52)))
            for seed, p in zip((7, 9, 17), values)]


def check_prompt(table, figure):
    assert close(by(table, config__prompt="fix")["test_prompt_pct_mean"], 61)
    assert close(by(table, config__prompt="pad")["test_noprompt_pct_mean"], 30)
    text = " ".join(figure.caption)
    assert "pad 1344, fix 1344, random 1344" in text
    # pad - fix: 20, 20, 23 points (p = 0.0025); pad - random: 30, 30, 32 (p = 0.0008): Holm over 2
    assert ("Headline accuracy, highest point against the others: prompt type pad − prompt type "
            "fix: +21.0 points, family-wise 95% CI (Holm over 2) [") in text
    assert text.count("3 seeds: resolved") == 2


def stage_rows():
    values = {"both": 0.8, "mask": 0.7, "tune": 0.75, "none": 0.6}
    return [trial(seed, values[stage] + d, values[stage] + d, 0.5 + d, 0.4, vp_stages=stage)
            for stage in values for seed, d in ((7, 0.0), (9, 0.2))]  # std 14.1 points: all within noise


def check_stage(table, figure):
    assert set(table["config.vp_stages"]) == {"both", "mask", "tune", "none"}
    assert close(by(table, config__vp_stages="tune")["test_prompt_pct_mean"], 85)
    assert close(by(table, config__vp_stages="none")["mask_noprompt_pct_mean"], 40)
    text = " ".join(figure.caption)
    assert "(2 seeds paired; at least 3 needed): not tested" in text and "seed noise" not in text
    assert "Every arm takes one step per iteration: the same updates." in text


def sparsity_rows(script="sparsity_curves"):
    rows = []
    for method, base in (("vpns", 0.8), ("hydra", 0.7)):
        for sparsity, drop in ((0.5, 0.0), (0.9, 0.1)):
            for seed, d in ((7, 0.0), (9, 0.02)):
                acc = base - drop + d
                rows.append(trial(seed, acc, acc - 0.05, acc - 0.3, acc - 0.35, script=script,
                                  phase="pruned", method=method, sparsity=sparsity,
                                  extra={"last.grad_steps": 100 * (2 if method == "vpns" else 1),
                                         "wall_time_s": 10.0 + seed, "epochs_done": 4}))
    rows.append(trial(7, state="failed", script=script, phase="pruned", method="hydra", sparsity=0.9))
    for seed, acc in ((7, 0.9), (9, 0.92)):
        rows.append(trial(seed, acc, acc, script=script, phase="dense", method="dense",
                          extra={"last.grad_steps": 50, "wall_time_s": 5.0, "epochs_done": 2}))
    return rows


def check_sparsity(table, figure):
    vpns = by(table, config__method="vpns", config__sparsity=0.9)
    assert close(vpns["test_prompt_pct_mean"], 71) and close(vpns["mask_noprompt_pct_mean"], 36)
    assert close(vpns["sparsity_pct"], 90)
    dense = by(table, config__method="dense")
    assert close(dense["test_prompt_pct_mean"], 91) and dense["mask_prompt_pct_n"] == 0
    hydra = by(table, config__method="hydra", config__sparsity=0.9)
    assert (hydra["ok"], hydra["failed"], hydra["failed_trials"], hydra["trials"]) == (2, 0, 1, 3)
    assert "Failed trials at points that have a result from another trial: HYDRA at 90%: 1." in " ".join(figure.caption)
    text = " ".join(figure.caption)
    assert "Dense fine-tuning (dotted line, ± std band): Fashion-MNIST: with prompt 91.0 ± 1.4%" in text


def check_cost(table, figure):
    vpns = by(table, config__method="vpns", config__sparsity=0.5)
    assert close(vpns["grad_steps_mean"], 200) and close(vpns["wall_time_s_mean"], 18)
    assert close(vpns["epochs_mean"], 4)
    assert close(by(table, config__method="dense")["grad_steps_mean"], 50)


def architecture_rows():
    rows = []
    for arch, model, pretrained, acc in (("resnet18", "resnet18", True, 0.8),
                                         ("scratch", "resnet18", False, 0.3)):
        for method, d in (("vpns", 0.05), ("hydra", 0.0)):
            for seed in (7, 9):
                rows.append(trial(seed, acc + d, acc + d - 0.1, acc, acc, script="architectures",
                                  model=model, pretrained=pretrained, method=method,
                                  axes={"architecture": arch}))
    return rows


def check_architectures(table, figure):
    assert close(by(table, architecture="resnet18", config__method="vpns")["test_prompt_pct_mean"], 85)
    assert close(by(table, architecture="scratch", config__method="hydra")["test_noprompt_pct_mean"], 20)
    assert "scratch = resnet18, random init" in " ".join(figure.caption)


def transfer_rows():
    rows = [trial(7, None, None, 0.6, 0.5, script="transfer", phase="source", method="vpns", tune_epochs=0),
            trial(9, state="failed", script="transfer", phase="source", method="vpns", tune_epochs=0),
            trial(7, None, None, 0.55, 0.5, script="transfer", phase="source", method="hydra", tune_epochs=0),
            trial(9, None, None, 0.57, 0.5, script="transfer", phase="source", method="hydra", tune_epochs=0)]
    for method, seeds in (("vpns", (7,)), ("hydra", (7, 9))):  # vpns seed 9 has no source mask
        for seed in seeds:
            rows.append(trial(seed, 0.9 if method == "vpns" else 0.8 + seed / 100, 0.7, script="transfer",
                              phase="target", method=method, dataset="digits",
                              mask_file=f"/m/{method}{seed}/masks.pt",
                              axes={"mask": f"fashion_mnist/{method}/seed{seed}", "dataset": "digits"}))
    return rows


def check_transfer(table, figure):
    vpns = by(table, transfer="Fashion-MNIST → digits", config__method="vpns")
    assert close(vpns["test_prompt_pct_mean"], 90) and (vpns["ok"], vpns["missing"]) == (1, 1)
    hydra = by(table, transfer="Fashion-MNIST → digits", config__method="hydra")
    assert close(hydra["test_prompt_pct_mean"], 88) and hydra["ok"] == 2
    text = " ".join(figure.caption)
    assert "Fashion-MNIST VPNs: 1/2 finished, after mask finding 60.0% (1 seed) with prompt" in text


def pilot_rows():
    values = {("omp", "none"): 0.6, ("omp", "zero_shot"): 0.5, ("omp", "fine_tune"): 0.7,
              ("random", "none"): 0.4, ("random", "zero_shot"): 0.3, ("random", "fine_tune"): 0.45}
    return [trial(seed, acc + d, acc - 0.1, script="pilot", method=method, post_prompt=post)
            for (method, post), acc in values.items() for seed, d in ((7, 0.0), (9, 0.01))]


def check_pilot(table, figure):
    assert close(by(table, config__method="omp", config__post_prompt="fine_tune")["test_prompt_pct_mean"], 70.5)
    assert close(by(table, config__method="random", config__post_prompt="zero_shot")["test_noprompt_pct_mean"], 20)


def structured_rows():
    rows = [trial(seed, 0.8 - s / 2, 0.7 - s / 2, script="structured", method=method, sparsity=s,
                  extra={"speedup": 1 + s * (2 if method == "vpns_structured" else 1),
                         "memory_mb": 100 * (1 - s), "flops_g": 0.2 * (1 - s)})
            for method in ("vpns_structured", "slim") for s in (0.3, 0.6) for seed in (7, 9)]
    return rows + [trial(seed, 0.9, 0.85, script="structured", method="dense", sparsity=0.9)
                   for seed in (7, 9)]


def check_structured(table, figure):
    row = by(table, config__method="vpns_structured", config__sparsity=0.6)
    assert close(row["speedup_mean"], 2.2) and close(row["memory_mb_mean"], 40)
    assert close(row["flops_g_mean"], 0.08)
    assert close(row["test_prompt_pct_mean"], 50)
    assert "dense" not in set(table["config.method"])  # the dense trials draw the reference line
    assert any("Dense fine-tuning" in line for line in figure.caption)


def lr_rows():
    return [trial(7, 0.8, 0.7, script="learning_rates", mask_lr=0.01, tune_lr=0.05),
            trial(7, 0.6, 0.5, script="learning_rates", mask_lr=0.001, tune_lr=0.01),
            trial(7, state="stopped", script="learning_rates", mask_lr=0.1, tune_lr=0.1,
                  extra={"last.val_acc": 0.2}),
            trial(7, state="failed", script="learning_rates", mask_lr=0.05, tune_lr=0.002)]


def check_lr(table, figure):
    assert list(table["state"]) == ["ok", "ok", "stopped", "failed"]  # best validation first
    assert close(table.loc[0, "mask_lr"], 0.01) and close(table.loc[0, "val_acc_pct"], 80)
    assert close(table.loc[2, "val_acc_pct"], 20) and math.isnan(table.loc[3, "val_acc_pct"])
    assert "Best by validation: mask_lr 0.01, tune_lr 0.05" in " ".join(figure.caption)


CASES = {"pad_size": (pad_rows, check_pad), "input_size": (input_rows, check_input),
         "prompt_type": (prompt_rows, check_prompt), "vp_stage": (stage_rows, check_stage),
         "sparsity_curves": (sparsity_rows, check_sparsity), "cost": (sparsity_rows, check_cost),
         "architectures": (architecture_rows, check_architectures),
         "transfer": (transfer_rows, check_transfer), "pilot": (pilot_rows, check_pilot),
         "structured": (structured_rows, check_structured), "learning_rates": (lr_rows, check_lr)}


def test_a_one_step_no_prompt_under_the_reference_loop_is_named_half_the_updates():
    rows = [{**row, "config.schedule": "reference"} for row in pad_rows()]
    caption = " ".join(analysis.FIGURES["pad_size"].build(runs_of(rows)).caption)
    assert "pad width 8 − no prompt, half the updates" in caption
    assert "as many updates:" not in caption


def test_pad_figure_tests_each_pad_against_both_controls_on_the_unprompted_headline():
    """The default figure's shape: pads, the frozen pad, no prompt with matched updates, under the
    reference loop (headline: without the prompt), 3 seeds; the caption's numbers are scipy's
    paired t-test, Holm over the figure's 4 comparisons."""
    from scipy import stats as sps
    seeds = (7, 9, 17)
    acc = {"4": (0.82, 0.83, 0.81), "8": (0.84, 0.85, 0.82), "frozen": (0.79, 0.84, 0.77),
           "none": (0.79, 0.76, 0.73)}
    fields = {"4": dict(pad_size=4), "8": dict(pad_size=8), "frozen": dict(pad_size=8, learn_prompt=False),
              "none": dict(prompt="none", pad_size=0, matched_updates=True)}
    rows = []
    for arm, values in acc.items():
        for seed, n in zip(seeds, values):
            row = trial(seed, 0.5, n, schedule="reference", axes={"pad": arm}, **fields[arm])
            row["selected_test_acc"] = n  # the reference schedule's headline: without the prompt
            rows.append(row)
    figure = analysis.FIGURES["pad_size"].build(runs_of(rows))
    text = " ".join(figure.caption)
    assert list(figure.table["pad_px"]) == ["pad frozen at zero (same updates)", "no prompt, as many updates", 4, 8]
    p = {(a, c): sps.ttest_rel([100 * v for v in acc[a]], [100 * v for v in acc[c]]).pvalue
         for a in ("4", "8") for c in ("frozen", "none")}
    ordered_p = sorted(p.values())
    holm = [max(min(1, (4 - i) * q) for i, q in enumerate(ordered_p[:k + 1])) for k in range(4)]
    adjusted = dict(zip(sorted(p, key=p.get), holm))
    expect = f"pad width 8 − pad frozen at zero (same updates): +3.7 points, family-wise 95% CI (Holm over 4) ["
    assert expect in text
    assert f"p = {adjusted[('8', 'frozen')]:.2g} (Holm)" in text
    assert "two steps" in text and "twice the epochs" in text
    assert "± 1 std (a description, not a test)" in text


def test_every_registered_figure_has_a_synthetic_case():
    assert set(CASES) == set(analysis.FIGURES)


@pytest.mark.parametrize("name", sorted(analysis.FIGURES))
def test_figure_plots_the_known_numbers(name, tmp_path):
    make_rows, check = CASES[name]
    runs = runs_of(make_rows())
    module = analysis.FIGURES[name]
    assert module.applicable(runs)
    figure = module.build(runs)
    png, svg, csv = save(figure, tmp_path)
    assert [p.name for p in (png, svg, csv)] == [f"{name}.png", f"{name}.svg", f"{name}.csv"]
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert svg.stat().st_size > 5000
    check(pd.read_csv(csv), figure)


def test_aggregate_keeps_the_best_trial_on_validation_per_point_and_seed():
    rows = [trial(7, 0.5, 0.5, pad_size=8, extra={"selected_val_acc": 0.9}),  # chosen: best val
            trial(7, 0.8, 0.8, pad_size=8, extra={"selected_val_acc": 0.1}),  # best test: not chosen
            trial(9, 0.6, 0.6, pad_size=8)]
    table = aggregate(runs_of(rows).trials, ["config.pad_size"],
                      {"acc": ("selected_test_acc_prompt", 100.0)})
    assert close(table.loc[0, "acc_mean"], 55) and table.loc[0, "acc_n"] == 2
    assert (table.loc[0, "trials"], table.loc[0, "ok"]) == (3, 2)


def test_a_trial_that_never_ended_counts_as_missing():
    table = aggregate(runs_of([trial(7, 0.5, 0.5), trial(9, state="missing")]).trials,
                      ["config.pad_size"], {"acc": ("selected_test_acc_prompt", 1.0)})
    assert (table.loc[0, "ok"], table.loc[0, "missing"]) == (1, 1)


def test_best_notes_test_the_highest_point_paired_by_seed_with_holm_over_the_figure():
    from scipy import stats as sps
    a = {7: 80.0, 9: 81.0, 17: 82.5}
    b = {7: 78.0, 9: 80.5, 17: 79.0}  # diffs 2.0, 0.5, 3.5
    c = {7: 70.0, 9: 71.0, 17: 72.0}
    table = pd.DataFrame({"g": ["u", "u", "v", "v"], "x": [1, 2, 1, 2],
                          "a_mean": [81.17, 79.17, 71.0, 81.17], "a_n": [3, 3, 3, 3],
                          "a_by_seed": [a, b, c, a]})
    notes = best_notes(table, lambda r: f"x{r['x']}", by="g", heading=lambda g: f"group {g}", stem="a")
    assert notes[0].startswith("group u: x1 − x2: +2.0 points, family-wise 95% CI (Holm over 2) [")
    assert notes[1].startswith("group v: x2 − x1: +10.2 points")  # the highest mean goes first
    p_u = sps.ttest_rel(list(a.values()), list(b.values())).pvalue
    p_v = sps.ttest_rel(list(a.values()), list(c.values())).pvalue
    assert p_v < p_u  # Holm: v's is the first step (x 2), u's the second (x 1, after the running max)
    assert f"p = {max(2 * p_v, p_u):.2g} (Holm)" in notes[0] and notes[0].endswith("3 seeds: not resolved.")
    assert f"p = {2 * p_v:.2g} (Holm)" in notes[1] and notes[1].endswith("3 seeds: resolved.")


def test_missing_config_fields_get_config_defaults_but_explicit_none_stays():
    trials = complete_config(pd.DataFrame([{"config.prompt": "none", "config.train_subset": None},
                                           {"config.prompt": None, "config.train_subset": None}]))
    assert list(trials["config.prompt"]) == ["none", "pad"]  # the export leaves defaults out
    assert list(trials["config.method"]) == ["vpns", "vpns"]
    assert trials["config.train_subset"].isna().all()  # may be an explicit None: never filled


def write_parquet(rows, folder):
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]),
                   folder / "trials.parquet")
    pq.write_table(pa.Table.from_pylist([{"sweep": "syn-sweep", "phase": "trials", "trial_id": r["trial_id"],
                                          "epoch": 1} for r in rows]), folder / "epochs.parquet")
    return folder / "trials.parquet", folder / "epochs.parquet"


def test_sweep_hook_writes_table_figure_report_and_a_closing_note(tmp_path):
    trials, epochs = write_parquet(pad_rows(), tmp_path / "sweep")
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"args": {"tracking_uri": None}}))
    notes = []
    paths = analysis.sweep_figure("ablation_pad", [{"pad": "none", "done": 3}], trials, epochs,
                                  tmp_path / "sweep", echo=notes.append)
    names = {p.relative_to(tmp_path / "sweep").as_posix() for p in paths}
    assert names == {"ablation_pad_table.csv", "figures/pad_size.png", "figures/pad_size.svg",
                     "figures/pad_size.csv", "report.html"}
    assert all(p.stat().st_size > 0 for p in paths)
    (note,) = notes
    assert f"figure pad_size: {tmp_path / 'sweep' / 'figures' / 'pad_size.png'}" in note
    assert "pad width 8: tested with prompt 71.0 ± 1.4%" in note and "[2/3 seeds]" in note
    page = (tmp_path / "sweep" / "report.html").read_text()
    assert "Pad-size ablation" in page and "data:image/png;base64," in page
    assert "Failed trials" in page and "mask_file: file not found" in page


def test_points_where_every_seed_failed_are_drawn_as_failed(tmp_path):
    rows = [trial(7, state="failed", pad_size=8), trial(9, state="failed", pad_size=16)]
    trials, epochs = write_parquet(rows, tmp_path / "sweep")
    paths = analysis.sweep_figure("ablation_pad", [], trials, epochs, tmp_path / "sweep", echo=None)
    assert (tmp_path / "sweep" / "ablation_pad_table.csv") in paths
    table = pd.read_csv(tmp_path / "sweep" / "figures" / "pad_size.csv")
    assert list(table["failed"]) == [1, 1] and list(table["ok"]) == [0, 0]  # drawn as failed points


def test_cli_rebuilds_one_figure_from_the_parquet_export(tmp_path, capsys):
    trials, _ = write_parquet(prompt_rows(), tmp_path / "sweep")
    assert cli.main(["prompt_type", "--trials", str(trials), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "prompt_type.csv")
    assert close(by(table, config__prompt="random")["test_prompt_pct_mean"], 154 / 3)
    assert (tmp_path / "out" / "prompt_type.png").stat().st_size > 0
    assert "figure prompt_type:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["no_such_figure", "--trials", str(trials)])


def test_read_parquet_reads_the_export(tmp_path):
    trials, _ = write_parquet(pad_rows(), tmp_path)
    runs = read_parquet(trials)
    assert len(runs.trials) == 8 and len(runs.epochs) == 8
    assert (runs.script, runs.preset, runs.sweep) == ("ablation_pad", "tiny", "syn-sweep")


def test_sweep_hook_never_raises_on_an_empty_sweep(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([]), folder / "trials.parquet")
    pq.write_table(pa.Table.from_pylist([]), folder / "epochs.parquet")
    paths = analysis.sweep_figure("ablation_pad", [], folder / "trials.parquet",
                                  folder / "epochs.parquet", folder, echo=None)
    assert paths[0] == folder / "ablation_pad_table.csv" and paths[0].is_file()


def test_cli_names_a_missing_mlflow_store_and_does_not_create_one(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli.main(["pad_size", "--experiment", "ablation_pad", "--tracking-uri", uri]) == 2
    assert "no MLflow database" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def effect_rows():
    rows = []
    for seed, d in ((7, 0.0), (9, 0.02), (17, 0.04)):
        rows.append(trial(seed, 0.60 + d, 0.60 + d, 0.5, 0.5, script="prompt_effect", phase="inert",
                          method="hydra", axes={"setting": "hydra"}))
        rows.append(trial(seed, 0.70 + d, 0.40, 0.5, 0.3, script="prompt_effect", phase="inert",
                          method="vpns", axes={"setting": "vpns"}))
        rows.append(trial(seed, 0.61 + d, 0.61 + d, 0.5, 0.5, script="prompt_effect", phase="inert",
                          method="vpns", axes={"setting": "vpns_inert_prompt"}))
    return rows


def check_effect(table, figure):
    assert list(table["point"]) == ["inert: hydra", "inert: vpns", "inert: vpns_inert_prompt"]
    assert close(by(table, point="inert: vpns")["test_prompt_pct_mean"], 72)
    text = " ".join(figure.caption)
    # vpns - hydra: +10 at every seed (no variance: not tested); inert: +1 at every seed likewise
    assert ("Phase inert, headline accuracy against hydra (62.0 ± 2.0%): vpns − hydra: +10.0 points "
            "at all 3 seeds (no variance): not tested; vpns_inert_prompt − hydra: +1.0 points at all "
            "3 seeds (no variance): not tested.") in text
    assert analysis.figures_for(runs_of(effect_rows()), "prompt_effect") == ["prompt_effect"]


CASES["prompt_effect"] = (effect_rows, check_effect)


def pareto_rows():
    """A Pareto search (no rank columns: the figure ranks as the sweep does) under params_m<=2."""
    def point(method, sparsity, val, test, latency, params, **extra):
        costs = {"selected_val_acc": val, "selected_test_acc": test, "latency_ms": latency,
                 "latency_ms_min": 0.9 * latency, "latency_ms_max": 1.2 * latency, "params_m": params,
                 "flops_g": params / 100, "pareto_objectives": "selected_val_acc:max,latency_ms:min",
                 "pareto_budget": "params_m<=2", "latency_batch": 64, "latency_threads": 1,
                 "latency_device": "cpu: test", **extra}
        return trial(7, val, val, script="pareto", phase="search", method=method, sparsity=sparsity,
                     extra={**costs, "pareto_reference": False})
    rows = [point("depgraph", 0.7, 0.50, 0.48, 20.0, 0.6), point("depgraph", 0.5, 0.60, 0.55, 40.0, 1.2),
            point("slim", 0.5, 0.55, 0.50, 45.0, 1.2),                   # dominated by depgraph 0.5
            point("hydra", 0.9, 0.70, 0.66, 80.0, 1.5),
            point("vpns_structured", 0.1, 0.75, 0.70, 70.0, 3.5)]      # best, but over the budget
    dense = trial(7, 0.72, 0.72, script="pareto", phase="dense", method="dense", sparsity=0.9,
                  extra={"selected_val_acc": 0.72, "selected_test_acc": 0.70, "latency_ms": 82.0,
                         "params_m": 4.6, "flops_g": 0.046, "pareto_reference": True,
                         "pareto_objectives": "selected_val_acc:max,latency_ms:min", "pareto_budget": "params_m<=2"})
    return rows + [dense]


def check_pareto(table, figure):
    search = table[table["role"] == "search"]
    ranks = dict(zip(search["config.method"] + " " + search["sparsity"].astype(str), search["rank"]))
    assert ranks == {"depgraph 0.7": 1, "depgraph 0.5": 1, "hydra 0.9": 1, "slim 0.5": 2,
                     "vpns_structured 0.1": 3}  # over the budget: after every trial that fits
    assert list(search["fits"]) == [True, True, True, True, False]
    front = search[search["rank"] == 1]
    assert sorted(front["test_acc_pct"]) == pytest.approx([48, 55, 66]) and search[search["rank"] != 1]["test_acc_pct"].isna().all()
    reference = table[table["role"] == "reference"].iloc[0]
    assert close(reference["val_acc_pct"], 72) and math.isnan(reference["sparsity"])
    text = " ".join(figure.caption)
    assert "Budget params_m<=2: 4 of 5 trials fit" in text
    assert "Front latency 20.0-80.0 ms (4.0x range) at batch 64" in text and "HYDRA" in text
    assert analysis.figures_for(runs_of(pareto_rows()), "pareto") == ["pareto"]


CASES["pareto"] = (pareto_rows, check_pareto)


def test_the_pareto_figure_labels_2_4_candidates_and_the_retimed_spread(tmp_path):
    rows = pareto_rows()
    nm = trial(7, 0.65, 0.65, script="pareto", phase="search", method="hydra", sparsity=0.5, pattern="2:4",
               extra={**{k: v for k, v in rows[3].items() if not k.startswith(("config.", "trial_id"))},
                      "selected_val_acc": 0.65, "latency_ms": 60.0, "latency_ms_min": 55.0,
                      "latency_ms_max": 70.0, "params_m": 1.8})
    rows.insert(4, nm)
    for row in rows:  # re-timed by the sweep: the in-trial median kept, the IQR beside the median
        if row["phase"] == "search":
            row.update(latency_ms_in_trial=1.5 * row["latency_ms"], latency_ms_spread=0.1 * row["latency_ms"],
                       latency_repeats=10)
    figure = analysis.FIGURES["pareto"].build(runs_of(rows))
    _, _, csv = save(figure, tmp_path)
    table = pd.read_csv(csv)
    search = table[table["role"] == "search"]
    patterns = dict(zip(search["config.method"] + " " + search["sparsity"].astype(str), search["pattern"]))
    assert patterns == {"depgraph 0.7": "channels", "depgraph 0.5": "channels", "slim 0.5": "channels",
                        "hydra 0.9": "unstructured", "hydra 0.5": "2:4", "vpns_structured 0.1": "channels"}
    assert search.set_index("pattern").loc["2:4", "latency_ms_spread"] == pytest.approx(6.0)
    text = " ".join(figure.caption)
    assert "re-timed after training, one candidate at a time with no trial running: median of 10" in text
    assert "interquartile range is a median 10% of the median" in text and "read a median 1.50x" in text
    assert "Squares: 2:4 weight patterns" in text
    assert figure.label({"config.method": "hydra", "pattern": "2:4", "sparsity": 0.5}) == "hydra 2:4 0.5"


def test_rerun_comparison_pairs_points_and_seeds(tmp_path):
    from analysis import rerun
    first = [trial(s, p, p, pad_size=8, axes={"pad": 8}) for s, p in ((7, 0.60), (9, 0.64), (17, 0.62))]
    first += [trial(s, p, p, pad_size=16, axes={"pad": 16}) for s, p in ((7, 0.70), (9, 0.72), (17, 0.71))]
    again = [trial(s, p, p, pad_size=8, axes={"pad": 8}) for s, p in ((7, 0.60), (9, 0.66), (17, 0.63))]
    again += [trial(s, p, p, pad_size=16, axes={"pad": 16}) for s, p in ((7, 0.75), (9, 0.76), (17, 0.77))]
    paths = []
    for name, rows in (("a", first), ("b", again)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        paths.append(str(path))
    result = rerun.compare(read_parquet(paths[0]).trials, read_parquet(paths[1]).trials,
                           "selected_test_acc_prompt")
    assert len(result["pairs"]) == 6 and result["identical"] == 1
    assert math.isclose(result["max_diff"], 6.0, abs_tol=1e-9)
    by_point = {r["point"]: r for r in result["points"]}
    # pad 16 moved 5, 4, 6 points (p = 0.013, Holm over 2: resolved); pad 8 0, 2, 1 (p = 0.23)
    assert by_point["8"]["within"] and not by_point["16"]["within"]
    assert rerun.main([*paths, "--metric", "selected_test_acc_prompt"]) == 1
    assert rerun.main([paths[0], str(tmp_path / "missing.parquet")]) == 2


def confirmation_rows():
    """Four seeds of the five arms; pad8 at seed 104 failed (dropped from H1 and H3)."""
    from search_spaces.confirmation import ARMS
    acc = {"pad8": (0.84, 0.85, 0.83, None), "pad8_frozen": (0.81, 0.819, 0.801, 0.80),
           "none_matched": (0.87, 0.881, 0.859, 0.85), "pad8_99": (0.77, 0.78, 0.76, 0.77),
           "pad8_frozen_99": (0.77, 0.77, 0.77, 0.78)}
    rows = []
    for arm, values in acc.items():
        fields = {k: v for k, v in ARMS[arm].items()}
        for seed, n in zip((101, 102, 103, 104), values):
            row = trial(seed, 0.5, n, state="ok" if n is not None else "failed", script="confirm_prompt",
                        axes={"arm": arm}, schedule="reference", data_seed=1, **fields)
            rows.append(row)
    return rows


def check_confirmation(table, figure):
    from scipy import stats as sps
    assert len(table) == 20 and set(table["arm"]) == {"pad8", "pad8_frozen", "none_matched", "pad8_99",
                                                      "pad8_frozen_99"}
    row = table[(table["arm"] == "pad8") & (table["seed"] == 102)].iloc[0]
    assert close(row["test_noprompt_pct"], 85) and row["state"] == "ok"
    assert table[(table["arm"] == "pad8") & (table["seed"] == 104)]["test_noprompt_pct"].isna().all()
    text = " ".join(figure.caption)
    p1 = sps.ttest_rel([84, 85, 83], [81, 81.9, 80.1]).pvalue  # H1: +3.0 at seeds 101-103
    p3 = sps.ttest_rel([84, 85, 83], [87, 88.1, 85.9]).pvalue  # H3: -3.0
    p2 = sps.ttest_rel([77, 78, 76, 77], [77, 77, 77, 78]).pvalue  # H2: -0.25
    order = sorted([("H1", p1), ("H2", p2), ("H3", p3)], key=lambda kv: kv[1])
    holm, running = {}, 0.0
    for i, (h, p) in enumerate(order):
        running = max(running, min(1.0, (3 - i) * p))
        holm[h] = running
    assert f"H1: pad8 − pad8_frozen: +3.0 points, family-wise 95% CI (Holm over 3) [" in text
    assert f"p = {holm['H1']:.2g} (Holm), 3 seeds: reproduced." in text
    assert f"p = {holm['H3']:.2g} (Holm), 3 seeds: contradicted." in text
    assert "H2: pad8_99 − pad8_frozen_99: -0.2 points" in text and "4 seeds: not resolved." in text
    assert "pad8 seed 104 (failed)" in text


CASES["confirmation"] = (confirmation_rows, check_confirmation)


def nm_rows():
    """Three seeds of the N:M study's eight arms (search_spaces/nm.py)."""
    from search_spaces.nm import METHODS, PATTERNS
    acc = {"vpns": 0.80, "frozen pad": 0.78, "hydra": 0.75, "omp": 0.70}
    rows = []
    for pattern, fields in PATTERNS.items():
        for arm, method in METHODS.items():
            for seed, d in ((7, 0.0), (9, 0.011), (17, -0.004)):
                value = acc[arm] + d + (0.004 * seed if arm == "vpns" else 0.0) - (0.05 if pattern == "2:4" else 0)
                row = trial(seed, value, value, script="ablation_nm", axes={"pattern_arm": f"{pattern} · {arm}"},
                            **{**fields, **method})
                rows.append(row)
    return rows


def check_nm(table, figure):
    assert set(table["pattern"]) == {"2:4", "unstructured 50%"} and len(table) == 8
    row = table[(table["pattern"] == "2:4") & (table["arm"] == "omp")].iloc[0]
    assert close(row["test_pct_mean"], 100 * (0.70 - 0.05 + (0.011 - 0.004) / 3))
    text = " ".join(figure.caption)
    assert "2:4, headline accuracy: vpns − frozen pad: +" in text
    assert "unstructured 50%, headline accuracy: vpns − frozen pad:" in text
    assert text.count("family-wise 95% CI (Holm over 6)") == 6


CASES["nm"] = (nm_rows, check_nm)
