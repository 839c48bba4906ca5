"""Latency measurement and ONNX export of pruned and unpruned models."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tea_lightning.model.weights import build_model, inference_model
from tea_lightning.pruning import prune
from tea_lightning.report.latency import export_onnx, onnx_latency, torch_latency


@pytest.mark.parametrize("ratio", [None, 0.3])
def test_onnx_export_of_a_pruned_model_matches_pytorch_at_any_batch(tmp_path, ratio):
    model = build_model("yolov5n.yaml", nc=4)
    if ratio:
        prune(model, torch.zeros(1, 3, 64, 64), ratio)
    path = export_onnx(model, tmp_path / "m.onnx", img_size=64)
    x = torch.rand(3, 3, 64, 64)  # another batch size than the export's
    with torch.no_grad():
        expected = inference_model(model)(x)[0].numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert got.shape == expected.shape == (3, 3 * (8 * 8 + 4 * 4 + 2 * 2), 9)  # 3 anchors on 3 grids, 4 + 5 values
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_inference_model_folds_batch_norms_and_keeps_outputs_and_layout(channels_last):
    model = build_model("yolov5n.yaml", nc=4)
    prune(model, torch.zeros(1, 3, 64, 64), 0.3)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics worth folding
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    if channels_last:
        model.model.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        expected = model.eval()(x)[0]
        deployed = inference_model(model)
        got = deployed(x)[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy: the model keeps its own
    convolutions = [m.weight for m in deployed.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convolutions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_latency_reports_median_of_the_runs(tmp_path):
    model = build_model("yolov5n.yaml", nc=4)
    eager = torch_latency(model, 64, batch=2, runs=5, warmup=1)
    onnx = onnx_latency(export_onnx(model, tmp_path / "m.onnx", 64), 64, batch=2, threads=1, runs=5, warmup=1)
    for latency in (eager, onnx):
        assert latency.runs == 5 and latency.batch == 2 and 0 < latency.median_ms <= latency.p90_ms
    assert onnx.backend == "onnxruntime" and onnx.threads == 1
