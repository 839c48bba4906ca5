"""Inference latency of a model, pruned or not: PyTorch eager and ONNX Runtime after an ONNX export that is checked
against PyTorch's output."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tea_lightning.model.weights import quiet_yolov5, set_layer_memory_format


@dataclass
class Latency:
    """Median and spread of repeated timed runs, in milliseconds."""

    backend: str
    batch: int
    median_ms: float
    p90_ms: float
    runs: int
    threads: int


def _time(run, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _summary(backend: str, batch: int, times: list[float], threads: int) -> Latency:
    return Latency(backend, batch, statistics.median(times), float(np.percentile(times, 90)), len(times), threads)


def inference_model(model: nn.Module) -> nn.Module:
    """Return an eval-mode float32 copy of a YOLOv5 model as it is deployed: each BatchNorm folded into the
    convolution before it (YOLOv5's `fuse`, as its detect.py and export.py do), the layers in the memory layout they
    had, and a Detect head that returns only the (B, N, 5 + nc) predictions."""
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(model).float().eval()
    set_layer_memory_format(model, torch.contiguous_format)  # YOLOv5's folding views weights as (out, in*k*k)
    with quiet_yolov5():
        model.fuse()
    if channels_last:
        set_layer_memory_format(model, torch.channels_last)
    model.model[-1].export = True  # YOLOv5's switch: skip the per-level raw outputs
    return model


@torch.no_grad()
def torch_latency(model: nn.Module, img_size: int, batch: int, runs: int = 30, warmup: int = 5) -> Latency:
    """Return PyTorch eager latency of one batch on the CPU."""
    x = torch.zeros(batch, 3, img_size, img_size)
    model = inference_model(model)
    return _summary("pytorch", batch, _time(lambda: model(x), runs, warmup), torch.get_num_threads())


def export_onnx(model: nn.Module, path: Path, img_size: int, atol: float = 1e-3) -> Path:
    """Write the model as ONNX (dynamic batch) and check that ONNX Runtime's output matches PyTorch's within
    `atol` (relative to the output's scale); return the path."""
    import onnxruntime as ort

    model = inference_model(model)
    x = torch.rand(2, 3, img_size, img_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["predictions"],
                      dynamic_axes={"images": {0: "batch"}, "predictions": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    with torch.no_grad():
        expected = model(x)[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    error = np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max()))
    if error > atol:
        raise RuntimeError(f"ONNX export {path} differs from PyTorch by {error:.2e} (relative), more than {atol}.")
    return path


def onnx_latency(path: Path, img_size: int, batch: int, threads: int, runs: int = 30, warmup: int = 5) -> Latency:
    """Return ONNX Runtime latency of one batch on the CPU with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.zeros((batch, 3, img_size, img_size), np.float32)
    return _summary("onnxruntime", batch, _time(lambda: session.run(None, {"images": x}), runs, warmup), threads)
