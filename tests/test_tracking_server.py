"""Sweeps against a real MLflow tracking server (``mlflow server``: SQLite, artifacts proxied to a
local folder, 127.0.0.1, one worker): runs, metrics and artifacts go through it and are read back
by the analysis; the UI opens the experiment on its runs; a server killed mid-sweep loses no
result, and ``--resume`` back-fills its runs once it is back, without duplicates."""
import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from sweeps import ablation_pad
from sweeps.sweep import UNLOGGED
from sweeps.tracking import EXPERIMENT_KIND, KEY_METRICS, ui_link

MLFLOW = Path(sys.executable).with_name("mlflow")


class Server:
    """An ``mlflow server`` in its own process group, on a fixed port and database."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:  # a free port, kept across restarts
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        command = [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
                   "--artifacts-destination", str(self.folder / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = open(self.folder / "server.log", "a")
        # without MLflow 3's job runner: its eight huey consumer processes, which sweeps never use,
        # each import MLflow at every start (README, "A shared tracking server")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(["nice", *command], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.folder, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the MLflow server did not answer in time"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.read(8) == b"OK":
                        return
            except OSError:
                time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server and its workers (its whole process group), like losing its host."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def served(server, ray_session, tmp_path_factory):
    """The tiny pad sweep (pad 4, the frozen pad and no prompt, seed 7) logged through the server; what it
    printed is in ``served.out`` next to its folder."""
    storage = tmp_path_factory.mktemp("sweeps")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = ablation_pad.main(["--preset", "tiny", "--seeds", "7", "--tracking-uri", server.url,
                                "--storage-path", str(storage), "--name", "served",
                                "--max-concurrent", "2"])
    (storage / "served.out").write_text(printed.getvalue())
    assert rc == 0, printed.getvalue()[-3000:]
    return storage / "served"


def sweep_runs(client: MlflowClient, sweep: str) -> tuple[list, dict]:
    """The sweep's parent runs and its trial runs by trial id (all of them: duplicates show)."""
    experiment = client.get_experiment_by_name("ablation_pad")
    if experiment is None:
        return [], {}
    runs = client.search_runs([experiment.experiment_id], f"tags.sweep = '{sweep}'")
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    trials: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("role") == "trial":
            trials.setdefault(run.data.tags["trial_id"], []).append(run)
    return parents, trials


@pytest.mark.slow  # a sweep through a real MLflow server (module fixture)
def test_a_sweep_logs_runs_metrics_and_artifacts_through_the_server(server, served):
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("ablation_pad")
    assert experiment.tags.get("mlflow.experimentKind") == EXPERIMENT_KIND["mlflow.experimentKind"]
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    (parent,), trials = sweep_runs(client, "served")
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.parquet", "epochs.parquet", "ablation_pad_table.csv", "report.html",
            "pad_size.png", "pad_size.csv"} <= names

    rows = {r["trial_id"]: r for r in pq.read_table(served / "trials.parquet").to_pylist()}
    assert set(trials) == set(rows) and len(rows) == 3  # pad 4, the frozen pad, no prompt
    for trial_id, (run,) in trials.items():  # exactly one run per trial
        row = rows[trial_id]
        assert run.info.run_id == row["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["model"] == "tiny_resnet"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
        assert run.data.metrics["selected_test_acc"] == pytest.approx(row["selected_test_acc"])
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"layer_stats.json", "layer_stats.csv", "final.json"} <= files
        assert ("prompt.png" in files) == (run.data.params["prompt"] != "none")
    stored = list((server.folder / "artifacts").rglob("layer_stats.json"))
    assert len(stored) == 3  # the files went through the server into its artifact folder


@pytest.mark.slow  # a sweep through a real MLflow server (module fixture)
def test_the_analysis_and_the_report_read_the_runs_back_from_the_server(server, served, tmp_path, capsys):
    from analysis import __main__ as cli
    from analysis import report
    common = ["--experiment", "ablation_pad", "--sweep", "served", "--tracking-uri", server.url]
    assert cli.main(["pad_size", *common, "--out", str(tmp_path / "server")]) == 0
    assert cli.main(["pad_size", "--trials", str(served / "trials.parquet"), "--no-log",
                     "--out", str(tmp_path / "parquet")]) == 0
    from_server = (tmp_path / "server" / "pad_size.csv").read_bytes()
    assert from_server == (tmp_path / "parquet" / "pad_size.csv").read_bytes()
    assert (tmp_path / "server" / "pad_size.png").stat().st_size > 0
    assert "logged to MLflow parent run" in capsys.readouterr().out

    assert report.main([*common, "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("<figcaption>") == 2  # the pad-4 and frozen-pad prompts, downloaded from the server
    assert page.count('class="figure"') == 1


def page_text(url: str, profile: Path, width: int = 1280) -> str:
    """The text of ``url`` after the single-page app rendered it in headless Chromium, in a
    window ``width`` pixels wide (the runs table draws only the columns in view)."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: run scripts/setup.sh"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", f"--window-size={width},2000",
                          f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90).stdout
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.slow  # a sweep through a real MLflow server (module fixture)
def test_the_ui_opens_the_experiment_on_its_training_runs(server, served, tmp_path):
    experiment = MlflowClient(server.url).get_experiment_by_name("ablation_pad")
    url = ui_link(server.url, experiment.experiment_id)  # what the sweep prints at its start
    text = page_text(url, tmp_path / "profile")
    assert "Runs - Experiment" in text  # the page's title: the runs table, not the overview
    assert "Run Name" in text and "served" in text  # the table, with the sweep's parent run
    assert "Token Usage" not in text and "Tokens per Trace" not in text  # not the GenAI overview


@pytest.mark.slow  # a sweep through a real MLflow server (module fixture)
def test_the_link_the_sweep_prints_shows_its_trials_by_accuracy_with_their_dataset(server, served, tmp_path):
    printed = (served.parent / "served.out").read_text()
    link = re.search(r"\(trials by accuracy: (\S+)\)", printed.splitlines()[0]).group(1)
    assert link.startswith(f"{server.url}/#/experiments/") and "viewStateShareKey=" in link
    assert "MLflow UI for this store" not in printed  # a server serves its own UI
    client = MlflowClient(server.url)
    _, trials = sweep_runs(client, "served")
    runs = sorted((runs[0] for runs in trials.values()),
                  key=lambda r: -r.data.metrics["selected_test_acc"])
    text = page_text(link, tmp_path / "profile", width=1600)
    assert "served: trials by accuracy" in text  # the saved view applied
    names = [r.info.run_name for r in runs]
    header = text[text.index("Run Name"):min(text.index(name) for name in names)].split()
    assert "Dataset" in header and set(KEY_METRICS) <= set(header), text  # the key columns
    assert all(text.count(name) == 1 for name in names), (names, text)
    if runs[0].data.metrics["selected_test_acc"] > runs[1].data.metrics["selected_test_acc"]:
        assert text.index(names[0]) < text.index(names[1])  # best first
    (entry,) = client.get_run(runs[0].info.run_id).inputs.dataset_inputs
    assert f"{entry.dataset.name} ({entry.dataset.digest})" in text  # the Dataset column
    for run in runs:  # each trial's accuracy in its row, as the table writes it
        assert _shown(run.data.metrics["selected_test_acc"]) in text
        # what the trial's process used, per epoch, for the run page's System metrics tab
        rss = client.get_metric_history(run.info.run_id, "system/process_memory_rss_megabytes")
        assert [m.step for m in rss] == [1, 2] and all(m.value > 10 for m in rss)


def _shown(value: float) -> str:
    """``value`` as the runs table writes it (JavaScript's shortest round-trip form)."""
    return str(int(value)) if value == int(value) else repr(value)


@pytest.mark.slow  # about 40 s on 2 cores: three 4-epoch trials, a server restart, --resume
def test_a_server_killed_mid_sweep_loses_nothing_and_resume_backfills(server, ray_session, tmp_path, capsys):
    storage = tmp_path / "sweeps"
    argv = ["--preset", "tiny", "--seeds", "7", "--tracking-uri", server.url,
            "--storage-path", str(storage), "--name", "killed", "--max-concurrent", "1",
            "--cpus-per-trial", "1", "--set", "mask_epochs=2", "--set", "tune_epochs=2",
            "--set", "train_subset=384"]
    killed = threading.Event()

    def kill_once_an_epoch_is_logged():
        client = MlflowClient(server.url)
        deadline = time.time() + 300
        while time.time() < deadline:
            _, trials = sweep_runs(client, "killed")
            if any(r.data.metrics.get("epoch", 0) >= 1 for runs in trials.values() for r in runs):
                server.kill()
                killed.set()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_once_an_epoch_is_logged, daemon=True)
    watcher.start()
    started = time.time()
    rc = ablation_pad.main(argv)
    elapsed = time.time() - started
    watcher.join(timeout=5)
    out = capsys.readouterr()
    assert killed.is_set(), "the sweep ended before its first epoch was logged"
    assert rc == UNLOGGED, out.out[-3000:] + out.err[-3000:]
    assert "MLflow: could not log trial" in out.err  # said when it happened
    # each call to the dead server fails in seconds (MLflow's defaults retry for minutes)
    assert elapsed < 90, f"the sweep took {elapsed:.0f} s after its server died"
    # the first trial's later epochs, the second trial entirely, the parent run's files
    assert ("[killed] MLflow is incomplete: 3 of 3 trial runs and the parent run's results could "
            f"not be logged to {server.url} (server unreachable: connection refused)") in out.out
    resume = f"python sweeps/ablation_pad.py --resume killed --storage-path {storage}"
    assert f"back-fill with:  {resume}" in out.out
    folder = storage / "killed"
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(rows) == 3 and all(r["finished"] for r in rows)  # every result kept
    epochs = pq.read_table(folder / "epochs.parquet").to_pylist()
    assert sorted(e["epoch"] for e in epochs) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]

    server.start()  # same port, same database
    assert ablation_pad.main([*argv, "--resume", "killed"]) == 0
    client = MlflowClient(server.url)
    parents, trials = sweep_runs(client, "killed")
    rows = {r["trial_id"]: r for r in pq.read_table(folder / "trials.parquet").to_pylist()}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert set(trials) == set(rows)
    for trial_id, runs in trials.items():
        assert len(runs) == 1, f"trial {trial_id} has {len(runs)} runs"
        run = client.get_run(runs[0].info.run_id)
        assert run.info.run_id == rows[trial_id]["mlflow_run_id"] and run.info.status == "FINISHED"
        for metric in ("val_acc", "train_loss", "epoch"):  # every epoch once
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == [1, 2, 3, 4], (trial_id, metric, steps)
        assert run.data.metrics["selected_test_acc"] == pytest.approx(rows[trial_id]["selected_test_acc"])
        assert run.data.params["train_subset"] == "384" and run.data.tags["early_stopped"] == "false"
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"layer_stats.json", "final.json"} <= files
    assert "trials.parquet" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
