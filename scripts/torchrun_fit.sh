#!/bin/bash
# DDP training started by torchrun (one process per GPU), on one node or, run once per node, on several:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=4 scripts/torchrun_fit.sh [more tea-lightning fit options]
# Lightning recognises torchrun's environment; it does not start processes of its own. Without GPUs (to try it), give
# GPUS=2 (processes) and --trainer.accelerator cpu.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # .venv and configs/ are found there, from any working folder
if [ -z "${GPUS:-}" ]; then
    if ! command -v nvidia-smi > /dev/null; then
        echo "error: nvidia-smi not found: give the number of processes per node, e.g. GPUS=2 (on CPU also" \
             "--trainer.accelerator cpu)." >&2
        exit 2
    fi
    GPUS=$(nvidia-smi -L | wc -l)
fi
NNODES=${NNODES:-1}
"$REPO/.venv/bin/torchrun" --nnodes "$NNODES" --nproc_per_node "$GPUS" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" -m tea_lightning.cli fit \
    --config "$REPO/configs/yolov5s.yaml" --config "$REPO/configs/data/tea_shoots.yaml" \
    --config "$REPO/configs/ddp.yaml" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS" "$@"
