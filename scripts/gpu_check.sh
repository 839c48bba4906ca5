#!/usr/bin/env bash
# GPU check: a short fit of YOLOv5s at 640 (from scratch) on the tea-shoot data in fp32 (32-true), 16-mixed and
# bf16-mixed, in one Python process. Prints per precision the training images/s (median of train/images_per_s over
# epochs >= 1), the peak GPU memory (torch.cuda.max_memory_allocated), and val/mAP50, val/mAP50-95 of the last
# epoch; before the fits, a synthetic forward+backward+SGD step benchmark of the bare model (no data loader) gives
# the GPU's own ceiling per precision.
#
# Run from the repository root on a machine with a CUDA GPU:
#   bash scripts/gpu_check.sh
# Inputs (optional, environment): GPU_CHECK_DATA (default .gpu_data/tea_shoots/data.yaml), GPU_CHECK_EPOCHS (5),
# GPU_CHECK_BATCH (16), GPU_CHECK_WORKERS (12), GPU_CHECK_PRECISIONS ("32-true 16-mixed bf16-mixed"),
# OUT (where the log, results.md and the metrics.csv files go; default gpu_check_out).
# Missing Python packages may be carried as wheels in .whl/ (installed with --no-deps into /tmp/site); .whl/opt/
# holds setuptools, installed only if `import pkg_resources` (needed by yolov5 7.0.14) fails there.
set -o pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"

{
set -e
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    if ! python3 -c "import pkg_resources" 2>/dev/null && compgen -G ".whl/opt/setuptools-*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/opt/setuptools-*.whl
    fi
fi
set +e
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 YOLO_OFFLINE=1
export TEA_LIGHTNING_CACHE=/tmp/tea_lightning_cache
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc

cat > /tmp/gpu_check.py <<'EOF'
import csv, gc, os, shutil, statistics, sys, time, traceback

import torch

OUT = os.environ["OUT"]
DATA = os.environ.get("GPU_CHECK_DATA", ".gpu_data/tea_shoots/data.yaml")
EPOCHS = int(os.environ.get("GPU_CHECK_EPOCHS", "5"))
BATCH = int(os.environ.get("GPU_CHECK_BATCH", "16"))
WORKERS = int(os.environ.get("GPU_CHECK_WORKERS", "12"))
PRECISIONS = os.environ.get("GPU_CHECK_PRECISIONS", "32-true 16-mixed bf16-mixed").split()
DTYPES = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}

import pytorch_lightning, torchmetrics, torchvision  # noqa: E402
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision "
      f"{torchvision.__version__}, pytorch-lightning {pytorch_lightning.__version__}, torchmetrics "
      f"{torchmetrics.__version__}, GPU {torch.cuda.get_device_name(0)}, cudnn.benchmark "
      f"{torch.backends.cudnn.benchmark}, cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}, "
      f"matmul precision {torch.get_float32_matmul_precision()}", flush=True)

from tea_lightning.cli import cli_main  # noqa: E402
from tea_lightning.model.weights import build_model  # noqa: E402


def synthetic_step_bench(precision: str, iters: int = 20) -> tuple[float, float]:
    """Images/s and peak GiB of the bare YOLOv5s (nc=4) forward + backward + SGD step on random 640 images."""
    dtype = DTYPES[precision]
    model = build_model("yolov5s.yaml", 4).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")
    x = torch.rand(BATCH, 3, 640, 640, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(t.float().mean() for t in model(x))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    ips = BATCH * iters / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, x
    gc.collect()
    torch.cuda.empty_cache()
    return ips, peak


bench = {}
for p in PRECISIONS:
    try:
        bench[p] = synthetic_step_bench(p)
        print(f"synthetic step {p}: {bench[p][0]:.0f} images/s, peak {bench[p][1]:.2f} GiB", flush=True)
    except Exception:
        traceback.print_exc()
        bench[p] = None


def fnum(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def table(rows):
    lines = ["| precision | images/s (median, epochs >= 1) | per-epoch images/s | peak memory GiB | val mAP50 | "
             "val mAP50-95 | epochs | fit wall s | synthetic step images/s (no loader) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = bench.get(r["precision"])
        lines.append(f"| {r['precision']} | {fnum(r['ips'], '.0f')} | {r['per_epoch']} | {fnum(r['peak'], '.2f')} | "
                     f"{fnum(r['map50'], '.4f')} | {fnum(r['map'], '.4f')} | {r['epochs']} | {r['wall']:.0f} | "
                     f"{fnum(b[0] if b else None, '.0f')} |")
    return "\n".join(lines)


rows = []
for p in PRECISIONS:
    args = ["fit", "--config", "configs/yolov5s.yaml", "--data.data_yaml", DATA, "--data.img_size", "640",
            "--data.batch_size", str(BATCH), "--data.workers", str(WORKERS), "--trainer.max_epochs", str(EPOCHS),
            "--trainer.precision", p, "--trainer.accelerator", "gpu", "--trainer.devices", "1",
            "--trainer.logger", "CSVLogger", "--trainer.default_root_dir", f"/tmp/gpu_check_runs/{p}",
            "--trainer.enable_progress_bar", "false"]
    print(f"\n=== fit {p}: tea-lightning {' '.join(args)}", flush=True)
    row = {"precision": p, "ips": None, "per_epoch": "", "peak": None, "map50": None, "map": None, "epochs": 0,
           "wall": 0.0}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli = None
    try:
        cli = cli_main(args)
    except BaseException as error:  # SystemExit from a bad option too: report it and go on with the next
        traceback.print_exc()
        print(f"fit {p} FAILED: {error!r}", flush=True)
    row["wall"] = time.perf_counter() - start
    row["peak"] = torch.cuda.max_memory_allocated() / 2**30
    if cli is not None:
        metrics_csv = os.path.join(cli.trainer.logger.log_dir, "metrics.csv")
        print(f"metrics: {metrics_csv}", flush=True)
        try:
            shutil.copy(metrics_csv, os.path.join(OUT, f"metrics_{p}.csv"))
            with open(metrics_csv) as f:
                records = list(csv.DictReader(f))
            speed = {int(float(r["epoch"])): float(r["train/images_per_s"])
                     for r in records if r.get("train/images_per_s")}
            val = [r for r in records if r.get("val/mAP50")]
            row["per_epoch"] = " ".join(f"{speed[e]:.0f}" for e in sorted(speed))
            later = [v for e, v in speed.items() if e >= 1]
            row["ips"] = statistics.median(later) if later else None
            row["epochs"] = len(speed)
            if val:
                row["map50"], row["map"] = float(val[-1]["val/mAP50"]), float(val[-1]["val/mAP50-95"])
        except Exception:
            traceback.print_exc()
    rows.append(row)
    del cli
    gc.collect()
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(table(rows) + "\n")
    print(table(rows), flush=True)

print("\n## GPU check results\n")
print(table(rows))
by = {r["precision"]: r for r in rows}
if by.get("32-true", {}).get("ips") and by.get("16-mixed", {}).get("ips"):
    ratio = by["16-mixed"]["ips"] / by["32-true"]["ips"]
    print(f"\n16-mixed / fp32 images/s: {ratio:.2f}x ({'>=' if ratio >= 1.5 else '<'} 1.5x)")
b32, b16 = bench.get("32-true"), bench.get("16-mixed")
if b32 and b16:
    print(f"synthetic step 16-mixed / fp32: {b16[0] / b32[0]:.2f}x")
EOF
python3 /tmp/gpu_check.py
} 2>&1 | tee "$OUT/log"
