"""The trial's input pipeline: evaluation loaders keep their worker processes, and worker
processes change nothing in the results."""
from vpns_core.config import Config
from vpns_core.train import Trial

from conftest import tiny


def test_worker_processes_change_nothing_and_evaluation_loaders_persist(tmp_path):
    curves = {}
    for workers in (0, 1):
        seen = []
        trial = Trial(tiny(train_subset=96, test_subset=48, eval_batch_size=16, label_mapping_samples=48,
                           num_workers=workers), tmp_path / str(workers), seen.append)
        trial.run()
        curves[workers] = [(m["train_loss"], m["val_acc"], m["test_acc_prompt"], m["test_acc_noprompt"])
                           for m in seen]
        test_loader = trial.feed.loader(trial.data.test, train=False)
        assert (test_loader is trial.feed.loader(trial.data.test, train=False)) == (workers > 0)
        assert test_loader.persistent_workers == (workers > 0)
        train_loader = trial.feed.loader(trial.data.train, train=True)
        assert train_loader is not trial.feed.loader(trial.data.train, train=True)  # seeded per epoch
    assert curves[0] == curves[1]
