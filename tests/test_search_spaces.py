"""Search spaces are data: every module gives valid configs for every preset (no Ray needed)."""
import importlib
import pkgutil

import pytest

import search_spaces
from search_spaces import method
from search_spaces.points import check_points, driver_config, is_domain, longest_first, point_configs, resolve
from sweeps.flags import parse_overrides
from vpns_core.config import Config
from vpns_core.errors import ConfigError
from vpns_core.methods import METHODS

MODULES = sorted(info.name for info in pkgutil.iter_modules(search_spaces.__path__)
                 if hasattr(importlib.import_module(f"search_spaces.{info.name}"), "space"))


@pytest.mark.parametrize("preset", search_spaces.PRESETS)
@pytest.mark.parametrize("name", MODULES)
def test_every_space_gives_valid_configs(name, preset):
    module = importlib.import_module(f"search_spaces.{name}")
    base, axes = module.base(preset), module.space(preset)
    if hasattr(axes, "corners"):  # a define-by-run space (search_spaces/pareto.py): its corners
        assert axes.corners()
        for corner in axes.corners():
            driver_config({**base, **corner})
        return
    assert axes, "a space needs at least one axis"
    for key, values in axes.items():
        assert isinstance(values, (list, dict)) or is_domain(values), key
    check_points(base, axes)  # raises ConfigError naming the field
    assert base == module.base(preset)  # a fresh copy every call


def test_methods_axis_follows_the_registry():
    every = set(method.pruning_methods()) | set(method.reference_methods()) | set(method.channel_methods())
    assert every == set(METHODS.names())
    assert "dense" in method.reference_methods() and "vpns" in method.pruning_methods()
    assert set(method.channel_methods()) == {"vpns_structured", "slim", "depgraph"}
    assert not set(method.channel_methods()) & set(method.pruning_methods())
    from search_spaces import structured
    points = structured.space("default")["channel_method"]
    assert set(points) == set(method.channel_methods())
    assert all(p["method"] == name for name, p in points.items())


def test_named_points_resolve_to_config_fields():
    from search_spaces import pad_size
    axes = pad_size.space("default")
    assert axes["pad"]["none"] == {"prompt": "none", "pad_size": 0, "matched_updates": True}
    assert axes["pad"]["frozen"] == {"pad_size": 8, "learn_prompt": False}
    configs = point_configs(pad_size.base("default"), axes, {"pad": axes["pad"]})
    assert [c["pad_size"] for c in configs] == [4, 8, 8, 0]
    assert resolve({"pad": 8, "seed": 7}, {"pad": axes["pad"]}) == {"pad_size": 8, "seed": 7}
    assert Config.from_dict(configs[-1]).prompt == "none"
    assert Config.from_dict(configs[2]).learn_prompt is False


def test_the_grid_runs_its_longest_trials_first():
    from search_spaces import sparsity
    base, axes = sparsity.base("default"), {**method.space("default"), **sparsity.space("default")}
    order = longest_first(base, axes, {})
    epochs = {m: driver_config({**base, "method": m, "sparsity": 0.9}).total_epochs for m in axes["method"]}
    assert [epochs[m] for m in order["method"]] == sorted(epochs.values(), reverse=True)
    assert order["method"][:2] == ["lth", "vpns_lth"] and epochs["lth"] > epochs["vpns"]
    assert order["sparsity"] == [0.9, 0.7, 0.5]  # LTH needs more rounds to reach 90%
    assert sorted(order["method"]) == sorted(axes["method"])
    even = {"seed": [7, 9, 17], "method": ["vpns", "hydra"]}  # equal costs: the space's order
    assert longest_first(base, even, {}) == even


def test_overrides_parse_python_literals():
    assert parse_overrides(["train_subset=500", "data_root=none", "prompt=fix", "sparsity=0.5"]) == {
        "train_subset": 500, "data_root": None, "prompt": "fix", "sparsity": 0.5}
    with pytest.raises(ValueError, match="not_a_field"):
        parse_overrides(["not_a_field=1"])


def test_a_cpu_driver_accepts_gpu_trials():
    """The head node validates every point, but CUDA is checked where the trial runs."""
    assert driver_config({**search_spaces.base.base("tiny"), "device": "cuda"}).total_epochs == 2


# the Pareto search chooses the method itself: --set method is refused (test_pareto.py); the
# confirmation's arms are a pre-registered plan about VPNs (its 99% arms are beyond channel methods)
@pytest.mark.parametrize("name", [m for m in MODULES if m not in ("pareto", "confirmation")])
def test_every_method_is_reachable_by_name_from_every_space(name):
    """``--set method=NAME`` fixes the method axis of any sweep: each registered method gives
    valid configs on every search space's base and grid (channel methods at their limit 0.9)."""
    module = importlib.import_module(f"search_spaces.{name}")
    for preset in ("default", "tiny"):
        base, axes = module.base(preset), module.space(preset)
        for m in METHODS.names():
            overrides = parse_overrides([f"method={m}"])
            fixed = {**base, **overrides}
            if METHODS.get(m).structured:
                fixed["sparsity"] = min(fixed.get("sparsity", 0.5), 0.9)
            free = {k: v for k, v in axes.items() if k not in overrides and k != "channel_method"}
            free = {k: ([min(x, 0.9) for x in v] if k == "sparsity" and METHODS.get(m).structured else v)
                    for k, v in free.items()}
            if name == "transfer" and METHODS.get(m).structured:
                continue  # transfer fine-tunes weight masks: channel methods refuse mask files
            if name == "pad_size" and not METHODS.get(m).uses_prompt:
                # their frozen-pad control needs a prompt to freeze: refused in one line
                with pytest.raises(ConfigError, match="learn_prompt: False freezes a prompt"):
                    check_points(fixed, free)
                continue
            check_points(fixed, free)
            assert driver_config({**fixed, **{k: (v[0] if isinstance(v, list) else v)
                                              for k, v in free.items() if isinstance(v, list)}}).method == m
