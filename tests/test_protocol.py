"""The authors' protocol (``schedule="reference"``), label mapping on class-ordered data, and the
two prompt layouts: executable specifications on the tiny task."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from search_spaces.base import PAPER, layout
from vpns_core.config import Config
from vpns_core.data import TensorImages
from vpns_core.label_mapping import frequency_label_mapping
from vpns_core.prompts import build_prompt
from vpns_core.loop import Loop
from vpns_core.train import Trial

from conftest import tiny


class StepSpy:
    """Records every training step of a trial: whether it was prompted, its images and labels,
    the learning rate it ran at, and which groups received a gradient."""

    def __init__(self, trial: Trial, monkeypatch):
        self.steps = []
        self.inputs = []  # (training?, shape of the network's input)
        original = Loop.train_step
        scores0 = trial.net.layers[0][1]

        def step(this, opt, sched, x, y, prompted, scheduler_step=True):
            lr = opt.param_groups[0]["lr"]
            out = original(this, opt, sched, x, y, prompted, scheduler_step)
            score = getattr(scores0, "weight_scores", None)
            self.steps.append({"prompted": prompted, "x": x.detach().clone(), "y": y.tolist(),
                               "lr": lr,
                               "score_grad": score is not None and score.grad is not None,
                               "prompt_grad": this.assembly.prompt.delta.grad is not None})
            return out
        monkeypatch.setattr(Loop, "train_step", step)
        trial.model.register_forward_pre_hook(
            lambda module, args: self.inputs.append((module.training, tuple(args[0].shape))))


def test_reference_takes_a_prompted_then_a_plain_step_on_independent_batches(tmp_path, monkeypatch):
    trial = Trial(tiny(schedule="reference", mask_epochs=2, tune_epochs=1), tmp_path)
    spy = StepSpy(trial, monkeypatch)
    seen = []
    trial.reporter = seen.append
    trial.run()
    steps = spy.steps
    iterations = 4  # 128 images / 32 per batch
    assert len(steps) == 2 * iterations * 3  # 3 epochs, two steps per iteration
    assert [s["prompted"] for s in steps] == [True, False] * (iterations * 3)
    assert [m["grad_steps"] for m in seen] == [8, 16, 24]
    assert [m["prompted_steps"] for m in seen] == [4, 8, 12]

    # Prompted batches: the training split with the test-time transform, each image once per
    # epoch; plain batches: augmented (random crops of the 27 px stored images).
    plain_images = trial.data.train_eval.tensors()[0].float().div(255)
    def rows_of(x):
        return {bytes(r.numpy().tobytes()) for r in x}
    reference = rows_of(plain_images)
    epoch0 = steps[:2 * iterations]
    prompted_x = torch.cat([s["x"] for s in epoch0 if s["prompted"]])
    assert rows_of(prompted_x) == reference  # every training image, unaugmented, once
    plain_x = torch.cat([s["x"] for s in epoch0 if not s["prompted"]])
    assert len(rows_of(plain_x) & reference) < len(plain_x) // 2  # augmented
    # independent shuffles: the two batches of an iteration are not the same images in order
    pairs = [(steps[i]["y"], steps[i + 1]["y"]) for i in range(0, len(steps), 2)]
    assert sum(a != b for a, b in pairs) >= len(pairs) - 1
    assert [sorted(sum((a for a, _ in pairs[:iterations]), []))] == \
        [sorted(sum((b for _, b in pairs[:iterations]), []))]  # both cover the split

    # Stage 1: the scores learn from both steps, the prompt only from the prompted one.
    mask_steps = steps[:2 * iterations * 2]
    assert all(s["score_grad"] for s in mask_steps)
    assert [s["prompt_grad"] for s in mask_steps] == [True, False] * (iterations * 2)

    # The plain step and the unprompted evaluation see the bare 24 px image, the prompted
    # step the 32 px frame.
    train_shapes = {shape[-1] for training, shape in spy.inputs if training}
    assert train_shapes == {24, 32}
    assert {shape[-1] for training, shape in spy.inputs if not training} == {24, 32}

    # Cosine stepped per epoch: constant within an epoch, lr * (1 + cos(pi e / E)) / 2 across.
    mask_lrs = [s["lr"] for s in mask_steps]
    assert mask_lrs[:8] == [pytest.approx(0.05)] * 8
    assert mask_lrs[8:] == [pytest.approx(0.025)] * 8
    # evaluation headline without the prompt
    assert seen[-1]["val_acc"] == seen[-1]["val_acc_noprompt"]


def test_paper_schedule_takes_one_prompted_augmented_step_with_per_step_cosine(tmp_path, monkeypatch):
    trial = Trial(tiny(schedule="paper"), tmp_path)
    spy = StepSpy(trial, monkeypatch)
    trial.run()
    assert [s["prompted"] for s in spy.steps] == [True] * 8
    lrs = [s["lr"] for s in spy.steps[:4]]
    assert len(set(lrs)) == 4  # decays every step
    assert {shape[-1] for training, shape in spy.inputs if training} == {32}  # always framed


def test_hydra_under_reference_is_one_plain_step_on_the_bare_image(tmp_path, monkeypatch):
    trial = Trial(tiny(schedule="reference", method="hydra"), tmp_path)
    spy = StepSpy(trial, monkeypatch)
    result = trial.run()
    assert [s["prompted"] for s in spy.steps] == [False] * 8
    assert {shape[-1] for _, shape in spy.inputs} == {24}  # training, mapping, evaluation
    assert result.final["selected_test_acc_prompt"] == result.final["selected_test_acc_noprompt"]


class ColourClassifier(nn.Module):
    """A stand-in source model: images of target class k (constant grey level) are predicted as
    source class 3 + k, by the nearest of the prototypes it is given."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.register_buffer("prototypes", prototypes)

    def forward(self, x):
        means = x.mean(dim=(1, 2, 3))
        k = (means[:, None] - self.prototypes[None, :]).abs().argmin(1)
        return nn.functional.one_hot(k + 3, 1000).float()


def test_label_mapping_reads_every_class_of_a_class_ordered_split(tmp_path):
    trial = Trial(tiny(label_mapping_samples=40), tmp_path)
    per_class = 12
    labels = np.repeat(np.arange(10), per_class)  # stored class by class, as Tiny-ImageNet
    images = torch.from_numpy((20 * (labels + 1)).astype(np.uint8))[:, None, None, None].expand(-1, 3, 24, 24)
    trial.feed.data = dataclasses.replace(trial.data, train_eval=TensorImages(images.contiguous(), labels))
    with torch.no_grad():
        prototypes = torch.stack([trial.prompt(images[i * per_class:i * per_class + 1].float() / 255,
                                               enabled=False).mean() for i in range(10)])
    trial.assembly.model = ColourClassifier(prototypes)
    chosen = trial.feed.label_mapping_indices()
    assert len(chosen) == 40 and set(labels[chosen]) == set(range(10))  # stratified, all classes
    assert np.array_equal(chosen, trial.feed.label_mapping_indices())  # the same sample on resume
    mapping = trial.evaluation.compute_label_mapping(prompted=False)
    assert mapping.tolist() == [3 + k for k in range(10)]
    # the old rule, the first 40 images, sees classes 0-3 only and maps the rest wrongly
    first = torch.arange(40)
    old = frequency_label_mapping(torch.from_numpy(labels[first.numpy()] + 3), torch.from_numpy(labels[:40]),
                                  1000, 10)
    assert old.tolist() != [3 + k for k in range(10)]
    # the whole split (the authors' choice, the paper preset's)
    trial.feed.cfg = trial.cfg.replace(label_mapping_samples=None)
    assert len(trial.feed.label_mapping_indices()) == len(labels)
    assert trial.evaluation.compute_label_mapping(prompted=False).tolist() == [3 + k for k in range(10)]
    assert PAPER["label_mapping_samples"] is None


@pytest.mark.parametrize("kind,sizes,expected", [
    ("over_image", dict(output_size=224, pad_size=16), "over_image"),
    ("around_image", dict(output_size=64, pad_size=16, input_size=32), "around_image"),
])
def test_both_layouts_are_named_and_derived(kind, sizes, expected):
    cfg = Config(**{**layout(kind, **sizes), "prompt": "pad"})
    assert cfg.layout == expected
    if kind == "over_image":
        assert cfg.prompt_input_fraction == pytest.approx(1 - 192**2 / 224**2)  # 26.5%
        assert cfg.prompt_image_fraction == pytest.approx(cfg.prompt_input_fraction)
    else:
        assert cfg.prompt_input_fraction == pytest.approx(1 - 32**2 / 64**2)
        assert cfg.prompt_image_fraction == 0.0


def test_layout_errors_and_partial_overlap():
    with pytest.raises(ValueError, match="exceeds the 16 px border"):
        layout("around_image", output_size=64, pad_size=24, input_size=32)
    with pytest.raises(ValueError, match="input_size must equal"):
        layout("over_image", output_size=64, pad_size=8, input_size=32)
    with pytest.raises(ValueError, match="choose from over_image, around_image"):
        layout("inside", output_size=64, pad_size=8)
    cfg = Config(input_size=32, output_size=64, pad_size=24)
    assert cfg.layout == "partly_over_image"
    assert cfg.prompt_image_fraction == pytest.approx(1 - 16**2 / 32**2)
    assert PAPER["input_size"] == PAPER["output_size"] == 224  # the authors' layout


def test_prompt_plain_pass_without_the_frame():
    x = torch.rand(2, 3, 24, 24)
    framed = build_prompt("pad", input_size=24, output_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                          pad_size=4)
    bare = build_prompt("pad", input_size=24, output_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                        pad_size=4, plain_frame=False)
    assert framed(x, enabled=False).shape == (2, 3, 32, 32)
    assert bare(x, enabled=False).shape == (2, 3, 24, 24)
    assert torch.equal(bare(x, enabled=False), (x - 0.5) / 0.5)
    assert torch.equal(bare(x), framed(x))  # the prompted pass is the same
    assert framed.is_identity() and not bare.is_identity()  # frames differ: two passes
    same = build_prompt("pad", input_size=32, output_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                        pad_size=4, plain_frame=False)
    assert same.is_identity()  # input = output: nothing to drop


@pytest.mark.parametrize("model", ["tiny_resnet", pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])  # Lite0 has dropout
def test_a_frozen_prompt_is_hydra_exactly(model, tmp_path):
    """VPNs whose prompt is frozen at zero (``learn_prompt=False``) is the same computation as
    HYDRA under the paper schedule: any difference would be a bug in the prompted path (it was
    one: VPNs' extra evaluation pass drew from the global RNG, so its dropout masks differed)."""
    cfg = tiny(mask_epochs=2, tune_epochs=2, model=model)
    hydra = Trial(cfg.replace(method="hydra"), tmp_path / "h")
    a = hydra.run()  # a trial's randomness starts at its construction (seeded there)
    frozen = Trial(cfg.replace(method="vpns", learn_prompt=False), tmp_path / "v")
    b = frozen.run()
    assert float(frozen.prompt.delta.detach().abs().max()) == 0.0  # never moved
    assert frozen.prompt.delta.grad is None  # and never had a gradient to move by
    for key in ("train_loss", "val_acc_noprompt", "sparsity", "grad_steps"):
        assert [h[key] for h in a.history] == [h[key] for h in b.history], key
    assert [h["prompt_lr"] for h in b.history] == [0.0] * 4
    assert b.final["selected_test_acc_prompt"] == a.final["selected_test_acc"]
    for (name, layer), (_, other) in zip(hydra.net.layers, frozen.net.layers):
        assert torch.equal(layer.weight, other.weight), name
        assert torch.equal(layer.weight_mask, other.weight_mask), name


def test_channels_last_is_chosen_for_depthwise_models_and_changes_no_value(tmp_path):
    from vpns_core.models import build_model, prefers_channels_last
    cpu = torch.device("cpu")
    assert prefers_channels_last(build_model("efficientnet_lite0", pretrained=False).module, cpu)
    assert not prefers_channels_last(build_model("tiny_resnet", pretrained=False).module, cpu)
    assert prefers_channels_last(build_model("tiny_resnet", pretrained=False).module, torch.device("cuda"))
    nchw = Trial(tiny(), tmp_path / "a")
    nhwc = Trial(tiny(channels_last=True), tmp_path / "b")
    assert not nchw.prompt.channels_last and nhwc.prompt.channels_last
    x = torch.rand(4, 3, 24, 24)
    out = nhwc.prompt(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, nchw.prompt(x))
    nchw.model.eval(), nhwc.model.eval()
    with torch.no_grad():
        assert torch.allclose(nhwc.assembly.forward(x, True), nchw.assembly.forward(x, True), atol=1e-5)


def test_evaluation_leaves_the_global_rng_alone(tmp_path):
    trial = Trial(tiny(prompt="random"), tmp_path)  # a random prompt draws its location too
    before = torch.get_rng_state()
    trial.evaluation.compute_label_mapping(prompted=True)
    for prompted in (True, False):
        trial.evaluation.evaluate(trial.data.val, prompted=prompted)
    assert torch.equal(before, torch.get_rng_state())
