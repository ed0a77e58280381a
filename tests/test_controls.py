"""The controls of the prompt's figures take the pads' exact updates (issue 26): a prompt frozen at
zero (``learn_prompt=False``) runs the pads' loop unchanged, and ``matched_updates`` gives a stage
without the prompt as many updates as a prompted stage under the reference schedule."""
import pytest
import torch

from search_spaces import confirmation, pad_size, prompt_type, vp_stage
from search_spaces.points import named_points, point_configs
from vpns_core.config import Config, ConfigError
from vpns_core.train import Trial

from conftest import tiny


def _steps(cfg: Config, tmp_path) -> tuple[list[int], list[int], Trial]:
    seen = []
    trial = Trial(cfg, tmp_path, reporter=seen.append)
    trial.run()
    return [m["grad_steps"] for m in seen], [m["prompted_steps"] for m in seen], trial


def test_a_frozen_pad_takes_the_learned_pads_steps_and_stays_zero(tmp_path):
    cfg = tiny(schedule="reference", input_size=32)  # the authors' layout: the pad over the image
    learned, learned_prompted, a = _steps(cfg, tmp_path / "learned")
    frozen, frozen_prompted, b = _steps(cfg.replace(learn_prompt=False), tmp_path / "frozen")
    assert learned == frozen == [8, 16]  # 4 iterations x 2 steps per epoch
    assert learned_prompted == frozen_prompted == [4, 8]
    assert float(a.prompt.delta.detach().abs().max()) > 0  # the learned pad moved
    assert float(b.prompt.delta.detach().abs().max()) == 0.0  # the frozen one did not
    assert any(not torch.equal(x.weight, y.weight) for (_, x), (_, y) in zip(a.net.layers, b.net.layers))


def test_matched_updates_doubles_only_the_stages_without_the_prompt():
    ref = dict(schedule="reference", mask_epochs=2, tune_epochs=3)
    assert tiny(**ref, method="hydra", matched_updates=True).stage_plan == [("mask", 4), ("tune", 6)]
    assert tiny(**ref, method="hydra").stage_plan == [("mask", 2), ("tune", 3)]
    assert tiny(**ref, vp_stages="mask", matched_updates=True).stage_plan == [("mask", 2), ("tune", 6)]
    assert tiny(**ref, vp_stages="tune", matched_updates=True).stage_plan == [("mask", 4), ("tune", 3)]
    assert tiny(**ref, matched_updates=True).stage_plan == [("mask", 2), ("tune", 3)]  # prompted: as is
    # the paper schedule takes one step per iteration in every arm: nothing to match
    assert tiny(method="hydra", matched_updates=True).stage_plan == [("mask", 1), ("tune", 1)]


def test_hydra_with_matched_updates_takes_the_pads_grad_steps(tmp_path):
    cfg = tiny(schedule="reference")
    pad, _, _ = _steps(cfg, tmp_path / "pad")
    none, prompted, _ = _steps(cfg.replace(method="hydra", matched_updates=True), tmp_path / "none")
    assert pad[-1] == none[-1] == 16
    assert prompted[-1] == 0


def test_frozen_prompt_needs_a_prompt():
    with pytest.raises(ConfigError, match="learn_prompt"):
        tiny(method="hydra", learn_prompt=False)
    with pytest.raises(ConfigError, match="learn_prompt"):
        tiny(prompt="none", pad_size=0, learn_prompt=False)


@pytest.mark.parametrize("schedule", ["paper", "reference"])
@pytest.mark.parametrize("module", [pad_size, vp_stage, prompt_type, confirmation])
def test_every_arm_of_a_prompt_figure_takes_the_same_updates(module, schedule):
    """Per point: the updates a trial of that arm takes (epochs x steps per iteration), from
    the Config alone: equal across the arms of the pad sweep, the VP-stage sweep and each
    sparsity of the confirmation, under both schedules."""
    fixed = {**module.base("tiny"), "schedule": schedule}
    space = {k: v for k, v in module.space("tiny").items() if k in ("pad", "vp_stages", "prompt", "arm")}
    updates = {}
    for values in point_configs(fixed, space, named_points(space)):
        cfg = Config.from_dict(values)
        per_iteration = {s: 2 if schedule == "reference" and prompted else 1
                         for s, prompted in (("mask", cfg.prompt_in_mask_stage),
                                             ("tune", cfg.prompt_in_tune_stage))}
        updates.setdefault(cfg.sparsity, set()).add(
            tuple(e * per_iteration[s] for s, e in cfg.stage_plan))
    assert all(len(u) == 1 for u in updates.values()), updates


@pytest.mark.parametrize("arms, message", [(["pad9"], "--arms pad9: unknown arm; choose from pad8, "),
                                           (["pad8", "pad8"], "--arms: pad8, pad8 names an arm twice")])
def test_the_confirmation_refuses_unknown_or_repeated_arms_before_ray(arms, message, tmp_path, capsys):
    from sweeps import confirm_prompt
    rc = confirm_prompt.main(["--preset", "tiny", "--storage-path", str(tmp_path / "s"),
                              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--arms", *arms])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
