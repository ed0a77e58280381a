import pytest

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
    ({"mask_file": "/nonexistent/masks.pt"}, "mask_file", "not found"),
    ({"source_checkpoint": "/nonexistent/model.pt"}, "source_checkpoint", "not found"),
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


def test_unknown_name_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError) and issubclass(UnknownNameError, ValueError)


def test_stage_plan_and_total_epochs_follow_the_method():
    assert Config(method="vpns", mask_epochs=3, tune_epochs=2).stage_plan == [("mask", 3), ("tune", 2)]
    assert Config(method="omp", tune_epochs=2).total_epochs == 2
    lth = Config(method="lth", sparsity=0.5, lth_epochs_per_round=1, tune_epochs=2)
    assert [n for n, _ in lth.stage_plan] == ["round0", "round1", "round2", "round3", "tune"]
    assert lth.total_epochs == 4 + 2
