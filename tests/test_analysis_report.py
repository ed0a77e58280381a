"""Figures and the HTML report from runs logged to MLflow the way the sweeps log them (a parent run,
one child run per trial with params, metrics, tags and the prompt image), and the report
rendered by a real headless browser."""
import json
import re
import shutil
import subprocess
import time

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis import FIGURES
from analysis import __main__ as cli
from analysis import report
from analysis.runs import complete_config, read_mlflow, read_parquet
from test_analysis import pad_rows, write_parquet

SWEEP = "syn-sweep"


def log_sweep(uri: str, rows: list[dict], folder) -> str:
    """Log ``rows`` as the trial runs of one sweep (as ``sweeps/tracking.py`` does); returns the
    parent run id. Fills each row's ``mlflow_run_id`` and writes the prompt images."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("ablation_pad", artifact_location=(folder / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name=SWEEP, tags={
        "sweep": SWEEP, "role": "parent", "script": "ablation_pad", "preset": "tiny"}).info.run_id
    full = complete_config(pd.DataFrame(rows))
    prompt = np.random.default_rng(0).random((32, 32, 3))
    prompt[4:-4, 4:-4] = 0.5
    mpimg.imsave(folder / "prompt.png", prompt)
    now = int(time.time() * 1000)
    for row, (_, config) in zip(rows, full.iterrows()):
        tags = {"sweep": SWEEP, "phase": row["phase"], "script": "ablation_pad", "preset": "tiny",
                "role": "trial", "trial_id": row["trial_id"], "mlflow.parentRunId": parent,
                "early_stopped": str(row["early_stopped"]).lower()}
        if row["status"] == "ERROR":
            tags.update(error=row["error"], failures=str(row["num_failures"]))
        run_id = client.create_run(experiment, tags=tags).info.run_id
        row["mlflow_run_id"] = run_id
        params = {k[7:]: json.dumps(v) if isinstance(v, dict) else str(v)
                  for k, v in config.items() if k.startswith("config.")}
        params.update({k[5:]: v for k, v in row.items() if k.startswith("axis.")})
        epoch = row["epochs_done"]
        metrics = {"epoch": epoch, "wall_time_s": row["wall_time_s"]}
        if row["finished"]:
            metrics.update({k: v for k, v in row.items() if k.startswith(("selected_", "mask_stage_"))})
            metrics.update(final_epoch=epoch, prompt_tunable=0 if config["config.prompt"] == "none" else 1344)
            row["prompt_tunable"] = metrics["prompt_tunable"]
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(epoch)) for k, v in metrics.items()
                                          if v is not None],
                         params=[Param(k, v) for k, v in params.items()])
        if row["finished"] and row["prompt_tunable"]:
            client.log_artifact(run_id, str(folder / "prompt.png"))
        client.set_terminated(run_id, "FAILED" if row["status"] == "ERROR" else "FINISHED")
    return parent


@pytest.fixture(scope="module")
def logged(tmp_path_factory, mlflow_store):
    """One MLflow store holding one synthetic pad sweep."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = mlflow_store(folder)
    rows = pad_rows()
    parent = log_sweep(uri, rows, folder)
    trials, _ = write_parquet(rows, folder / "sweep")
    return {"uri": uri, "parent": parent, "trials": trials,
            "prompts": sum(1 for r in rows if r["finished"] and r.get("prompt_tunable"))}


def test_mlflow_and_parquet_give_the_same_figure(logged, tmp_path):
    from_mlflow = read_mlflow("ablation_pad", tracking_uri=logged["uri"])
    from_parquet = read_parquet(logged["trials"])
    assert from_mlflow.sweep == SWEEP and len(from_mlflow.trials) == len(from_parquet.trials)
    tables = [FIGURES["pad_size"].build(runs).table for runs in (from_mlflow, from_parquet)]
    pd.testing.assert_frame_equal(*tables, check_dtype=False)
    with pytest.raises(LookupError, match="experiment 'nope' not found"):
        read_mlflow("nope", tracking_uri=logged["uri"])


def test_cli_rebuilds_a_figure_from_mlflow_and_logs_it_to_the_parent_run(logged, tmp_path, capsys):
    argv = ["pad_size", "--experiment", "ablation_pad", "--tracking-uri", logged["uri"], "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert (tmp_path / "pad_size.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert f"figure pad_size: {tmp_path / 'pad_size.png'}" in out and logged["parent"] in out
    names = {a.path for a in MlflowClient(logged["uri"]).list_artifacts(logged["parent"])}
    assert {"pad_size.png", "pad_size.svg", "pad_size.csv"} <= names


def test_report_embeds_figures_and_prompts_and_renders_in_a_headless_browser(logged, tmp_path):
    argv = ["--experiment", "ablation_pad", "--tracking-uri", logged["uri"], "--out", str(tmp_path)]
    assert report.main(argv) == 0
    page = tmp_path / "report.html"
    text = page.read_text()
    assert "src=\"http" not in text and "<link" not in text  # self-contained
    assert text.count('class="figure"') == 1 and text.count("<figcaption>") == logged["prompts"]
    names = {a.path for a in MlflowClient(logged["uri"]).list_artifacts(logged["parent"])}
    assert "report.html" in names

    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: run scripts/setup.sh"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1280,2000"]
    url = page.as_uri()
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60).stdout
    images = 1 + logged["prompts"]  # the page marks how many of its images decoded
    assert re.search(r'data-rendered="(\d+)/(\d+)"', dom).groups() == (str(images), str(images))
    shot = tmp_path / "screenshot.png"
    subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}", url],
                   capture_output=True, timeout=60, check=True)
    pixels = mpimg.imread(shot)[:, :, :3]
    assert pixels.shape[:2] == (2000, 1280)
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.2  # the plot lines, not grey text
    assert coloured.mean() > 0.002


def test_ties_on_validation_pick_the_same_trial_from_mlflow_and_from_parquet(tmp_path, mlflow_store):
    """Two trials of one point and seed with equal validation accuracy: the later selected epoch
    wins, then the smaller trial id, whichever order a source lists them in (the CSVs of the two
    sources are byte-identical)."""
    rows = pad_rows()
    tie = lambda test, epoch, trial_id: {**rows[3], "trial_id": trial_id, "selected_test_acc_prompt": test,
                                         "selected_epoch": epoch}
    # pad 8, seed 7 (val 0.70): the later epoch wins although it is listed last and has the larger id
    rows[3] = tie(0.70, 3, "t9001")
    rows.append(tie(0.10, 4, "t9002"))
    # pad 16, seed 7 (val 0.80): same epoch, so the smaller trial id wins although listed last
    rows[6] = {**rows[6], "trial_id": "t9004", "selected_epoch": 4}
    rows.append({**rows[6], "trial_id": "t9003", "selected_test_acc_prompt": 0.20})
    log_sweep(mlflow_store(tmp_path), rows, tmp_path)
    trials, _ = write_parquet(rows, tmp_path / "sweep")
    common = ["pad_size", "--no-log", "--out"]
    assert cli.main([*common, str(tmp_path / "p"), "--trials", str(trials)]) == 0
    assert cli.main([*common, str(tmp_path / "m"), "--experiment", "ablation_pad",
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    csv = (tmp_path / "p" / "pad_size.csv").read_bytes()
    assert csv == (tmp_path / "m" / "pad_size.csv").read_bytes()
    table = pd.read_csv(tmp_path / "p" / "pad_size.csv")
    assert table.loc[table["pad_px"].astype(str) == "8", "test_prompt_pct_mean"].item() == pytest.approx((10.0 + 72.0) / 2)
    assert table.loc[table["pad_px"].astype(str) == "16", "test_prompt_pct_mean"].item() == pytest.approx(20.0)
