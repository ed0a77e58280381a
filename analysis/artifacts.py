"""MLflow artifacts of a sweep: its parent run (where figures and the report are logged) and the
learned prompt images of its trial runs."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .runs import Runs


def parent_run_id(runs: Runs) -> str | None:
    """The sweep's parent run: the ``mlflow.parentRunId`` tag of any of its trial runs."""
    if not runs.tracking_uri or "mlflow_run_id" not in runs.trials:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.tracking_uri)
    for run_id in runs.trials["mlflow_run_id"].dropna():
        parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if parent:
            return parent
    return None


def log_to_parent(runs: Runs, paths: list[Path], artifact_path: str | None = None) -> str:
    """Log ``paths`` as artifacts of the sweep's parent run; returns its run id."""
    from mlflow.tracking import MlflowClient

    run_id = parent_run_id(runs)
    if run_id is None:
        raise LookupError(f"no MLflow parent run found for sweep {runs.sweep} ({runs.origin})")
    client = MlflowClient(runs.tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
    return run_id


@dataclass
class PromptImage:
    trial: pd.Series
    png: bytes


def prompt_images(runs: Runs, limit: int = 64) -> tuple[list[PromptImage], str]:
    """``prompt.png`` of each finished trial that learned a prompt (at most ``limit``), read from
    its MLflow run; and a note on what could not be read."""
    trials = runs.trials
    if "prompt_tunable" not in trials:
        return [], "no trial learned a prompt"
    wanted = trials[trials["finished"].astype(bool) & (trials["prompt_tunable"].fillna(0) > 0)]
    if wanted.empty:
        return [], "no finished trial learned a prompt"
    if not runs.tracking_uri or "mlflow_run_id" not in trials:
        return [], "prompt images live in MLflow, and no tracking URI is known for these runs"
    from mlflow.artifacts import download_artifacts

    images, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
        for i, (_, row) in enumerate(wanted.head(limit).iterrows()):
            try:
                path = download_artifacts(run_id=row["mlflow_run_id"], artifact_path="prompt.png",
                                          dst_path=f"{tmp}/{i}", tracking_uri=runs.tracking_uri)
                images.append(PromptImage(row, Path(path).read_bytes()))
            except Exception:  # noqa: BLE001 - a missing artifact is reported, not fatal
                failed += 1
                if failed == 3 and not images:  # the store is down: don't wait on every image
                    break
    notes = []
    if len(wanted) > limit:
        notes.append(f"showing {limit} of {len(wanted)} prompts")
    if failed:
        unread = failed if images or failed < 3 else len(wanted.head(limit)) - len(images)
        notes.append(f"{unread} prompt image(s) could not be read from MLflow")
    return images, "; ".join(notes)


@contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per download; a report reads dozens of small images."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
