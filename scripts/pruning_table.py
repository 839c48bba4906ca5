"""The pruning study as one table: for each pruning ratio, size, GFLOPs, CPU latency (batch 1, PyTorch eager and
ONNX Runtime), mAP right after one-shot pruning and after fine-tuning, next to the baseline trained as long.

    python scripts/pruning_table.py --baseline runs/parity_train/ours/version_0/checkpoints/best.ckpt \
        --data ../shared/data/tea_shoots/data.yaml --img 416 --ratios 0.1 0.3 0.5 0.7 \
        --finetune-ratios 0.3 0.5 --finetune-epochs 10 --out runs/pruning

`--importance taylor --distill` gives the recipe the shipped configs/prune/*.yaml recommend (Taylor importance, the
baseline as the teacher while fine-tuning); `--seed` repeats the fine-tuning runs with another seed.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tea_lightning.cli import cli_main  # noqa: E402
from tea_lightning.study.benchmark import measure  # noqa: E402
from tea_lightning.study.sweep import prune_flags  # noqa: E402

COMMON = ["--config", str(ROOT / "configs" / "yolov5n.yaml"), "--trainer.logger", "CSVLogger",
          "--trainer.enable_progress_bar", "false"]


def validate(data: Path, img: int, out: Path, *extra: str) -> tuple[dict, object]:
    """Return mAP50, mAP50-95 of a validate run, and its model."""
    cli = cli_main(["validate", *COMMON, "--data.data_yaml", str(data), "--data.img_size", str(img),
                    "--trainer.default_root_dir", str(out), *extra])
    metrics = cli.trainer.callback_metrics
    return {"mAP50": float(metrics["val/mAP50"]), "mAP50-95": float(metrics["val/mAP50-95"])}, cli.model.model


def finetune(options: argparse.Namespace, out: Path, *extra: str) -> dict:
    """Return the re-validated best checkpoint's mAP of a fit that starts from the baseline's weights."""
    fit = cli_main(["fit", *COMMON, "--data.data_yaml", str(options.data), "--data.img_size", str(options.img),
                    "--data.batch_size", str(options.batch), "--model.weights", str(options.baseline),
                    "--trainer.max_epochs", str(options.finetune_epochs), "--seed_everything", str(options.seed),
                    "--trainer.default_root_dir", str(out), *extra])
    best = fit.trainer.checkpoint_callback.best_model_path
    return validate(options.data, options.img, out / "check", "--ckpt_path", best)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a trained tea-lightning .ckpt")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--img", type=int, default=416)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    parser.add_argument("--finetune-ratios", type=float, nargs="*", default=[0.3])
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--importance", default="l2", help="ChannelPruning's criterion (l2, taylor, ...)")
    parser.add_argument("--distill", action="store_true",
                        help="distil from the baseline while fine-tuning the pruned models (--model.teacher)")
    parser.add_argument("--seed", type=int, default=0, help="--seed_everything of the fine-tuning runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "pruning")
    options = parser.parse_args()
    weights = ["--model.weights", str(options.baseline)]
    teacher = ["--model.teacher", str(options.baseline)] if options.distill else []
    rows = []
    base_map, base_model = validate(options.data, options.img, options.out / "base", *weights)
    base = {**measure(base_model, options.img, options.out / "base.onnx"), "pruned": base_map}
    if options.finetune_ratios:
        base["finetuned"] = finetune(options, options.out / "base_more")
    rows.append(("baseline", base))
    for ratio in options.ratios:
        flags = prune_flags(ratio, options.importance)
        pruned_map, model = validate(options.data, options.img, options.out / f"p{ratio}", *weights, *flags)
        row = {**measure(model, options.img, options.out / f"p{ratio}.onnx"), "pruned": pruned_map}
        if ratio in options.finetune_ratios:
            row["finetuned"] = finetune(options, options.out / f"ft{ratio}", *flags, *teacher)
        rows.append((f"{ratio:.1f}", row))
    print(f"{datetime.date.today()}, {torch.get_num_threads()} threads, image size {options.img}, "
          f"{options.importance} importance{', distilled from the baseline' if options.distill else ''}, "
          f"fine-tuning {options.finetune_epochs} epochs with seed {options.seed} "
          f"(baseline: {options.finetune_epochs} more epochs)")
    print("| pruning ratio | params | GFLOPs | PyTorch ms (b1) | ONNX Runtime ms (b1) | mAP50 / mAP50-95 after "
          "pruning | after fine-tuning |\n|---|---|---|---|---|---|---|")
    b = rows[0][1]
    for name, r in rows:
        tuned = r.get("finetuned")
        costs = [f"{r[key]:{fmt}} ({r[key] / b[key] - 1:+.0%})" for key, fmt in (
            ("params", ","), ("GFLOPs", ".2f"), ("latency_pytorch_ms", ".1f"), ("latency_onnxruntime_ms", ".1f"))]
        print(f"| {name} | {' | '.join(costs)} | {r['pruned']['mAP50']:.4f} / {r['pruned']['mAP50-95']:.4f} | "
              + (f"{tuned['mAP50']:.4f} / {tuned['mAP50-95']:.4f} |" if tuned else "- |"))


if __name__ == "__main__":
    main()
