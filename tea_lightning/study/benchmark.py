"""`tea-lightning benchmark`: size, GFLOPs and CPU latency of a checkpoint (pruned or not) in PyTorch eager and in
ONNX Runtime, after an ONNX export checked against PyTorch's output."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from tea_lightning.errors import ConfigError
from tea_lightning.model.complexity import count_parameters, gflops
from tea_lightning.report.latency import BUSY_CPU_SHARE, Latency, export_onnx, onnx_latency, other_cpu_load, \
    torch_latency


def latencies(model: nn.Module, img_size: int, batches: list[int], onnx_path: Path | None, runs: int = 30,
              warmup: int = 5) -> tuple[list[Latency], float]:
    """Return PyTorch latencies for each batch size and, when `onnx_path` is given, ONNX Runtime's too (after
    exporting there and checking the export), all with torch's thread count; and the share of the CPUs that other
    processes kept busy just before (with a warning on stderr when it is over BUSY_CPU_SHARE)."""
    busy = other_cpu_load()
    if busy > BUSY_CPU_SHARE:
        print(f"Warning: other processes kept {busy:.0%} of the CPUs busy just before timing: PyTorch eager latency "
              "can come out many times too slow on a shared CPU. Time on a quiet machine (tea-lightning benchmark "
              "CKPT) to compare models.", file=sys.stderr)
    threads = torch.get_num_threads()
    results = [torch_latency(model, img_size, b, runs, warmup) for b in batches]
    if onnx_path is not None:
        export_onnx(model, onnx_path, img_size)
        results += [onnx_latency(onnx_path, img_size, b, threads, runs, warmup) for b in batches]
    return results, busy


def measure(model: nn.Module, img_size: int, onnx_path: Path | None, runs: int = 30, warmup: int = 5) -> dict:
    """Return params, GFLOPs, batch-1 latencies (ms; ONNX Runtime's None without `onnx_path`), the thread count, the
    other processes' CPU load when timed and, when exported, the ONNX file's size in MB: the figures a study
    compares models by."""
    timed, busy = latencies(model, img_size, [1], onnx_path, runs, warmup)
    found = {lat.backend: lat.median_ms for lat in timed}
    return {"params": count_parameters(model), "GFLOPs": gflops(model, img_size),
            "latency_pytorch_ms": found["pytorch"], "latency_onnxruntime_ms": found.get("onnxruntime"),
            "latency_threads": torch.get_num_threads(), "latency_cpu_busy": busy,
            "onnx_MB": onnx_path.stat().st_size / 1e6 if onnx_path is not None else None}


def benchmark_main(argv: list[str]) -> None:
    """Measure a checkpoint's batch-1 and batch-N CPU latency in PyTorch and ONNX Runtime (and export it to ONNX)."""
    from tea_lightning.model.weights import read_model_and_img_size, set_layer_memory_format

    parser = argparse.ArgumentParser(prog="tea-lightning benchmark", description=benchmark_main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="a tea-lightning .ckpt or a YOLOv5 .pt (official weights, or "
                        "what export-pt wrote), pruned or not")
    parser.add_argument("--img", type=int, default=None, help="image size (default: the checkpoint's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--runs", type=int, default=30,
                        help="timed runs per figure; the median is reported (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--onnx", type=Path, default=None, help="keep the verified ONNX export here")
    options = parser.parse_args(argv)
    if options.onnx is not None and options.onnx.is_dir():  # found now, not after minutes of timing
        raise ConfigError(f"--onnx {options.onnx} is a folder: give the path of the .onnx file to write, e.g. "
                          f"{options.onnx / (options.checkpoint.stem + '.onnx')}.")
    if options.runs < 1 or options.warmup < 0 or min(options.batch) < 1:
        raise ConfigError("--runs and --batch must be at least 1 and --warmup at least 0.")
    if options.threads:
        torch.set_num_threads(options.threads)
    # a tea-lightning .ckpt or a YOLOv5 .pt (official, export-pt)
    model, saved_img_size = read_model_and_img_size(options.checkpoint, "checkpoint")
    set_layer_memory_format(model, torch.channels_last)  # the layout predict runs in (--model.channels_last default)
    img = options.img or saved_img_size
    if img % 32:
        raise ConfigError(f"--img must be a multiple of 32, got {img}.")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = options.onnx or Path(tmp) / "model.onnx"
        results, _ = latencies(model, img, options.batch, onnx_path, options.runs, options.warmup)
    print(f"{options.checkpoint}: {count_parameters(model):,} parameters, "
          f"{gflops(model, img):.2f} GFLOPs at {img}x{img}; CPU, {torch.get_num_threads()} threads, "
          f"median of {options.runs} runs after {options.warmup} warm-up runs")
    print("| backend | batch | median ms | p90 ms | ms per image |\n|---|---|---|---|---|")
    for lat in results:
        print(f"| {lat.backend} | {lat.batch} | {lat.median_ms:.1f} | {lat.p90_ms:.1f} | "
              f"{lat.median_ms / lat.batch:.1f} |")
    if options.onnx:
        print(f"ONNX export (checked against PyTorch): {options.onnx}")
