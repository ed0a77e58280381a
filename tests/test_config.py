import pytest

from vpns_core.checkpoint import CheckpointError
from vpns_core.config import Config, ConfigError
from vpns_core.data import DataUnavailableError
from vpns_core.models import WeightsUnavailableError
from vpns_core.registry import UnknownNameError


@pytest.mark.parametrize("changes,field,hint", [
    ({"dataset": "cifar11"}, "dataset", "cifar10"),
    ({"model": "resnt18"}, "model", "resnet18"),
    ({"method": "hdyra"}, "method", "hydra"),
    ({"prompt": "border"}, "prompt", "pad"),
    ({"allocation": "uniform"}, "allocation", "layerwise"),
    ({"vp_stages": "first"}, "vp_stages", "both"),
    ({"schedule": "fast"}, "schedule", "reference"),
    ({"head": "mlp"}, "head", "flm"),
    ({"device": "tpu"}, "device", "cuda"),
    ({"sparsity": 1.0}, "sparsity", "[0, 1)"),
    ({"sparsity": -0.1}, "sparsity", "[0, 1)"),
    ({"pad_size": 33}, "pad_size", "32"),
    ({"input_size": 96}, "input_size", "output_size"),
    ({"mask_epochs": -1}, "mask_epochs", "non-negative"),
    ({"tune_lr": -0.1}, "tune_lr", "positive"),
    ({"mask_lr": 0}, "mask_lr", "positive"),
    ({"batch_size": 0}, "batch_size", "positive"),
    ({"train_subset": 2.5}, "train_subset", "integer"),
    ({"bn_momentum": 2.0}, "bn_momentum", "(0, 1]"),
    ({"val_fraction": 1.0}, "val_fraction", "[0, 1)"),
    ({"prompt": "pad", "pad_size": 0}, "pad_size", "none"),
    ({"post_prompt": "later"}, "post_prompt", "zero_shot"),
    ({"method": "omp", "post_prompt": "zero_shot", "prompt": "none"}, "post_prompt", "prompt"),
    ({"method": "vpns", "post_prompt": "fine_tune"}, "post_prompt", "vpns"),
    ({"lth_rate": 1.0}, "lth_rate", "(0, 1)"),
    ({"lth_epochs_per_round": -1}, "lth_epochs_per_round", "non-negative"),
    ({"synflow_iterations": 0}, "synflow_iterations", "positive"),
    ({"prune_batches": 0}, "prune_batches", "positive"),
    ({"grasp_temperature": 0}, "grasp_temperature", "positive"),
    ({"bip_optimizer": "rmsprop"}, "bip_optimizer", "adam"),
    ({"bip_weight_lr": -1.0}, "bip_weight_lr", "positive"),
    ({"bip_implicit_lr": -1.0}, "bip_implicit_lr", "non-negative"),
    ({"pad_size": -1}, "pad_size", "non-negative"),
    ({"output_size": 0}, "output_size", "positive"),
    ({"input_size": 0}, "input_size", "positive"),
    ({"tune_epochs": -2}, "tune_epochs", "non-negative"),
    ({"num_workers": -1}, "num_workers", "non-negative"),
    ({"weight_decay": -1e-4}, "weight_decay", "non-negative"),
    ({"momentum": -0.1}, "momentum", "non-negative"),
    ({"eval_batch_size": 0}, "eval_batch_size", "positive"),
    ({"batch_size": True}, "batch_size", "integer"),
    ({"seed": -1}, "seed", "non-negative"),
    ({"mask_prompt_lr": 0.0}, "mask_prompt_lr", "positive"),
    ({"val_fraction": -0.1}, "val_fraction", "[0, 1)"),
    ({"density_floor": 1.0}, "density_floor", "[0, 1)"),
    ({"sparsity": "0.9"}, "sparsity", "[0, 1)"),
    ({"prompt_size": 65}, "prompt_size", "output_size"),
    ({"tags": "a=b"}, "tags", "dict"),
    ({"cost_record": "yes"}, "cost_record", "True or False"),
    ({"count_flops": 1}, "count_flops", "True or False"),
])
def test_bad_values_name_field_and_allowed(changes, field, hint):
    with pytest.raises(ConfigError) as err:
        Config(**changes)
    assert str(err.value).startswith(f"{field}:")
    assert hint in str(err.value)


def test_unknown_key_fails():
    with pytest.raises(ConfigError, match="^spasity: unknown config key"):
        Config.from_dict({"spasity": 0.5})


def test_round_trip_and_derived_values():
    cfg = Config(method="hydra", prompt="fix", pad_size=16, output_size=224, input_size=192)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.effective_vp_stages == "none" and not cfg.prompt_in_mask_stage
    assert cfg.resolved_prompt_size == 115
    assert Config(vp_stages="mask").prompt_in_mask_stage and not Config(vp_stages="mask").prompt_in_tune_stage


def test_missing_data_and_weights_fail_before_compute(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="cifar10"):
        Config(dataset="cifar10", data_root=str(tmp_path)).check_resources()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="TORCH_HOME"):
        Config(model="resnet18").check_resources()
    Config(model="resnet18", pretrained=False).check_resources()  # fine without weights


@pytest.mark.parametrize("changes,field,hint", [
    ({"mask_file": "/nonexistent/masks.pt"}, "mask_file", "not found"),
    ({"source_checkpoint": "/nonexistent/model.pt"}, "source_checkpoint", "not found"),
])
def test_missing_files_fail_where_the_trial_starts_not_in_the_config(changes, field, hint):
    from vpns_core.resources import check_resources
    cfg = Config(**changes)  # a driver may build the config of a trial that runs elsewhere
    with pytest.raises(ConfigError) as err:
        check_resources(cfg)
    assert str(err.value).startswith(f"{field}:") and hint in str(err.value)


def test_cuda_is_checked_where_the_trial_starts(monkeypatch):
    import torch
    from vpns_core.resources import check_resources
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config(device="cuda", model="tiny_resnet", pretrained=False)  # fine on a CPU-only driver
    check_resources(cfg, device=False)  # the driver's check of a trial that runs on a GPU node
    with pytest.raises(ConfigError, match="^device: CUDA is not available"):
        check_resources(cfg)


def test_unknown_name_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError) and issubclass(UnknownNameError, ValueError)


def test_stage_plan_and_total_epochs_follow_the_method():
    assert Config(method="vpns", mask_epochs=3, tune_epochs=2).stage_plan == [("mask", 3), ("tune", 2)]
    assert Config(method="omp", tune_epochs=2).total_epochs == 2
    lth = Config(method="lth", sparsity=0.5, lth_epochs_per_round=1, tune_epochs=2)
    assert [n for n, _ in lth.stage_plan] == ["round0", "round1", "round2", "round3", "tune"]
    assert lth.total_epochs == 4 + 2


# --- bad inputs that need files, the environment or the sweep driver: rejected before compute ---


class _Evil:
    """Unpickling it would create ``marker``: a checkpoint must never be loaded with pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _no_compute(monkeypatch):
    import vpns_core.assembly as assembly
    import vpns_core.train as train

    def compute(*args, **kwargs):
        raise AssertionError("compute started before the bad input was rejected")
    monkeypatch.setattr(train, "build_data", compute)
    monkeypatch.setattr(assembly, "build_model", compute)


def _case(name, tmp_path, monkeypatch):
    """(Config values, files to write) for each named bad input; returns the values."""
    import torch
    tiny = dict(model="tiny_resnet", pretrained=False, train_subset=64, test_subset=32)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\\x00not a torch file")
    evil = tmp_path / "evil.pt"
    torch.save({"masks": _Evil(tmp_path / "pwned")}, evil)
    if name == "missing data root":
        return dict(tiny, dataset="cifar10")
    if name == "empty data root":
        return dict(tiny, dataset="cifar10", data_root=str(tmp_path))
    if name == "weights missing offline":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        return dict(model="resnet18", pretrained=True)
    if name == "corrupt mask_file":
        return dict(tiny, mask_file=str(junk))
    if name == "pickled objects in mask_file":
        return dict(tiny, mask_file=str(evil))
    if name == "corrupt source_checkpoint":
        return dict(tiny, source_checkpoint=str(junk))
    if name == "pickled objects in source_checkpoint":
        return dict(tiny, source_checkpoint=str(evil))
    raise KeyError(name)


@pytest.mark.parametrize("name,error,field", [
    ("missing data root", DataUnavailableError, "--data-root"),
    ("empty data root", DataUnavailableError, "data root"),
    ("weights missing offline", WeightsUnavailableError, "model 'resnet18'"),
    ("corrupt mask_file", CheckpointError, "mask_file:"),
    ("pickled objects in mask_file", CheckpointError, "mask_file:"),
    ("corrupt source_checkpoint", CheckpointError, "source_checkpoint:"),
    ("pickled objects in source_checkpoint", CheckpointError, "source_checkpoint:"),
])
def test_bad_resources_are_rejected_before_any_compute(name, error, field, tmp_path, monkeypatch):
    from vpns_core.train import Trial
    values = _case(name, tmp_path, monkeypatch)
    cfg = Config(**values)  # valid as values; the files behind them are not
    _no_compute(monkeypatch)
    with pytest.raises(error) as err:
        Trial(cfg, tmp_path / "trial")
    assert field in str(err.value)
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


def test_truncated_trial_checkpoint_is_rejected_before_any_compute(tmp_path, monkeypatch):
    import torch
    from vpns_core.checkpoint import atomic_save
    from vpns_core.train import CHECKPOINT, Trial
    atomic_save({"format": "vpns-trial-1", "model": {"w": torch.randn(1000, 100)}}, tmp_path / CHECKPOINT)
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[: len(data) // 2])
    _no_compute(monkeypatch)
    with pytest.raises(CheckpointError, match="^checkpoint: cannot read"):
        Trial(Config(model="tiny_resnet", pretrained=False), tmp_path)


@pytest.mark.parametrize("space,field", [
    ({"spasity": [0.5, 0.9]}, "spasity"),                          # unknown search-space key
    ({"case": {"a": {"pad_sise": 4}}}, "pad_sise"),                # unknown field in a named point
    ({"pad_size": [4, 40]}, "pad_size"),                           # a grid value out of range
    ({"method": ["vpns", "hdyra"]}, "method"),                     # a typo among the choices
])
def test_bad_search_spaces_are_rejected_by_the_driver(space, field):
    from search_spaces import base as presets
    from search_spaces.points import check_points
    with pytest.raises(ConfigError) as err:
        check_points(presets.base("tiny"), space)
    assert str(err.value).startswith(f"{field}:")


def test_bad_sweep_flags_name_the_flag(tmp_path, capsys):
    from sweeps.flags import parse_overrides
    from sweeps.sweep import run_sweep
    with pytest.raises(ValueError, match="--set spasity=0.5"):
        parse_overrides(["spasity=0.5"])
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path.parent / (tmp_path.name + '.db')}"]
    for bad in ("../escape", "a/b", "..", "/abs"):
        assert run_sweep("test_names", lambda sweep: None,
                         ["--storage-path", str(tmp_path), "--name", bad, "--preset", "tiny", *tracking]) == 2
        assert "--name" in capsys.readouterr().err
    assert run_sweep("test_names", lambda sweep: None,
                     ["--storage-path", str(tmp_path), "--resume", "../../etc", "--preset", "tiny", *tracking]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not any(tmp_path.parent.glob("escape*")) and list(tmp_path.iterdir()) == []
