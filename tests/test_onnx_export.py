"""ONNX export of a trial's model, checked in onnxruntime on real test images (issue 29): the
weight-sparse model keeps its zeros, the channel-pruned one is the smaller network, and the
command refuses what it cannot do in one line."""
import json

import numpy as np
import onnx
import pytest
import torch

from vpns_core import onnx_export
from vpns_core.train import Trial

from conftest import tiny

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def weight_sparse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sparse")
    Trial(tiny(measure_repeats=0), folder).run()
    return folder


def test_a_weight_sparse_export_runs_in_onnxruntime_with_its_zeros(weight_sparse, tmp_path):
    check = onnx_export.export_onnx(weight_sparse / "model_export.pt", tmp_path / "m.onnx",
                                    n_images=64, batch=8, repeats=2)
    assert check["images"] == 64 and check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0
    state = torch.load(weight_sparse / "model_export.pt", weights_only=True)["state_dict"]
    params = [v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert check["nonzero_params"] == sum(int(torch.count_nonzero(v)) for v in params) < check["params"]
    graph = onnx.load(str(tmp_path / "m.onnx"))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    zeros = sum(int((w == 0).sum()) for w in weights.values() if w.ndim == 4)
    assert zeros > 0.5 * sum(w.size for w in weights.values() if w.ndim == 4)
    assert graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10  # target classes
    assert check["torch_latency_ms"] > 0 and check["onnxruntime_latency_ms"] > 0


def test_the_prompted_export_adds_the_learned_pad(weight_sparse, tmp_path):
    export = torch.load(weight_sparse / "model_export.pt", weights_only=True)
    plain = onnx_export.Deployed(export).eval()
    prompted = onnx_export.Deployed(export, with_prompt=True).eval()
    assert float((prompted.delta != 0).float().mean()) > 0  # the learned border
    x = onnx_export.test_images(export, 4)
    assert x.shape[-1] == export["input_size"] and prompted.size == export["output_size"]
    check = onnx_export.export_onnx(weight_sparse / "model_export.pt", tmp_path / "p.onnx", images=x,
                                    batch=4, repeats=1, with_prompt=True)
    assert check["max_abs_diff"] < 1e-4
    with torch.no_grad():
        assert not torch.allclose(plain(x), prompted(x))


def test_a_channel_pruned_export_is_the_smaller_network(tmp_path):
    Trial(tiny(method="depgraph", model="resnet18", sparsity=0.7, max_steps_per_epoch=1,
               measure_repeats=0), tmp_path / "t").run()
    assert onnx_export.main([str(tmp_path / "t"), "--images", "32", "--batch", "4", "--repeats", "1"]) == 0
    check = json.loads((tmp_path / "t" / "model_check.json").read_text())
    dense = sum(p.numel() for p in __import__("torchvision").models.resnet18().parameters())
    assert check["params"] < 0.5 * dense and check["max_abs_diff"] < 1e-3
    assert (tmp_path / "t" / "model.onnx").stat().st_size < 0.5 * dense * 4


def test_the_command_refuses_a_folder_without_an_export(tmp_path, capsys):
    assert onnx_export.main([str(tmp_path)]) == 2
    assert "no model_export.pt" in capsys.readouterr().err
