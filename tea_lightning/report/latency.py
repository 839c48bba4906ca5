"""Inference latency of a model, pruned or not: PyTorch eager and ONNX Runtime after an ONNX export that is checked
against PyTorch's output."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tea_lightning.model.weights import inference_model


# Share of all CPUs that other processes may keep busy before a latency figure is flagged as taken on a busy machine.
BUSY_CPU_SHARE = 0.25


def other_cpu_load(seconds: float = 0.5) -> float:
    """Return the share of all CPUs (0-1) kept busy over `seconds` while this process sleeps: other processes' load.

    PyTorch eager splits each layer over its threads and waits for the slowest, so with another job on the same
    cores its latency comes out many times too slow (10-100x measured on 2 cores) while ONNX Runtime suffers far
    less; figures taken then cannot be compared with figures taken on a quiet machine.
    """
    import psutil

    return psutil.cpu_percent(interval=seconds) / 100


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
