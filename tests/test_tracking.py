"""MLflow at a glance, without a server: the UI command and link printed for a local store, each
trial's dataset input, its ``system/`` metrics and summary, and the saved view of a sweep's
trials (``tests/test_tracking_server.py`` opens that view in Chromium)."""
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sweeps.tracking import (KEY_METRICS, VIEW_PREFIX, MLflowTracker, save_trials_view, ui_command,
                             ui_link, view_key)
from sweeps.usage import Usage
from vpns_core.data import DataSplits, RawSplit, ResizedImages, TensorImages, split_record


def test_a_local_store_gets_the_command_that_serves_its_ui_and_the_link_of_its_view():
    uri = "sqlite:////data/results/mlflow.db"
    command = ui_command(uri)
    assert command.startswith("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false ")  # no job runner
    assert command.endswith(f" ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    assert command.split()[1].endswith("mlflow")
    assert ui_link(uri, "3", "trials-x") == ("http://127.0.0.1:5000/#/experiments/3/runs?"
                                             "viewStateShareKey=trials-x&workflowType=machine_learning")
    # a server serves its own UI: the link names it and there is no command to run
    assert ui_command("http://10.0.0.2:5000/") == ""
    assert ui_link("http://10.0.0.2:5000/", "3", "v").startswith("http://10.0.0.2:5000/#/experiments/3/runs?")
    assert ui_link("http://10.0.0.2:5000", "3") == \
        "http://10.0.0.2:5000/#/experiments/3?workflowType=machine_learning"


def test_the_saved_view_lists_the_sweeps_trials_by_accuracy_with_the_key_columns(mlflow_store, tmp_path):
    client = MlflowClient(mlflow_store(tmp_path))
    experiment = client.create_experiment("ablation_pad")
    key = save_trials_view(client, experiment, "pad-tiny-1=2+3")
    assert key == view_key("pad-tiny-1=2+3") == "trials-pad-tiny-1_2_3"  # a valid tag key
    envelope = json.loads(client.get_experiment(experiment).tags[VIEW_PREFIX + key])
    assert envelope["name"] == "pad-tiny-1=2+3: trials by accuracy"
    assert isinstance(envelope["createdAt"], int) and envelope["updatedAt"] >= envelope["createdAt"]
    state = json.loads(envelope["state"])  # a JSON string inside, as the UI writes it
    assert state["searchFilter"] == "tags.sweep = 'pad-tiny-1=2+3' and tags.role = 'trial'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`selected_test_acc`", False)
    columns = ["attributes.`Dataset`", *(f"metrics.`{m}`" for m in KEY_METRICS)]
    assert state["selectedColumns"] == state["columnOrder"] == columns
    assert set(state["columnWidths"]) == set(columns)
    save_trials_view(client, experiment, "pad-tiny-1=2+3")  # a resumed sweep: the same view
    views = [k for k in client.get_experiment(experiment).tags if k.startswith(VIEW_PREFIX)]
    assert views == [VIEW_PREFIX + key]


def _splits(train: list[int], labels: np.ndarray) -> DataSplits:
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    raw = RawSplit(TensorImages(images, labels), labels, ["a", "b"])
    return DataSplits(train=ResizedImages(raw, np.array(train), 4), train_eval=ResizedImages(raw, np.array(train), 4),
                      val=ResizedImages(raw, np.array([0]), 4), test=ResizedImages(raw, np.arange(3), 4),
                      num_classes=2, classes=["a", "b"])


def test_the_split_record_names_the_sizes_and_digests_the_images_of_each_split():
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=np.int64)
    record = split_record("cifar10", _splits([1, 2, 3], labels))
    assert {k: record[k] for k in ("name", "train", "val", "test", "num_classes")} == \
        {"name": "cifar10", "train": 3, "val": 1, "test": 3, "num_classes": 2}
    assert len(record["digest"]) == 16
    assert split_record("cifar10", _splits([1, 2, 3], labels)) == record  # same images, same digest
    assert split_record("cifar10", _splits([1, 2, 4], labels))["digest"] != record["digest"]
    assert split_record("cifar100", _splits([1, 2, 3], labels))["digest"] != record["digest"]


def test_usage_samples_the_process_cpu_and_memory():
    usage = Usage("cpu")
    sum(i * i for i in range(300_000))  # some CPU time in this process
    sample = usage.sample()
    assert sample["process_memory_rss_megabytes"] > 10  # at least this interpreter and torch
    assert sample["process_cpu_percentage"] > 0
    assert 0 <= sample["cpu_utilization_percentage"] <= 100
    assert 0 < sample["system_memory_usage_percentage"] < 100
    assert not any(k.startswith("gpu_") for k in sample)  # a CPU trial reports no GPU memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_usage_reports_the_peak_cuda_memory_of_a_gpu_trial():
    usage = Usage("cuda")
    block = torch.ones(64, 2**20, device="cuda")  # 256 MiB
    assert usage.sample()["gpu_max_memory_allocated_megabytes"] >= 256
    del block


DATASET = {"name": "cifar10", "train": 384, "val": 38, "test": 500, "num_classes": 10,
           "digest": "0123456789abcdef"}
SYSTEM = {"process_cpu_percentage": 180.0, "process_memory_rss_megabytes": 900.0,
          "cpu_utilization_percentage": 95.0}
FINAL = {"final": 1, "epoch": 2, "selected_epoch": 2, "selected_val_acc": 0.5,
         "selected_test_acc": 0.7123, "selected_test_acc_prompt": 0.7123,
         "selected_test_acc_noprompt": 0.6012, "sparsity": 0.5, "trial_time_s": 53.4,
         "dataset": DATASET}


def _tracker(uri: str) -> tuple[MlflowClient, MLflowTracker]:
    client = MlflowClient(uri)
    experiment = client.create_experiment("ablation_pad")
    parent = client.create_run(experiment, run_name="sweep", tags={"sweep": "s", "role": "parent"})
    tracker = MLflowTracker(tracking_uri=uri, experiment_id=experiment,
                            parent_run_id=parent.info.run_id, points={}, label_keys=["seed"],
                            log_model=False, tags={"sweep": "s", "phase": "main", "script": "x"})
    return client, tracker


class _Trial:
    """What the tracker reads of a Tune trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.config, self.num_failures = trial_id, {"seed": 7, "model": "tiny_resnet"}, 0

    def __str__(self) -> str:
        return f"trainable_{self.trial_id}"


def _check_run(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    (entry,) = run.inputs.dataset_inputs  # logged once, whatever the number of reports
    assert (entry.dataset.name, entry.dataset.digest) == ("cifar10", "0123456789abcdef")
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "train")]
    profile = json.loads(entry.dataset.profile)
    assert {k: profile[k] for k in ("train", "val", "test")} == {"train": 384, "val": 38, "test": 500}
    history = client.get_metric_history(run_id, "system/process_cpu_percentage")
    assert [(m.step, m.value) for m in history] == [(1, 180.0), (2, 180.0)]
    assert run.data.metrics["system/process_memory_rss_megabytes"] == 900.0
    assert "system" not in run.data.metrics and "dataset" not in run.data.metrics
    note = run.data.tags["mlflow.note.content"]  # the run's description: its page shows it first
    assert note.startswith("**Test accuracy 71.2%** (epoch 2, selected on validation): 71.2% with "
                           "the prompt, 60.1% without · sparsity 50.0% · trial time 53 s")
    assert note.endswith("cifar10: 384 train / 38 val / 500 test images")


def test_the_tracker_logs_each_trials_dataset_system_metrics_and_summary(mlflow_store, tmp_path):
    client, tracker = _tracker(mlflow_store(tmp_path))
    trial = _Trial("t1")
    tracker.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        tracker.on_trial_result(0, [], trial, {"epoch": epoch, "val_acc": 0.5, "dataset": DATASET,
                                               "system": SYSTEM})
    tracker.on_trial_result(0, [], trial, FINAL)
    assert tracker.unlogged == {}
    _check_run(client, tracker._runs["t1"].run_id)


def test_backfill_logs_the_dataset_system_metrics_and_summary_of_a_run_it_creates(mlflow_store, tmp_path):
    client, tracker = _tracker(mlflow_store(tmp_path))
    epochs = [{"epoch": e, "val_acc": 0.5, "dataset": DATASET, "system": SYSTEM, "timestamp": 1e9}
              for e in (1, 2)]
    record = {"epochs": epochs, "final": FINAL, "checkpoint": None, "status": "TERMINATED",
              "error": None}
    run_ids: dict[str, str] = {}
    tracker._backfill_trial(_Trial("t2"), record, None, run_ids)
    _check_run(client, run_ids["t2"])
    assert client.get_run(run_ids["t2"]).info.status == "FINISHED"
