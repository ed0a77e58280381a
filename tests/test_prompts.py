import pytest
import torch

from vpns_core.config import Config, ConfigError
from vpns_core.prompts import PROMPTS, build_prompt, equal_param_prompt_size

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make(kind, inp=24, out=32, pad=4, size=None):
    return build_prompt(kind, input_size=inp, output_size=out, mean=MEAN, std=STD,
                        pad_size=pad, prompt_size=size)


@pytest.mark.parametrize("kind", PROMPTS.names())
def test_every_prompt_shapes_and_zero_init(kind):
    p = make(kind)
    x = torch.rand(5, 3, 24, 24)
    y = p(x)
    assert y.shape == (5, 3, 32, 32)
    for d in p.parameters():
        assert torch.count_nonzero(d) == 0  # zero init
    if kind in ("none", "pad"):  # pad's zero delta adds nothing; fix/random add sigmoid(0)=0.5
        assert torch.allclose(y, p(x, enabled=False))


@pytest.mark.parametrize("out,pad", [(32, 4), (224, 16), (224, 112), (64, 1)])
def test_pad_prompt_tunable_count(out, pad):
    p = make("pad", inp=min(out, 24), out=out, pad=pad)
    assert p.tunable_count == 3 * (out**2 - (out - 2 * pad) ** 2)
    x = torch.rand(2, 3, min(out, 24), min(out, 24))
    p(x).sum().backward()
    assert int((p.delta.grad != 0).sum()) <= p.tunable_count
    assert int((p.delta.grad.abs().sum(dim=(0, 1)) > 0).sum()) * 3 == p.tunable_count


def test_pad_geometry_image_centred_and_normalised():
    p = make("pad", inp=24, out=32, pad=2)
    x = torch.rand(1, 3, 24, 24)
    y = p(x, enabled=False) * 0.25 + 0.5  # undo normalisation
    assert torch.allclose(y[..., 4:28, 4:28], x, atol=1e-6)
    assert torch.all(y[..., :4, :] == 0) and torch.all(y[..., :, 28:] == 0)
    with torch.no_grad():
        p.delta.fill_(0.7)
    y = p(x) * 0.25 + 0.5
    assert torch.allclose(y[..., :2, :], torch.full_like(y[..., :2, :], 0.7), atol=1e-6)
    assert torch.allclose(y[..., 4:28, 4:28], x, atol=1e-6)  # centre untouched
    with torch.no_grad():
        p.delta.fill_(5.0)
    assert (p(x) * 0.25 + 0.5).max() <= 1.0 + 1e-6  # clamped to [0, 1] before normalising


def test_fix_prompt_top_left_sigmoid():
    p = make("fix", size=5)
    assert p.tunable_count == 3 * 25
    x = torch.zeros(1, 3, 24, 24)
    y = p(x) * 0.25 + 0.5
    assert torch.allclose(y[..., :5, :5], torch.full((1, 3, 5, 5), 0.5))
    assert torch.all(y[..., 5:, :] == 0) and torch.all(y[..., :, 5:] == 0)


def test_random_prompt_moves_and_keeps_size():
    torch.manual_seed(0)
    p = make("random", size=6)
    x = torch.zeros(1, 3, 24, 24)
    corners = set()
    for _ in range(20):
        y = (p(x) * 0.25 + 0.5)[0, 0]
        nz = torch.nonzero(y)
        assert len(nz) == 36  # exactly one 6x6 square
        corners.add(tuple(nz.min(0).values.tolist()))
    assert len(corners) > 5


def test_equal_param_size_matches_reference():
    assert equal_param_prompt_size(224, 16) == 115
    cfg = Config(prompt="fix", output_size=64, pad_size=8)
    p = make("fix", inp=48, out=64, size=cfg.resolved_prompt_size)
    pad = make("pad", inp=48, out=64, pad=8)
    assert abs(p.tunable_count - pad.tunable_count) / pad.tunable_count < 0.05


@pytest.mark.parametrize("changes,field", [
    ({"pad_size": 40, "output_size": 64}, "pad_size"),
    ({"input_size": 72, "output_size": 64}, "input_size"),
    ({"input_size": 0}, "input_size"),
    ({"output_size": -3}, "output_size"),
    ({"prompt": "fix", "prompt_size": 65, "output_size": 64}, "prompt_size"),
    ({"prompt": "padd"}, "prompt"),
])
def test_invalid_geometry_rejected_naming_field(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        Config(**changes)


def test_image_is_in_unit_range():
    p = make("pad")
    with torch.no_grad():
        p.delta.normal_()
    img = p.image()
    assert img.shape == (3, 32, 32) and img.min() >= 0 and img.max() <= 1


class _SamePaddedConv(torch.nn.Conv2d):
    """A conv subclass with its own forward (TensorFlow-style asymmetric padding, as Lite0's stem)."""

    def forward(self, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias,
                                          self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("kind", ["pad", "fix", "random"])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 3), (2, "same_tf")])
def test_batch_summed_input_gradient_is_exact(kind, stride, padding):
    """The first conv hands the prompt sum_b conv^T(g_b) as conv^T(sum_b g_b): same gradients."""
    from torch import nn

    def model():
        torch.manual_seed(0)
        first = (_SamePaddedConv(3, 8, 3, stride=stride) if padding == "same_tf" else
                 nn.Conv2d(3, 8, 7 if padding == 3 else 3, stride=stride, padding=padding, bias=True))
        return nn.Sequential(first,
                             nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())

    x = torch.rand(6, 3, 24, 24)
    grads = []
    for share in (False, True):
        net, prompt = model(), make(kind)
        with torch.no_grad():
            for d in prompt.parameters():
                d.normal_(generator=torch.Generator().manual_seed(1))
        assert prompt.share_input_gradient(net[0]) if share else True
        torch.manual_seed(2)  # the random prompt's location
        net(prompt(x)).square().sum().backward()
        grads.append([p.grad for p in [*prompt.parameters(), *net.parameters()]])
        if share:  # engaged on the prompt's output; an unprompted pass or evaluation: plain path
            torch.manual_seed(2)
            assert "BatchSummed" in type(net[0](prompt(x)).grad_fn).__name__
            assert "BatchSummed" not in type(net[0](prompt(x, enabled=False)).grad_fn).__name__
            with torch.no_grad():
                net(prompt(x))
            assert "_vpns_shared_input" not in net[0].__dict__
    for plain, shared in zip(*grads):
        assert torch.allclose(plain, shared, rtol=1e-4, atol=1e-6)


def test_input_gradient_sharing_ignores_other_inputs():
    from torch import nn
    conv = nn.Conv2d(3, 4, 3)
    assert make("pad").share_input_gradient(conv)
    assert not make("pad").share_input_gradient(nn.Linear(3, 3))
    x = torch.rand(2, 3, 8, 8, requires_grad=True)  # not the prompt's output: per-image gradient
    conv(x).square().sum().backward()
    expected = torch.autograd.grad(nn.functional.conv2d(x, conv.weight, conv.bias).square().sum(), x)[0]
    assert torch.allclose(x.grad, expected)


@pytest.mark.parametrize("kind", PROMPTS.names())
def test_is_identity_exactly_when_the_prompt_changes_nothing(kind):
    p = make(kind)
    x = torch.rand(4, 3, 24, 24)
    torch.manual_seed(0)
    prompted = p(x)
    assert p.is_identity() == torch.equal(prompted, p(x, enabled=False))
    assert p.is_identity() == (kind in ("none", "pad"))  # zero init; fix/random add sigmoid(0)
    with torch.no_grad():
        for d in p.parameters():
            d[..., 0, 0] = 0.3  # a corner pixel: inside every prompt's tunable region
    assert p.is_identity() == (kind == "none")
    assert p.is_identity() == torch.equal(p(x), p(x, enabled=False))
