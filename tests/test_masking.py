import math

import pytest
import torch
from torch import nn

from vpns_core.masking import (ALLOCATIONS, MaskedNetwork, erk_densities, kth_smallest,
                               kth_smallest_abs, plain_state_dict, scaled_score_init, score_grad_)


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_scaled_init_formula():
    w = torch.randn(4, 3, 3, 3)
    s = scaled_score_init(w)
    assert torch.allclose(s, math.sqrt(6 / 27) * w / w.abs().max())


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99])
def test_realised_sparsity_exact(allocation, sparsity):
    net = MaskedNetwork(tiny_net(), sparsity, allocation=allocation)
    net.attach_scores()
    masks = net.current_masks()
    kept = sum(int(m.sum()) for m in masks.values())
    if allocation == "global":
        assert kept == net.total - round(sparsity * net.total)  # exact count
    else:
        assert abs(kept - (1 - sparsity) * net.total) <= len(net.layers)  # within a weight per layer
    # the threshold-based forward mask agrees with the exact top-k masks (no ties here)
    for name, m in net.layers:
        assert torch.equal((m.weight_scores.abs() > m.weight_threshold), masks[name])


def test_global_threshold_keeps_largest_scores():
    net = MaskedNetwork(tiny_net(), 0.5)
    scores = net.attach_scores()
    allscores = torch.cat([s.detach().abs().flatten() for s in scores])
    masks = torch.cat([m.flatten() for m in net.current_masks().values()])
    assert allscores[masks].min() >= allscores[~masks].max()


def test_straight_through_gradient_reaches_all_scores():
    model = tiny_net()
    net = MaskedNetwork(model, 0.7)
    scores = net.attach_scores()
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    for (name, m), s in zip(net.layers, scores):
        assert s.grad is not None
        # pruned entries still get a gradient (straight-through), equal to dL/dw_eff * w
        assert (s.grad[~net.current_masks()[name]] != 0).any()
        assert m.weight_orig.grad is None


def test_forward_uses_masked_weights_and_refreshes_after_step():
    model = tiny_net()
    x = torch.randn(2, 3, 8, 8)
    dense_out = model(x)
    net = MaskedNetwork(model, 0.0)
    net.attach_scores()
    assert torch.allclose(model(x), dense_out, atol=1e-6)  # sparsity 0 = dense
    net = MaskedNetwork(tiny_net(), 0.5)
    scores = net.attach_scores()
    before = {n: m.clone() for n, m in net.current_masks().items()}
    opt = torch.optim.Adam(scores, lr=0.5)
    net.model(x).sum().backward()
    opt.step()
    net.model(x)  # the pre-hook refreshes thresholds because the scores' versions changed
    after = net.current_masks()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for name, m in net.layers:
        assert torch.equal(m.weight != 0, after[name] & (m.weight_orig != 0))


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero_through_tuning(opt_name):
    model = tiny_net()
    net = MaskedNetwork(model, 0.8)
    net.attach_scores()
    net.fix()
    masks = net.current_masks()
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2) if opt_name == "sgd"
           else torch.optim.Adam(params, lr=0.1, weight_decay=1e-2))
    before = {n: m.weight.detach().clone() for n, m in net.layers}
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 10, (8,))).backward()
        opt.step()
    for name, m in net.layers:
        assert torch.all(m.weight[~masks[name]] == 0)
        if masks[name].any():  # kept ones do train
            assert not torch.equal(m.weight[masks[name]], before[name][masks[name]])
    assert net.sparsity_report()["sparsity"] == pytest.approx(1 - sum(int(m.sum()) for m in masks.values()) / net.total)


def test_exclude_head_and_first_layer():
    model = tiny_net()
    net = MaskedNetwork(model, 0.9, exclude=("0", "9"))
    net.attach_scores()
    assert [n for n, _ in net.layers] == ["3", "5"]
    assert isinstance(model[9].weight, nn.Parameter) and model[9].weight.requires_grad
    report = net.sparsity_report()
    assert report["sparsity"] == pytest.approx(0.9, abs=1 / net.total)
    assert report["sparsity_all_layers"] < report["sparsity"]
    with pytest.raises(ValueError, match="exclude"):
        MaskedNetwork(tiny_net(), 0.5, exclude=("nope",))


def test_erk_densities_budget_and_shape_awareness():
    shapes = [torch.Size([64, 3, 3, 3]), torch.Size([64, 1, 3, 3]), torch.Size([128, 64, 1, 1]),
              torch.Size([1000, 1280])]
    dens = erk_densities(shapes, 0.1)
    sizes = [math.prod(s) for s in shapes]
    assert sum(d * n for d, n in zip(dens, sizes)) == pytest.approx(0.1 * sum(sizes))
    assert all(0 < d <= 1 for d in dens)
    assert dens[1] >= dens[2] > dens[3] and dens[3] < 0.1  # small / depthwise layers keep more


def test_density_floor_warns():
    with pytest.warns(UserWarning, match="below density floor"):
        net = MaskedNetwork(tiny_net(), 0.99, allocation="layerwise", density_floor=0.05)
    assert net.warnings


def test_plain_state_dict_loads_into_unmasked_copy():
    model = tiny_net()
    net = MaskedNetwork(model, 0.6)
    net.attach_scores()
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    expected = model(x)
    plain = tiny_net()
    plain.load_state_dict(plain_state_dict(model, net.current_masks()))
    plain.eval()
    assert torch.allclose(plain(x), expected, atol=1e-6)
    net.fix()
    plain.load_state_dict(plain_state_dict(model, net.current_masks()))
    assert torch.allclose(plain(x), model(x), atol=1e-6)


def test_global_allocation_warns_at_fix_when_a_layer_collapses():
    model = tiny_net()
    net = MaskedNetwork(model, 0.9, density_floor=0.05)
    net.attach_scores()
    with torch.no_grad():  # make one layer's scores tiny so the global threshold empties it
        net.layers[1][1].weight_scores.mul_(1e-6)
    with pytest.warns(UserWarning, match="below density floor"):
        net.fix()
    assert "3" in net.warnings[0]
    net.fix()  # already fixed: no-op


def test_score_gradient_goes_through_abs():
    """dL/ds = dL/dw_eff * w * sign(s): a step against it lowers the loss for either sign."""
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0]]))
    net = MaskedNetwork(lin, 0.0)
    (scores,) = net.attach_scores()
    with torch.no_grad():
        scores.copy_(torch.tensor([[0.5, -0.5, -0.7, 0.9]]))
    x = torch.ones(1, 4)
    lin(x).sum().backward()
    assert torch.allclose(scores.grad, torch.tensor([[1.0, -2.0, 3.0, -4.0]]) * scores.sign())


@pytest.mark.parametrize("k_fraction", [0.0, 1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_kth_smallest_abs_equals_kthvalue_of_the_concatenation(k_fraction):
    torch.manual_seed(0)
    parts = [torch.randn(300, 200), torch.randn(64, 3, 7, 7), torch.randn(1000, 100).round(decimals=1)]
    flat = torch.cat([p.flatten() for p in parts]).abs()  # many ties in the last part
    k = round(k_fraction * flat.numel())
    got = kth_smallest_abs(parts, k)
    expected = torch.kthvalue(flat, k).values if k > 0 else torch.tensor(float("-inf"))
    assert torch.equal(got, expected)


def test_the_gpu_threshold_method_sort_equals_kthvalue_exactly():
    # CUDA takes the k-th smallest from a sort (its kthvalue is slow); run both on the CPU here
    torch.manual_seed(0)
    values = torch.cat([torch.randn(200_000).abs(), torch.randn(50_000).round(decimals=1).abs()])
    for k in (1, 7, 125_000, 249_999, 250_000):
        assert torch.equal(kth_smallest(values, k, "sort"), kth_smallest(values, k, "kthvalue"))
    with pytest.raises(ValueError, match="method: choose from kthvalue, sort"):
        kth_smallest(values, 1, "topk")


def test_the_gpu_score_gradient_path_equals_the_chunked_cpu_path():
    torch.manual_seed(0)
    grad, weight, scores = torch.randn(3, 1 << 19), torch.randn(3, 1 << 19), torch.randn(3, 1 << 19)
    expected = grad * weight * scores.sign()
    for chunked in (True, False):  # False: the one-pass path a GPU takes
        assert torch.equal(score_grad_(grad.clone(), weight, scores, chunked=chunked), expected)


def test_kth_smallest_abs_is_exact_when_the_sample_misleads():
    # every sampled (strided) value is 0, so the sampled bracket misses: the exact path must run
    x = torch.rand(400_000) + 1.0
    stride = x.numel() // 65536
    x[::stride] = 0.0
    for k in (10, 200_000, 399_990):
        assert torch.equal(kth_smallest_abs([x], k), torch.kthvalue(x.abs(), k).values)


def test_eval_forward_reuses_the_masked_weight_until_scores_change():
    model = tiny_net()
    net = MaskedNetwork(model, 0.5)
    scores = net.attach_scores()
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        model(x)
        first = model[3].weight
        before = first.clone()
        model(x)
        assert model[3].weight is first and torch.equal(first, before)  # nothing recomputed
        scores[1].mul_(-1.0).add_(torch.randn_like(scores[1]))
        out = model(x)
    assert not torch.equal(model[3].weight, before)  # rebuilt (in place) after the change
    masks = net.current_masks()
    assert torch.equal(model[3].weight, model[3].weight_orig * masks["3"])
    plain = tiny_net()
    plain.load_state_dict(plain_state_dict(model, masks))
    plain.eval()
    assert torch.allclose(plain(x), out, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_thresholds_follow_a_fused_optimizer_step(fused):
    """Fused optimizers do not bump version counters; the network must still see the change."""
    net = MaskedNetwork(tiny_net(), 0.5)
    scores = net.attach_scores()
    x = torch.randn(2, 3, 8, 8)
    # fused set per parameter group, not in the optimizer's defaults: still seen
    opt = torch.optim.Adam([{"params": scores, "fused": fused}], lr=0.5)
    before = [m.weight_threshold.clone() for _, m in net.layers]
    net.model(x).sum().backward()
    opt.step()
    net.model(x)
    assert any(not torch.equal(b, m.weight_threshold) for b, (_, m) in zip(before, net.layers))
    masks = net.current_masks()
    for name, m in net.layers:
        assert torch.equal(m.weight != 0, masks[name] & (m.weight_orig != 0))
    net.fix()  # removes the hook with the score mode
    sgd = torch.optim.SGD(net.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, fused=fused)
    for _ in range(3):
        sgd.zero_grad()
        net.model(x).sum().backward()
        sgd.step()
    assert all(torch.all(m.weight[~masks[n]] == 0) for n, m in net.layers)


def test_a_graph_from_before_a_score_update_is_refused_not_silently_wrong():
    model = tiny_net()
    net = MaskedNetwork(model, 0.5)
    scores = net.attach_scores()
    x = torch.randn(2, 3, 8, 8)
    stale = model(x).sum()
    with torch.no_grad():
        scores[0].add_(torch.randn_like(scores[0]))
    model(x)  # refreshes the layers' buffers in place
    with pytest.raises(RuntimeError, match="modified inplace|modified by an inplace"):
        stale.backward()
