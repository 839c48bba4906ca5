"""The deployed form of a YOLOv5 model: BatchNorm folded into the convolutions, outputs and layout kept."""

import pytest
import torch

from tea_lightning.model.weights import build_model, inference_model
from tea_lightning.pruning import prune


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_inference_model_folds_batch_norms_and_keeps_outputs_and_layout(channels_last):
    model = build_model("yolov5n.yaml", nc=4)
    prune(model, torch.zeros(1, 3, 64, 64), 0.3)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics worth folding
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    if channels_last:
        model.model.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 96, 64)
    deployed = inference_model(model)  # as predict and benchmark call it: with gradients on
    with torch.no_grad():
        expected = model.eval()(x)[0]
        got = deployed(x)[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    assert all(p.grad_fn is None for p in deployed.parameters())  # plain tensors, no graph to the model's weights
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy: the model keeps its own
    convolutions = [m.weight for m in deployed.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convolutions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
