"""Each baseline's defining property on a tiny network, plus every registered method end to end."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpns_core.checkpoint import safe_load
from vpns_core.config import Config, ConfigError
from vpns_core.channel_pruning import count_parameters
from vpns_core.masking import MaskedNetwork
from vpns_core.methods import METHODS
from vpns_core.methods.bip import upper_level_gradient
from vpns_core.methods.grasp import grasp_scores
from vpns_core.methods.lottery import lth_rounds, round_sparsity
from vpns_core.methods.snip import snip_scores
from vpns_core.methods.synflow import synflow_scores
from vpns_core.models import build_model, first_layer, head_layer
from vpns_core.train import Trial, run_trial

import conftest

def tiny(**changes):
    """The tiny task under one global threshold (so realised sparsity is an exact count)."""
    return conftest.tiny(**{"synflow_iterations": 5, "allocation": "global", **changes})


def two_layer(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).to(dtype)


def fake_trial(net, seed=7):
    return SimpleNamespace(cfg=SimpleNamespace(seed=seed), net=net)


def channel_pruned_params(dense: nn.Module, sparsity: float) -> int:
    """Parameters of ``dense`` once ``sparsity`` of every group's channels is removed: each
    channel dimension keeps ``int(n (1 - s))`` (torch-pruning's count) except the image's input
    channels and the classes."""
    def kept(n: int) -> int:
        return int(n * (1 - sparsity))
    first, head = first_layer(dense)[0], head_layer(dense)[0]
    total = 0
    for name, m in dense.named_modules():
        if isinstance(m, nn.Conv2d):
            cin = m.in_channels if name == first else kept(m.in_channels)
            total += kept(m.out_channels) * cin // m.groups * math.prod(m.kernel_size)
            total += kept(m.out_channels) if m.bias is not None else 0
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * kept(m.num_features)
        elif isinstance(m, nn.Linear):
            assert name == head  # tiny_resnet: the classifier is the only linear layer
            total += m.out_features * kept(m.in_features) + m.out_features
    return total


# --- every method ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_hits_target_sparsity_and_reports(method, tmp_path):
    """The one end-to-end trial of each registered method (the sweep smoke tests run a few)."""
    channel = METHODS.get(method).structured  # with a dense warm-up epoch and the cost record
    cfg = tiny(method=method, lth_rate=0.6, max_steps_per_epoch=2,
               **({"warmup_epochs": 1, "measure_repeats": 1, "cost_record": True} if channel else {}))
    seen = []
    trial = Trial(cfg, tmp_path, reporter=seen.append)
    result = trial.run()
    assert [m["stage"] for m in seen] == [n for n, e in cfg.stage_plan for _ in range(e)]
    assert len(seen) == cfg.total_epochs and [m["epoch"] for m in seen] == list(range(1, len(seen) + 1))
    for m in seen:
        for key in ("train_loss", "val_acc_prompt", "val_acc_noprompt", "sparsity", "lr",
                    "epoch_time_s", "eval_time_s", "images_per_s", "grad_steps"):
            assert math.isfinite(m[key]), key
        assert 0 <= m["val_acc"] <= 1
    # the test set is evaluated where a result reads it: end of mask finding, selected epochs
    tested = [m for m in seen if "test_acc" in m]
    assert {m["epoch"] for m in tested} >= {result.final["selected_epoch"]}
    assert all(0 <= m["test_acc"] <= 1 for m in tested)
    if any(m["stage"] == "mask" for m in seen):
        assert "test_acc" in [m for m in seen if m["stage"] == "mask"][-1]
    if method == "dense":
        assert seen[-1]["sparsity"] == 0.0
    assert (tmp_path / "model_export.pt").is_file() and (tmp_path / "masks.pt").is_file()
    bilevel_epochs = sum(m["stage"] == "mask" for m in seen) if method == "bip" else 0  # 2 steps each
    assert seen[-1]["grad_steps"] == 2 * (len(seen) + bilevel_epochs)  # max_steps_per_epoch=2
    masks = safe_load(tmp_path / "masks.pt")["masks"]
    if channel:  # channels removed: every conv narrower, parameters as planned
        assert masks == {}
        assert [m["stage"] for m in seen][:1] == ["warmup"] and seen[0]["sparsity"] == 0.0
        assert result.final["removal_max_abs_diff"] < 1e-4  # removal equals the gated network
        for key in ("speedup", "speedup_b1", "memory_mb", "flops_g", "memory_ratio", "train_speedup"):
            assert result.final[key] > 0, key
        # the cost record's flops_g (the export) and the comparison's (trial.model) are two keys
        # of one network: equal, and below the dense model's
        assert result.final["flops_g"] == pytest.approx(result.final["pruned_flops_g"])
        assert result.final["pruned_flops_g"] < 0.2 * result.final["dense_flops_g"]
        assert result.final["params_m"] * 1e6 == pytest.approx(result.final["pruned_params"])
        dense = build_model(cfg.model, pretrained=False).module
        widths = {n: m.out_channels for n, m in trial.model.named_modules() if isinstance(m, nn.Conv2d)}
        dense_widths = {n: m.out_channels for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)}
        assert widths == {n: int(w * (1 - 0.8)) for n, w in dense_widths.items()}
        pruned = count_parameters(trial.model)
        assert pruned == channel_pruned_params(dense, 0.8)
        assert result.final["pruned_params"] == pruned and result.final["dense_params"] == count_parameters(dense)
        # a conv loses 80% of its input and output channels (~1 - 0.2² of its weights); the head
        # keeps its 1000 classes: the parameters drop by more than the channel sparsity
        assert pruned < (1 - 0.8) * count_parameters(dense)
        assert seen[-1]["sparsity_all_layers"] == pytest.approx(1 - pruned / count_parameters(dense))
        assert seen[-1]["sparsity"] == pytest.approx(0.8, abs=1 / 16)
    else:  # no cost record asked for: nothing built, counted or timed
        assert not {"params_m", "flops_g", "latency_ms", "dense_flops_g"} & set(result.final)
    if not channel and METHODS.get(method).prunes:  # realised sparsity is exactly the target (global top-k)
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == total - round(0.8 * total)
        assert seen[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    for key in ("wall_time_s", "grad_steps", "forward_passes", "backward_passes", "epoch"):
        values = [m[key] for m in seen]
        assert values == sorted(values) and values[-1] > 0, key
    assert seen[-1]["forward_passes"] >= seen[-1]["grad_steps"]
    if method.endswith("lth"):
        assert [m["round"] for m in seen] == [0, 1, 2]
    assert result.final["selected_epoch"] >= 1


def test_every_method_has_its_own_label_and_plot_order():
    labels = [METHODS.get(n).label for n in METHODS]
    orders = [METHODS.get(n).plot_order for n in METHODS]
    assert len(set(labels)) == len(labels) and len(set(orders)) == len(orders) and "base" not in labels
    assert METHODS.get("vpns_omp").label == "VPNs w. OMP"
    assert orders.index(min(orders)) == list(METHODS).index("vpns_structured")


def test_prompt_only_where_the_method_uses_it():
    for name in METHODS.names():
        cfg = tiny(method=name)
        vpns_like = name.startswith("vpns") or name == "dense"
        assert cfg.prompt_in_tune_stage == vpns_like, name
    assert tiny(method="vpns_lth").prompt_in_mask_stage  # the prompt trains in every LTH round
    assert tiny(method="vpns_omp").effective_vp_stages == "tune"  # no mask-finding training


# --- Random / OMP -------------------------------------------------------------------------


def big_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 50))


def random_masks(allocation, seed):
    net = MaskedNetwork(big_net(), 0.9, allocation=allocation)
    METHODS.get("random")().prune(fake_trial(net, seed))
    return net, net.current_masks()


@pytest.mark.parametrize("allocation", ["global", "layerwise"])
def test_random_is_reproducible_by_seed_and_uniform(allocation):
    net, a = random_masks(allocation, 7)
    _, b = random_masks(allocation, 7)
    _, c = random_masks(allocation, 8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert sum(int(m.sum()) for m in a.values()) == net.global_keep
    for name, mask in a.items():
        density = mask.float().mean().item()
        if allocation == "layerwise":
            assert density == pytest.approx(0.1, abs=1 / mask.numel())
        else:  # each layer keeps about 1 - s of its weights
            assert density == pytest.approx(0.1, abs=0.02)
        rows = mask.float().mean(1)  # no part of the layer favoured
        assert rows.max() < 0.3 and abs(rows[: len(rows) // 2].mean() - rows[len(rows) // 2:].mean()) < 0.03
    # a random mask ignores magnitudes: kept weights are not the largest ones
    w = big_net()[0].weight.detach().abs()  # the same pretrained weights
    assert w[a["0"]].min() < w[~a["0"]].max()


def test_omp_keeps_exactly_the_largest_pretrained_magnitudes():
    model = big_net()
    pretrained = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    net = MaskedNetwork(model, 0.9, allocation="global")
    METHODS.get("omp")().prune(fake_trial(net))
    masks = net.current_masks()
    kept = torch.cat([pretrained[n].abs()[masks[n]] for n in masks])
    pruned = torch.cat([pretrained[n].abs()[~masks[n]] for n in masks])
    assert len(kept) == net.global_keep
    assert kept.min() >= pruned.max()
    for name, m in net.layers:  # kept weights start at their pretrained values, pruned are zero
        assert torch.equal(m.weight.detach(), pretrained[name] * masks[name])


# --- LTH ------------------------------------------------------------------------------------


def test_lth_round_count_and_schedule():
    assert lth_rounds(0.9) == 11 and lth_rounds(0.99) == 21 and lth_rounds(0.5) == 4
    assert lth_rounds(1 - 0.8**3) == 3 and lth_rounds(0.2) == 1 and lth_rounds(0.0) == 0
    assert round_sparsity(2, 0.5) == pytest.approx(0.36) and round_sparsity(4, 0.5) == 0.5
    cfg = tiny(method="lth", sparsity=0.9, lth_epochs_per_round=2, tune_epochs=3)
    assert cfg.stage_plan[0] == ("round0", 2) and cfg.stage_plan[-1] == ("tune", 3)
    assert cfg.total_epochs == 11 * 2 + 3


def test_lth_prunes_20_percent_per_round_and_rewinds_to_pretrained(tmp_path):
    cfg = tiny(method="lth", sparsity=0.36, max_steps_per_epoch=2, tune_lr=0.1)
    trial = Trial(cfg, tmp_path)
    pretrained = {k: v.clone() for k, v in trial.model.state_dict().items()}
    snapshots = []
    run_stage = trial.loop.run_stage

    def recording(stage, *args, **kwargs):
        state = {k: v.clone() for k, v in trial.model.state_dict().items()}
        run_stage(stage, *args, **kwargs)
        snapshots.append((stage, state, {k: v.clone() for k, v in trial.model.state_dict().items()}))
    trial.loop.run_stage = recording
    seen = []
    trial.reporter = seen.append
    trial.run()
    assert [m["round"] for m in seen] == [0, 1, 2]
    for m in seen:  # round k trains the ticket of sparsity 1 - 0.8^k; the last is exactly s
        total = trial.net.total
        assert m["sparsity"] == pytest.approx(round_sparsity(m["round"], 0.36), abs=1 / total)
    names = [n for n, _ in trial.net.layers]
    previous = None
    for (stage, before, _), (_, _, trained_before) in zip(snapshots[1:], snapshots[:-1]):
        masks = {n: before[f"{n}.weight_mask"] for n in names}
        for key, value in before.items():  # rewound: every parameter and statistic is pretrained
            if key.endswith("weight_mask"):
                continue
            layer = key.removesuffix(".weight")
            expected = pretrained[key] * masks[layer] if layer in masks and layer != key else pretrained[key]
            assert torch.equal(value, expected), (stage, key)
        # the pruned weights are the smallest trained magnitudes among the survivors
        alive = {n: previous[n] if previous else torch.ones_like(masks[n]) for n in names}
        kept = torch.cat([trained_before[f"{n}.weight"].abs()[masks[n]] for n in names])
        dropped = torch.cat([trained_before[f"{n}.weight"].abs()[alive[n] & ~masks[n]] for n in names])
        assert all(torch.all(masks[n] <= alive[n]) for n in names)  # nested
        assert kept.min() >= dropped.max()
        previous = masks
    assert not torch.equal(snapshots[0][2]["conv1.weight"], pretrained["conv1.weight"])  # rounds train


# --- SNIP / GraSP / SynFlow hand computations -----------------------------------------------


def hand_gradients(w1, w2, x, y, temperature=1.0):
    """Cross-entropy gradients of Linear(3,4) -> ReLU -> Linear(4,2) without autograd."""
    a = x @ w1.T
    h = a.clamp_min(0)
    p = torch.softmax(h @ w2.T / temperature, 1)
    d2 = (p - F.one_hot(y, 2).to(p.dtype)) / (len(y) * temperature)
    d1 = (d2 @ w2) * (a > 0).to(p.dtype)
    return d1.T @ x, d2.T @ h


def test_snip_scores_equal_hand_computation():
    model = two_layer()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    weights = [model[0].weight, model[2].weight]
    scores = snip_scores(model, weights, [(x, y)])
    g1, g2 = hand_gradients(*(w.detach() for w in weights), x, y)
    assert torch.allclose(scores[0], (weights[0] * g1).abs().detach(), atol=1e-6)
    assert torch.allclose(scores[1], (weights[1] * g2).abs().detach(), atol=1e-6)


def test_grasp_scores_equal_hand_computation():
    model = two_layer(torch.float64)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    weights = [model[0].weight, model[2].weight]
    scores = grasp_scores(model, weights, [(x, y)], temperature=2.0)
    w1, w2 = (w.detach() for w in weights)
    g1, g2 = hand_gradients(w1, w2, x, y, 2.0)
    eps = 1e-6  # H g by central differences of the hand gradient along g
    p1, p2 = hand_gradients(w1 + eps * g1, w2 + eps * g2, x, y, 2.0)
    m1, m2 = hand_gradients(w1 - eps * g1, w2 - eps * g2, x, y, 2.0)
    hg1, hg2 = (p1 - m1) / (2 * eps), (p2 - m2) / (2 * eps)
    assert torch.allclose(scores[0], -w1 * hg1, atol=1e-7)
    assert torch.allclose(scores[1], -w2 * hg2, atol=1e-7)
    assert scores[1].abs().sum() > 1e-4


def test_synflow_scores_equal_hand_computation():
    model = two_layer()
    w1, w2 = model[0].weight.detach().abs(), model[2].weight.detach().abs()
    s1, s2 = synflow_scores(model, ["0", "2"], (3,))
    # R = 1ᵀ|W2||W1|1: dR/d|W1|_ij = sum_k |W2|_ki, dR/d|W2|_ki = sum_j |W1|_ij
    assert torch.allclose(s1.float(), w1 * w2.sum(0)[:, None], atol=1e-6)
    assert torch.allclose(s2.float(), w2 * w1.sum(1)[None, :], atol=1e-6)
    masks = [torch.ones_like(w1, dtype=torch.bool), torch.zeros_like(w2, dtype=torch.bool)]
    masks[1][0, 0] = True  # with masks, flow goes through the surviving weights only
    s1, _ = synflow_scores(model, ["0", "2"], (3,), masks)
    assert torch.count_nonzero(s1[1:]) == 0 and torch.allclose(s1[0].float(), w1[0] * w2[0, 0])


class NoData:
    def __getattr__(self, name):
        raise AssertionError(f"data accessed: {name}")


def test_synflow_needs_no_data(tmp_path):
    trial = Trial(tiny(method="synflow", synflow_iterations=3), tmp_path)
    trial.feed.data = NoData()
    METHODS.get("synflow")().prune(trial.context)
    assert trial.net.mode == "fixed" and trial.forward_passes == 3
    assert trial.net.sparsity_report()["sparsity"] == pytest.approx(0.8, abs=1 / trial.net.total)
    snip = Trial(tiny(method="snip"), tmp_path / "snip")
    snip.feed.data = NoData()
    with pytest.raises(AssertionError, match="data accessed"):  # SNIP, by contrast, needs data
        METHODS.get("snip")().prune(snip.context)


# --- BiP ------------------------------------------------------------------------------------


def test_bip_upper_level_gradient_matches_finite_differences():
    """On ℓ(z) = aᵀz (linear, so BiP's Hessian-free assumption is exact) with lower level
    θ*(m) = argmin_θ ℓ(m ⊙ θ) + γ/2‖θ‖², the implicit gradient equals dℓ(m ⊙ θ*(m))/dm."""
    f64 = torch.float64
    a = torch.tensor([[0.5, -1.0, 2.0, 0.3, -0.7, 1.5]], dtype=f64)
    gamma = 4.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1, bias=False, dtype=f64))
    net = MaskedNetwork(model, 0.5, allocation="global")
    net.attach_scores()
    scores = torch.tensor([[0.9, -0.8, 0.1, -0.7, 0.05, 0.02]], dtype=f64)  # two kept ones negative
    net.set_scores([scores])
    m = net.current_masks()["0"].to(f64)
    assert m.tolist() == [[1, 1, 0, 1, 0, 0]]

    def solve_lower(mask):  # gradient descent on the lower-level objective
        theta = torch.zeros(1, 6, dtype=f64, requires_grad=True)
        for _ in range(200):
            g = torch.autograd.grad((a * mask * theta).sum() + gamma / 2 * theta.pow(2).sum(), theta)[0]
            theta = (theta - 0.2 * g).detach().requires_grad_(True)
        return theta.detach()

    def upper(mask):
        return (a * mask * solve_lower(mask)).sum().item()

    theta_star = solve_lower(m)
    with torch.no_grad():
        model[0].weight_orig.copy_(theta_star)
    model[0].weight_orig.requires_grad_(True)
    loss = model(a).sum()  # ℓ(m ⊙ θ) = aᵀ(m ⊙ θ) at θ = θ*(m)
    (grad,), _ = upper_level_gradient(loss, net, implicit_lr=1 / gamma)
    grad = grad * scores.sign()  # w.r.t. the scores; the mask follows |s|
    eps = 1e-5
    fd = torch.tensor([[(upper(m + eps * e) - upper(m - eps * e)) / (2 * eps) for e in torch.eye(6, dtype=f64)]],
                      dtype=f64)
    assert torch.allclose(grad, fd, atol=1e-6), (grad, fd)
    assert grad.abs().sum() > 0.1
    # BiP's code multiplies by the mask gradient instead: not the total derivative
    g_m = a * theta_star
    assert not torch.allclose(g_m - (1 / gamma) * g_m * g_m, fd, atol=1e-3)


def test_bip_bilevel_stage_moves_weights_and_mask(tmp_path):
    trial = Trial(tiny(method="bip", tune_epochs=0, mask_lr=0.1), tmp_path)
    before = {n: m.weight.detach().clone() for n, m in trial.net.layers}
    initial_masks = {}
    run_stage = trial.loop.run_stage

    def recording(stage, *args, **kwargs):
        if stage == "mask":
            initial_masks.update(trial.net.current_masks())
        run_stage(stage, *args, **kwargs)
    trial.loop.run_stage = recording
    seen = []
    trial.reporter = seen.append
    trial.run()
    assert [m["stage"] for m in seen] == ["mask"]
    assert seen[0]["grad_steps"] == 8 and seen[0]["forward_passes"] == 8  # 4 iterations x 2
    for name, m in trial.net.layers:  # the lower level moved the kept weights
        assert not torch.equal(m.weight[m.weight_mask], before[name][m.weight_mask])
    assert any(not torch.equal(initial_masks[n], m.weight_mask) for n, m in trial.net.layers)  # upper level


# --- post-pruning prompts and transfer ----------------------------------------------------


@pytest.mark.parametrize("post", ["zero_shot", "fine_tune"])
def test_post_pruning_prompt(post, tmp_path):
    trial = Trial(tiny(method="omp", post_prompt=post, tune_lr=0.1), tmp_path)
    pretrained = {n: m.weight.detach().clone() for n, m in trial.net.layers}
    trial.run()
    assert torch.count_nonzero(trial.prompt.delta) > 0
    frozen = [torch.equal(m.weight.detach(), pretrained[n] * m.weight_mask) for n, m in trial.net.layers]
    assert all(frozen) if post == "zero_shot" else not any(frozen)


def test_post_prompt_validation():
    with pytest.raises(ConfigError, match="^post_prompt:"):
        tiny(method="vpns", post_prompt="zero_shot")
    with pytest.raises(ConfigError, match="^post_prompt:"):
        tiny(method="omp", post_prompt="zero_shot", prompt="none")
    with pytest.raises(ConfigError, match="^post_prompt:"):
        tiny(method="omp", post_prompt="later")
    assert tiny(method="hydra", post_prompt="fine_tune").prompt_in_tune_stage


def test_transfer_mask_across_datasets_for_every_kind_of_method(tmp_path):
    run_trial(tiny(method="omp"), tmp_path / "src")
    src = safe_load(tmp_path / "src" / "masks.pt")["masks"]
    for method in ("omp", "hydra", "vpns"):
        cfg = tiny(method=method, dataset="digits", mask_file=str(tmp_path / "src" / "masks.pt"),
                   max_steps_per_epoch=2)
        trial = Trial(cfg, tmp_path / method)
        seen = []
        trial.reporter = seen.append
        trial.run()
        assert [m["stage"] for m in seen] == ["tune"] and cfg.stage_plan == [("tune", 1)]
        dst = safe_load(tmp_path / method / "masks.pt")["masks"]
        assert all(torch.equal(src[k], dst[k]) for k in src)
        assert (torch.count_nonzero(trial.prompt.delta) > 0) == (method == "vpns")
    with pytest.raises(ConfigError, match="^mask_file:"):
        tiny(method="dense", mask_file=str(tmp_path / "src" / "masks.pt"))


@pytest.mark.parametrize("method,changes", [
    ("lth", dict(sparsity=0.36, lth_epochs_per_round=1)),  # cut after round 0, before its pruning
    ("snip", dict(tune_epochs=2, prune_batches=2)),       # cut inside fine-tuning, after scoring
    ("bip", dict(mask_epochs=2)),                          # cut inside the bi-level stage
])
def test_resume_equals_uninterrupted_run(method, changes, tmp_path):
    cfg = tiny(method=method, max_steps_per_epoch=2, **changes)
    full = []
    run_trial(cfg, tmp_path / "full", reporter=full.append)

    class Stop(Exception):
        pass

    part, rest = [], []

    def reporter(m):
        part.append(m)
        raise Stop
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path / "cut", reporter=reporter)
    run_trial(cfg, tmp_path / "cut", reporter=rest.append)
    assert len(part) + len(rest) == len(full) > 1
    for a, b in zip(part + rest, full):
        assert a.keys() == b.keys()  # the test set is evaluated at the same epochs
        for key in ("train_loss", "val_acc", "sparsity", "grad_steps", "forward_passes", "test_acc"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert any("test_acc" in m for m in full)
