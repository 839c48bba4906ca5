"""Latency measurement and ONNX export of pruned and unpruned models."""

import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tea_lightning.model.weights import build_model, inference_model
from tea_lightning.pruning import prune
from tea_lightning.report.latency import BUSY_CPU_SHARE, export_onnx, onnx_latency, other_cpu_load, torch_latency
from tea_lightning.study.benchmark import latencies


@pytest.fixture
def busy_cpus():
    """Keep every CPU busy with a spinning process while the test runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    time.sleep(0.5)  # let them start
    yield
    for spinner in spinners:
        spinner.kill()
        spinner.wait()


def test_other_processes_load_is_seen_and_latency_timed_under_it_comes_with_a_warning(busy_cpus, capsys):
    assert other_cpu_load() > 0.6
    model = build_model("yolov5n.yaml", nc=4)
    timed, busy = latencies(model, 64, [1], None, runs=2, warmup=0)
    assert busy > BUSY_CPU_SHARE and [lat.backend for lat in timed] == ["pytorch"]
    assert f"Warning: other processes kept {busy:.0%} of the CPUs busy just before timing" in capsys.readouterr().err


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


def test_latency_reports_median_of_the_runs(tmp_path):
    model = build_model("yolov5n.yaml", nc=4)
    eager = torch_latency(model, 64, batch=2, runs=5, warmup=1)
    onnx = onnx_latency(export_onnx(model, tmp_path / "m.onnx", 64), 64, batch=2, threads=1, runs=5, warmup=1)
    for latency in (eager, onnx):
        assert latency.runs == 5 and latency.batch == 2 and 0 < latency.median_ms <= latency.p90_ms
    assert onnx.backend == "onnxruntime" and onnx.threads == 1
