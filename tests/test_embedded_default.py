"""The embedded default (ImageNet EfficientNet-Lite0 -> real Fashion-MNIST) does not collapse at 90%."""
import pytest

from vpns_core.config import Config
from vpns_core.train import run_trial


@pytest.mark.slow
def test_default_allocation_survives_90_percent(tmp_path):
    cfg = Config(sparsity=0.9, train_subset=1024, test_subset=500, mask_epochs=1, tune_epochs=1,
                 num_threads=2, measure_repeats=1, latency_batch=8)  # the cost record's timing: cheap
    assert cfg.model == "efficientnet_lite0" and cfg.dataset == "fashion_mnist" and cfg.allocation == "erk"
    result = run_trial(cfg, tmp_path)
    final = result.final
    assert final["sparsity"] == pytest.approx(0.9, abs=1e-4)
    # chance is 0.10; a global threshold collapses to it (MISSION.md). 16 steps per stage are
    # noisy: 0.27-0.31 measured on this CPU across code variants that agree to rounding, 0.18
    # when the thresholds went stale (fused optimizer steps unseen), 0.35-0.4 on other CPUs.
    assert final["selected_test_acc_prompt"] > 0.22, final
    assert final["train_loss"] < 0.8 * result.history[0]["train_loss"], result.history  # it learned
    assert final["min_layer_density"] > 0.01  # no layer pruned to (almost) nothing
