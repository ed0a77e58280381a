"""Channel pruning: gates equal removal, realised channel sparsity, plain-torch export, each
method end to end on a tiny ResNet, and the dense-vs-pruned measurements."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vpns_core.config import Config, ConfigError
from vpns_core.methods import METHODS
from vpns_core.models import build_model, head_layer
from vpns_core.channel_pruning import ChannelPruner, architecture, count_parameters
from vpns_core.costs import _PeakMemory, compare, measure
from vpns_core.train import Trial, run_trial

import conftest

ROOT = Path(__file__).resolve().parents[1]
CHANNEL_METHODS = tuple(n for n in METHODS.names() if METHODS.get(n).structured)


def tiny(**changes):
    """The tiny task at 50% channel sparsity, measuring once."""
    return conftest.tiny(**{"sparsity": 0.5, "measure_repeats": 1, **changes})


def random_bn(model):
    """Non-trivial BatchNorm statistics and shifts, so a gated channel is not zero by accident."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def pruner(name, method, sparsity, size=32, allocation="layerwise"):
    model = random_bn(build_model(name, pretrained=False).module)
    cp = ChannelPruner(model, torch.zeros(1, 3, size, size), sparsity, method=METHODS.get(method)(),
                       allocation=allocation, ignored=(head_layer(model)[1],))
    return model, cp


@pytest.mark.parametrize("name,size", [("tiny_resnet", 32), ("resnet18", 32), ("efficientnet_lite0", 64)])
@pytest.mark.parametrize("method", CHANNEL_METHODS)
def test_removing_channels_keeps_the_gated_outputs(name, size, method):
    model, cp = pruner(name, method, 0.5, size)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        dense = model(x)
    if method == "vpns_structured":
        cp.attach_scores()
        with torch.no_grad():  # scores unlike the magnitude init, so the plan is not a magnitude one
            for s in cp.scores.values():
                s.copy_(torch.randn(s.shape, generator=torch.Generator().manual_seed(1)))
    plan = cp.plan()
    cp.fix(plan)
    with torch.no_grad():
        gated = model(x)
    before = count_parameters(model)
    cp.remove(plan)
    with torch.no_grad():
        removed = model(x)
    assert not torch.allclose(gated, dense, atol=1e-3)  # the gates did remove something
    torch.testing.assert_close(removed, gated, atol=1e-5, rtol=1e-4)
    assert count_parameters(model) < 0.5 * before
    assert head_layer(model)[1].out_features == 1000  # the classes stay


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_realised_channel_sparsity_matches_the_target(sparsity):
    model, cp = pruner("tiny_resnet", "depgraph", sparsity)
    plan = cp.plan()
    for name, group in cp.groups.items():  # torch-pruning keeps int(n (1 - s)) channels per group
        assert len(plan[name]) == group.channels - int(group.channels * (1 - sparsity))
        assert abs(len(plan[name]) / group.channels - sparsity) < 1 / group.channels
    cp.remove(plan)
    realised = cp.report()["channel_sparsity"]
    assert abs(realised - sparsity) < 1 / 16
    convs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs["conv1"] == 16 - len(plan["conv1"])


def test_each_channel_method_builds_its_own_pruner():
    kinds = {"vpns_structured": "BasePruner", "slim": "BNScalePruner", "depgraph": "GroupNormPruner"}
    assert set(CHANNEL_METHODS) == set(kinds)
    for method in CHANNEL_METHODS:
        _, cp = pruner("tiny_resnet", method, 0.5)
        assert type(cp.method) is METHODS.get(method) and type(cp.pruner).__name__ == kinds[method]
    with pytest.raises(ValueError, match="^method: 'omp' is not a channel method; choose one of vpns_core.methods.channel"):
        pruner("tiny_resnet", "omp", 0.5)


def test_global_allocation_ranks_all_groups_together():
    _, cp = pruner("tiny_resnet", "depgraph", 0.5, allocation="global")
    plan = cp.plan()
    total = sum(len(v) for v in plan.values())
    assert abs(total / cp.total_channels - 0.5) < 0.02
    assert len({round(len(plan.get(n, [])) / g.channels, 3) for n, g in cp.groups.items()}) > 1


def test_channel_gate_gradient_is_straight_through_abs():
    """The gate multiplies the group's channels where they enter their consumer (here the Linear
    after Flatten: channel c = features 16c … 16c + 15); d loss / d s_c = d loss / d gate_c ·
    sign(s_c) (top-k on |s|), for kept and removed channels alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))
    model = random_bn(model)
    cp = ChannelPruner(model, torch.zeros(1, 3, 6, 6), 0.5, method=METHODS.get("vpns_structured")(), ignored=(model[4],))
    (s,) = cp.attach_scores()
    with torch.no_grad():
        s.copy_(torch.tensor([0.3, -0.1, -0.4, 0.2]))  # drop channels 1 and 3 (smallest |s|)
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    with torch.no_grad():
        feats = model[3](model[2](model[1](model[0](x))))
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0], requires_grad=True)
    y = nn.functional.linear(feats * gate.repeat_interleave(16), model[4].weight, model[4].bias).sum()
    (dgate,) = torch.autograd.grad(y, gate)
    torch.testing.assert_close(s.grad, dgate * torch.tensor([0.3, -0.1, -0.4, 0.2]).sign())
    assert s.grad[1] != 0 and s.grad[3] != 0  # removed channels get a gradient too (straight-through)


def test_slim_regulariser_adds_l1_on_batchnorm_scales():
    model, cp = pruner("tiny_resnet", "slim", 0.5)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    before = {n: m.weight.grad.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    cp.regularize()
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.weight.grad - before[n], 1e-5 * m.weight.sign())


def test_measure_counts_flops_and_memory():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    m = measure(conv, 16, batches=(1, 4), repeats=1)
    assert m["flops_g"] == pytest.approx(2 * 8 * 3 * 9 * 16 * 16 / 1e9)  # 2 · MACs per image
    assert m["params"] == 8 * 3 * 9
    assert m["memory_mb"] * 2**20 >= 4 * 8 * 16 * 16 * 4  # at least the batch-4 output
    assert m["latency_ms_b1"] > 0 and m["throughput_b4"] > 0 and m["train_step_ms"] > 0
    untimed = measure(conv, 16, batches=(1, 4), repeats=0, count_flops=False)  # nothing timed or counted
    assert set(untimed) == {"params", "memory_mb", "train_memory_mb"} and untimed["params"] == m["params"]
    with _PeakMemory() as tracker:
        a = torch.ones(1024)  # 4 KiB alive together with b
        b = torch.ones(1024)
        del a, b
    assert tracker.peak >= 8192 and tracker.live < tracker.peak


def test_compare_reports_ratios_below_one_for_a_pruned_model():
    model, cp = pruner("tiny_resnet", "depgraph", 0.5)
    cp.remove(cp.plan())
    dense = build_model("tiny_resnet", pretrained=False).module
    r = compare(dense, model, 32, batches=(1, 8), repeats=2)
    assert r["params_ratio"] < 0.4 and r["flops_ratio"] < 0.4 and r["memory_ratio"] < 1
    assert r["speedup"] > 0 and r["train_speedup"] > 0 and r["train_memory_ratio"] < 1
    # the comparison's FLOPs have their own keys: the cost record's flops_g is never overwritten
    assert "flops_g" not in r and r["flops_ratio"] == pytest.approx(r["pruned_flops_g"] / r["dense_flops_g"])


def test_structured_vpns_learns_scores_and_prompt(tmp_path):
    trial = Trial(tiny(method="vpns_structured", mask_epochs=2), tmp_path)
    trial.method.warmup(trial, prompted=True)
    scores = trial.method.channels.attach_scores()
    start = [s.detach().clone() for s in scores]
    weight = trial.model.conv1.weight.detach().clone()
    trial.loop.run_stage("mask", [{"params": scores, "lr": 0.05},
                             {"params": trial.assembly.prompt_params(), "lr": 0.05}],
                    optimizer="adam", epochs=1, prompted=True)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, scores))
    assert torch.count_nonzero(trial.prompt.delta) > 0
    assert torch.equal(trial.model.conv1.weight, weight)  # stage 1 trains scores, not weights


def test_exported_model_loads_with_plain_torchvision_code(tmp_path):
    cfg = tiny(method="depgraph", model="resnet18", sparsity=0.7, max_steps_per_epoch=1, measure_repeats=0)
    trial = Trial(cfg, tmp_path)
    trial.run()
    export = torch.load(tmp_path / "model_export.pt", weights_only=True)
    assert export["builder"]["module"] == "torchvision.models"
    assert export["architecture"]["layer1.0.conv1"]["out_channels"] < 64
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = (f"import sys; sys.modules['vpns_core'] = None; sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
            "import torch\nfrom load_pruned import load_pruned\n"
            f"m = load_pruned({str(tmp_path / 'model_export.pt')!r})\n"
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-I", "-c", code], check=True, cwd=tmp_path)
    trial.model.load_state_dict(export["state_dict"])
    trial.model.eval()
    with torch.no_grad():
        expected = trial.model(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected)
    assert architecture(trial.model) == export["architecture"]


def test_resume_after_removal_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny(method="vpns_structured", tune_epochs=2, measure_repeats=0)
    whole = run_trial(cfg, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_in_tune(metrics):
        if metrics["stage"] == "tune":
            raise Stop
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path / "cut", reporter=stop_in_tune)
    resumed = run_trial(cfg, tmp_path / "cut")
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in whole.history])
    assert ["test_loss" in h for h in resumed.history] == ["test_loss" in h for h in whole.history]
    tested = [h["test_loss"] for h in whole.history if "test_loss" in h]
    assert tested and [h["test_loss"] for h in resumed.history if "test_loss" in h] == pytest.approx(tested)
    assert resumed.final["removal_max_abs_diff"] == whole.final["removal_max_abs_diff"]


def test_channel_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^sparsity: channel methods"):
        tiny(method="slim", sparsity=0.95)
    with pytest.raises(ConfigError, match="^channel_allocation:"):
        tiny(method="slim", channel_allocation="erk")
    with pytest.raises(ConfigError, match="^warmup_epochs:"):
        tiny(method="slim", warmup_epochs=-1)
    with pytest.raises(ConfigError, match="^channel_reg:"):
        tiny(method="depgraph", channel_reg=-1.0)
