#!/bin/bash
# Multi-node DDP training under SLURM: one task per GPU; Lightning reads SLURM's variables for ranks and addresses.
#   sbatch scripts/slurm_fit.sh [more tea-lightning fit options]      (from the repository's folder)
# Each job writes under runs/slurm/<job id> (ROOT=... to choose). Two minutes before the time limit SLURM sends
# SIGUSR1: every process stops after the same batch, hpc_ckpt_<n>.ckpt is written in that folder and the job is
# requeued; the requeued job (same job id, same folder, same W&B run) resumes from it on its own. A preemption's
# SIGTERM writes hpc_ckpt_<n>.ckpt too, for SLURM's own requeue (--requeue). Another job never takes it by itself:
# continue a run in a new job with ROOT=<its folder> ... --ckpt_path <its hpc_ckpt_<n>.ckpt>.
#SBATCH --job-name=tea-lightning
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
ROOT=${ROOT:-runs/slurm/$SLURM_JOB_ID}
srun .venv/bin/tea-lightning fit --config configs/yolov5s.yaml --config configs/data/tea_shoots.yaml \
    --config configs/ddp.yaml --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
    --trainer.default_root_dir "$ROOT" --trainer.logger.init_args.id "slurm-$SLURM_JOB_ID" \
    --trainer.logger.init_args.resume allow "$@"
