"""What would break a CUDA run, checked on the CPU: resume across devices and GPU counts."""
import pytest
import torch

from vpns_core import checkpoint
from vpns_core.checkpoint import load_scaler_state, rng_state, set_rng_state


def test_an_empty_scaler_state_is_skipped_not_loaded():
    # a CPU or bf16 checkpoint (scaler disabled: state {}) resumed under fp16 loss scaling
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError):
        scaler.load_state_dict({})  # what the trial did before
    load_scaler_state(scaler, {})
    assert scaler.get_scale() == 2.0 ** 16  # a fresh scale
    load_scaler_state(scaler, {"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000, "_growth_tracker": 0})
    assert scaler.get_scale() == 8.0


class FakeCuda:
    """torch.cuda's generator calls on a machine whose visible GPUs are ``count``."""

    def __init__(self, count):
        self.count, self.set_calls = count, []

    def get_rng_state(self, device):
        assert device.index < self.count
        return torch.full((16,), device.index, dtype=torch.uint8)

    def set_rng_state(self, state, device):
        if device.index >= self.count:
            raise RuntimeError(f"invalid device ordinal {device.index}")
        self.set_calls.append((int(state[0]), device.index))


def test_rng_state_saves_and_restores_only_the_trial_device(monkeypatch):
    saved_on = FakeCuda(count=4)
    monkeypatch.setattr(checkpoint.torch.cuda, "get_rng_state", saved_on.get_rng_state)
    state = rng_state("cuda:3")
    assert int(state["cuda"][0]) == 3 and state["cuda"].shape == (16,)  # one device's state
    resumed_on = FakeCuda(count=1)  # resumed where one GPU is visible
    monkeypatch.setattr(checkpoint.torch.cuda, "set_rng_state", resumed_on.set_rng_state)
    set_rng_state(state, "cuda:0")
    assert resumed_on.set_calls == [(3, 0)]
    set_rng_state(state, "cpu")  # a GPU checkpoint resumed on the CPU drops the CUDA state
    assert resumed_on.set_calls == [(3, 0)]
    # checkpoints of earlier versions saved every visible GPU: the trial device's entry is used
    old = {**state, "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]}
    set_rng_state(old, "cuda:0")
    assert resumed_on.set_calls[-1] == (0, 0)
    cpu_state = rng_state("cpu")  # a CPU checkpoint resumed on a GPU: no CUDA state to set
    assert "cuda" not in cpu_state
    set_rng_state(cpu_state, "cuda:0")
    assert len(resumed_on.set_calls) == 2


def test_trials_sharing_a_gpu_get_their_share_of_its_memory(monkeypatch):
    from sweeps.placement import cap_gpu_memory
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", calls.append)
    assert cap_gpu_memory(0.5, "cuda") == 0.5 and calls == [0.5]
    assert cap_gpu_memory(1.0, "cuda") is None  # a whole GPU: no cap
    assert cap_gpu_memory(0.25, "cpu") is None
    assert calls == [0.5]


def test_loading_workers_fit_in_the_reserved_cpus():
    import argparse
    from sweeps.flags import runtime_fields
    args = argparse.Namespace(cpus_per_trial=4.0, gpus_per_trial=1.0)
    assert runtime_fields(args, preset_workers=4)["num_workers"] == 3  # 3 + the training process
    assert runtime_fields(args, preset_workers=2)["num_workers"] == 2
    assert runtime_fields(argparse.Namespace(cpus_per_trial=1.0, gpus_per_trial=0.0), 4)["num_workers"] == 0


def _bip_trial(tmp_path, scaler):
    from test_methods import tiny
    from vpns_core.train import Trial
    trial = Trial(tiny(method="bip", tune_epochs=0, mask_lr=0.1), tmp_path)
    if scaler is not None:
        trial.loop.scaler = scaler  # the fp16 path's loss scaling, run on the CPU
    return trial


def test_bip_follows_fp16_loss_scaling(tmp_path):
    """BiP takes its own gradients (autograd.grad), so it must scale the loss itself: with a
    power-of-two scale the result equals the unscaled run; an overflow skips the iteration and
    backs the scale off instead of writing inf into the weights."""
    plain = _bip_trial(tmp_path / "plain", None)
    plain.run()
    scaled = _bip_trial(tmp_path / "scaled", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    scaled.run()
    for (name, a), (_, b) in zip(plain.net.layers, scaled.net.layers):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.weight_mask, b.weight_mask), name
    overflow = _bip_trial(tmp_path / "overflow", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    poisoned = []

    def overflow_once(module, args, out):  # the first backward pass overflows, as fp16 can
        if torch.is_grad_enabled() and not poisoned:
            poisoned.append(True)
            out.register_hook(lambda grad: grad * float("inf"))
        return None
    head = dict(overflow.model.named_modules())[overflow.head_name]
    head.register_forward_hook(overflow_once)
    overflow.run()
    assert poisoned and overflow.scaler.get_scale() == 2.0 ** 9  # backed off once
    for name, m in overflow.net.layers:
        assert torch.isfinite(m.weight).all(), name
    assert overflow.history[-1]["grad_steps"] == 7  # 4 iterations x 2 steps, one lower step skipped


def test_data_held_on_the_device_trains_exactly_as_the_loader(tmp_path):
    """data_on_device (the default on CUDA for in-memory datasets) serves the same batches in
    the same order as the DataLoader, resized in batches: a whole trial gives the same numbers."""
    from conftest import TINY
    from vpns_core.config import Config
    from vpns_core.data import DeviceBatches
    from vpns_core.train import Trial, run_trial
    cfg = Config(**{**TINY, "method": "vpns", "mask_epochs": 1, "tune_epochs": 1, "test_every_epoch": True})
    held = Trial(cfg.replace(data_on_device=True), tmp_path / "probe")
    gen = lambda: torch.Generator().manual_seed(3)
    device_batches = list(held.feed.loader(held.data.train, train=True, generator=gen()))
    assert isinstance(held.feed.loader(held.data.train, train=True), DeviceBatches)
    plain = Trial(cfg.replace(data_on_device=False), tmp_path / "probe2")
    loader_batches = list(plain.feed.loader(plain.data.train, train=True, generator=gen()))
    assert len(device_batches) == len(loader_batches) > 1
    for (a, ya), (b, yb) in zip(device_batches, loader_batches):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    on = run_trial(cfg.replace(data_on_device=True), tmp_path / "on")
    off = run_trial(cfg.replace(data_on_device=False), tmp_path / "off")
    for a, b in zip(on.history, off.history):
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    assert on.final["selected_test_acc"] == off.final["selected_test_acc"]


def test_cifar_is_held_as_one_tensor_not_per_image_pil(tmp_path):
    import numpy as np
    from vpns_core.data import TensorImages, _raw

    class FakeCifar(torch.utils.data.Dataset):  # torchvision's CIFAR keeps .data and .targets
        data = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
        targets = [0, 1, 2, 0, 1, 2]
        classes = ["a", "b", "c"]
    raw = _raw([FakeCifar()])
    assert isinstance(raw.source, TensorImages) and raw.source.images.shape == (6, 3, 32, 32)
    assert torch.equal(raw.source.images[1].permute(1, 2, 0), torch.from_numpy(FakeCifar.data[1]))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (VPNS_TEST_CUDA=1)")


@pytest.mark.cuda
@cuda
def test_cuda_threshold_from_sort_equals_kthvalue_on_the_cpu():
    from vpns_core.masking import kth_smallest_abs
    torch.manual_seed(0)
    scores = [torch.randn(3_000_000), torch.randn(64, 3, 7, 7).round(decimals=1)]
    k = int(0.9 * sum(s.numel() for s in scores))
    on_gpu = kth_smallest_abs([s.cuda() for s in scores], k)
    assert on_gpu.device.type == "cuda" and on_gpu.item() == kth_smallest_abs(scores, k).item()


@pytest.mark.cuda
@cuda
def test_cuda_device_batches_match_the_loader(tmp_path):
    from conftest import TINY
    from vpns_core.config import Config
    from vpns_core.data import DeviceBatches
    from vpns_core.train import Trial
    cfg = Config(**{**TINY, "device": "cuda"})
    trial = Trial(cfg, tmp_path / "t")
    loader = trial.loader(trial.data.train, train=True, generator=torch.Generator().manual_seed(1))
    assert isinstance(loader, DeviceBatches)  # the default on CUDA
    plain = Trial(cfg.replace(data_on_device=False), tmp_path / "p")
    reference = plain.feed.loader(plain.data.train, train=True, generator=torch.Generator().manual_seed(1))
    for (x, y), (xr, yr) in zip(loader, reference):
        assert x.is_cuda and torch.equal(y.cpu(), yr)
        assert (x.cpu().int() - xr.int()).abs().max() <= 1  # GPU and CPU resize round alike


def test_a_sweep_takes_one_gpu_per_trial_where_there_is_one_unless_told(monkeypatch):
    """Issue 29: on a machine with an NVIDIA GPU a sweep's trials use it (one GPU each) unless
    --gpus-per-trial (or $VPNS_GPUS_PER_TRIAL) says otherwise; without one nothing changes. The
    first line of the sweep says where its trials train."""
    from sweeps import gpus
    from sweeps.flags import build_parser, resolve_gpus_per_trial, runtime_fields, trials_on

    def resolved(*flags):
        args = build_parser("ablation_pad", None, "grid", "fifo", 8).parse_args(list(flags))
        resolve_gpus_per_trial(args)
        return args

    monkeypatch.delenv("VPNS_GPUS_PER_TRIAL", raising=False)
    monkeypatch.setattr(gpus, "local_gpus", lambda: 0)  # a machine without one
    args = resolved()
    assert args.gpus_per_trial == 0 and runtime_fields(args)["device"] == "cpu"
    assert trials_on(args) == "trials on cpu"
    monkeypatch.setattr(gpus, "local_gpus", lambda: 1)  # a machine with a GPU
    args = resolved()
    assert args.gpus_per_trial == 1 and runtime_fields(args)["device"] == "cuda"
    assert trials_on(args) == "trials on cuda (1 GPU each)"
    assert trials_on(resolved("--gpus-per-trial", "0.5")) == "trials on cuda (0.5 GPU each)"  # packed
    assert resolved("--gpus-per-trial", "0.5").gpus_per_trial == 0.5
    assert trials_on(resolved("--gpus-per-trial", "0")) == "trials on cpu"  # told not to
    assert trials_on(resolved("--workers-per-trial", "2")) == "trials on cuda (2 workers of 1 GPU each)"
    assert trials_on(resolved("--set", "device=auto")).startswith("trials on cuda where usable, else cpu")
    assert resolved("--address", "auto").gpus_per_trial == 0  # a cluster's trials run on its nodes
    monkeypatch.setenv("VPNS_GPUS_PER_TRIAL", "0")
    assert resolved().gpus_per_trial == 0


def test_the_gpu_count_is_the_one_a_local_ray_declares(monkeypatch):
    """NVML's count, at most as many as CUDA_VISIBLE_DEVICES lists (what Ray does)."""
    from sweeps import gpus
    assert gpus._nvml_device_count() >= 0  # also where there is no NVIDIA driver (0)
    monkeypatch.setattr(gpus, "_nvml_device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpus.local_gpus() == 4
    for visible, count in (("", 0), ("NoDevFiles", 0), ("1", 1), ("0,2", 2), ("0,1,2,3,4,5", 4)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpus.local_gpus() == count, visible
    monkeypatch.setattr(gpus, "_nvml_device_count", lambda: 0)  # no NVIDIA driver
    assert gpus.local_gpus() == 0
