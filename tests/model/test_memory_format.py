"""The channels-last memory layout: the same outputs as PyTorch's default NCHW, in the layout it promises."""

import torch
from torch import nn

from tea_lightning.model.detector import Detector


def convolutions_are_channels_last(model: nn.Module) -> bool:
    """Return whether every convolution with a spatial kernel holds its weight channels-last (for 1x1 kernels the
    two layouts are the same memory)."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    return bool(convolutions) and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                                      for m in convolutions)


def test_channels_last_model_gives_the_outputs_of_the_default_layout():
    torch.manual_seed(0)
    default = Detector(nc=4, img_size=128, channels_last=False).eval()
    channels_last = Detector(nc=4, img_size=128, channels_last=True).eval()
    channels_last.load_state_dict(default.state_dict())
    assert convolutions_are_channels_last(channels_last.model)
    assert not convolutions_are_channels_last(default.model)
    images = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8)  # not square: YOLOv5's rect batches
    with torch.no_grad():
        expected, got = default(images)[0], channels_last(images)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
