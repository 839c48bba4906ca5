"""Run by test_callback.py: a 2-process DDP fit (gloo, CPU) that prunes at epoch 1 (Taylor, global); each rank saves
its weights and its optimizer-step count, and every checkpoint write is recorded with the rank that made it."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from pytorch_lightning import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tea_lightning.checkpoints import AtomicCheckpointIO  # noqa: E402
from tea_lightning.cli import cli_main  # noqa: E402
from tea_lightning.pruning.callback import ChannelPruning  # noqa: E402
from tests.conftest import FAST  # noqa: E402


class SaveWeights(Callback):
    def on_fit_end(self, trainer, pl_module):
        (pruning,) = [c for c in trainer.callbacks if isinstance(c, ChannelPruning)]
        # Parameters only: DDP broadcasts BatchNorm statistics at the start of each forward, so after the last
        # batch every rank holds the statistics of its own images.
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.named_parameters()}
        state["steps_done"] = torch.tensor(pruning.steps_done)
        state["optimizer_steps"] = torch.tensor(trainer.global_step)
        torch.save(state, Path(sys.argv[3]) / f"rank{trainer.global_rank}.pt")


class RecordedCheckpointIO(AtomicCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with open(Path(sys.argv[3]) / "writes.txt", "a") as f:
            f.write(f"{dist.get_rank()} {Path(path).name}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


if __name__ == "__main__":
    data, weights, out = sys.argv[1:4]
    # nominal batch 16 over 2 processes x 4 images: YOLOv5 accumulates 2 batches (4 on one process)
    cli_main(["fit", *FAST, "--data.data_yaml", data, "--model.weights", weights, "--trainer.max_epochs", "3",
              "--model.recipe.nominal_batch_size", "16", "--trainer.default_root_dir", out,
              "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
              "--trainer.plugins", '[{"class_path": "tests.pruning.ddp_prune.RecordedCheckpointIO"}]',
              "--trainer.callbacks+=tea_lightning.ChannelPruning",
              "--trainer.callbacks.pruning_ratio", "0.3", "--trainer.callbacks.schedule", "[1]",
              # Taylor importance reads the gradients of training batches, which differ between ranks; pruned
              # globally, different gradients would give different architectures
              "--trainer.callbacks.importance", "taylor", "--trainer.callbacks.global_pruning", "true",
              "--trainer.callbacks+=tests.pruning.ddp_prune.SaveWeights"])
