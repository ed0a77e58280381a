"""Models named by where they come from (issue 29): ``timm/<name>`` and a user's own
``package.module:factory``, end to end on the tiny task, their exports, and one clear error for
each way a name can be wrong."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpns_core.config import Config, ConfigError
from vpns_core.models import build_model, check_model, head_layer, plain_model
from vpns_core.registry import UnknownNameError
from vpns_core.resources import check_resources
from vpns_core.train import Trial

from conftest import tiny

FIXTURES = Path(__file__).parent / "fixtures"
timm = pytest.importorskip("timm")  # the test extra installs it; the core never needs it


@pytest.fixture
def user_package(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


def test_a_timm_model_prunes_end_to_end_and_exports_a_timm_builder(tmp_path):
    cfg = tiny(model="timm/test_efficientnet", pretrained=False, sparsity=0.8, measure_repeats=0)
    trial = Trial(cfg, tmp_path)
    result = trial.run()
    assert trial.head_name == "classifier"  # timm's get_classifier(), not a guess
    assert result.final["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert 0.0 <= result.final["selected_test_acc"] <= 1.0
    export = torch.load(tmp_path / "model_export.pt", weights_only=True)
    assert export["builder"] == {"module": "timm", "call": "create_model", "args": ["test_efficientnet"],
                                 "kwargs": {"pretrained": False, "num_classes": 1000}}
    model = plain_model(export)
    x = torch.rand(2, 3, 32, 32)
    trial.model.eval()
    with torch.no_grad():  # the masked network as trained against the plain rebuilt one
        torch.testing.assert_close(model(x), trial.model(x))
    zeros = sum(int((w == 0).sum()) for k, w in export["state_dict"].items() if k.endswith("weight")
                and w.dim() > 1)
    assert zeros > 0


def test_channel_pruning_removes_channels_of_a_timm_model(tmp_path):
    cfg = tiny(model="timm/test_resnet", pretrained=False, method="depgraph", sparsity=0.5,
               max_steps_per_epoch=1, measure_repeats=0)
    trial = Trial(cfg, tmp_path)
    trial.run()
    before = sum(p.numel() for p in build_model("timm/test_resnet", pretrained=False).module.parameters())
    after = sum(p.numel() for p in trial.model.parameters())
    assert after < 0.8 * before
    export = torch.load(tmp_path / "model_export.pt", weights_only=True)
    assert export["architecture"]  # the smaller network is rebuilt from its channel counts
    model = plain_model(export)
    assert sum(p.numel() for p in model.parameters()) == after


def test_a_users_factory_by_import_path_trains_and_its_head_is_found(tmp_path, user_package):
    cfg = tiny(model="user_models:small_cnn", pretrained=False, measure_repeats=0)
    check_resources(cfg)
    trial = Trial(cfg, tmp_path)
    result = trial.run()
    assert trial.head_name == "8" and result.final["sparsity"] == pytest.approx(0.8, abs=0.02)
    export = torch.load(tmp_path / "model_export.pt", weights_only=True)
    assert export["builder"] == {"module": "user_models", "call": "small_cnn", "args": [], "kwargs": {}}
    assert isinstance(plain_model(export), torch.nn.Sequential)


def test_a_users_factory_takes_its_weights_from_a_source_checkpoint(tmp_path, user_package):
    own = build_model("user_models:small_cnn", pretrained=False).module
    torch.nn.init.constant_(own[0].weight, 0.25)
    torch.save(own.state_dict(), tmp_path / "mine.pt")
    loaded = build_model("user_models:small_cnn", pretrained=False, source_checkpoint=str(tmp_path / "mine.pt"))
    assert torch.equal(loaded.module[0].weight, own[0].weight) and loaded.num_source_classes == 1000


@pytest.mark.parametrize("name, message", [
    ("timm/no_such_net", "model: unknown timm model 'no_such_net'"),
    ("no_such_pkg.models:net", "model: cannot import 'no_such_pkg.models' for 'no_such_pkg.models:net'"),
    ("user_models:nothing", "model: 'user_models' has no 'nothing'"),
])
def test_a_wrong_model_name_is_refused_before_any_compute(name, message, user_package):
    cfg = Config(**{**tiny().to_dict(), "model": name, "pretrained": False})  # the syntax is valid
    with pytest.raises(UnknownNameError, match=message):
        check_resources(cfg)


def test_a_factory_without_a_linear_head_or_returning_no_module_is_named(user_package):
    with pytest.raises(ValueError, match="has no nn.Linear classifier head"):
        build_model("user_models:headless", pretrained=False)
    with pytest.raises(ValueError, match="returned str, not an nn.Module"):
        build_model("user_models:not_a_model", pretrained=False)


def test_timm_pretrained_weights_are_never_downloaded_unasked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UnknownNameError, match="--source-checkpoint PATH, run with --no-pretrained"):
        check_model("timm/resnet18", pretrained=True, source_checkpoint=None)


def test_the_cli_takes_a_model_by_import_path(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "vpns_core", "--model", "user_models:small_cnn",
                          "--no-pretrained", "--dataset", "fashion_mnist", "--train-subset", "64",
                          "--test-subset", "32", "--input-size", "24", "--output-size", "32",
                          "--pad-size", "4", "--batch-size", "32", "--mask-epochs", "1",
                          "--tune-epochs", "1", "--label-mapping-samples", "32", "--num-threads", "1",
                          "--measure-repeats", "0", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True, cwd=root, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": f"{FIXTURES}:{root}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "t" / "model_export.pt").is_file()
