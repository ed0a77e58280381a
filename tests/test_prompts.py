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
