"""The suite runs on the CPU, also on a machine with a GPU: its exact-resume comparisons (1e-6)
would not hold under cuDNN's nondeterminism, and its timings are sized for a CPU. The CUDA tests
(``-m cuda``) run with ``VPNS_TEST_CUDA=1``, as ``scripts/gpu_check.sh`` does. Set here, before
anything initialises CUDA, so that Ray's worker processes inherit it too.

The README's test command runs the suite on two pytest-xdist workers, each one test file at a time
(``-n 2 --dist loadfile``): a module's fixtures (its Ray session, its sweeps) are set up once, in
one worker, and its tests run in file order, as they do serially (``pytest`` without ``-n``)."""
import os
import shutil
from pathlib import Path

if os.environ.get("VPNS_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# decoded image caches (vpns_core.image_folder) of the tests' folders: not in the user's ~/.cache
os.environ.setdefault("VPNS_CACHE", os.path.join(__import__("tempfile").gettempdir(),
                                                 f"vpns-test-cache-{os.getpid()}"))

import pytest  # noqa: E402

from vpns_core.config import Config  # noqa: E402  (after the CUDA setting above)

#: the tiny task every end-to-end trial test runs: a tiny ResNet on 128 real Fashion-MNIST
#: images (a quarter of them validation) at 24 px in a 32 px frame, one epoch per stage; where a
#: test turns the cost record on (cost_record=True), it times one pass at batch 8 (test_pareto.py
#: checks the timing itself)
TINY = dict(model="tiny_resnet", pretrained=False, dataset="fashion_mnist", train_subset=128,
            test_subset=64, val_fraction=0.25, input_size=24, output_size=32, pad_size=4,
            batch_size=32, eval_batch_size=64, mask_epochs=1, tune_epochs=1, sparsity=0.8,
            label_mapping_samples=64, mask_lr=0.05, tune_lr=0.05, num_threads=1, measure_repeats=1,
            latency_batch=8)


def tiny(**changes) -> Config:
    """The tiny task's Config with ``changes``."""
    return Config(**{**TINY, **changes})


#: test files by their time in the full suite, longest first (measured on 2 cores, 2026-12-07):
#: xdist (``--dist loadfile``, no reordering: pyproject.toml) hands files to its workers in this
#: order, so the long end-to-end files start at once and the short ones fill the gaps at the end
#: instead of one worker running a five-minute file alone while the other waits
LONGEST_FIRST = ("test_sweeps_resume.py", "test_sweeps.py", "test_tracking_server.py", "test_multinode.py",
                 "test_data_parallel.py", "test_pareto.py", "test_train.py", "test_cluster_config.py",
                 "test_embedded_default.py", "test_docs.py", "test_protocol.py", "test_structured.py",
                 "test_methods.py", "test_export.py", "test_security.py", "test_front_door.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Files in :data:`LONGEST_FIRST` order (the rest after them, as collected); the tests of a
    file keep their order and stay together, so module fixtures are set up once."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def start_local_ray() -> None:
    """Start the local Ray a test module shares: 2 CPUs, no dashboard, and the system config of
    a sweep's own local Ray (no idle workers pre-started)."""
    import ray

    from sweeps.sweep import LOCAL_RAY_SYSTEM_CONFIG
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray session per test module (starting Ray costs seconds)."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """``mlflow_store(folder)``: the URI of a new, empty MLflow SQLite store in ``folder``, a copy
    of one made once per session (a new store runs MLflow's schema migrations: seconds; a copy
    takes milliseconds). Tests of what happens on a store nobody has opened yet create their own."""
    from mlflow.tracking import MlflowClient
    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it

    def make(folder: Path) -> str:
        target = Path(folder) / "mlflow.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)
        return f"sqlite:///{target}"
    return make
