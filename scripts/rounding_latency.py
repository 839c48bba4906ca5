"""Batch-1 CPU latency of a YOLOv5 model pruned at one or more ratios with several channel roundings (`round_to`),
in its deployed form (BatchNorm folded) in PyTorch eager and ONNX Runtime, the models interleaved so that a
machine's drift touches them alike. Weights stay untrained: they do not change the arithmetic.

    python scripts/rounding_latency.py --model yolov5n.yaml --nc 4 --img 416 --ratio 0.3 --round-to 8 16 32
    python scripts/rounding_latency.py --ratio 0.3 0.32 --round-to 8 16   # every ratio with every rounding

Prints a Markdown table for docs/benchmarks.md (medians per pass, change of the mean against the unpruned model).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tea_lightning.model.complexity import count_parameters, gflops  # noqa: E402
from tea_lightning.model.weights import build_model  # noqa: E402
from tea_lightning.pruning import prune  # noqa: E402
from tea_lightning.report.latency import export_onnx, onnx_latency, torch_latency  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="yolov5n.yaml", help="YOLOv5 model yaml")
    parser.add_argument("--nc", type=int, default=4, help="classes of the head (tea_shoots: 4)")
    parser.add_argument("--img", type=int, default=416)
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.3])
    parser.add_argument("--round-to", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--passes", type=int, default=3, help="times every model is timed, interleaved")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per figure (median)")
    options = parser.parse_args()

    torch.manual_seed(0)
    baseline = build_model(options.model, options.nc)
    models = {"baseline": baseline}
    for ratio in options.ratio:
        for round_to in options.round_to:
            pruned = copy.deepcopy(baseline)
            prune(pruned, torch.zeros(1, 3, options.img, options.img), ratio, round_to=round_to)
            models[f"{ratio} / {round_to}"] = pruned
    folder = Path(tempfile.mkdtemp())
    onnx = {name: export_onnx(model, folder / f"model{i}.onnx", options.img)
            for i, (name, model) in enumerate(models.items())}
    for model in models.values():  # the layout tea-lightning trains and deploys in
        model.model.to(memory_format=torch.channels_last)
    threads = torch.get_num_threads()

    def medians(name: str, runs: int) -> tuple[float, float]:
        return (torch_latency(models[name], options.img, 1, runs).median_ms,
                onnx_latency(onnx[name], options.img, 1, threads, runs).median_ms)

    for name in models:  # an untimed pass first: a process's first timings ran slow on this machine
        medians(name, options.runs)
    times = {name: [] for name in models}
    for _ in range(options.passes):
        for name in models:
            times[name].append(medians(name, options.runs))

    def cell(name: str, backend: int) -> str:
        values = [t[backend] for t in times[name]]
        text = "; ".join(f"{v:.1f}" for v in values)
        if name == "baseline":
            return text
        base = statistics.mean(t[backend] for t in times["baseline"])
        return f"{text} ({statistics.mean(values) / base - 1:+.0%})"

    base_params, base_gflops = count_parameters(baseline), gflops(baseline, options.img)
    print(f"{options.model}, {options.img}x{options.img}, batch 1, "
          f"{threads} threads, median of {options.runs} runs, {options.passes} interleaved passes")
    print("| ratio / round_to | params | GFLOPs | PyTorch eager ms | ONNX Runtime ms |\n|---|---|---|---|---|")
    for name, model in models.items():
        params, flops = count_parameters(model), gflops(model, options.img)
        size = f"{params:,} ({params / base_params - 1:+.0%}) | {flops:.2f} ({flops / base_gflops - 1:+.1%})"
        print(f"| {name} | {size} | {cell(name, 0)} | {cell(name, 1)} |")


if __name__ == "__main__":
    main()
