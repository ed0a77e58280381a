"""Specification of vpns_core.models: names, pretrained weights, checkpoints and layer surgery."""
from __future__ import annotations

import contextlib
import socket
import time
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

from vpns_core.models import (
    IMAGENET_STD, MODELS, SourceModel, WeightsUnavailableError, build_model, check_model,
    first_layer, head_layer, model_names, replace_head, set_bn_momentum,
)
from vpns_core.registry import UnknownNameError

SURGERY_MODELS = ["resnet18", "vgg16", "efficientnet_lite0", "tiny_resnet"]
# One small model per torchvision builder family; all of them run in the slow test below.
FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small",
            "regnet_x_400mf", "shufflenet_v2_x0_5", "swin_t", "vit_b_16"]


_UNPICKLED: list[bool] = []  # set if a test's pickle payload ever runs


def _record_unpickling() -> str:
    _UNPICKLED.append(True)
    return "executed"


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


@contextlib.contextmanager
def parameters_on_meta():
    """Construct modules with parameters and buffers on the meta device (no memory, no init)."""
    original = nn.Module.register_parameter, nn.Module.register_buffer
    register_parameter, register_buffer = original

    def on_meta_parameter(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def on_meta_buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = on_meta_parameter, on_meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = original


def execution_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The Conv2d and Linear layers in the order forward() runs them."""
    order: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o, name=name: order.append((name, mod)))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def check_surgery(model: nn.Module, x: torch.Tensor) -> None:
    order = execution_order(model, x)
    head_name, head = head_layer(model)
    first_name, first = first_layer(model)
    assert isinstance(head, nn.Linear) and head.out_features == 1000
    assert [n for n, m in order if isinstance(m, nn.Linear)][-1] == head_name
    assert order[0][0] == first_name and isinstance(first, (nn.Conv2d, nn.Linear))
    new = replace_head(model, 7)
    assert model.get_submodule(head_name) is new and head_layer(model) == (head_name, new)
    assert (new.in_features, new.out_features) == (head.in_features, 7)
    assert new.weight.device == head.weight.device
    with torch.no_grad():
        assert model.eval()(x).shape == (x.shape[0], 7)


# --- names and errors -----------------------------------------------------------------------


def test_model_names_cover_registered_and_torchvision():
    names = model_names()
    assert names == sorted(set(names))
    assert {"efficientnet_lite0", "tiny_resnet", "resnet18", "resnet50", "vgg16"} <= set(names)
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)


@pytest.mark.parametrize("call", [lambda: build_model("resnet19", pretrained=False),
                                  lambda: check_model("resnet19", False, None)])
def test_unknown_model_names_field_and_choices(call):
    with pytest.raises(UnknownNameError) as info:
        call()
    message = str(info.value)
    assert message.startswith("model:") and "resnet19" in message
    assert "resnet18" in message and "efficientnet_lite0" in message and "tiny_resnet" in message


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_check_model_wants_cached_torchvision_weights(empty_torch_home):
    with pytest.raises(WeightsUnavailableError) as info:
        check_model("resnet18", True, None)
    message = str(info.value)
    cached = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    for needle in ("resnet18-f37072fd.pth", str(cached), "TORCH_HOME", "--no-pretrained",
                   "--source-checkpoint"):
        assert needle in message
    assert isinstance(info.value, FileNotFoundError)
    check_model("resnet18", False, None)                       # random init needs nothing
    check_model("resnet18", True, None, allow_download=True)   # build_model may download
    cached.parent.mkdir(parents=True)
    cached.touch()
    check_model("resnet18", True, None)                        # cached: fine


def test_build_model_without_network_raises_weights_unavailable(empty_torch_home, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # hermetic even on a networked host
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet18", pretrained=True)
    assert time.perf_counter() - start < 5.0
    assert "resnet18-f37072fd.pth" in str(info.value) and "TORCH_HOME" in str(info.value)
    assert "URLError" in str(info.value)
    assert not (empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()
    assert socket.getdefaulttimeout() is None  # the download timeout was restored


def _cache(torch_home, obj) -> None:
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(obj, path)


def test_build_model_loads_cached_torchvision_weights(empty_torch_home):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    _cache(empty_torch_home, reference.state_dict())  # a cached file is used without network
    model = build_model("resnet18", pretrained=True)
    assert (model.num_source_classes, model.std) == (1000, (0.229, 0.224, 0.225))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.module.eval()(x), reference.eval()(x))


def test_cached_torchvision_weights_are_loaded_weights_only(empty_torch_home):
    _cache(empty_torch_home, {"fc.weight": torch.zeros(1), "payload": _Payload()})
    with pytest.raises(WeightsUnavailableError, match="resnet18-f37072fd.pth"):
        build_model("resnet18", pretrained=True)
    assert _UNPICKLED == []


def test_tiny_resnet_has_no_pretrained_weights():
    with pytest.raises(WeightsUnavailableError, match="no pretrained weights"):
        check_model("tiny_resnet", True, None)
    with pytest.raises(WeightsUnavailableError, match="--no-pretrained"):
        build_model("tiny_resnet", pretrained=True)


def test_missing_source_checkpoint(tmp_path):
    missing = str(tmp_path / "nope.pt")
    for call in (lambda: check_model("tiny_resnet", False, missing),
                 lambda: build_model("tiny_resnet", source_checkpoint=missing)):
        with pytest.raises(FileNotFoundError, match="source_checkpoint.*nope.pt"):
            call()


# --- registered models ----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
def test_registered_models_build_and_run(name):
    model = build_model(name, pretrained=False)
    assert isinstance(model, SourceModel) and model.name == name
    assert len(model.mean) == len(model.std) == 3
    with torch.no_grad():
        assert model.module.eval()(torch.rand(2, 3, 32, 32)).shape == (2, model.num_source_classes)


def test_tiny_resnet_block_is_torchvisions_basic_block(monkeypatch):
    """vpns' own BasicBlock (so that the tiny model needs no torchvision) gives the tiny ResNet
    torchvision's random init, state dict and outputs, in training and in eval mode."""
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock

    from vpns_core import models
    torch.manual_seed(0)
    ours = models.TinyResNet(num_classes=10)
    monkeypatch.setattr(models, "BasicBlock", TorchvisionBlock)
    torch.manual_seed(0)
    reference = models.TinyResNet(num_classes=10)
    assert isinstance(reference.layers[1], TorchvisionBlock)
    assert not isinstance(ours.layers[1], TorchvisionBlock)
    theirs = reference.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    x = torch.rand(4, 3, 24, 24)
    for mode in (True, False):
        assert torch.equal(ours.train(mode)(x), reference.train(mode)(x))
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())  # same BN stats


def test_torchvision_model_normalisation_and_classes():
    model = build_model("resnet18", pretrained=False)
    assert (model.mean, model.std, model.num_source_classes) == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1000)


def test_tiny_resnet_is_fast():
    model = build_model("tiny_resnet", pretrained=False).module
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 1000, (16,))
    # One thread and the minimum: robust to other processes sharing the CPU (a second busy
    # process makes torch's default 2-thread CPU kernels ~60x slower on this 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(10):
            start = time.perf_counter()
            nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 0.1  # 15-60 ms measured on 2-core Xeons; a ResNet-18 takes several times that


@pytest.fixture(scope="module")
def lite0() -> SourceModel:
    return build_model("efficientnet_lite0", pretrained=True)


def _photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo, shorter side resized to 224, centre-cropped, in [0, 1]."""
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1)
    transform = v2.Compose([v2.Resize(224, antialias=True), v2.CenterCrop(224),
                            v2.ToDtype(torch.float32, scale=True)])
    return transform(image)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_efficientnet_lite0_classifies_photos(lite0):
    photos = torch.stack([_photo("chelsea"), _photo("coffee")])
    with torch.no_grad():
        logits = lite0.module.eval()(_normalise(photos, lite0.mean, lite0.std))
    assert logits.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert lite0.num_source_classes == 1000


def test_efficientnet_lite0_normalisation_matches_its_batchnorm(lite0):
    """The stem BatchNorm's running variance is what TF's (x-127)/128 input produces; ImageNet
    mean/std (the package README's) inflate it ~4.5x. Evidence for LITE_MEAN/LITE_STD."""
    photos = torch.stack([_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket")])
    bn = lite0.module._bn0
    used = bn.running_var > 0

    def log_variance_ratio(std) -> float:
        with torch.no_grad():
            z = lite0.module._conv_stem(_normalise(photos, lite0.mean, std))
        return (z.var((0, 2, 3))[used] / bn.running_var[used]).log().median().item()

    assert abs(log_variance_ratio(lite0.std)) < 0.5
    assert log_variance_ratio(IMAGENET_STD) > 1.0


def test_efficientnet_lite0_keeps_tf_bn_momentum_and_pads_any_size(lite0):
    momenta = [m.momentum for m in lite0.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(momenta) > 40 and all(abs(m - 0.01) < 1e-9 for m in momenta)
    with torch.no_grad():
        assert lite0.module.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


# --- layer surgery --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SURGERY_MODELS)
def test_head_first_layer_and_replace_head(name):
    model = build_model(name, pretrained=False).module
    check_surgery(model, torch.rand(2, 3, 32, 32))
    expected = {"resnet18": ("fc", "conv1"), "vgg16": ("classifier.6", "features.0"),
                "efficientnet_lite0": ("_fc", "_conv_stem"), "tiny_resnet": ("fc", "conv1")}
    assert (head_layer(model)[0], first_layer(model)[0]) == expected[name]


def _check_torchvision_surgery(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init warnings
        with parameters_on_meta():
            model = torchvision.models.get_model(name)
    if name.startswith("squeezenet"):  # its classifier is a 1x1 Conv2d
        with pytest.raises(ValueError, match="no nn.Linear"):
            head_layer(model)
        return
    check_surgery(model, torch.empty(1, 3, 224, 224, device="meta"))


@pytest.mark.parametrize("name", FAMILIES + ["squeezenet1_1"])
def test_surgery_on_torchvision_families(name):
    _check_torchvision_surgery(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_surgery_on_every_torchvision_model(name):
    _check_torchvision_surgery(name)


def test_replace_head_keeps_bias_setting():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 5, bias=False))
    new = replace_head(model, 3)
    assert model[2] is new and new.bias is None and new.out_features == 3


def test_set_bn_momentum_counts_and_sets():
    model = build_model("tiny_resnet", pretrained=False).module
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 9
    assert set_bn_momentum(model, None) == 0 and {m.momentum for m in bns} == {0.1}
    assert set_bn_momentum(model, 0.3) == 9 and {m.momentum for m in bns} == {0.3}
    assert set_bn_momentum(model, 0.3) == 0
    bns[0].momentum = 0.5
    assert set_bn_momentum(model, 0.3) == 1
    with pytest.raises(ValueError, match="bn_momentum"):
        set_bn_momentum(model, 0.0)


def test_set_bn_momentum_on_lite0():
    model = build_model("efficientnet_lite0", pretrained=False).module
    count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert count > 40 and set_bn_momentum(model, 0.1) == count


# --- user checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3},
                                  lambda sd: {"model": sd},
                                  lambda sd: {f"module.{k}": v for k, v in sd.items()}])
def test_source_checkpoint_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    original = build_model("tiny_resnet", pretrained=False).module
    replace_head(original, 10)
    path = tmp_path / "own.pt"
    torch.save(wrap(original.state_dict()), path)
    check_model("tiny_resnet", True, str(path))  # pretrained is ignored given a checkpoint
    loaded = build_model("tiny_resnet", source_checkpoint=str(path))
    assert loaded.num_source_classes == 10 and loaded.name == "tiny_resnet"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module.eval()(x), original.eval()(x))


def test_source_checkpoint_torchvision_round_trip(tmp_path):
    original = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18_10.pt"
    torch.save(original.state_dict(), path)
    loaded = build_model("resnet18", source_checkpoint=str(path))
    assert loaded.num_source_classes == 10 and loaded.mean == (0.485, 0.456, 0.406)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module.eval()(x), original.eval()(x))


def test_source_checkpoint_for_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(build_model("tiny_resnet", pretrained=False).module.state_dict(), path)
    with pytest.raises(ValueError, match="source_checkpoint.*resnet18"):
        build_model("resnet18", source_checkpoint=str(path))


def test_source_checkpoint_is_loaded_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    state = build_model("tiny_resnet", pretrained=False).module.state_dict()
    torch.save({"state_dict": state, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        build_model("tiny_resnet", source_checkpoint=str(path))
    assert _UNPICKLED == []
