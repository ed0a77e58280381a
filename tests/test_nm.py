"""N:M (2:4) semi-structured masks (issue 30): exactly N of every M weights along each pruned
layer's input dimension, for the score methods and the one-shot rankers, kept through weight
tuning; layers that cannot follow the pattern stay dense and are named."""
import pytest
import torch
from torch import nn

from vpns_core.config import Config, ConfigError
from vpns_core.masking import MaskedNetwork, nm_eligible, nm_mask
from vpns_core.train import Trial

from conftest import tiny


def groups_of(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept counts per group of m along the input dimension (convs: input channels per position)."""
    grouped = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
    return grouped.reshape(-1, m).sum(1)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    gen = torch.Generator().manual_seed(0)
    linear = torch.randn(6, 16, generator=gen)
    mask = nm_mask(linear, n, m)
    assert (groups_of(mask, m) == n).all()
    top = linear.reshape(-1, m).topk(n, dim=1).values.min(1).values
    assert torch.equal(linear.reshape(-1, m)[mask.reshape(-1, m)].reshape(-1, n).min(1).values, top)
    conv = torch.randn(5, 8, 3, 3, generator=gen)
    cmask = nm_mask(conv, n, m)
    assert cmask.shape == conv.shape and (groups_of(cmask, m) == n).all()
    # the groups run along input channels: at one kernel position, n of each m channels
    assert (cmask[:, :m, 1, 1].sum(1) == n).all()


def test_layers_whose_input_is_not_a_multiple_of_m_stay_dense():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                          nn.Flatten(), nn.Linear(16, 12), nn.Linear(12, 6))
    net = MaskedNetwork(model, 0.5, pattern=(2, 4))
    assert net.ineligible == ["0", "1"]  # 3 input channels; depthwise: 1 per group
    assert [n for n, _ in net.layers] == ["2", "4", "5"]
    assert not nm_eligible(model[1].weight, 4) and nm_eligible(model[2].weight, 4)
    with pytest.raises(ValueError, match="removes 0.5 of each layer's weights, not 0.9"):
        MaskedNetwork(model, 0.9, pattern=(2, 4))


@pytest.mark.parametrize("method", ["vpns", "hydra", "omp", "snip", "random", "vpns_omp"])
@pytest.mark.parametrize("schedule", ["paper", "reference"])
def test_every_group_of_every_pruned_layer_keeps_exactly_n(method, schedule, tmp_path):
    cfg = tiny(method=method, pattern="2:4", sparsity=0.5, schedule=schedule, measure_repeats=0)
    trial = Trial(cfg, tmp_path)
    result = trial.run()
    masks = trial.net.current_masks()
    assert masks and all((groups_of(mask, 4) == 2).all() for mask in masks.values())
    for name, layer in trial.net.layers:  # pruned weights stayed zero through weight tuning
        assert (layer.weight.detach()[~masks[name]] == 0).all()
    assert result.final["sparsity"] == pytest.approx(0.5)
    assert result.final["nm_dense_layers"] == "conv1, fc"  # the first conv (3 inputs) and the head
    # no cost record asked for: no semi-structured conversion either (test_pareto.py runs one with it)
    assert not any(k.startswith(("semi_structured", "params_m", "latency")) for k in result.final)


def test_score_masks_are_recomputed_every_step_in_mask_finding(tmp_path):
    trial = Trial(tiny(pattern="2:4", sparsity=0.5, mask_epochs=1, tune_epochs=0, measure_repeats=0), tmp_path)
    layer = trial.net.layers[1][1]
    trial.net.attach_scores()
    before = nm_mask(layer.weight_scores.detach().abs(), 2, 4)
    with torch.no_grad():
        layer.weight_scores.mul_(torch.rand_like(layer.weight_scores) + 0.5)
    trial.net.refresh()
    after = nm_mask(layer.weight_scores.detach().abs(), 2, 4)
    x = torch.rand(2, 3, 32, 32)
    trial.model.eval()
    trial.model(x)
    assert torch.equal(layer.weight.detach() != 0, after & (layer.weight_orig.detach() != 0))
    assert not torch.equal(before, after)


@pytest.mark.parametrize("changes, field", [
    (dict(pattern="2:4", sparsity=0.9), "sparsity: a 2:4 pattern removes 0.5"),
    (dict(pattern="4:2", sparsity=0.5), "pattern: choose unstructured or N:M"),
    (dict(pattern="2by4", sparsity=0.5), "pattern: choose unstructured or N:M"),
    (dict(pattern="2:4", sparsity=0.5, method="lth"), "pattern: method 'lth' cannot produce 2:4 masks"),
    (dict(pattern="2:4", sparsity=0.5, method="slim"), "pattern: method 'slim' cannot produce 2:4 masks"),
])
def test_a_pattern_that_cannot_hold_is_refused_by_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**changes)
    assert Config(**{**tiny().to_dict(), "pattern": "1:4", "sparsity": 0.75}).nm == (1, 4)


@pytest.mark.parametrize("schedule", ["paper", "reference"])
def test_a_vision_transformer_runs_vpns_with_2_4_masks_on_its_linear_layers(schedule, tmp_path, monkeypatch):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fixtures"))
    cfg = tiny(model="user_models:tiny_vit", input_size=32, output_size=32, pad_size=4, pattern="2:4",
               sparsity=0.5, schedule=schedule, measure_repeats=0)
    trial = Trial(cfg, tmp_path)
    result = trial.run()
    pruned = dict(trial.net.layers)
    assert trial.head_name == "heads.head" and "heads.head" not in pruned and "conv_proj" not in pruned
    linears = [n for n, m in pruned.items() if isinstance(m, nn.Linear)]
    assert len(linears) == 6  # per block: attention out_proj, mlp.0, mlp.3
    masks = trial.net.current_masks()
    assert all((groups_of(masks[n], 4) == 2).all() for n in linears)
    assert result.final["prompt_tunable"] == 3 * (32 ** 2 - 24 ** 2)  # the pad prompt on its input


def test_the_semi_structured_path_says_why_a_cpu_keeps_dense_weights():
    from vpns_core import semi_structured
    assert "keeps dense weights with zeros" in semi_structured.unavailable("cpu")
    layer = nn.Linear(128, 64)
    assert not semi_structured.eligible(layer)  # a dense weight is not 2:4
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(64, 10))
    assert semi_structured.prune_2_4(model) == 2
    assert semi_structured.eligible(layer) and semi_structured.is_2_4(layer.weight)
    assert not semi_structured.eligible(model[2])  # 10 outputs: not a multiple of 64


@pytest.mark.cuda
def test_a_2_4_linear_layer_converts_and_matches_on_a_gpu():
    from vpns_core import semi_structured
    device = torch.device("cuda")
    if semi_structured.unavailable(device):
        pytest.skip(semi_structured.unavailable(device))
    dense = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128)).half().to(device).eval()
    semi_structured.prune_2_4(dense)
    import copy
    sparse = copy.deepcopy(dense)
    assert semi_structured.convert(sparse) == ["0", "2"]
    out = semi_structured.compare(dense, sparse, torch.randn(64, 256, device=device, dtype=torch.half), repeats=3)
    assert out["max_abs_diff"] < 1e-2 and out["sparse_ms"] > 0
