"""End-to-end trials on real Fashion-MNIST with the tiny ResNet (32 px, a few hundred images)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from vpns_core.checkpoint import CheckpointError, safe_load
from vpns_core.config import Config
from vpns_core.methods import METHODS
from vpns_core.models import build_model
from vpns_core.evaluation import Evaluation
from vpns_core.train import CHECKPOINT, NonFiniteLossError, Trial, run_trial

from conftest import TINY, tiny


def test_a_tiny_trial_imports_neither_torchvision_nor_torch_pruning(tmp_path):
    """A Ray trial process pays for every import: torchvision (half a second of CPU) is only
    for torchvision models and the paper's file datasets, torch-pruning only for the channel
    methods. A fresh process imports everything a trial of a weight method can reach (the
    methods, the channel pruning module, the Tune trainable) and runs a tiny VPNs trial."""
    code = ("import sys; import vpns_core.methods, vpns_core.channel_pruning, sweeps.trainable\n"
            "from vpns_core.config import Config; from vpns_core.train import run_trial\n"
            f"run_trial(Config(**{dict(TINY, method='vpns')!r}), {str(tmp_path)!r})\n"
            "print(sorted(m for m in ('torchvision', 'torch_pruning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "layer_stats.json").is_file()  # the trial ran to its end


def test_hydra_means_no_prompt_and_prompt_is_trained_in_vpns(tmp_path):
    hydra = Trial(tiny(method="hydra"), tmp_path / "h")
    assert hydra.cfg.effective_vp_stages == "none"
    hydra.run()
    assert torch.count_nonzero(hydra.prompt.delta) == 0
    vpns = Trial(tiny(method="vpns"), tmp_path / "v")
    vpns.run()
    delta = vpns.prompt.delta.detach()
    assert torch.count_nonzero(delta) > 0
    assert torch.count_nonzero(delta * (1 - vpns.prompt.mask)) == 0  # centre never tuned


@pytest.mark.parametrize("method,passes", [("hydra", 1), ("vpns", 2)])
def test_an_identity_prompt_is_evaluated_once(method, passes, tmp_path, monkeypatch):
    calls = []
    evaluate = Evaluation.evaluate

    def counting(self, dataset, prompted):
        calls.append(prompted)
        return evaluate(self, dataset, prompted)
    monkeypatch.setattr(Evaluation, "evaluate", counting)
    seen = []
    run_trial(tiny(method=method, test_every_epoch=True), tmp_path, reporter=seen.append)
    assert len(calls) == 2 * passes * len(seen)  # test and validation splits, every epoch
    if passes == 1:  # HYDRA's prompt stays at zero: both columns are the one unprompted pass
        assert all(m["test_acc_prompt"] == m["test_acc_noprompt"] for m in seen)
        assert set(calls) == {False}  # a method without a prompt only ever runs plain passes


@pytest.mark.parametrize("model", ["tiny_resnet", pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])  # Lite0 has dropout
def test_test_set_only_where_read_gives_the_same_selected_results(model, tmp_path, monkeypatch):
    """Skipping the test passes nobody reads changes no number that is read, and saves passes."""
    calls = {}
    evaluate = Evaluation.evaluate

    def counting(self, dataset, prompted):
        split = "test" if dataset is self.feed.data.test else "val"
        calls[self.cfg.test_every_epoch, split] = calls.get((self.cfg.test_every_epoch, split), 0) + 1
        return evaluate(self, dataset, prompted)
    monkeypatch.setattr(Evaluation, "evaluate", counting)
    cfg = tiny(mask_epochs=3, tune_epochs=3, model=model)
    lean = run_trial(cfg, tmp_path / "lean")
    full = run_trial(cfg.replace(test_every_epoch=True), tmp_path / "full")
    for key in ("selected_epoch", "selected_val_acc", "selected_test_acc", "selected_test_acc_prompt",
                "selected_test_acc_noprompt", "mask_stage_test_acc_prompt", "mask_stage_test_acc_noprompt"):
        assert lean.final[key] == full.final[key], key
    assert [h["val_acc"] for h in lean.history] == [h["val_acc"] for h in full.history]
    assert calls[True, "val"] == calls[False, "val"] == 2 * 6  # both passes, every epoch
    assert calls[True, "test"] == 2 * 6
    tested = [h["epoch"] for h in lean.history if "test_acc" in h]
    assert calls[False, "test"] == 2 * len(tested) and 3 in tested and len(tested) < 6


def test_pruned_weights_zero_after_tuning_and_export_loads_plainly(tmp_path):
    trial = Trial(tiny(sparsity=0.9, tune_epochs=2), tmp_path)
    trial.run()
    masks = safe_load(tmp_path / "masks.pt")["masks"]
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept - round(0.1 * total)) <= 1
    for name, module in trial.net.layers:
        assert torch.all(module.weight[~masks[name]] == 0)
    export = safe_load(tmp_path / "model_export.pt")
    plain = build_model("tiny_resnet", pretrained=False).module
    plain.load_state_dict(export["state_dict"])  # a plain model, no vpns hooks
    for name, module in plain.named_modules():
        if name in masks:
            assert torch.all(module.weight[~masks[name]] == 0)
    stats = json.loads((tmp_path / "layer_stats.json").read_text())
    assert {s["name"] for s in stats if s["pruned"]} == set(masks)
    assert sum(s["kept"] for s in stats if s["pruned"]) == kept


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = tiny(mask_epochs=2, tune_epochs=2, prompt="random", pad_size=6)
    full = []
    run_trial(cfg, tmp_path / "full", reporter=full.append)

    class Stop(Exception):
        pass

    for stop_after in (1, 2, 3):  # inside stage 1, at the stage boundary, inside stage 2
        part = []

        def reporter(m, part=part, stop_after=stop_after):
            part.append(m)
            if len(part) == stop_after:
                raise Stop
        work = tmp_path / f"cut{stop_after}"
        with pytest.raises(Stop):
            run_trial(cfg, work, reporter=reporter)
        rest = []
        run_trial(cfg, work, reporter=rest.append)
        assert len(part) + len(rest) == len(full)
        for a, b in zip(part + rest, full):
            for key in ("train_loss", "val_acc_prompt", "val_acc_noprompt", "test_acc_prompt",
                        "test_acc_noprompt", "sparsity"):
                assert (key in a) == (key in b), (stop_after, key)
                if key in a:
                    assert a[key] == pytest.approx(b[key], abs=1e-6), (stop_after, key)


def test_corrupt_checkpoint_and_config_mismatch_are_refused(tmp_path):
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        Trial(tiny(), tmp_path)
    other = tmp_path / "o"
    run_trial(tiny(), other)
    with pytest.raises(CheckpointError, match="different config"):
        Trial(tiny(sparsity=0.5), other)


def test_nan_loss_stops_trial(tmp_path):
    with pytest.raises(NonFiniteLossError):
        run_trial(tiny(tune_lr=1e30, method="dense", momentum=0.0), tmp_path)


@pytest.mark.parametrize("schedule,stages", [("reference", "both"), ("paper", "mask"), ("paper", "tune")])
def test_schedules_and_vp_stage_switches(schedule, stages, tmp_path):
    seen = []
    trial = Trial(tiny(schedule=schedule, vp_stages=stages), tmp_path)
    trial.reporter = seen.append
    trial.run()
    steps_per_epoch = 4 * (2 if schedule == "reference" else 1)
    mask_steps = steps_per_epoch if stages in ("both", "mask") else 4
    assert seen[0]["grad_steps"] == mask_steps
    if stages == "mask":  # prompt learned in stage 1, dropped for tuning
        assert torch.count_nonzero(trial.prompt.delta) == 0
        assert seen[-1]["test_acc_prompt"] == seen[-1]["test_acc_noprompt"]
    if stages == "tune":
        assert seen[0]["prompt_lr"] == 0.0 and seen[1]["prompt_lr"] > 0


def test_transfer_from_mask_file(tmp_path):
    run_trial(tiny(), tmp_path / "src")
    seen = []
    cfg = tiny(dataset="digits", mask_file=str(tmp_path / "src" / "masks.pt"), train_subset=None,
               test_subset=None)
    run_trial(cfg, tmp_path / "dst", reporter=seen.append)
    assert [m["stage"] for m in seen] == ["tune"]
    src = safe_load(tmp_path / "src" / "masks.pt")["masks"]
    dst = safe_load(tmp_path / "dst" / "masks.pt")["masks"]
    assert all(torch.equal(src[k], dst[k]) for k in src)


def test_linear_head_and_layerwise_allocation(tmp_path):
    trial = Trial(tiny(head="linear", allocation="layerwise", prune_first=False), tmp_path)
    trial.run()
    assert trial.new_head.out_features == 10
    stats = trial.net.layer_stats()
    first = [s for s in stats if not s.pruned]
    assert len(first) == 2 and all(s.density == 1 for s in first)  # head + first conv dense
    assert all(abs(s.density - 0.2) < 0.02 for s in stats if s.pruned and s.numel > 100)


def test_cli_runs_one_trial(tmp_path, capsys):
    from vpns_core.cli import main
    args = ["--out", str(tmp_path)]
    for key, value in TINY.items():
        flag = "--" + key.replace("_", "-")
        args += [flag if value is not False else "--no-" + key.replace("_", "-")]
        if not isinstance(value, bool):
            args.append(str(value))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '"selected_test_acc"' in out and (tmp_path / CHECKPOINT).is_file()
    assert main(["--sparsity", "1.5"]) == 2
    assert "sparsity:" in capsys.readouterr().err


def test_cli_flags_and_progress_bar(tmp_path):
    import io
    from vpns_core.cli import build_parser, config_from_args, progress_bar
    parse = lambda *a: config_from_args(build_parser().parse_args(list(a)))  # noqa: E731
    assert parse("--channels-last", "false").channels_last is False
    assert parse("--channels-last", "none").channels_last is None
    assert parse("--label-mapping-samples", "none").label_mapping_samples is None
    assert progress_bar(io.StringIO()) is None  # not a terminal: quiet
    stream = io.StringIO()
    bar = progress_bar(stream, force=True)
    run_trial(tiny(), tmp_path, progress=bar)
    text = stream.getvalue()
    assert "mask epoch 1" in text and "tune epoch 1" in text and "4/4" in text and "images/s" in text


def test_export_loads_into_plain_torchvision_model(tmp_path):
    import torchvision
    cfg = tiny(model="resnet18", pretrained=False, mask_epochs=1, tune_epochs=1, max_steps_per_epoch=1,
               train_subset=64, num_threads=2)
    trial = Trial(cfg, tmp_path)
    trial.run()
    export = torch.load(tmp_path / "model_export.pt", weights_only=True)
    plain = torchvision.models.resnet18(num_classes=export["num_source_classes"])
    plain.load_state_dict(export["state_dict"])  # strict: same keys as torchvision's own
    plain.eval()
    trial.model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), trial.model(x), atol=1e-5)
    fc_mask = export["masks"].get("fc")
    assert fc_mask is None  # the head is excluded from pruning by default
    conv_mask = export["masks"]["layer1.0.conv1"]
    assert torch.all(plain.layer1[0].conv1.weight[~conv_mask] == 0)
