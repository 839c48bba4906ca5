#!/usr/bin/env bash
# GPU check: short fits of YOLOv5s at 640 (from scratch) on the tea-shoot data in fp32 (32-true), 16-mixed and
# bf16-mixed, at each batch size asked for, in one Python process. Prints per fit the training images/s (median of
# train/images_per_s over epochs >= 1), the share of that time spent waiting for the loader
# (train/data_wait_share), the images/s of the training step alone (the rest of the time), the peak GPU memory
# (torch.cuda.max_memory_allocated), and val/mAP50, val/mAP50-95 of the last epoch. Before the fits, a synthetic
# forward+backward+SGD step of the bare model (no data loader) gives the GPU's own ceiling per precision and batch.
# Everything runs as the fit does: channels-last layout (the Detector's default) and cudnn.benchmark on.
#
# Run from the repository root on a machine with a CUDA GPU:
#   bash scripts/gpu_check.sh
# Inputs (optional, environment): GPU_CHECK_DATA (default .gpu_data/tea_shoots/data.yaml), GPU_CHECK_EPOCHS (5),
# GPU_CHECK_BATCHES ("16 64"), GPU_CHECK_WORKERS (14), GPU_CHECK_PRECISIONS ("32-true 16-mixed bf16-mixed"),
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
BATCHES = [int(b) for b in os.environ.get("GPU_CHECK_BATCHES", "16 64").split()]
WORKERS = int(os.environ.get("GPU_CHECK_WORKERS", "14"))
PRECISIONS = os.environ.get("GPU_CHECK_PRECISIONS", "32-true 16-mixed bf16-mixed").split()
DTYPES = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
torch.backends.cudnn.benchmark = True  # as --trainer.benchmark true does for the fits

import pytorch_lightning, torchmetrics, torchvision  # noqa: E402
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision "
      f"{torchvision.__version__}, pytorch-lightning {pytorch_lightning.__version__}, torchmetrics "
      f"{torchmetrics.__version__}, GPU {torch.cuda.get_device_name(0)}, cudnn.allow_tf32 "
      f"{torch.backends.cudnn.allow_tf32}, matmul precision {torch.get_float32_matmul_precision()}", flush=True)

from tea_lightning.cli import cli_main  # noqa: E402
from tea_lightning.model import speed  # noqa: E402
from tea_lightning.model.detector import Detector  # noqa: E402

# Wait for the GPU at the end of every training batch, so that a batch's kernels are clocked with it and not with
# the wait for the next batch: train/data_wait_share then separates the loader from the model step.
_batch_end = speed.TrainingSpeed.on_train_batch_end


def _synchronised_batch_end(self, *args):
    torch.cuda.synchronize()
    _batch_end(self, *args)


speed.TrainingSpeed.on_train_batch_end = _synchronised_batch_end


def synthetic_step_bench(precision: str, batch: int, iters: int = 20) -> tuple[float, float]:
    """Images/s and peak GiB of the bare YOLOv5s (nc=4) forward + backward + SGD step on random 640 images, through
    the Detector's forward (its memory layout, no loader, loss or logging)."""
    dtype = DTYPES[precision]
    model = Detector(model_cfg="yolov5s.yaml", nc=4, img_size=640).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")
    x = torch.rand(batch, 3, 640, 640, device="cuda")

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
    ips = batch * iters / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, x
    gc.collect()
    torch.cuda.empty_cache()
    return ips, peak


bench = {}
for b in BATCHES:
    for p in PRECISIONS:
        try:
            bench[p, b] = synthetic_step_bench(p, b)
            print(f"synthetic step {p} batch {b}: {bench[p, b][0]:.0f} images/s, peak {bench[p, b][1]:.2f} GiB",
                  flush=True)
        except Exception:
            traceback.print_exc()
            bench[p, b] = None


def fnum(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def table(rows):
    lines = ["| precision | batch | images/s (median, epochs >= 1) | per-epoch images/s | loader wait share | "
             "step alone images/s | peak memory GiB | val mAP50 | val mAP50-95 | epochs | fit wall s | "
             "synthetic step images/s (no loader) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = bench.get((r["precision"], r["batch"]))
        lines.append(f"| {r['precision']} | {r['batch']} | {fnum(r['ips'], '.0f')} | {r['per_epoch']} | "
                     f"{fnum(r['wait'], '.2f')} | {fnum(r['step_ips'], '.0f')} | {fnum(r['peak'], '.2f')} | "
                     f"{fnum(r['map50'], '.4f')} | {fnum(r['map'], '.4f')} | {r['epochs']} | {r['wall']:.0f} | "
                     f"{fnum(b[0] if b else None, '.0f')} |")
    return "\n".join(lines)


def fit_args(precision: str, batch: int, root: str) -> list[str]:
    """Return the `tea-lightning fit` options every fit of this check shares: YOLOv5s at 640 on one GPU."""
    return ["fit", "--config", "configs/yolov5s.yaml", "--data.data_yaml", DATA, "--data.img_size", "640",
            "--data.batch_size", str(batch), "--data.workers", str(WORKERS), "--trainer.precision", precision,
            "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.benchmark", "true",
            "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false"]


def read_fit(metrics_csv: str, row: dict) -> None:
    """Fill the row from a fit's metrics.csv: speed over epochs >= 1 (epoch 0 starts the workers), last mAP."""
    with open(metrics_csv) as f:
        records = list(csv.DictReader(f))
    per_epoch = {int(float(r["epoch"])): (float(r["train/images_per_s"]), float(r["train/data_wait_share"]))
                 for r in records if r.get("train/images_per_s")}
    val = [r for r in records if r.get("val/mAP50")]
    row["per_epoch"] = " ".join(f"{per_epoch[e][0]:.0f}" for e in sorted(per_epoch))
    later = [v for e, v in per_epoch.items() if e >= 1]
    if later:
        row["ips"] = statistics.median(ips for ips, _ in later)
        row["wait"] = statistics.median(wait for _, wait in later)
        row["step_ips"] = statistics.median(ips / (1 - wait) for ips, wait in later if wait < 1)
    row["epochs"] = len(per_epoch)
    if val:
        row["map50"], row["map"] = float(val[-1]["val/mAP50"]), float(val[-1]["val/mAP50-95"])


rows = []
for b in BATCHES:
    for p in PRECISIONS:
        name = f"{p}_b{b}"
        args = [*fit_args(p, b, f"/tmp/gpu_check_runs/{name}"), "--trainer.max_epochs", str(EPOCHS),
                "--trainer.logger", "CSVLogger"]
        print(f"\n=== fit {p}, batch {b}: tea-lightning {' '.join(args)}", flush=True)
        row = {"precision": p, "batch": b, "ips": None, "wait": None, "step_ips": None, "per_epoch": "",
               "peak": None, "map50": None, "map": None, "epochs": 0, "wall": 0.0}
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        cli = None
        try:
            cli = cli_main(args)
        except BaseException as error:  # SystemExit from a bad option too: report it and go on with the next
            traceback.print_exc()
            print(f"fit {name} FAILED: {error!r}", flush=True)
        row["wall"] = time.perf_counter() - start
        row["peak"] = torch.cuda.max_memory_allocated() / 2**30
        if cli is not None:
            metrics_csv = os.path.join(cli.trainer.logger.log_dir, "metrics.csv")
            print(f"metrics: {metrics_csv}", flush=True)
            try:
                shutil.copy(metrics_csv, os.path.join(OUT, f"metrics_{name}.csv"))
                read_fit(metrics_csv, row)
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
by = {(r["precision"], r["batch"]): r for r in rows}
for b in BATCHES:
    fp32, amp = by.get(("32-true", b), {}), by.get(("16-mixed", b), {})
    for key, what in (("ips", "fit images/s"), ("step_ips", "training step alone images/s")):
        if fp32.get(key) and amp.get(key):
            ratio = amp[key] / fp32[key]
            print(f"batch {b}: 16-mixed / fp32 {what}: {ratio:.2f}x ({'>=' if ratio >= 1.5 else '<'} 1.5x)")
    b32, b16 = bench.get(("32-true", b)), bench.get(("16-mixed", b))
    if b32 and b16:
        print(f"batch {b}: synthetic step 16-mixed / fp32: {b16[0] / b32[0]:.2f}x")

# Where a training step's time goes (the first GPU run had 95 ms per batch-16 step against 29 ms for the bare model):
# a short fit per precision under torch.profiler, with each phase of the step marked, and per batch the GPU's kernel
# time beside the wall time, the synchronisations and the kernel launches.
import functools  # noqa: E402

import pytorch_lightning.core.optimizer as lightning_optimizer  # noqa: E402
import yolov5.utils.loss  # noqa: E402

from tea_lightning.model import detector as detector_module  # noqa: E402
from tea_lightning.model.recipe import ExponentialMovingAverage  # noqa: E402

PHASES = {"batch to device": (Detector, "transfer_batch_to_device"), "schedule": (detector_module, "apply_schedule"),
          "forward": (Detector, "forward"), "YOLOv5 loss": (yolov5.utils.loss.ComputeLoss, "__call__"),
          "finite check": (Detector, "_stop_unless_finite"), "backward": (Detector, "manual_backward"),
          "optimizer step (clip, scaler)": (lightning_optimizer.LightningOptimizer, "step"),
          "EMA update": (ExponentialMovingAverage, "on_train_batch_end")}


def _marked(original, label):
    @functools.wraps(original)
    def marked(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)
    return marked


for _label, (_owner, _name) in PHASES.items():
    setattr(_owner, _name, _marked(getattr(_owner, _name), f"step: {_label}"))

SKIP, ACTIVE = 10, 15  # batches before the profiled ones (workers start, cudnn searches), profiled batches
profiler, batch_ends = None, []


def _profiled_batch_end(self, *args):
    _synchronised_batch_end(self, *args)
    if profiler is not None:
        batch_ends.append(time.perf_counter())
        profiler.step()


speed.TrainingSpeed.on_train_batch_end = _profiled_batch_end


def profile_fit(precision: str, batch: int) -> None:
    """Print per batch: wall and GPU kernel time, synchronisations, copies and launches, and each phase's time."""
    global profiler
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    args = [*fit_args(precision, batch, f"/tmp/gpu_check_runs/profile_{precision}_b{batch}"),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(SKIP + ACTIVE + 1),
            "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--model.plots", "false"]
    print(f"\n=== profile {precision}, batch {batch}: tea-lightning {' '.join(args)}", flush=True)
    batch_ends.clear()
    # the profiler's step k runs from batch end k-1 to batch end k; steps SKIP .. SKIP+ACTIVE-1 are recorded
    with torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(
            wait=SKIP - 2, warmup=2, active=ACTIVE, repeat=1)) as prof:
        profiler = prof
        try:
            cli_main(args)
        finally:
            profiler = None
    wall_ms = (batch_ends[SKIP + ACTIVE - 1] - batch_ends[SKIP - 1]) / ACTIVE * 1e3
    events = prof.key_averages()
    by_key = {e.key: e for e in events}

    def per_batch(*keys):
        return sum(by_key[k].count for k in keys if k in by_key) / ACTIVE

    kernel_ms = sum(e.self_device_time_total for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA) / ACTIVE / 1e3
    print(f"{precision}, batch {batch}, per batch: {wall_ms:.1f} ms wall, {kernel_ms:.1f} ms of GPU kernels "
          f"(GPU busy {kernel_ms / wall_ms:.0%}), "
          f"{per_batch('cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize'):.1f} "
          f"synchronisations, {per_batch('cudaMemcpyAsync'):.1f} copies, "
          f"{per_batch('cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel', 'cuLaunchKernelEx'):.0f} "
          "kernel launches (the batch-end synchronisation is this script's)")
    print("| phase of the training step | CPU ms per batch | GPU ms per batch | calls per batch |\n|---|---|---|---|")
    for label in PHASES:
        e = by_key.get(f"step: {label}")
        if e is not None:
            print(f"| {label} | {e.cpu_time_total / ACTIVE / 1e3:.2f} | {e.device_time_total / ACTIVE / 1e3:.2f} | "
                  f"{e.count / ACTIVE:.2f} |")
    print(events.table(sort_by="self_cpu_time_total", row_limit=20), flush=True)


for p in [p for p in ("32-true", "16-mixed") if p in PRECISIONS]:
    try:
        profile_fit(p, BATCHES[0])
    except BaseException:  # the fits' figures above are already printed: report and go on
        traceback.print_exc()
EOF
python3 /tmp/gpu_check.py
} 2>&1 | tee "$OUT/log"
