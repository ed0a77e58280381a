"""The trial's input pipeline: evaluation loaders keep their worker processes, and worker
processes change nothing in the results."""
from vpns_core.config import Config
from vpns_core.train import Trial

TINY = dict(model="tiny_resnet", pretrained=False, dataset="fashion_mnist", train_subset=96,
            test_subset=48, val_fraction=0.25, input_size=24, output_size=32, pad_size=4,
            batch_size=32, eval_batch_size=16, mask_epochs=1, tune_epochs=1, sparsity=0.8,
            label_mapping_samples=48, mask_lr=0.05, tune_lr=0.05, num_threads=1)


def test_worker_processes_change_nothing_and_evaluation_loaders_persist(tmp_path):
    curves = {}
    for workers in (0, 1):
        seen = []
        trial = Trial(Config(**TINY, num_workers=workers), tmp_path / str(workers), seen.append)
        trial.run()
        curves[workers] = [(m["train_loss"], m["val_acc"], m["test_acc_prompt"], m["test_acc_noprompt"])
                           for m in seen]
        test_loader = trial._loader(trial.data.test, train=False)
        assert (test_loader is trial._loader(trial.data.test, train=False)) == (workers > 0)
        assert test_loader.persistent_workers == (workers > 0)
        train_loader = trial._loader(trial.data.train, train=True)
        assert train_loader is not trial._loader(trial.data.train, train=True)  # seeded per epoch
    assert curves[0] == curves[1]
