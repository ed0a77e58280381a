"""The trial's input pipeline: loaders keep their worker processes (training loaders reseeded
every epoch), and worker processes change nothing in the results."""
import pytest
import torch

from vpns_core.config import Config
from vpns_core.feed import Feed
from vpns_core.train import Trial

from conftest import tiny


@pytest.mark.parametrize("schedule,mask_epochs", [("paper", 1),
                                                  pytest.param("reference", 1, marks=pytest.mark.slow)])
def test_worker_processes_change_nothing_and_loaders_persist(schedule, mask_epochs, tmp_path):
    curves = {}
    for workers in (0, 1):
        seen = []
        trial = Trial(tiny(train_subset=96, test_subset=48, eval_batch_size=16, label_mapping_samples=48,
                           num_workers=workers, schedule=schedule, mask_epochs=mask_epochs),
                      tmp_path / str(workers), seen.append)
        trial.run()
        curves[workers] = [(m["train_loss"], m["val_acc"], m.get("test_acc_prompt"), m.get("test_acc_noprompt"))
                           for m in seen]
        test_loader = trial.feed.loader(trial.data.test, train=False)
        assert (test_loader is trial.feed.loader(trial.data.test, train=False)) == (workers > 0)
        assert test_loader.persistent_workers == (workers > 0)
        train_loader = trial.feed.loader(trial.data.train, train=True, generator=torch.Generator())
        again = trial.feed.loader(trial.data.train, train=True, generator=torch.Generator())
        assert (train_loader is again) == (workers > 0)  # kept with its workers, reseeded each epoch
    assert curves[0] == curves[1]


def test_workers_default_to_none_in_memory_and_the_trials_cpus_for_files(tmp_path):
    trial = Trial(tiny(num_threads=3), tmp_path)
    assert trial.cfg.num_workers is None
    assert trial.feed.workers(trial.data.train) == 0  # Fashion-MNIST is held in memory: nothing to decode

    class Files(torch.utils.data.Dataset):  # a split read from files (not a tensor in memory)
        def __len__(self):
            return 4
    feed = Feed(trial.cfg, trial.data, trial.device, trial.collective)
    assert feed.workers(Files()) == 2  # three CPUs: two workers beside the training process
    assert Feed(trial.cfg.replace(num_threads=1), trial.data, trial.device, trial.collective).workers(Files()) == 0
    assert Feed(trial.cfg.replace(num_workers=5), trial.data, trial.device, trial.collective).workers(Files()) == 5
